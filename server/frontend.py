"""gRPC front end in rank 0's process: Inference and Admin services over one Engine.

The engine runs its serving loop in a background thread; RPC threads only add, cancel and
read. A reconfiguration pauses the loop at a step boundary, so requests arriving meanwhile
queue and streams in flight just see a gap in tokens.
"""
from __future__ import annotations

import hmac
import itertools
import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from remp_megatron.engine import Engine, RequestHandle
from remp_megatron.reconfigure import MODES, PHASES, Fault
from remp_megatron.request import Request, SamplingParams
from remp_megatron.scheduler import QueueFull, RequestTooLong
from remp_megatron.topology import Topology, TopologyError

from . import metrics
from .api import pb, pb_grpc
from .config import ServerConfig
from .switching import SwitchController, SwitchRequest

log = logging.getLogger("remp.server")

CHAT_ROLES = ("system", "user", "assistant")
_PARAM_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


class Frontend(pb_grpc.InferenceServicer, pb_grpc.AdminServicer):
    def __init__(self, engine: Engine, switches: SwitchController, cfg: ServerConfig, tokenizer=None,
                 allow_fault_injection: bool = False, policy=None):
        self.engine, self.switches, self.cfg, self.tok = engine, switches, cfg, tokenizer
        self.token = cfg.admin_token()
        self.allow_fault_injection = allow_fault_injection
        self.accepting = True
        self.policy = policy  # a PolicyLoop when the server has a cost profile
        self._ids = itertools.count(1)

    # ---- Inference --------------------------------------------------------------------
    def Generate(self, request, context):
        handle = self._submit(request, context)
        context.add_callback(lambda: self.engine.cancel(handle.request_id))
        done = handle.result()
        self._observe(handle, done.finish_reason.value)
        ttft = handle.token_times[0] - handle.arrival if handle.token_times else 0.0
        return pb.GenerateResponse(request_id=handle.request_id, token_ids=done.token_ids, text=done.text,
                                   finish_reason=done.finish_reason.value, ttft_s=ttft,
                                   usage=pb.Usage(prompt_tokens=handle.prompt_tokens,
                                                  completion_tokens=len(done.token_ids)))

    def GenerateStream(self, request, context):
        handle = self._submit(request, context)
        # Client gone (or RPC over for any reason): cancel now, freeing its KV blocks.
        context.add_callback(lambda: self.engine.cancel(handle.request_id))
        for out in handle:
            yield pb.GenerateChunk(request_id=out.request_id, token_ids=out.token_ids, text=out.text,
                                   finished=out.finished,
                                   finish_reason=out.finish_reason.value if out.finish_reason else "",
                                   usage=pb.Usage(prompt_tokens=out.prompt_tokens,
                                                  completion_tokens=out.completion_tokens))
            if out.finished:
                self._observe(handle, out.finish_reason.value)

    def Cancel(self, request, context):
        return pb.CancelResponse(cancelled=self.engine.cancel(request.request_id))

    # ---- Admin ------------------------------------------------------------------------
    def Reconfigure(self, request, context):
        self._authorize(context)
        target = Topology(request.tp, request.pp)
        try:
            target.validate(self.engine.spec, self.engine.worker.world)
        except TopologyError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        mode = request.mode or "migrate"
        if mode not in MODES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"mode {mode!r} is not one of {list(MODES)}")
        fault = self._fault(request.inject_fault, context) if request.inject_fault else None
        events = self.switches.start(SwitchRequest(target, mode, fault))
        if events is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a reconfiguration is already running")
        yield from iter(events.get, None)

    def SetPolicy(self, request, context):
        self._authorize(context)
        if self.policy is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no policy cost profile (serve --policy-profile FILE)")
        self.policy.enabled = request.enabled
        return self.policy.state()

    def GetStatus(self, request, context):
        self._authorize(context)
        load, topo, world = self.engine.load(), self.engine.topo, self.engine.worker.world
        return pb.StatusResponse(
            topology=str(topo), tp=topo.tp, pp=topo.pp, world_size=world,
            active_ranks=list(range(topo.size)), standby_ranks=list(range(topo.size, world)),
            queue_depth=load.queued, running_requests=load.running, kv_blocks_used=load.kv_blocks_used,
            kv_blocks_free=load.kv_blocks_free, kv_block_size=self.engine.cfg.block_size,
            switch_history=list(self.switches.history), reconfiguring=self.switches.busy,
            policy=self.policy.state() if self.policy is not None else None)

    # ---- internals --------------------------------------------------------------------
    def _submit(self, request, context) -> RequestHandle:
        if not self.accepting:
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        req = self._to_request(request, context)
        try:
            return self.engine.add_request(req)
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (RequestTooLong, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _to_request(self, request, context) -> Request:
        def bad(msg: str):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg)

        kind = request.WhichOneof("prompt")
        if kind is None:
            bad("prompt: one of text, chat or token_ids is required")
        if kind in ("text", "chat") and self.tok is None:
            bad(f"prompt.{kind}: this model has no tokenizer; send token_ids")
        if kind == "text":
            ids = self.tok.encode(request.text, add_special_tokens=False)
        elif kind == "chat":
            msgs = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not msgs or any(m["role"] not in CHAT_ROLES for m in msgs):
                bad(f"prompt.chat: needs at least one message, roles in {list(CHAT_ROLES)}")
            ids = list(self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        else:
            ids = list(request.token_ids.ids)
        if len(ids) > self.cfg.max_prompt_tokens:
            bad(f"prompt: {len(ids)} tokens exceeds the server limit of {self.cfg.max_prompt_tokens}")
        p = request.params
        params = {f: getattr(p, f) for f in _PARAM_FIELDS if p.HasField(f)}
        params.setdefault("max_new_tokens", min(64, self.cfg.max_new_tokens))
        if params["max_new_tokens"] > self.cfg.max_new_tokens:
            bad(f"params.max_new_tokens: {params['max_new_tokens']} exceeds the server limit of "
                f"{self.cfg.max_new_tokens}")
        try:
            return Request(request_id=request.request_id or f"req-{next(self._ids)}", prompt_token_ids=ids,
                           params=SamplingParams(stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                                                 ignore_eos=p.ignore_eos, **params))
        except ValidationError as e:
            err = e.errors()[0]
            bad(f"{'.'.join(map(str, err['loc'])) or 'request'}: {err['msg']}")

    def _authorize(self, context) -> None:
        if self.token is None:
            return
        got = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(got, f"Bearer {self.token}"):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Admin RPCs need 'authorization: Bearer <token>'")

    def _fault(self, spec: str, context) -> Fault:
        phase, _, rank = spec.partition(":")
        if not self.allow_fault_injection:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "fault injection is off (--allow-fault-injection)")
        if phase not in PHASES or (rank and not rank.isdigit()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inject_fault: expected PHASE[:RANK], PHASE in {PHASES}")
        return Fault(phase, int(rank or 0))

    def _observe(self, handle: RequestHandle, finish_reason: str) -> None:
        metrics.REQUESTS.labels(finish_reason).inc()
        t = handle.token_times
        metrics.TOKENS.inc(len(t))
        if t:
            metrics.TTFT.observe(t[0] - handle.arrival)
        if len(t) > 1:
            metrics.TPOT.observe((t[-1] - t[0]) / (len(t) - 1))


def start_grpc(frontend: Frontend, cfg: ServerConfig) -> tuple[grpc.Server, int, health.HealthServicer]:
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=128), options=opts)
    pb_grpc.add_InferenceServicer_to_server(frontend, server)
    pb_grpc.add_AdminServicer_to_server(frontend, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Inference", "Admin")]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    addr = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert and cfg.tls_key:
        creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
        port = server.add_secure_port(addr, creds)
    else:
        port = server.add_insecure_port(addr)
    server.start()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer
