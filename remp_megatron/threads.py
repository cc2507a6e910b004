"""How many CPU threads a step's kernels use: chosen per step from measured step times.

More threads are not always faster here. A decode step of a few sequences is a chain of small,
memory-bound GEMMs and many tiny ops; with two threads every one of them is a parallel region
that waits for the slower thread, and on a shared VM whose vCPUs are stolen for milliseconds at a
time that wait is the step's time. Measured on this project's 2-vCPU VM, SmolLM2 fp32, steps
alternating 1 and 2 threads in one process (docs/benchmarks.md): 2 threads took 1.4-1.5x as
long as 1 at 1 sequence, 1.2-1.8x at 4-16, and 0.9-1.2x at 32-64 depending on the hour; at
another hour one thread was as fast as two at 1 sequence and two 27 % faster at 32. No fixed
count is right, so each rank picks its own per step size: mostly the count with the lowest
recent time per token, and now and then another, to follow the machine as it changes.
"""
from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field

import torch

_WINDOW = 3  # recent steps per (size, count) whose median decides: one stolen step does not
_EXPLORE_EVERY = 16  # steps of a size between tries of a count that is not the best (<= ~3 % lost)


@dataclass
class ThreadChooser:
    """``choose(tokens)`` names the thread count for a step of ``tokens`` tokens, ``record``
    takes its measured time. Steps are grouped by size in powers of two of their tokens."""

    candidates: tuple[int, ...]  # counts to choose from (powers_of_two)
    # (size, threads) -> seconds per token of the recent steps; size -> steps chosen so far
    _seconds_per_token: dict[tuple[int, int], collections.deque] = field(default_factory=dict, init=False)
    _steps: collections.Counter = field(default_factory=collections.Counter, init=False)

    def choose(self, tokens: int) -> int:
        size = tokens.bit_length()
        n = self._steps[size]
        self._steps[size] += 1
        untried = [t for t in self.candidates if (size, t) not in self._seconds_per_token]
        if untried:  # the most first: a size seen once (one prompt's prefill) runs as configured
            return untried[-1]
        best = min(self.candidates, key=lambda t: statistics.median(self._seconds_per_token[size, t]))
        others = [t for t in self.candidates if t != best]
        if others and n % _EXPLORE_EVERY == 0:
            return others[(n // _EXPLORE_EVERY) % len(others)]
        return best

    def record(self, tokens: int, threads: int, seconds: float) -> None:
        recent = self._seconds_per_token.setdefault(
            (tokens.bit_length(), threads), collections.deque(maxlen=_WINDOW))
        recent.append(seconds / tokens)


def powers_of_two(most: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to and including ``most``."""
    return tuple(1 << i for i in range(most.bit_length()) if 1 << i < most) + (most,)


_budget: int | None = None


def budget() -> int:
    """This process's thread count as configured (OMP_NUM_THREADS, ``torch.set_num_threads``)
    when a model runner first asked: the most a step uses. Remembered, because the count set for
    the last step is what ``torch.get_num_threads`` says afterwards."""
    global _budget
    if _budget is None:
        _budget = torch.get_num_threads()
    return _budget
