"""Continuous-batching scheduler (pure; rank 0 only).

Each step: every running sequence continues (one decode token, or the next chunk of its
prefill), then waiting sequences are admitted FIFO while the token budget, the batch limit
and the free blocks allow. When a running sequence needs a block and none is free, the
newest running sequence is preempted: its blocks are freed and it goes back to the front of
the queue to be recomputed (prompt + output so far), never dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Optional

from .kv_cache import BlockAllocator
from .request import Sequence, SequenceState, Status


@dataclass(frozen=True)
class KVMove:
    """Which live KV blocks a switch keeps, and the block id each one gets in the new cache.
    Planned by the scheduler before the switch; applied to its block tables after the commit."""

    old_ids: list[int]  # live physical blocks at the old topology, in compact order
    new_ids: list[int]  # the physical block each one becomes at the new topology
    new_num_blocks: int
    dropped: list[str]  # requests whose KV does not fit: preempted for recompute after commit
    staged: frozenset[int] = frozenset()  # old ids already copied to the same id in the target's pre-staged cache

    @property
    def renumbered(self) -> bool:
        return self.old_ids != self.new_ids


def plan_kv_move(live: list[tuple[str, list[int]]], new_num_blocks: int,
                 staged: frozenset[int] = frozenset()) -> KVMove:
    """``live``: (request id, block table) of running requests, oldest first. Keeps block ids
    when they all fit the new cache, else renumbers them densely in sorted order; drops the
    newest requests whose blocks do not fit at all. ``staged`` blocks (copied ahead under
    their own id) stay out of the move only while ids are kept."""
    kept, dropped, used = [], [], 0
    for rid, table in live:
        if used + len(table) <= new_num_blocks:
            kept.append(table)
            used += len(table)
        else:
            dropped.append(rid)
    old = [b for t in kept for b in t]
    if all(b < new_num_blocks for b in old):
        return KVMove(old, list(old), new_num_blocks, dropped, staged.intersection(old))
    rank = {b: i for i, b in enumerate(sorted(old))}
    return KVMove(old, [rank[b] for b in old], new_num_blocks, dropped)


class QueueFull(RuntimeError):
    pass


class RequestTooLong(ValueError):
    pass


def check_fits(prompt_len: int, max_new_tokens: int, max_model_len: int, block_size: int, num_blocks: int) -> None:
    """Raise RequestTooLong for a request that can never run: beyond the model's context, or more
    KV blocks than the whole cache has."""
    total = prompt_len + max_new_tokens
    if total > max_model_len:
        raise RequestTooLong(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {total} "
                             f"exceeds the model context of {max_model_len} tokens")
    blocks = -(-total // block_size)
    if blocks > num_blocks:
        raise RequestTooLong(f"{total} tokens need {blocks} KV blocks; the cache has {num_blocks} in all")


@dataclass(frozen=True)
class Load:
    """The engine's load at one instant (what the policy, metrics and status read)."""

    queued: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 32
    max_tokens_per_step: int = 256  # prefill chunking budget (decode tokens count too)
    max_queue: Optional[int] = 256  # None: unbounded (the engine core's front end bounds it)
    max_model_len: int = 2048


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    start: int  # first position computed this step
    n: int  # tokens computed this step
    sample: bool  # this chunk ends at the last token: sample the next one


@dataclass(frozen=True)
class StepPlan:
    """What every rank executes for one step (sent over the control group; small)."""

    token_ids: list[int]  # new tokens of all sequences, packed
    starts: list[int]
    query_lens: list[int]
    block_tables: list[list[int]]
    sample: list[bool]
    all_logits: bool = False  # logits for every packed row (parity checks), not just sampled ones

    @classmethod
    def of(cls, scheduled: list[Scheduled]) -> "StepPlan":
        return cls(
            token_ids=[t for s in scheduled for t in s.seq.tokens[s.start : s.start + s.n]],
            starts=[s.start for s in scheduled],
            query_lens=[s.n for s in scheduled],
            block_tables=[list(s.seq.block_table) for s in scheduled],
            sample=[s.sample for s in scheduled],
        )

    @property
    def num_seqs(self) -> int:
        return len(self.starts)

    def logit_rows(self) -> list[int]:
        """Packed row of each sampled sequence's last token (or every row with all_logits)."""
        if self.all_logits:
            return list(range(len(self.token_ids)))
        rows, end = [], 0
        for n, s in zip(self.query_lens, self.sample):
            end += n
            if s:
                rows.append(end - 1)
        return rows

    def microbatches(self, k: int) -> list["StepPlan"]:
        """Split into <= k contiguous groups of sequences with balanced token counts."""
        k = max(1, min(k, self.num_seqs))
        total, bounds, acc = sum(self.query_lens), [0], 0
        for i, n in enumerate(self.query_lens):
            acc += n
            if len(bounds) < k and acc >= total * len(bounds) / k and i + 1 < self.num_seqs:
                bounds.append(i + 1)
        bounds.append(self.num_seqs)
        offs = [0]
        for n in self.query_lens:
            offs.append(offs[-1] + n)
        return [
            StepPlan(
                self.token_ids[offs[a] : offs[b]],
                self.starts[a:b],
                self.query_lens[a:b],
                self.block_tables[a:b],
                self.sample[a:b],
                self.all_logits,
            )
            for a, b in zip(bounds, bounds[1:])
            if b > a
        ]


class Scheduler:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.alloc = BlockAllocator(cfg.num_blocks, cfg.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.admit = True  # False while draining for a reconfiguration: queued requests wait
        # Blocks whose KV was copied ahead into a pre-staged cache (under the same id). A block
        # leaves the set when it is freed: until then it holds the same tokens (full blocks are
        # never written again).
        self.kv_staged: set[int] = set()

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Reject what can never run, or what finds the queue full; raises RequestTooLong / QueueFull."""
        check_fits(prompt_len, max_new_tokens, self.cfg.max_model_len, self.cfg.block_size, self.cfg.num_blocks)
        if self.cfg.max_queue is not None and len(self.waiting) >= self.cfg.max_queue:
            raise QueueFull(f"admission queue full ({self.cfg.max_queue} waiting)")

    def add(self, seq: Sequence) -> None:
        self.check(len(seq.prompt), seq.params.max_new_tokens)
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget = self.cfg.max_tokens_per_step
        out: list[Scheduled] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._reserve(seq, seq.num_computed + n):
                self._preempt(self.running[-1])
                if seq.status is not Status.RUNNING:
                    break
            if seq.status is Status.RUNNING:
                out.append(Scheduled(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
                budget -= n
        while self.admit and self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens, budget)
            if not self._reserve(seq, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, 0, n, n == seq.num_tokens))
            budget -= n
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or cancelled) and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def plan_kv_move(self, new_num_blocks: int) -> KVMove:
        """How the running sequences' KV (oldest first) maps onto a cache of ``new_num_blocks``."""
        return plan_kv_move([(s.request_id, list(s.block_table)) for s in self.running], new_num_blocks,
                            frozenset(self.kv_staged))

    def full_blocks(self) -> list[int]:
        """The running sequences' blocks whose every slot is computed (their KV is final)."""
        return [b for s in self.running for b in s.block_table[: s.num_computed // self.cfg.block_size]]

    def preempt_all(self) -> None:
        """Send every running sequence back to the queue for recompute (newest ends up last)."""
        for seq in reversed(list(self.running)):
            self._preempt(seq)

    def apply_kv_move(self, move: KVMove) -> None:
        """Adopt the new topology's KV cache after a committed switch: block ids renumbered as
        migrated; requests whose KV was not migrated go back to the queue for recompute."""
        remap = dict(zip(move.old_ids, move.new_ids))
        for seq in reversed(list(self.running)):
            if seq.request_id in move.dropped:
                seq.block_table = []  # not freed: the old cache is gone
                self._preempt(seq)
            else:
                seq.block_table = [remap[b] for b in seq.block_table]
        self.cfg = replace(self.cfg, num_blocks=move.new_num_blocks)
        self.alloc = BlockAllocator(move.new_num_blocks, self.cfg.block_size, frozenset(move.new_ids))
        self.kv_staged.clear()

    def states(self) -> list[SequenceState]:
        return [
            SequenceState(s.request_id, s.status.name.lower(), list(s.prompt), list(s.output), s.num_computed,
                          list(s.block_table), s.seed, s.params)
            for s in [*self.running, *self.waiting]
        ]

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.alloc.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.alloc.num_free:
            return False
        if need > 0:
            seq.block_table += self.alloc.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.alloc.free(seq.block_table)
        self.kv_staged.difference_update(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
