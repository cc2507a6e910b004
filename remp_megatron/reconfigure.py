"""Live TP×PP reconfiguration on every rank: build → plan → move weights → move KV → apply →
commit, with rollback before the commit point.

Every rank runs the same phases on the same ``ReconfigureOrder`` (sent by rank 0 at a step
boundary). After each phase the ranks vote over the control group; one failed vote (an
exception, or a phase past its deadline) rolls every rank back: the old model, KV cache and
process groups were only read, never changed, so rollback is dropping the new ones and
re-activating the old snapshot. Communication starts only after a successful vote, so a rank
that fails in its local work never leaves a peer waiting in a receive.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import groups
from .kv_cache import KVCache
from .layout import plan_transfers
from .model import build_stage_model
from .model_runner import ModelRunner
from .reshard import (KV_KEY, MoveStats, copy_local, gather_layout, kv_layout, kv_region, run_rounds,
                      weight_regions)
from .spec import ModelSpec
from .topology import Topology

log = logging.getLogger("remp.reconfigure")

PHASES = ("validate", "build", "plan", "move_weights", "move_kv", "apply", "commit")
MODES = ("migrate", "recompute", "drain")


@dataclass(frozen=True)
class KVMove:
    """Which live blocks move, and where (decided by rank 0; pure)."""

    old_ids: list[int]  # live physical blocks at the old topology, in compact order
    new_ids: list[int]  # the physical block each one becomes at the new topology
    new_num_blocks: int
    dropped: list[str]  # requests whose KV does not fit: preempted for recompute after commit

    @classmethod
    def plan(cls, live: list[tuple[str, list[int]]], new_num_blocks: int) -> "KVMove":
        """``live``: (request id, block table) of running requests, oldest first. Keeps block ids
        when they fit the new cache, else renumbers them in sorted order; drops the newest
        requests whose blocks do not fit at all."""
        kept, dropped, used = [], [], 0
        for rid, table in live:
            if used + len(table) <= new_num_blocks:
                kept.append(table)
                used += len(table)
            else:
                dropped.append(rid)
        old = [b for t in kept for b in t]
        if all(b < new_num_blocks for b in old):
            new = list(old)
        else:
            rank = {b: i for i, b in enumerate(sorted(old))}
            new = [rank[b] for b in old]
        return cls(old, new, new_num_blocks, dropped)


@dataclass(frozen=True)
class Fault:
    """Test hook: make ``rank`` fail at the start of ``phase`` (an error, or a stall past the
    phase deadline)."""

    phase: str
    rank: int
    kind: str = "error"  # "error" | "stall"


@dataclass(frozen=True)
class ReconfigureOrder:
    target: Topology
    mode: str
    kv: KVMove
    block_size: int
    bucket_bytes: int = 16 * 2**20
    phase_timeout_s: float = 120.0
    fault: Optional[Fault] = None
    weights_only: bool = False  # a pre-staging order: build, plan and copy the new weights only
    prestage_budget_bytes: int = 0  # pre-staging refuses a new shard larger than this


@dataclass
class Timeline:
    source: str
    target: str
    mode: str
    phases: dict[str, float] = field(default_factory=dict)
    weights_moved: int = 0
    weights_kept: int = 0
    kv_moved: int = 0
    kv_kept: int = 0
    kv_blocks: int = 0  # live blocks migrated
    bytes_sent: int = 0  # measured, all ranks (equals weights_moved + kv_moved)
    bytes_sent_in_pause: int = 0  # of which during this call (not pre-staged)
    peak_extra_bytes: int = 0  # max over ranks: new shard + new KV + largest buckets in flight
    resources: dict[str, int] = field(default_factory=dict)  # after commit, max over ranks (leak watch)
    committed: bool = False
    prestaged: bool = False  # weights were moved before the pause; the phases above exclude them
    failed_phase: Optional[str] = None
    error: Optional[str] = None

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


class RolledBack(RuntimeError):
    def __init__(self, timeline: Timeline):
        super().__init__(f"reconfiguration {timeline.source} -> {timeline.target} rolled back in phase "
                         f"'{timeline.failed_phase}': {timeline.error}")
        self.timeline = timeline


def process_resources() -> dict[str, int]:
    """What a leaking switch would grow: process groups, threads, open fds (this process)."""
    import os

    from torch.distributed import distributed_c10d as c10d

    def count(d: str) -> int:  # OS-level: gloo's threads and sockets are native
        return len(os.listdir(d)) if os.path.isdir(d) else 0

    return {"process_groups": len(c10d._world.pg_map), "threads": count("/proc/self/task"),
            "fds": count("/proc/self/fd")}


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


class Worker:
    """Every rank's serving state at its current topology, and the means to change it."""

    def __init__(self, spec: ModelSpec, topo: Topology, runner: Optional[ModelRunner], rank: int, world: int,
                 device: torch.device, control_group):
        self.spec, self.topo, self.runner = spec, topo, runner
        self.rank, self.world, self.device, self.group = rank, world, device, control_group
        # Pre-staged new weights: {"target", "new" (phase state), "rounds" left to run}.
        self.staged: Optional[dict] = None

    def reconfigure(self, order: ReconfigureOrder, progress: Optional[Callable[[str, Timeline], None]] = None
                    ) -> Timeline:
        """Collective. Returns the (identical on every rank) timeline; raises RolledBack.
        Uses the pre-staged weights if they are complete and for this target. ``progress`` is
        called after each completed phase (rank 0 streams it to the operator)."""
        staged, self.staged = self.staged, None
        new: dict = {}
        tl = Timeline(str(self.topo), str(order.target), order.mode)
        if staged is not None and staged["target"] == order.target and not staged["rounds"]:
            new, tl.prestaged = staged["new"], True
        self._run_phases(PHASES, order, new, tl, progress)
        tl.committed = True
        log.info("reconfigured %s -> %s (%s%s) in %.3fs", tl.source, tl.target, tl.mode,
                 ", prestaged" if tl.prestaged else "", tl.seconds)
        return tl

    def prestage(self, order: ReconfigureOrder) -> Timeline:
        """Collective: build the target's weight shards and plan their move while the current
        topology keeps serving; local copies happen now, remote rounds via prestage_rounds()."""
        self.staged = None
        new: dict = {}
        tl = Timeline(str(self.topo), str(order.target), "prestage")
        self._run_phases(("validate", "build", "plan"), order, new, tl)
        new["wstats"] = MoveStats()
        with torch.no_grad():
            copy_local(new["wplan"], self.rank, new["old_regions"], new["regions"], order.bucket_bytes, new["wstats"])
        rounds = list(new["wplan"].rounds(self.world, order.bucket_bytes))
        self.staged = {"target": order.target, "new": new, "rounds": rounds}
        return tl

    def prestage_rounds(self, n: int) -> bool:
        """Collective: run the next ``n`` pre-staging rounds; True when staging is complete."""
        st = self.staged
        todo, st["rounds"] = st["rounds"][:n], st["rounds"][n:]
        with torch.no_grad():
            run_rounds(todo, self.rank, st["new"]["old_regions"], st["new"]["regions"], self.device,
                       self.spec.torch_dtype, st["new"]["wstats"])
        return not st["rounds"]

    def _run_phases(self, phases, order: ReconfigureOrder, new: dict, tl: Timeline, progress=None) -> None:
        """Each phase has a local part (where faults are injected and most errors happen), then
        a vote, then a communication part that runs only if every rank's local part succeeded.
        An error in a communication part is carried into the next vote."""
        carried = None
        for phase in phases:
            t0 = time.perf_counter()
            error = carried
            if error is None:
                error = self._attempt(lambda: self._local(phase, order, new, tl), order, t0)
            failed = self._vote(error)
            if failed:
                tl.phases[phase] = time.perf_counter() - t0
                tl.failed_phase, tl.error = phase, failed
                self._rollback(new)
                raise RolledBack(tl)
            carried = self._attempt(lambda: self._comm(phase, order, new, tl), order, t0)
            tl.phases[phase] = time.perf_counter() - t0
            if progress is not None:
                progress(phase, tl)
        if carried:  # the commit's own communication failed after every vote passed
            raise RuntimeError(f"reconfiguration failed after its commit point: {carried}")

    def _vote(self, error: Optional[str]) -> Optional[str]:
        """Collective: None if every rank succeeded, else the first rank's error. A one-int
        all-reduce in the common case; error texts are gathered only when someone failed."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not flag.item():
            return None
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=self.group)
        return next(e for e in errors if e)

    def _attempt(self, fn, order: ReconfigureOrder, t0: float) -> Optional[str]:
        try:
            fn()
            if time.perf_counter() - t0 > order.phase_timeout_s:
                raise TimeoutError(f"phase took longer than {order.phase_timeout_s}s")
        except Exception as e:  # any failure on any rank becomes a rollback on all ranks
            log.warning("reconfigure failed on rank %d: %s", self.rank, e)
            return f"rank {self.rank}: {type(e).__name__}: {e}"
        return None

    def _local(self, phase: str, order: ReconfigureOrder, new: dict, tl: Timeline) -> None:
        f = order.fault
        if f is not None and f.phase == phase and f.rank == self.rank:
            if f.kind == "stall":
                time.sleep(order.phase_timeout_s + 0.5)
            else:
                raise RuntimeError(f"injected fault in phase '{phase}'")
        step = getattr(self, f"_{phase}_local", None)
        if step is not None:
            step(order, new, tl)

    def _comm(self, phase: str, order: ReconfigureOrder, new: dict, tl: Timeline) -> None:
        step = getattr(self, f"_{phase}_comm", None)
        if step is not None:
            step(order, new, tl)

    # ---- phases: local parts (no communication) and communication parts -----------------
    def _validate_local(self, order, new, tl) -> None:
        if order.mode not in MODES:
            raise ValueError(f"mode {order.mode!r} not in {MODES}")
        order.target.validate(self.spec, self.world)

    def _validate_comm(self, order, new, tl) -> None:
        groups.ensure(order.target)  # first use of a topology creates its groups (collective)

    def _build_local(self, order, new, tl) -> None:
        coords = order.target.coords(self.rank)
        if coords is not None and not order.weights_only:
            new["kv"] = KVCache.allocate(self.spec, order.target, coords[0], order.kv.new_num_blocks,
                                         order.block_size, self.device)
        if "shards" in new:  # pre-staged
            return
        groups.activate(order.target)
        try:
            if coords is not None:
                new["model"] = build_stage_model(self.spec, order.target, coords[0], self.device)
                if order.weights_only and _nbytes(new["model"]) > order.prestage_budget_bytes:
                    raise MemoryError(f"new shard of {_nbytes(new['model'])} B exceeds the pre-staging budget "
                                      f"of {order.prestage_budget_bytes} B")
            # megatron's sharded_state_dict reads ranks from parallel_state: call it under the
            # snapshot its model was built for.
            new["shards"], new["regions"] = weight_regions(new.get("model"), self.rank)
        finally:
            groups.activate(self.topo)

    def _plan_local(self, order, new, tl) -> None:
        if "wplan" not in new:
            new["old_shards"], new["old_regions"] = weight_regions(self.runner.model if self.runner else None,
                                                                   self.rank)

    def _plan_comm(self, order, new, tl) -> None:
        elem = torch.tensor([], dtype=self.spec.torch_dtype).element_size()
        if "wplan" not in new:
            old_layout = gather_layout(new["old_shards"], self.group)
            new_layout = gather_layout(new["shards"], self.group)
            new["wplan"] = plan_transfers(old_layout, new_layout, dict.fromkeys(new_layout, elem))
        tl.weights_moved, tl.weights_kept = new["wplan"].bytes_moved, new["wplan"].bytes_kept
        if order.weights_only:
            return
        kv = order.kv
        n_live = len(kv.old_ids)
        old_kv, new_kv = (kv_layout(self.spec, t, n_live, order.block_size) for t in (self.topo, order.target))
        new["kvplan"] = plan_transfers(old_kv, new_kv, {KV_KEY: elem})
        new["kv_src"] = kv_region(self.runner.kv.buffer, old_kv, self.rank, kv.old_ids) if self.runner else {}
        new["kv_dst"] = kv_region(new["kv"].buffer, new_kv, self.rank, kv.new_ids) if "kv" in new else {}
        tl.kv_moved, tl.kv_kept, tl.kv_blocks = new["kvplan"].bytes_moved, new["kvplan"].bytes_kept, n_live

    def _move_weights_comm(self, order, new, tl) -> None:
        if "wstats" not in new:  # else pre-staged
            new["wstats"] = self._execute(new["wplan"], new["old_regions"], new["regions"], order)

    def _move_kv_comm(self, order, new, tl) -> None:
        new["kvstats"] = self._execute(new["kvplan"], new["kv_src"], new["kv_dst"], order)

    def _apply_local(self, order, new, tl) -> None:
        groups.activate(order.target)
        new["runner"] = (ModelRunner(self.spec, order.target, self.rank, new["model"], new["kv"], self.device)
                         if "model" in new else None)

    def _commit_local(self, order, new, tl) -> None:
        ws, ks = new["wstats"], new["kvstats"]
        kv_bytes = new["kv"].buffer.numel() * new["kv"].buffer.element_size() if "kv" in new else 0
        new["sent"] = [ws.bytes_sent + ks.bytes_sent, ks.bytes_sent + (0 if tl.prestaged else ws.bytes_sent)]
        new["extra"] = _nbytes(new.get("model")) + kv_bytes + max(ws.peak_bucket_bytes, ks.peak_bucket_bytes)

    def _commit_comm(self, order, new, tl) -> None:
        # The old model and KV are freed here by refcount (megatron modules hold no cycles);
        # a gc.collect() would cost ~0.25 s of pause for nothing.
        self.runner, self.topo = new.pop("runner"), order.target
        sent = torch.tensor(new["sent"], dtype=torch.float64)
        dist.all_reduce(sent, group=self.group)
        peak = torch.tensor([new["extra"], *process_resources().values()], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
        tl.bytes_sent, tl.bytes_sent_in_pause = map(int, sent.tolist())
        tl.peak_extra_bytes = int(peak[0].item())
        tl.resources = dict(zip(process_resources(), map(int, peak[1:].tolist())))
        new.clear()

    # ---- helpers ------------------------------------------------------------------------
    def _execute(self, plan, src, dst, order) -> MoveStats:
        stats = MoveStats()
        with torch.no_grad():
            copy_local(plan, self.rank, src, dst, order.bucket_bytes, stats)
            run_rounds(list(plan.rounds(self.world, order.bucket_bytes)), self.rank, src, dst, self.device,
                       self.spec.torch_dtype, stats)
        return stats

    def _rollback(self, new: dict) -> None:
        groups.activate(self.topo)
        new.clear()
