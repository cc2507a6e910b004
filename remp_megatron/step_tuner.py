"""Pick, per step size, the fastest of a few equivalent ways to run a step, from measured step times.

Which GEMM is faster for decode-sized batches depends on the CPU (linear.py): oneDNN's packed
weights beat MKL's row-major GEMM at every batch size on the machine linear.py was tuned on (AMD
EPYC; SmolLM2's 120 layer GEMMs at 1 row 27 vs 41 ms) and lose at one row on another of this
project's machines (Intel Xeon with AMX: fp32 decode step of 1 sequence 48.8 vs 40.0 ms, while
winning at 8 and 32 sequences). So each rank measures: per step size (tokens, in powers of two)
the median time per token of its last 3 steps on each way; the fastest runs, another is tried
every 16th step of that size (a few % at worst), and the choice follows the machine if it
changes. The ways differ in summation order only (fp32 rounding), so which one ran can differ
from run to run.
"""
from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field
from typing import Hashable

_WINDOW = 3  # recent steps per (size, way) whose median decides: one stolen step does not
_EXPLORE_EVERY = 16  # steps of a size between tries of a way that is not the best


@dataclass
class StepTuner:
    """``choose(tokens)`` names the way to run a step of ``tokens`` tokens, ``record`` takes its
    measured time. Each way is tried once first, in the order given."""

    ways: tuple[Hashable, ...]
    # (size, way) -> seconds per token of the recent steps; size -> steps chosen so far
    _seconds_per_token: dict[tuple[int, Hashable], collections.deque] = field(default_factory=dict, init=False)
    _steps: collections.Counter = field(default_factory=collections.Counter, init=False)

    def choose(self, tokens: int) -> Hashable:
        size = tokens.bit_length()
        n = self._steps[size]
        self._steps[size] += 1
        untried = [w for w in self.ways if (size, w) not in self._seconds_per_token]
        if untried:
            return untried[0]
        best = min(self.ways, key=lambda w: statistics.median(self._seconds_per_token[size, w]))
        others = [w for w in self.ways if w != best]
        if others and n % _EXPLORE_EVERY == 0:
            return others[(n // _EXPLORE_EVERY) % len(others)]
        return best

    def record(self, tokens: int, way: Hashable, seconds: float) -> None:
        recent = self._seconds_per_token.setdefault((tokens.bit_length(), way), collections.deque(maxlen=_WINDOW))
        recent.append(seconds / tokens)
