"""Live TP×PP reconfiguration on every rank: validate → build → plan → move weights → move KV
→ apply → commit, with rollback before the commit point.

Every rank runs the same phases for the same order (sent by rank 0 at a step boundary). A
phase has a local part (no communication) and a communication part; after each local part
the ranks vote over the control group, and one failed vote (an exception, or a phase past
its deadline) rolls every rank back. Communication runs only after a unanimous vote, so a
rank that fails locally never leaves a peer waiting in a receive. The old model, KV cache
and process groups are only read before the commit, so rollback is dropping the new state
and re-activating the old snapshot.

Pre-staging runs the first three phases (and allocates the target's KV cache) while the old
topology keeps serving, then fills the new shards one bucket per step boundary (local copies
and peer-to-peer rounds), then may copy the running requests' full KV blocks ahead; a later
switch to the same target then skips building and moving the weights: its pause covers the
KV blocks written since, the group switch and the commit.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
import torch.distributed as dist

from . import groups, memory
from .kv_cache import KVCache
from .layout import Layout, Plan, Shard, Transfer, pack, plan_transfers
from .model import build_stage_model
from .model_runner import ModelRunner
from .reshard import (KV_KEY, MoveStats, Regions, copy_pieces, gather_layout, kv_layout, kv_region, local_pieces,
                      run_rounds, weight_regions)
from .scheduler import KVMove
from .topology import Topology

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("remp.reconfigure")

MODES = ("migrate", "recompute", "drain")


@dataclass(frozen=True)
class Fault:
    """Test hook: make ``rank`` fail at the start of ``phase`` (an error, or a stall past the
    phase deadline)."""

    phase: str
    rank: int
    kind: str = "error"  # "error" | "stall"


@dataclass(frozen=True)
class ReconfigureOrder:
    """Switch every rank to ``target`` now."""

    target: Topology
    mode: str
    kv: KVMove
    block_size: int
    bucket_bytes: int = 16 * 2**20
    phase_timeout_s: float = 120.0
    fault: Optional[Fault] = None


@dataclass(frozen=True)
class PrestageOrder:
    """Build, plan and fill ``target``'s weight shards (and allocate its KV cache of
    ``num_blocks``) while the current topology serves."""

    target: Topology
    num_blocks: int
    block_size: int
    bucket_bytes: int
    budget_bytes: Optional[int] = None  # refuse to stage a new shard larger than this (None: any)
    phase_timeout_s: float = 120.0
    fault: Optional[Fault] = None


Order = Union[ReconfigureOrder, PrestageOrder]


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
    kv_blocks_staged: int = 0  # of which copied ahead, before the pause (kv_moved/kept count the others)
    kv_moved_ahead: int = 0  # planned bytes of the copy ahead (its blocks freed since included)
    kv_renumbered: bool = False  # the new cache is smaller than the old block ids: ids changed
    requests_dropped: int = 0  # their KV did not fit the new cache: recomputed after the commit
    bytes_sent: int = 0  # measured, all ranks (equals weights_moved + kv_moved + kv_moved_ahead)
    bytes_sent_in_pause: int = 0  # of which during this call (not pre-staged)
    peak_extra_bytes: int = 0  # max over ranks: new shard + new KV + largest buckets in flight
    resources: dict[str, int] = field(default_factory=dict)  # after commit, max over ranks (leak watch)
    rss_bytes: int = 0  # after commit, summed over ranks (before the freed heap is trimmed)
    staging_refused: str = ""  # pre-staging: why nothing was staged (the new shard exceeds the budget)
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


@dataclass
class SwitchState:
    """What a switch builds on one rank, phase by phase. Nothing here is visible to serving
    until the commit; rollback drops it."""

    model: Optional[torch.nn.Module] = None  # the new stage (None on ranks standby at the target)
    shards: list[Shard] = field(default_factory=list)  # its weight shards and their regions
    regions: Regions = field(default_factory=dict)
    old_shards: list[Shard] = field(default_factory=list)
    old_regions: Regions = field(default_factory=dict)
    weight_plan: Optional[Plan] = None
    weight_stats: Optional[MoveStats] = None
    weight_rounds: list[dict] = field(default_factory=list)  # pre-staging: remote rounds still to run
    local_todo: list[list[Transfer]] = field(default_factory=list)  # pre-staging: local copies, a bucket each
    prestaged: bool = False  # built, planned and filled by pre-staging
    kv: Optional[KVCache] = None
    kv_staged: frozenset[int] = frozenset()  # block ids copied ahead into ``kv`` (pre-staging)
    kv_staged_moved: int = 0  # planned bytes of that copy (all ranks)
    kv_staged_sent: int = 0  # bytes this rank sent for it
    kv_plan: Optional[Plan] = None
    kv_src: Regions = field(default_factory=dict)
    kv_dst: Regions = field(default_factory=dict)
    kv_stats: Optional[MoveStats] = None
    runner: Optional[ModelRunner] = None


@dataclass
class Staged:
    """Pre-staged weights (and KV cache) for ``order.target`` (every rank holds its part)."""

    order: PrestageOrder
    state: SwitchState
    chunks: int  # step-boundary chunks (one peer-to-peer round and one local bucket each), max over ranks
    chunks_done: int = 0

    @property
    def target(self) -> Topology:
        return self.order.target

    @property
    def complete(self) -> bool:
        return self.chunks_done >= self.chunks


def process_resources() -> dict[str, int]:
    """What a leaking switch would grow: process groups, threads, open fds (this process)."""
    from torch.distributed import distributed_c10d as c10d

    def count(d: str) -> int:  # OS-level: gloo's threads and sockets are native
        return len(os.listdir(d)) if os.path.isdir(d) else 0

    return {"process_groups": len(c10d._world.pg_map), "threads": count("/proc/self/task"),
            "fds": count("/proc/self/fd"), "rss": memory.rss_bytes()}


def _by_rank(layout: Layout) -> dict[int, list[Shard]]:
    out: dict[int, list[Shard]] = {}
    for shards in layout.values():
        for s in shards:
            out.setdefault(s.rank, []).append(s)
    return out


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


class Switch:
    """One order on one rank: the phases' local and communication parts over a SwitchState."""

    def __init__(self, worker: Worker, order: Order, state: SwitchState, tl: Timeline):
        self.worker, self.order, self.state, self.tl = worker, order, state, tl
        self.kv_move = order.kv if isinstance(order, ReconfigureOrder) else None  # None: weights only

    # ---- validate ------------------------------------------------------------------------
    def check_target(self) -> None:
        if isinstance(self.order, ReconfigureOrder) and self.order.mode not in MODES:
            raise ValueError(f"mode {self.order.mode!r} not in {MODES}")
        self.order.target.validate(self.worker.spec, self.worker.world)

    def ensure_groups(self) -> None:
        groups.ensure(self.order.target)  # first use of a topology creates its groups (collective)

    # ---- build ---------------------------------------------------------------------------
    def build(self) -> None:
        w, st, target = self.worker, self.state, self.order.target
        coords = target.coords(w.rank)
        num_blocks = self.order.num_blocks if self.kv_move is None else self.kv_move.new_num_blocks
        if coords is not None and (st.kv is None or st.kv.buffer.shape[2] != num_blocks):  # pre-staged: kept
            st.kv = KVCache.allocate(w.spec, target, coords[0], num_blocks, self.order.block_size, w.device)
            st.kv_staged = frozenset()
        if st.prestaged:
            return
        # megatron's model constructors and sharded_state_dict read ranks from parallel_state:
        # build under the target's snapshot.
        groups.activate(target)
        try:
            if coords is not None:
                st.model = build_stage_model(w.spec, target, coords[0], w.device)  # torch.empty: no pages yet
            st.shards, st.regions = weight_regions(st.model, w.rank)
        finally:
            groups.activate(w.topo)

    # ---- plan ----------------------------------------------------------------------------
    def read_old_layout(self) -> None:
        if not self.state.prestaged:
            w = self.worker
            self.state.old_shards, self.state.old_regions = weight_regions(w.runner.model if w.runner else None,
                                                                           w.rank)

    def plan(self) -> None:
        w, st, tl = self.worker, self.state, self.tl
        elem = w.spec.torch_dtype.itemsize
        if not st.prestaged:
            old_layout = gather_layout(st.old_shards, w.group)
            new_layout = gather_layout(st.shards, w.group)
            st.weight_plan = plan_transfers(old_layout, new_layout, dict.fromkeys(new_layout, elem))
            budget = self.order.budget_bytes if isinstance(self.order, PrestageOrder) else None
            largest = max(sum(s.box.numel for s in ss) for ss in _by_rank(new_layout).values()) * elem
            if budget is not None and largest > budget:  # the same verdict on every rank: no vote needed
                tl.staging_refused = f"the largest new shard ({largest} B) exceeds the pre-staging budget ({budget} B)"
        tl.weights_moved, tl.weights_kept = st.weight_plan.bytes_moved, st.weight_plan.bytes_kept
        if self.kv_move is None:
            return
        kv = self.kv_move
        ahead = kv.staged & st.kv_staged  # both sides agree they are in place (same on every rank)
        ids = [(o, n) for o, n in zip(kv.old_ids, kv.new_ids) if o not in ahead]
        st.kv_plan, st.kv_src, st.kv_dst = plan_kv(w, self.order.target, st.kv, [o for o, _ in ids],
                                                   [n for _, n in ids], self.order.block_size)
        tl.kv_moved, tl.kv_kept = st.kv_plan.bytes_moved, st.kv_plan.bytes_kept
        tl.kv_blocks, tl.kv_blocks_staged, tl.kv_moved_ahead = len(kv.old_ids), len(ahead), st.kv_staged_moved
        tl.kv_renumbered, tl.requests_dropped = kv.renumbered, len(kv.dropped)

    # ---- move ----------------------------------------------------------------------------
    def move_weights(self) -> None:
        st = self.state
        if not st.prestaged:
            st.weight_stats = self.worker.execute_plan(st.weight_plan, st.old_regions, st.regions, self.order.bucket_bytes)

    def move_kv(self) -> None:
        st = self.state
        st.kv_stats = self.worker.execute_plan(st.kv_plan, st.kv_src, st.kv_dst, self.order.bucket_bytes)

    # ---- apply and commit ----------------------------------------------------------------
    def apply(self) -> None:
        w, st = self.worker, self.state
        groups.activate(self.order.target)
        st.runner = ModelRunner(w.spec, self.order.target, w.rank, st.model, st.kv, w.device) if st.model else None

    def commit(self) -> None:
        """The commit point: adopt the new runner (the old model and KV are freed by refcount;
        megatron modules hold no cycles, and a gc.collect() would cost ~0.25 s of pause), then
        sum what moved and take the peak extra memory over ranks."""
        w, st, tl = self.worker, self.state, self.tl
        ws, ks, ks_ahead = st.weight_stats, st.kv_stats, st.kv_staged_sent
        kv_bytes = st.kv.buffer.numel() * st.kv.buffer.element_size() if st.kv is not None else 0
        extra = _nbytes(st.model) + kv_bytes + max(ws.peak_bucket_bytes, ks.peak_bucket_bytes)
        w.runner, w.topo = st.runner, self.order.target
        self.state = st = None  # the old shard, KV and plans are unreferenced from here
        resources = process_resources()
        sent = torch.tensor([ws.bytes_sent + ks.bytes_sent + ks_ahead,
                             ks.bytes_sent + (0 if self.tl.prestaged else ws.bytes_sent),
                             resources["rss"]], dtype=torch.float64)
        dist.all_reduce(sent, group=w.group)
        peak = torch.tensor([extra, *resources.values()], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=w.group)
        memory.release_freed_async()
        tl.bytes_sent, tl.bytes_sent_in_pause, tl.rss_bytes = map(int, sent.tolist())
        tl.peak_extra_bytes = int(peak[0].item())
        tl.resources = dict(zip(resources, map(int, peak[1:].tolist())))


@dataclass(frozen=True)
class Phase:
    name: str
    local: Optional[Callable[[Switch], None]]  # no communication: faults are injected here
    comm: Optional[Callable[[Switch], None]]  # collective; runs only after a unanimous vote


# Read top to bottom: this is the switch.
PHASE_TABLE = (
    Phase("validate", Switch.check_target, Switch.ensure_groups),
    Phase("build", Switch.build, None),
    Phase("plan", Switch.read_old_layout, Switch.plan),
    Phase("move_weights", None, Switch.move_weights),
    Phase("move_kv", None, Switch.move_kv),
    Phase("apply", Switch.apply, None),
    Phase("commit", None, Switch.commit),
)
PHASES = tuple(p.name for p in PHASE_TABLE)
PRESTAGE_PHASES = PHASE_TABLE[:3]  # validate, build, plan: then the weights move between steps


def reconfigure(worker: Worker, order: ReconfigureOrder,
                progress: Optional[Callable[[str, Timeline], None]] = None) -> Timeline:
    """Collective. Returns the (identical on every rank) timeline; raises RolledBack. Uses
    the pre-staged weights if they are complete and for this target. ``progress`` is called
    after each completed phase (rank 0 streams it to the operator)."""
    staged, worker.staged = worker.staged, None
    tl = Timeline(str(worker.topo), str(order.target), order.mode)
    state = SwitchState()
    if staged is not None and staged.target == order.target and staged.complete:
        state, tl.prestaged = staged.state, True
    _run_phases(Switch(worker, order, state, tl), PHASE_TABLE, progress)
    tl.committed = True
    log.info("reconfigured %s -> %s (%s%s) in %.3fs", tl.source, tl.target, tl.mode,
             ", prestaged" if tl.prestaged else "", tl.seconds)
    return tl


def prestage(worker: Worker, order: PrestageOrder) -> Timeline:
    """Collective: build the target's weight shards and KV cache and plan the weights' move
    while the current topology keeps serving; the copies run via ``prestage_rounds``. Raises
    RolledBack; stages nothing (``tl.staging_refused``) if the new shard exceeds the budget."""
    worker.staged = None
    tl = Timeline(str(worker.topo), str(order.target), "prestage")
    switch = Switch(worker, order, SwitchState(), tl)
    _run_phases(switch, PRESTAGE_PHASES)
    if tl.staging_refused:
        return tl
    st = switch.state
    st.weight_stats = MoveStats()
    st.local_todo = pack(local_pieces(st.weight_plan, worker.rank, order.bucket_bytes), order.bucket_bytes)
    st.weight_rounds = list(st.weight_plan.rounds(worker.world, order.bucket_bytes))
    chunks = torch.tensor([len(st.weight_rounds), len(st.local_todo)])
    dist.all_reduce(chunks, op=dist.ReduceOp.MAX, group=worker.group)  # every rank runs as many chunks
    st.prestaged = True
    worker.staged = Staged(order, st, int(chunks.max()))
    return tl


def prestage_rounds(worker: Worker, n: int) -> bool:
    """Collective: run the next ``n`` staging chunks; True when staging is complete (on every
    rank at once)."""
    staged, st = worker.staged, worker.staged.state
    n = min(n, staged.chunks - staged.chunks_done)
    rounds, st.weight_rounds = st.weight_rounds[:n], st.weight_rounds[n:]
    pieces, st.local_todo = st.local_todo[:n], st.local_todo[n:]
    with torch.no_grad():
        copy_pieces([t for bucket in pieces for t in bucket], st.old_regions, st.regions, st.weight_stats)
        run_rounds(rounds, worker.rank, st.old_regions, st.regions, worker.device, worker.spec.torch_dtype,
                   st.weight_stats)
    staged.chunks_done += n
    return staged.complete


def prestage_kv(worker: Worker, block_ids: list[int]) -> None:
    """Collective: copy these live KV blocks (full: never written again) into the pre-staged
    target cache under the same ids, so the switch's pause moves only the blocks written
    since."""
    order, st = worker.staged.order, worker.staged.state
    plan, src, dst = plan_kv(worker, order.target, st.kv, block_ids, block_ids, order.block_size)
    stats = worker.execute_plan(plan, src, dst, order.bucket_bytes)
    st.kv_staged = st.kv_staged | frozenset(block_ids)
    st.kv_staged_moved += plan.bytes_moved
    st.kv_staged_sent += stats.bytes_sent


def plan_kv(worker: Worker, target: Topology, new_cache: Optional[KVCache], old_ids: list[int], new_ids: list[int],
            block_size: int) -> tuple[Plan, Regions, Regions]:
    """Plan moving the KV of blocks ``old_ids`` (current cache) to ``new_ids`` of
    ``new_cache`` at ``target``, and this rank's source and destination regions."""
    w = worker
    old_kv, new_kv = (kv_layout(w.spec, t, len(old_ids), block_size) for t in (w.topo, target))
    plan = plan_transfers(old_kv, new_kv, {KV_KEY: w.spec.torch_dtype.itemsize})
    src = kv_region(w.runner.kv.buffer, old_kv, w.rank, old_ids) if w.runner else {}
    dst = kv_region(new_cache.buffer, new_kv, w.rank, new_ids) if new_cache is not None else {}
    return plan, src, dst


def _run_phases(switch: Switch, phases, progress=None) -> None:
    """Each phase: local part, vote, communication part. An error in a communication part is
    carried into the next vote (after the last phase there is none: it is past the commit)."""
    tl, carried = switch.tl, None
    for phase in phases:
        t0 = time.perf_counter()
        error = carried or _attempt(switch, lambda: _local(switch, phase), t0)
        failed = _vote(switch.worker, error)
        if failed:
            tl.phases[phase.name] = time.perf_counter() - t0
            tl.failed_phase, tl.error = phase.name, failed
            groups.activate(switch.worker.topo)
            switch.state = SwitchState()
            raise RolledBack(tl)
        carried = _attempt(switch, lambda: phase.comm and phase.comm(switch), t0)
        tl.phases[phase.name] = time.perf_counter() - t0
        if progress is not None:
            progress(phase.name, tl)
    if carried:
        raise RuntimeError(f"reconfiguration failed after its commit point: {carried}")


def _local(switch: Switch, phase: Phase) -> None:
    """The phase's local part, after the test hook's fault (if it names this phase and rank)."""
    f = switch.order.fault
    if f is not None and f.phase == phase.name and f.rank == switch.worker.rank:
        if f.kind == "stall":
            time.sleep(switch.order.phase_timeout_s + 0.5)
        else:
            raise RuntimeError(f"injected fault in phase '{phase.name}'")
    if phase.local is not None:
        phase.local(switch)


def _attempt(switch: Switch, part: Callable[[], object], t0: float) -> Optional[str]:
    """Run one part of a phase; any failure (or the phase passing its deadline) becomes this
    rank's vote."""
    try:
        part()
        if time.perf_counter() - t0 > switch.order.phase_timeout_s:
            raise TimeoutError(f"phase took longer than {switch.order.phase_timeout_s}s")
    except Exception as e:
        log.warning("reconfigure failed on rank %d: %s", switch.worker.rank, e)
        return f"rank {switch.worker.rank}: {type(e).__name__}: {e}"
    return None


def _vote(worker: Worker, error: Optional[str]) -> Optional[str]:
    """Collective: None if every rank succeeded, else the first rank's error. A one-int
    all-reduce in the common case; error texts are gathered only when someone failed."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=worker.group)
    if not flag.item():
        return None
    errors = [None] * worker.world
    dist.all_gather_object(errors, error, group=worker.group)
    return next(e for e in errors if e)
