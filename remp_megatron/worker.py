"""Every rank's worker: its serving state, the commands rank 0 sends it, and its loop.

Rank 0 decides; every rank (standby ranks too, so all stay in lock-step) executes the same
command stream. ``Worker.execute`` on rank 0 broadcasts a command over the CPU control group
and runs it locally; ``worker_loop`` on the other ranks receives and runs the same commands
through the same ``Worker.run`` dispatcher.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from . import groups
from . import reconfigure as rc
from .config import EngineConfig
from .layout import Plan
from .model_runner import ModelRunner, load_runner
from .reshard import MoveStats, Regions, copy_pieces, local_pieces, run_rounds
from .scheduler import StepPlan
from .spec import ModelSpec
from .topology import Topology, valid_topologies

log = logging.getLogger("remp.worker")


# ---- commands: rank 0 -> every rank, over the control group (small, pickled) ------------
@dataclass(frozen=True)
class Step:
    plan: StepPlan


@dataclass(frozen=True)
class Reconfigure:
    order: rc.ReconfigureOrder


@dataclass(frozen=True)
class Prestage:
    order: rc.PrestageOrder


@dataclass(frozen=True)
class PrestageRounds:
    rounds: int


@dataclass(frozen=True)
class PrestageKV:
    block_ids: list[int]


@dataclass(frozen=True)
class Stop:
    """Leave ``worker_loop`` (the caller decides what comes next)."""


Command = Union[Step, Reconfigure, Prestage, PrestageRounds, PrestageKV, Stop]


def broadcast(obj: Any, group) -> Any:
    """rank 0's ``obj`` on every rank of ``group`` (others pass anything, e.g. None)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class Worker:
    """One rank's serving state at its current topology (the runner is None on standby ranks)."""

    def __init__(self, spec: ModelSpec, topo: Topology, runner: Optional[ModelRunner], rank: int, world: int,
                 device: torch.device, control_group):
        self.spec, self.topo, self.runner = spec, topo, runner
        self.rank, self.world, self.device, self.group = rank, world, device, control_group
        self.staged: Optional[rc.Staged] = None  # pre-staged weights of a target topology

    def execute(self, cmd: Command, progress: Optional[Callable[[str, rc.Timeline], None]] = None) -> Any:
        """Rank 0: send ``cmd`` to every rank, then run it here too."""
        if self.world > 1:  # pickling and a collective per step buy nothing alone (~0.3 ms a step)
            broadcast(cmd, self.group)
        return self.run(cmd, progress)

    def run(self, cmd: Command, progress: Optional[Callable[[str, rc.Timeline], None]] = None) -> Any:
        """Execute one command on this rank (the one dispatcher every rank uses)."""
        if isinstance(cmd, Step):
            return self.runner.run_step(cmd.plan) if self.runner is not None else None
        if isinstance(cmd, Reconfigure):
            return rc.reconfigure(self, cmd.order, progress)
        if isinstance(cmd, Prestage):
            return rc.prestage(self, cmd.order)
        if isinstance(cmd, PrestageRounds):
            return rc.prestage_rounds(self, cmd.rounds)
        if isinstance(cmd, PrestageKV):
            return rc.prestage_kv(self, cmd.block_ids)
        if isinstance(cmd, Stop):
            return None
        raise TypeError(f"rank {self.rank}: no handler for command {cmd!r}")

    def execute_plan(self, plan: Plan, src: Regions, dst: Regions, bucket_bytes: int) -> MoveStats:
        """Collective: this rank's local pieces of ``plan``, then every bucket round."""
        stats = MoveStats()
        with torch.no_grad():
            copy_pieces(local_pieces(plan, self.rank, bucket_bytes), src, dst, stats)
            run_rounds(list(plan.rounds(self.world, bucket_bytes)), self.rank, src, dst, self.device,
                       self.spec.torch_dtype, stats)
        return stats


def load_worker(rt, spec: ModelSpec, model_dir, topo: Topology, cfg: EngineConfig) -> Worker:
    """Collective: load ``topo``'s shards from a converted model dir on every rank, and create
    the process groups of every topology this world can switch to (so no switch pays for them).
    The worker's spec is ``spec`` in the serving dtype (``cfg.dtype``)."""
    spec = spec.served_in(cfg.dtype, rt.device)
    topo.validate(spec, rt.world_size)
    runner = load_runner(spec, model_dir, topo, rt.rank, rt.device, cfg.blocks_for(spec, topo), cfg.block_size)
    t0 = time.perf_counter()
    targets = valid_topologies(spec, rt.world_size)
    for t in targets:
        groups.ensure(t)
    log.info("serving in %s", spec.dtype)
    log.info("process groups for %d topologies (%s) in %.0f ms", len(targets), " ".join(t.short for t in targets),
             (time.perf_counter() - t0) * 1e3)
    return Worker(spec, topo, runner, rt.rank, rt.world_size, rt.device, rt.control_group)


def worker_loop(worker: Worker) -> None:
    """Ranks != 0: run rank 0's commands until told to stop."""
    while not isinstance(cmd := broadcast(None, worker.group), Stop):
        try:
            worker.run(cmd)
        except rc.RolledBack:
            pass  # rank 0 reports it; this rank is back on its old topology
