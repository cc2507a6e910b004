"""gRPC front end (in the `remp serve` process): the Inference and Admin services, translated
onto the transport-neutral ``Service`` (service.py).

RPC threads only add, cancel and read; the engine runs in its own processes. A reconfiguration
pauses the engine at a step boundary, and an engine restart re-admits what was running, so
requests arriving meanwhile queue and streams in flight just see a gap in tokens.
"""
from __future__ import annotations

import functools
import inspect
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api import pb, pb_grpc
from .config import ServerConfig
from .service import ApiError, ErrorKind, Service, invalid

GRPC_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT, ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION: grpc.StatusCode.PERMISSION_DENIED, ErrorKind.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION, ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
_PARAM_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
_PARAM_NAMES = {f: f"params.{f}" for f in (*_PARAM_FIELDS, "stop", "stop_token_ids", "ignore_eos")}


def _abort_on_api_error(method):
    """An ApiError ends the RPC with its status code and message."""
    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except ApiError as e:
            context.abort(GRPC_CODES[e.kind], e.message)

    @functools.wraps(method)
    def streaming(self, request, context):
        try:
            yield from method(self, request, context)
        except ApiError as e:
            context.abort(GRPC_CODES[e.kind], e.message)

    return streaming if inspect.isgeneratorfunction(method) else unary


class Frontend(pb_grpc.InferenceServicer, pb_grpc.AdminServicer):
    def __init__(self, service: Service):
        self.service = service

    # ---- Inference --------------------------------------------------------------------
    @_abort_on_api_error
    def Generate(self, request, context):
        handle = self.service.submit(self._to_request(request))
        context.add_callback(lambda: self.service.cancel(handle.request_id))
        done = handle.result()
        if done.error:
            raise ApiError(ErrorKind.UNAVAILABLE, done.error)
        self.service.observe(handle, done.finish_reason.value)
        ttft = handle.token_times[0] - handle.arrival if handle.token_times else 0.0
        return pb.GenerateResponse(request_id=handle.request_id, token_ids=done.token_ids, text=done.text,
                                   finish_reason=done.finish_reason.value, ttft_s=ttft,
                                   usage=pb.Usage(prompt_tokens=handle.prompt_tokens,
                                                  completion_tokens=len(done.token_ids)))

    @_abort_on_api_error
    def GenerateStream(self, request, context):
        handle = self.service.submit(self._to_request(request))
        # Client gone (or RPC over for any reason): cancel now, freeing its KV blocks.
        context.add_callback(lambda: self.service.cancel(handle.request_id))
        for out in handle:
            if out.error:
                raise ApiError(ErrorKind.UNAVAILABLE, out.error)
            yield pb.GenerateChunk(request_id=out.request_id, token_ids=out.token_ids, text=out.text,
                                   finished=out.finished,
                                   finish_reason=out.finish_reason.value if out.finish_reason else "",
                                   usage=pb.Usage(prompt_tokens=out.prompt_tokens,
                                                  completion_tokens=out.completion_tokens))
            if out.finished:
                self.service.observe(handle, out.finish_reason.value)

    def Cancel(self, request, context):
        return pb.CancelResponse(cancelled=self.service.cancel(request.request_id))

    # ---- Admin ------------------------------------------------------------------------
    @_abort_on_api_error
    def Reconfigure(self, request, context):
        self._authorize(context)
        events = self.service.reconfigure(request.tp, request.pp, request.mode, request.inject_fault, request.ep or 1)
        yield from events

    @_abort_on_api_error
    def SetPolicy(self, request, context):
        self._authorize(context)
        return self.service.set_policy(request.enabled)

    @_abort_on_api_error
    def GetStatus(self, request, context):
        self._authorize(context)
        return self.service.status()

    @_abort_on_api_error
    def Shutdown(self, request, context):
        self._authorize(context)
        self.service.request_shutdown()
        return pb.ShutdownResponse()

    # ---- internals --------------------------------------------------------------------
    def _authorize(self, context) -> None:
        self.service.authorize(dict(context.invocation_metadata()).get("authorization"))

    def _to_request(self, request):
        svc = self.service
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise invalid("prompt: one of text, chat or token_ids is required")
        if kind == "text":
            ids = svc.encode_text(request.text, "prompt.text")
        elif kind == "chat":
            ids = svc.encode_chat([{"role": m.role, "content": m.content} for m in request.chat.messages],
                                  "prompt.chat")
        else:
            ids = list(request.token_ids.ids)
        p = request.params
        params = {f: getattr(p, f) for f in _PARAM_FIELDS if p.HasField(f)}
        params.update(stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos)
        return svc.make_request(ids, params, request.request_id or svc.new_id("req"), _PARAM_NAMES)


class Health:
    """The standard gRPC health service for the server and each of its services: SERVING only while
    the engine serves (NOT_SERVING while it starts or restarts)."""

    def __init__(self, servicer: health.HealthServicer, names: list[str]):
        self.servicer, self.names = servicer, ["", *names]
        self.set_all(False)

    def set_all(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            self.servicer.set(name, status)

    def enter_graceful_shutdown(self) -> None:
        self.servicer.enter_graceful_shutdown()


def start_grpc(frontend: Frontend, cfg: ServerConfig) -> tuple[grpc.Server, int, Health]:
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=128), options=opts)
    pb_grpc.add_InferenceServicer_to_server(frontend, server)
    pb_grpc.add_AdminServicer_to_server(frontend, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Inference", "Admin")]
    status = Health(health_servicer, names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    addr = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert and cfg.tls_key:
        creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
        port = server.add_secure_port(addr, creds)
    else:
        port = server.add_insecure_port(addr)
    server.start()
    return server, port, status
