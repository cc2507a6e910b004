"""OpenAI-compatible HTTP API (FastAPI on uvicorn) in rank 0's process, beside gRPC.

    POST /v1/completions, /v1/chat/completions   (stream: server-sent events, then "data: [DONE]")
    GET  /v1/models, /health, /metrics
    POST /admin/reconfigure (NDJSON progress events), /admin/policy, /admin/shutdown; GET /admin/status
         (admin routes need "Authorization: Bearer <token>" whenever the server has an admin token)

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. Engine outputs
reach the event loop through a non-blocking sink (no thread per stream); a client that goes
away mid-request cancels it, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from typing import AsyncIterator, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from remp_megatron.request import StepOutput

from .config import ServerConfig
from .openai_protocol import PARAM_NAMES, ChatCompletionRequest, CompletionRequest, PolicyBody, ReconfigureBody
from .service import ApiError, AsyncRun, ErrorKind, Service

log = logging.getLogger("remp.http")

HTTP_STATUS = {
    ErrorKind.INVALID: 400, ErrorKind.UNAUTHENTICATED: 401, ErrorKind.PERMISSION: 403, ErrorKind.NOT_FOUND: 404,
    ErrorKind.PRECONDITION: 409, ErrorKind.QUEUE_FULL: 429, ErrorKind.UNAVAILABLE: 503,
}


def error_response(status: int, message: str, kind: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, run: AsyncRun, work):
    """Await ``work``; if the client goes away first, cancel the run (its KV blocks are freed) and
    raise _ClientGone (answered 499, which nobody reads)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        run.cancel()
        log.info("client went away: cancelled %s", [h.request_id for h in run.handles])
        raise _ClientGone
    return task.result()


def build_app(service: Service, model_name: str) -> FastAPI:
    app = FastAPI(title="ReMP-Megatron", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error_response(HTTP_STATUS[e.kind], e.message, e.kind.value, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            return error_response(400, f"body: not valid JSON ({err['ctx']['error']})", ErrorKind.INVALID.value,
                                  "body")
        param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"][1:]).lstrip(".") or "body"
        msg = str(err["msg"]).removeprefix("Value error, ")
        return error_response(400, f"{param}: {msg}", ErrorKind.INVALID.value, param)

    @app.exception_handler(_ClientGone)
    async def _gone(_, e: _ClientGone):
        return error_response(499, "client closed the request", "cancelled")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "error")

    def check_model(body) -> None:
        if body.model is not None and body.model != model_name:
            raise ApiError(ErrorKind.NOT_FOUND, f"model: {body.model!r} is not served here (this server serves "
                                                f"{model_name!r})", "model")

    # ---- OpenAI ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "remp-megatron",
            "root": str(service.cfg.model), "max_model_len": service.engine.spec.max_position_embeddings}]}

    @app.get("/health")
    async def health():
        if (why := service.health()) is not None:
            raise ApiError(ErrorKind.UNAVAILABLE, why)
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        rid = f"cmpl-{uuid.uuid4().hex}"
        reqs = []
        for i, prompt in enumerate(body.prompts()):
            ids = service.encode_text(prompt, "prompt") if isinstance(prompt, str) else list(prompt)
            # OpenAI's default for completions is 16 tokens.
            params = body.sampling(body.max_tokens or min(16, service.cfg.max_new_tokens))
            reqs.append(service.make_request(ids, params, f"{rid}-{i}", PARAM_NAMES))
        run = AsyncRun(service, asyncio.get_running_loop())
        run.submit(reqs)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            return _event_stream(run, head, body.include_usage,
                                 lambda i, out: {"index": i, "text": out.text, "logprobs": None,
                                                 "finish_reason": _reason(out)})
        texts, reasons, usage = await _unless_disconnected(request, run, _collect(run))
        return {**head, "choices": [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                                    for i in range(len(reqs))], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        ids = service.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages], "messages")
        params = body.sampling(body.max_new_tokens or service.default_max_new_tokens(len(ids)))
        names = {**PARAM_NAMES, "prompt": "messages",
                 "max_new_tokens": "max_completion_tokens" if body.max_completion_tokens else "max_tokens"}
        run = AsyncRun(service, asyncio.get_running_loop())
        run.submit([service.make_request(ids, params, rid, names)])
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            def choice(i, out):
                delta = {"content": out.text} if out.text or not out.finished else {}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": _reason(out)}

            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            return _event_stream(run, {**head, "object": "chat.completion.chunk"}, body.include_usage, choice, first)
        texts, reasons, usage = await _unless_disconnected(request, run, _collect(run))
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                                     "logprobs": None, "finish_reason": reasons[0]}], "usage": usage}

    # ---- admin ------------------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        service.authorize(request.headers.get("authorization"))

    @app.post("/admin/reconfigure")
    def reconfigure(body: ReconfigureBody, request: Request):
        authorize(request)
        events = service.reconfigure(body.tp, body.pp, body.mode, body.inject_fault, body.ep)
        lines = (json.dumps(MessageToDict(ev, preserving_proto_field_name=True)) + "\n" for ev in events)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    @app.get("/admin/status")
    def status(request: Request):
        authorize(request)
        return MessageToDict(service.status(), preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True)

    @app.post("/admin/policy")
    def policy(body: PolicyBody, request: Request):
        authorize(request)
        return MessageToDict(service.set_policy(body.enabled), preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True)

    @app.post("/admin/shutdown")
    def shutdown(request: Request):
        authorize(request)
        service.request_shutdown()
        return {"status": "shutting down"}

    return app


def _reason(out: StepOutput) -> Optional[str]:
    return out.finish_reason.value if out.finished else None


async def _collect(run: AsyncRun) -> tuple[list[str], list[str], dict]:
    n = len(run.handles)
    texts, reasons, completion = [""] * n, [""] * n, 0
    async for i, out in run:
        texts[i] += out.text
        if out.finished:
            reasons[i], completion = out.finish_reason.value, completion + out.completion_tokens
    return texts, reasons, _usage(sum(h.prompt_tokens for h in run.handles), completion)


def _event_stream(run: AsyncRun, head: dict, include_usage: bool, choice, first: Optional[dict] = None):
    """SSE: one chunk per output (``first`` before them: chat's role delta), an optional usage chunk,
    then [DONE]. If the client goes away, the generator is cancelled and so are the requests."""
    async def events() -> AsyncIterator[str]:
        usage_field = {"usage": None} if include_usage else {}
        completion = 0
        try:
            if first is not None:
                for i in range(len(run.handles)):
                    yield _sse({**head, "choices": [{**first, "index": i}], **usage_field})
            async for i, out in run:
                if out.finished:
                    completion += out.completion_tokens
                if out.text or out.finished:
                    yield _sse({**head, "choices": [choice(i, out)], **usage_field})
            if include_usage:
                yield _sse({**head, "choices": [],
                            "usage": _usage(sum(h.prompt_tokens for h in run.handles), completion)})
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")


class HttpServer:
    """uvicorn in a background thread on a socket bound up front (port 0 picks a free one)."""

    def __init__(self, service: Service, cfg: ServerConfig):
        self.sock = socket.create_server((cfg.host, cfg.http_port), family=_family(cfg.host))
        self.port = self.sock.getsockname()[1]
        tls = dict(ssl_certfile=str(cfg.tls_cert), ssl_keyfile=str(cfg.tls_key)) if cfg.tls_cert and cfg.tls_key else {}
        config = uvicorn.Config(build_app(service, cfg.model_name), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, **tls)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {cfg.host}:{self.port} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
