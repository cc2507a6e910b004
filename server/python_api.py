"""Python entry points in the style of DeepSpeed-MII (``mii.serve`` / ``mii.client`` / ``mii.pipeline``),
exported as ``remp_megatron.serve``, ``remp_megatron.client`` and ``remp_megatron.pipeline``:

    client = remp_megatron.serve("runs/smollm2", tp=3, pp=1)      # starts `remp serve`, returns a Client
    client.generate(["Hello", "The capital of France is"], max_new_tokens=16)   # list in, list out
    client.reconfigure(tp=1, pp=3)                                # live switch
    client.terminate_server()

    client = remp_megatron.client("127.0.0.1:50051")              # attach to a running server

    with remp_megatron.pipeline("runs/smollm2", tp=1, pp=3) as pipe:   # serve in this process
        pipe(["Hello"], max_new_tokens=16)

A prompt is text, a list of token ids, or chat messages ``[{"role": ..., "content": ...}]`` (the
model's chat template). Generation parameters are the server's: ``max_new_tokens``, ``temperature``
(0 = greedy, the default), ``top_k``, ``top_p``, ``seed``, ``stop``, ``stop_token_ids``, ``ignore_eos``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .api import pb
from .client import Prompt, RempClient
from .launch import ServerProcess

log = logging.getLogger("remp.api")

Prompts = Union[Prompt, Sequence[Prompt]]


@dataclass(frozen=True)
class Response:
    """One finished generation (or, from ``stream``, one chunk of it)."""

    text: str
    token_ids: list[int]
    prompt_length: int
    generated_length: int
    finish_reason: str  # stop | length | cancelled | aborted; "" on a stream's intermediate chunks


@dataclass(frozen=True)
class SwitchResult:
    committed: bool
    source: str
    target: str
    downtime_s: float
    phases: dict[str, float]  # seconds per phase
    reason: str = ""  # why it rolled back
    pause_s: float = 0.0  # step boundary -> serving again
    stall_s: float = 0.0  # the longest extra wait of an in-flight stream
    drain_s: float = 0.0  # drain mode: until the running requests finished
    staging_s: float = 0.0  # weights staged while serving went on


def _as_batch(prompts: Prompts) -> list[Prompt]:
    """A single prompt (text, token ids or one chat) or a list of them."""
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and (isinstance(items[0], int) or isinstance(items[0], dict)):
        return [items]
    return items


class Client:
    """A client of a running server (gRPC). From ``serve()`` it also owns the server process."""

    def __init__(self, address: str, token: Optional[str] = None, server: Optional[ServerProcess] = None):
        self.address, self.server = address, server
        self.rpc = RempClient(address, token=token)

    def generate(self, prompts: Prompts, timeout: Optional[float] = None, **params) -> list[Response]:
        """Generate for every prompt concurrently; responses in the prompts' order."""
        calls = [self.rpc.inference.Generate.future(self.rpc.build_request(p, **params), timeout=timeout)
                 for p in _as_batch(prompts)]
        return [_response(call.result()) for call in calls]

    def stream(self, prompt: Prompt, timeout: Optional[float] = None, **params) -> Iterator[Response]:
        """Chunks as they are generated (``text``/``token_ids`` are the new part)."""
        for c in self.rpc.stream(prompt, timeout=timeout, **params):
            yield Response(c.text, list(c.token_ids), c.usage.prompt_tokens, c.usage.completion_tokens,
                           c.finish_reason)

    def reconfigure(self, tp: int, pp: int, mode: str = "migrate", timeout: Optional[float] = None,
                    ep: int = 1) -> SwitchResult:
        """Switch the server's TP×PP(×EP) live; returns when it committed or rolled back."""
        phases, last = {}, None
        for ev in self.rpc.reconfigure(tp, pp, mode, timeout=timeout, ep=ep):
            if ev.kind == pb.ReconfigureEvent.PHASE:
                phases[ev.phase] = ev.seconds
            last = ev
        return SwitchResult(last.kind == pb.ReconfigureEvent.COMMITTED, last.source, last.target, last.downtime_s,
                            phases, last.reason, last.pause_s, last.stall_s, last.drain_s, last.staging_s)

    def status(self, timeout: Optional[float] = None) -> pb.StatusResponse:
        return self.rpc.status(timeout=timeout)

    def terminate_server(self, timeout: float = 60) -> None:
        """Graceful shutdown (running requests get the server's grace period); waits for it to exit
        when this client started it."""
        self.rpc.shutdown()
        self.close()
        if self.server is not None:
            try:
                self.server.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.server.stop()

    def close(self) -> None:
        self.rpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _response(r: pb.GenerateResponse) -> Response:
    return Response(r.text, list(r.token_ids), r.usage.prompt_tokens, r.usage.completion_tokens, r.finish_reason)


def serve(model: Union[str, Path], tp: int = 1, pp: int = 1, nproc: Optional[int] = None,
          workdir: Optional[Path] = None, timeout: float = 600, **flags) -> Client:
    """Start ``remp serve`` (``nproc`` ranks, default tp×pp) and return a client that owns it.
    ``flags`` are `remp serve` flags by name: ``http_port=0`` → ``--http-port 0``; True → a bare flag.
    Its log is ``client.server.log_path``."""
    extra: list[str] = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            extra.append(flag)
        elif value not in (None, False):
            extra += [flag, str(value)]
    workdir = Path(workdir or tempfile.mkdtemp(prefix="remp-serve-"))
    server = ServerProcess(Path(model).resolve(), nproc or tp * pp, tp, pp, *extra, workdir=workdir, timeout=timeout)
    log.info("serving %s on %s (log: %s)", model, server.addr, server.log_path)
    return Client(server.addr, server=server)


def client(address: str = "127.0.0.1:50051", token: Optional[str] = None) -> Client:
    """Attach to a running server (the admin token defaults to $REMP_ADMIN_TOKEN)."""
    return Client(address, token=token)


class Pipeline:
    """The engine in this process (rank 0); with tp×pp > 1 the other ranks are child processes.
    Synchronous: a call runs the engine until its prompts are done. One per process at a time."""

    def __init__(self, model: Path, tp: int, pp: int, nproc: int, ep: int = 1, **engine):
        from remp_megatron.config import EngineConfig
        from remp_megatron.engine import Engine
        from remp_megatron.quiet import quiet_third_party
        from remp_megatron.runtime import free_port, init_distributed
        from remp_megatron.spec import ModelSpec
        from remp_megatron.topology import Topology
        from remp_megatron.worker import load_worker

        from .config import ServerConfig
        from .link import Start
        from .main import agree_on_start
        from .service import Service

        quiet_third_party()
        cfg = ServerConfig(model=model, tp=tp, pp=pp, ep=ep, engine=EngineConfig(**engine))
        spec = ModelSpec.from_file(model / "config.json")
        Topology(tp, pp, ep).validate(spec, nproc)  # before any process starts
        port = free_port()
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc)}
        self.ranks = [subprocess.Popen([sys.executable, "-m", "server.main"],
                                       env={**os.environ, **env, "RANK": str(r), "LOCAL_RANK": str(r)})
                      for r in range(1, nproc)]
        rt = init_distributed(rank=0, world=nproc, init_method=f"tcp://127.0.0.1:{port}")
        tokenizer = None
        if (model / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model))
        eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
        agree_on_start(rt, lambda world, ranks: Start(cfg.model_dump_json(), tp, pp, ep, eos))
        worker = load_worker(rt, spec, model, Topology(tp, pp, ep), cfg.engine)
        self.engine = Engine(worker, cfg.engine, eos)
        self.service = Service(self.engine, cfg, tokenizer)

    def __call__(self, prompts: Prompts, **params) -> list[Response]:
        svc = self.service
        handles = []
        for prompt in _as_batch(prompts):
            if isinstance(prompt, str):
                ids = svc.encode_text(prompt, "prompt")
            elif prompt and isinstance(prompt[0], dict):
                ids = svc.encode_chat(list(prompt), "prompt")
            else:
                ids = list(prompt)
            handles.append(svc.submit(svc.make_request(ids, params, svc.new_id("pipe"))))
        self.engine.run_until_idle()
        out = []
        for h in handles:
            done = h.result()
            out.append(Response(done.text, done.token_ids, h.prompt_tokens, len(done.token_ids),
                                done.finish_reason.value))
        return out

    def reconfigure(self, tp: int, pp: int, mode: str = "migrate", ep: int = 1) -> SwitchResult:
        from remp_megatron.reconfigure import RolledBack
        from remp_megatron.topology import Topology

        try:
            tl, reason = self.engine.reconfigure(Topology(tp, pp, ep), mode), ""
        except RolledBack as e:
            tl, reason = e.timeline, str(e)
        return SwitchResult(tl.committed, tl.source, tl.target, tl.seconds, dict(tl.phases), reason, tl.seconds)

    def close(self) -> None:
        import torch.distributed as dist

        self.engine.stop_workers()
        dist.destroy_process_group()
        for p in self.ranks:
            p.wait(60)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pipeline(model: Union[str, Path], tp: int = 1, pp: int = 1, nproc: Optional[int] = None, ep: int = 1,
             **engine) -> Pipeline:
    """Serve in this process for scripts and notebooks (no server, no ports). ``engine``: EngineConfig
    fields (``kv_budget_mb``, ``max_num_seqs``, ...). Call it from the thread that creates it: that
    thread runs the model's kernels on the configured threads, any other on one (threads.py)."""
    return Pipeline(Path(model).resolve(), tp, pp, nproc or tp * pp, ep, **engine)
