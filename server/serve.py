"""`remp serve`: the front end's process. It holds the ports (gRPC, OpenAI HTTP, metrics), the
tokenizer and every request, and runs the engine's ranks under torchrun as a child: rank 0
connects back over the link (link.py). When a rank dies, torchrun re-forms the world (up to
``max_restarts`` times) and the front end re-admits what was unfinished; health says NOT_SERVING
meanwhile and clients see a pause. When torchrun gives up, requests get UNAVAILABLE with the reason.

SIGTERM/SIGINT (or Admin Shutdown) starts a graceful shutdown: admission stops, running
requests get ``shutdown_grace_s`` to finish, the rest end with finish_reason "aborted", then the
engine releases every rank and the process exits 0.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from remp_megatron.policy import CostProfile
from remp_megatron.spec import ModelSpec

from . import link, metrics
from .config import ServerConfig
from .engine_client import EngineClient
from .frontend import Frontend, GrpcServer
from .service import Service

log = logging.getLogger("remp.server")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In torchrun's process, before exec: SIGTERM when the front end dies (torchrun then stops its ranks)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_ranks(nproc: int, max_restarts: int, torchrun_flags: list[str], link_address: str,
                secret: str) -> subprocess.Popen:
    """torchrun running ``nproc`` engine ranks on this node, their rank 0 (wherever rendezvous puts
    it) connecting to the front end at ``link_address`` with ``secret``. It dies with its parent."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", *torchrun_flags, "-m", "server.main"]
    # With c10d rendezvous torch 2.13 shares one store, created by the first round's rank 0, and every
    # agent caches its address: a node joining a later round waits for an address nobody publishes,
    # and when the node holding the store is gone the survivors are sent to it. Unshared, every round
    # publishes a fresh store address (global rank 0 hosts it).
    env = {**os.environ, link.LINK_ADDRESS_ENV: link_address, link.LINK_SECRET_ENV: secret,
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)


def join(link_address: str, secret: str, nproc: int, max_restarts: int, torchrun_flags: list[str]) -> int:
    """`remp join`: this node's ranks of a multi-node world, for the front end at ``link_address``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ranks = start_ranks(nproc, max_restarts, torchrun_flags, link_address, secret)
    log.info("%d rank(s) under torchrun (pid %d) for the front end at %s", nproc, ranks.pid, link_address)
    for sig in (signal.SIGTERM, signal.SIGINT):  # this node leaves: its ranks go (the world re-forms)
        signal.signal(sig, lambda *_: os.killpg(ranks.pid, signal.SIGTERM))
    return ranks.wait()


def serve(cfg: ServerConfig, nproc: int, torchrun_flags: list[str], port_file: Optional[Path] = None,
          allow_fault_injection: bool = False, profile: Optional[CostProfile] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = ModelSpec.from_file(cfg.model / "config.json")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    grpc_server = None

    def on_serving(serving: bool) -> None:
        if grpc_server is not None and not stop.is_set():
            grpc_server.set_serving(serving)

    client = EngineClient(cfg, spec, nproc, on_serving, profile)
    # The ranks start first: their start-up (imports, process groups) overlaps with the front end's.
    ranks = start_ranks(nproc, cfg.max_restarts, torchrun_flags, client.address, client.secret)
    tokenizer = None
    if (cfg.model / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    client.set_eos([tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else [])
    service = Service(client, cfg, tokenizer, allow_fault_injection, shutdown=stop.set)
    grpc_server = GrpcServer(Frontend(service), cfg)
    grpc_server.set_serving(client.serving)
    port = grpc_server.port
    ports = {"port": port}
    http = None
    if cfg.http_port is not None:
        from .http_api import HttpServer

        http = HttpServer(service, cfg)
        ports["http_port"] = http.port
        log.info("OpenAI HTTP API for model %r on %s:%d", cfg.model_name, cfg.host, http.port)
    metrics.bind_engine(client)
    if cfg.metrics_port is not None:
        log.info("metrics on %s:%d", cfg.host, metrics.serve_metrics(cfg.metrics_port, cfg.host))
    log.info("gRPC on %s:%d; engine ranks under torchrun (pid %d, up to %d restarts), link %s",
             cfg.host, port, ranks.pid, cfg.max_restarts, client.address)

    def watch_ranks() -> None:
        code = ranks.wait()
        if not stop.is_set():
            client.fail(f"the engine's ranks are gone: torchrun exited with code {code} after {client.restarts} "
                        f"restart(s) of at most {cfg.max_restarts} (see the server log)")

    threading.Thread(target=watch_ranks, name="torchrun-watch", daemon=True).start()
    while not (client.serving or client.failure or stop.is_set()):
        time.sleep(0.05)
    if client.failure:  # never served: nothing to keep the ports open for
        stop.set()
    elif port_file:
        Path(port_file).write_text(json.dumps(ports))
    stop.wait()

    log.info("shutting down: admission closed, %d request(s) in flight", client.unfinished())
    service.accepting = False
    grpc_server.enter_graceful_shutdown()
    deadline = time.monotonic() + cfg.shutdown_grace_s
    while client.unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    client.abort_all()  # whatever is left ends with finish_reason "aborted"
    client.shutdown_engine()
    try:
        code = ranks.wait(60)
    except subprocess.TimeoutExpired:
        log.warning("the ranks did not exit within 60 s of Shutdown: killing them")
        os.killpg(ranks.pid, signal.SIGKILL)
        code = ranks.wait()
    grpc_server.stop(grace=5)  # streams deliver their last chunk
    if http is not None:
        http.stop()
    client.link.close()
    if client.failure:
        log.error("exiting: %s", client.failure)
        return 1
    log.info("front end exited cleanly (ranks exited with code %d)", code)
    return 0
