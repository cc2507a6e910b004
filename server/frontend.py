"""gRPC front end (in the `remp serve` process): the Inference and Admin services, translated
onto the transport-neutral ``Service`` (service.py).

On grpc.aio: one event loop thread serves every stream. Engine outputs reach it through a
non-blocking sink (``AsyncRun``), so a token costs no thread hand-offs (the sync server ran a
thread per stream: each token woke the link thread, the stream's thread and the completion
queue's, most of the front end's CPU). Admin calls that wait on the engine core (a switch's
events, the policy's reply) wait in worker threads. A reconfiguration pauses the engine at a
step boundary, and an engine restart re-admits what was running, so requests arriving
meanwhile queue and streams in flight just see a gap in tokens.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from typing import Optional

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api import pb, pb_grpc
from .config import ServerConfig
from .service import ApiError, AsyncRun, ErrorKind, Service, invalid

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
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except ApiError as e:
            await context.abort(GRPC_CODES[e.kind], e.message)

    @functools.wraps(method)
    async def streaming(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except ApiError as e:
            await context.abort(GRPC_CODES[e.kind], e.message)

    return streaming if inspect.isasyncgenfunction(method) else unary


class _Malformed:
    def __init__(self, why: str):
        self.why = why


class _MalformedRequests(grpc.aio.ServerInterceptor):
    """A request message that does not parse ends its RPC with INVALID_ARGUMENT naming the method and
    the parser's complaint (grpc.aio itself answers UNKNOWN and logs a traceback)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def lenient(data: bytes):
            try:
                return parse(data)
            except DecodeError as e:
                return _Malformed(f"{method}: the request message does not parse: {e}")

        if handler.response_streaming:
            behaviour = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)
                async for item in behaviour(request, context):
                    yield item

            return handler._replace(request_deserializer=lenient, unary_stream=unary_stream)
        behaviour = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)
            return await behaviour(request, context)

        return handler._replace(request_deserializer=lenient, unary_unary=unary_unary)


class Frontend(pb_grpc.InferenceServicer, pb_grpc.AdminServicer):
    def __init__(self, service: Service):
        self.service = service

    # ---- Inference --------------------------------------------------------------------
    @_abort_on_api_error
    async def Generate(self, request, context):
        run = self._submit(request)
        ids, text, reason = [], "", ""
        try:  # an RPC that ends early (client gone) is cancelled here: so is the request, freeing its KV blocks
            async for _, out in run:
                ids += out.token_ids
                text += out.text
                reason = out.finish_reason.value if out.finished else reason
        finally:
            run.cancel()
        handle = run.handles[0]
        ttft = handle.token_times[0] - handle.arrival if handle.token_times else 0.0
        return pb.GenerateResponse(request_id=handle.request_id, token_ids=ids, text=text, finish_reason=reason,
                                   ttft_s=ttft, usage=pb.Usage(prompt_tokens=handle.prompt_tokens,
                                                               completion_tokens=len(ids)))

    @_abort_on_api_error
    async def GenerateStream(self, request, context):
        run = self._submit(request)
        try:
            async for _, out in run:
                yield pb.GenerateChunk(request_id=out.request_id, token_ids=out.token_ids, text=out.text,
                                       finished=out.finished,
                                       finish_reason=out.finish_reason.value if out.finish_reason else "",
                                       usage=pb.Usage(prompt_tokens=out.prompt_tokens,
                                                      completion_tokens=out.completion_tokens))
        finally:
            run.cancel()

    async def Cancel(self, request, context):
        return pb.CancelResponse(cancelled=self.service.cancel(request.request_id))

    # ---- Admin ------------------------------------------------------------------------
    @_abort_on_api_error
    async def Reconfigure(self, request, context):
        self._authorize(context)
        events = await asyncio.to_thread(self.service.reconfigure, request.tp, request.pp, request.mode,
                                         request.inject_fault, request.ep or 1)
        while (event := await asyncio.to_thread(next, events, None)) is not None:
            yield event

    @_abort_on_api_error
    async def SetPolicy(self, request, context):
        self._authorize(context)
        return await asyncio.to_thread(self.service.set_policy, request.enabled)

    @_abort_on_api_error
    async def GetStatus(self, request, context):
        self._authorize(context)
        return self.service.status()

    @_abort_on_api_error
    async def Shutdown(self, request, context):
        self._authorize(context)
        self.service.request_shutdown()
        return pb.ShutdownResponse()

    # ---- internals --------------------------------------------------------------------
    def _authorize(self, context) -> None:
        self.service.authorize(dict(context.invocation_metadata()).get("authorization"))

    def _submit(self, request) -> AsyncRun:
        run = AsyncRun(self.service, asyncio.get_running_loop())
        run.submit([self._to_request(request)])
        return run

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


class GrpcServer:
    """The grpc.aio server on its own event loop thread; the methods are called from other threads.
    Health is the standard gRPC health service for the server and each of its services: SERVING
    only while the engine serves (NOT_SERVING while it starts or restarts)."""

    def __init__(self, frontend: Frontend, cfg: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc", daemon=True)
        self._thread.start()
        self.names = ["", *(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Inference", "Admin"))]
        self.server: Optional[grpc.aio.Server] = None
        self.health = None
        self._health_lock: Optional[asyncio.Lock] = None  # one status change at a time, in call order
        self.port = self._run(self._start(frontend, cfg), 30)

    async def _start(self, frontend: Frontend, cfg: ServerConfig) -> int:
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes)]
        self.server = server = grpc.aio.server(interceptors=[_MalformedRequests()], options=opts)
        pb_grpc.add_InferenceServicer_to_server(frontend, server)
        pb_grpc.add_AdminServicer_to_server(frontend, server)
        self.health, self._health_lock = health.aio.HealthServicer(), asyncio.Lock()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_all(False)
        reflection.enable_server_reflection([*self.names[1:], health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        addr = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert and cfg.tls_key:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            port = server.add_secure_port(addr, creds)
        else:
            port = server.add_insecure_port(addr)
        await server.start()
        return port

    def _run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _set_all(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        async with self._health_lock:
            for name in self.names:
                await self.health.set(name, status)

    def set_serving(self, serving: bool) -> None:
        """Any thread; does not wait (the link thread calls it). Calls take effect in order."""
        asyncio.run_coroutine_threadsafe(self._set_all(serving), self.loop)

    def enter_graceful_shutdown(self) -> None:
        self._run(self.health.enter_graceful_shutdown())

    def stop(self, grace: float) -> None:
        """Streams still open get ``grace`` seconds to deliver their last chunk."""
        self._run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
