"""The server process on every torchrun rank (started by ``remp serve``).

Rank 0 runs the engine loop, the gRPC front end, the OpenAI HTTP API (``--http-port``) and the
metrics endpoint; the other ranks run ``worker_loop``. SIGTERM/SIGINT on rank 0 (or Admin
Shutdown) starts a graceful shutdown: admission stops, running
requests get ``shutdown_grace_s`` to finish, the rest end with finish_reason "aborted", then
every rank is released and exits 0. Other ranks ignore SIGTERM (torchrun forwards it to all)
and leave when rank 0 tells them to.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from remp_megatron.engine import Engine
from remp_megatron.quiet import quiet_third_party
from remp_megatron.worker import load_worker, worker_loop
from remp_megatron.runtime import init_distributed
from remp_megatron.spec import ModelSpec
from remp_megatron.topology import Topology

from .config import ServerConfig

log = logging.getLogger("remp.server")


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    p = argparse.ArgumentParser()
    p.add_argument("--config-json", required=True)
    p.add_argument("--port-file", help="write the bound port here once serving (tests, scripts)")
    p.add_argument("--allow-fault-injection", action="store_true")
    args = p.parse_args(argv)
    cfg = ServerConfig.model_validate_json(args.config_json)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rt = init_distributed()
    spec = ModelSpec.from_file(cfg.model / "config.json")
    worker = load_worker(rt, spec, cfg.model, Topology(cfg.tp, cfg.pp, cfg.ep), cfg.engine)
    if rt.rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        worker_loop(worker)
        dist.destroy_process_group()
        log.info("rank %d exited cleanly", rt.rank)
        return 0
    return serve_rank0(worker, cfg, args)


def serve_rank0(worker, cfg: ServerConfig, args) -> int:
    from . import metrics
    from .frontend import Frontend, start_grpc
    from .service import Service
    from .switching import SwitchController

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    tokenizer = None
    if (cfg.model / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    engine = Engine(worker, cfg.engine, tokenizer)
    loop = threading.Thread(target=engine.run_forever, name="engine-loop", daemon=True)
    loop.start()
    switches = SwitchController(engine)
    policy = None
    if cfg.policy_profile is not None:
        from remp_megatron.policy import CostProfile

        from .policy_loop import PolicyLoop

        policy = PolicyLoop(engine, switches, cfg.policy, CostProfile.load(cfg.policy_profile), cfg.policy_enabled)
    service = Service(engine, switches, cfg, tokenizer, args.allow_fault_injection, policy, shutdown=stop.set)
    server, port, health = start_grpc(Frontend(service), cfg)
    ports = {"port": port}
    http = None
    if cfg.http_port is not None:
        from .http_api import HttpServer

        http = HttpServer(service, cfg)
        ports["http_port"] = http.port
        log.info("OpenAI HTTP API for model %r on %s:%d", cfg.model_name, cfg.host, http.port)
    metrics.bind_engine(engine)
    if cfg.metrics_port is not None:
        log.info("metrics on %s:%d", cfg.host, metrics.serve_metrics(cfg.metrics_port, cfg.host))
    log.info("serving %s at %s on %s:%d (%d ranks)", cfg.model.name, worker.topo, cfg.host, port, worker.world)
    if args.port_file:
        Path(args.port_file).write_text(json.dumps(ports))
    stop.wait()

    load = engine.load()
    log.info("shutting down: admission closed, %d request(s) in flight", load.running + load.queued)
    service.accepting = False
    if policy is not None:
        policy.stop()
    health.enter_graceful_shutdown()
    deadline = time.monotonic() + cfg.shutdown_grace_s
    while engine.has_work and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.shutdown()  # whatever is left ends with finish_reason "aborted"
    loop.join()
    server.stop(grace=5).wait()  # streams deliver their last chunk
    if http is not None:
        http.stop()
    engine.stop_workers()
    dist.destroy_process_group()
    log.info("rank 0 exited cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
