"""A rank of the engine (started by torchrun, which `remp serve`'s front end runs).

Rank 0 connects to the front end over the link ($REMP_LINK), asks it what to serve (the server
config, and the last committed topology: a restarted world comes back where it was), tells the
other ranks and runs the engine core; the other ranks run ``worker_loop``. Every rank loads its
shards. The ranks keep SIGTERM's
default (exit at once): torchrun sends it when a rank died and the world must be re-formed, and
a graceful shutdown is the front end's (it drains, then sends Shutdown; every rank exits 0).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Callable, Optional

import torch.distributed as dist

from remp_megatron.quiet import quiet_third_party
from remp_megatron.runtime import init_distributed
from remp_megatron.spec import ModelSpec
from remp_megatron.topology import Topology
from remp_megatron.worker import broadcast, load_worker, worker_loop

from . import link
from .config import ServerConfig

log = logging.getLogger("remp.rank")


def agree_on_start(rt, ask: Optional[Callable[[int, list[link.RankInfo]], link.Start]]) -> Optional[link.Start]:
    """Collective, before loading: rank 0 learns every rank's host and pid and asks (``ask``: the
    front end, or the in-process API) what to serve — the server config and the topology; every
    rank gets the answer (None: refused). Ranks on other nodes need nothing but the link's address."""
    ranks: list = [None] * rt.world_size
    dist.all_gather_object(ranks, (rt.rank, socket.gethostname(), os.getpid()), group=rt.control_group)
    start = None
    if rt.rank == 0:
        start = ask(rt.world_size, [link.RankInfo(*r) for r in ranks])
        if start.refused:
            log.warning("the front end refused this world: %s", start.refused)
            start = None
    return broadcast(start, rt.control_group)


def main() -> int:
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rt = init_distributed()
    core = None
    if rt.rank == 0:
        from .engine_core import EngineCore

        core = EngineCore(os.environ[link.LINK_ADDRESS_ENV], os.environ[link.LINK_SECRET_ENV])
    start = agree_on_start(rt, core.join if core is not None else None)
    if start is None:  # refused: exit 0 so that torchrun does not restart the world
        dist.destroy_process_group()
        return 0
    cfg = ServerConfig.model_validate_json(start.config)
    spec = ModelSpec.from_file(cfg.model / "config.json")
    t0 = time.perf_counter()
    worker = load_worker(rt, spec, cfg.model, Topology(start.tp, start.pp, start.ep), cfg.engine)
    if core is not None:
        core.serve(worker, cfg, time.perf_counter() - t0)
    else:
        worker_loop(worker)
    dist.destroy_process_group()
    log.info("rank %d exited cleanly", rt.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
