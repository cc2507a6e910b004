"""Parallel-state snapshots: megatron's process groups for each topology, built once per
process and switched in place.

megatron-core keeps its groups in ``parallel_state`` module globals. ``initialize_model_parallel``
fills them (a collective that creates ~30 groups); ``destroy_model_parallel`` forgets most of
them without destroying them, so re-initialising per switch leaks groups, fds and threads.
Instead we build each topology's groups once, keep the filled globals as a snapshot, and a
switch just assigns the target snapshot's values back. Modules built afterwards pick up the
target's groups; modules built before keep theirs (so the old model still works for rollback).
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Any

from .topology import Topology

log = logging.getLogger("remp.groups")

# Our rank map (topology.py) is megatron's with data parallelism outermost.
MEGATRON_ORDER = "tp-cp-ep-pp-dp"

_snapshots: dict[Topology, dict[str, Any]] = {}
_defaults: dict[str, Any] = {}
_current: list[Topology] = []


def _names(ps) -> list[str]:
    return [n for n in vars(ps) if re.fullmatch(r"_[A-Z][A-Z0-9_]*", n)]


def ensure(topo: Topology) -> None:
    """Build ``topo``'s groups if this process has not yet (collective over the world: every
    rank must call it at the same point). The active topology does not change."""
    here = current()
    activate(topo)
    if here is not None:
        activate(here)


def activate(topo: Topology) -> None:
    """Point megatron's parallel_state at ``topo``. Collective over the world the first time a
    topology is activated in this process (it creates that topology's groups)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    if not _defaults:
        _defaults.update({n: copy.copy(getattr(ps, n)) for n in _names(ps)})
        # The CUDA RNG tracker's seeding needs CUDA; the inference tracker does not (no dropout).
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    if topo not in _snapshots:
        for n, v in _defaults.items():
            setattr(ps, n, copy.copy(v))
        ps.initialize_model_parallel(
            tensor_model_parallel_size=topo.tp,
            pipeline_model_parallel_size=topo.pp,
            expert_model_parallel_size=topo.ep,
            expert_tensor_parallel_size=topo.expert_tp,
            order=MEGATRON_ORDER,
            create_gloo_process_groups=False,
        )
        _snapshots[topo] = {n: getattr(ps, n) for n in _defaults}
        log.info("built process groups for %s", topo)
    else:
        for n, v in _snapshots[topo].items():
            setattr(ps, n, v)
    _current[:] = [topo]


def current() -> Topology | None:
    return _current[0] if _current else None

