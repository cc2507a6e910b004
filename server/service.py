"""What the front end does, whatever the transport: turn prompts into requests, admit them,
detokenise their outputs, authorize and start switches, report status. The gRPC servicer
(frontend.py) and the HTTP app (http_api.py) are thin translations onto this; each maps an
``ApiError`` to its own status code. ``engine`` is the EngineClient (the engine core over the
link); the in-process Python API gives an Engine, which admits and cancels alike.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import hmac
import itertools
import logging
import threading
import weakref
from typing import AsyncIterator, Callable, Iterator, Mapping, Optional

from pydantic import ValidationError

from remp_megatron.reconfigure import MODES, PHASES, Fault
from remp_megatron.request import FinishReason, Request, RequestHandle, SamplingParams, StepOutput
from remp_megatron.scheduler import QueueFull, RequestTooLong
from remp_megatron.topology import Topology, TopologyError

from . import link, metrics
from .api import pb
from .config import ServerConfig
from .detokenizer import Detokenizer
from .engine_client import EngineUnavailable

log = logging.getLogger("remp.server")

CHAT_ROLES = ("system", "user", "assistant")
# A request that does not say how many tokens it wants gets this many (bounded by --max-new-tokens).
DEFAULT_MAX_NEW_TOKENS = 64


class ErrorKind(enum.Enum):
    INVALID = "invalid_request_error"
    NOT_FOUND = "not_found_error"
    UNAUTHENTICATED = "authentication_error"
    PERMISSION = "permission_error"
    QUEUE_FULL = "rate_limit_error"
    PRECONDITION = "conflict_error"  # e.g. a switch is already running
    UNAVAILABLE = "service_unavailable"


class ApiError(Exception):
    """A request the server refuses; ``param`` names the offending field in the caller's terms."""

    def __init__(self, kind: ErrorKind, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param


def invalid(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(ErrorKind.INVALID, message, param)


class Service:
    def __init__(self, engine, cfg: ServerConfig, tokenizer=None, allow_fault_injection: bool = False,
                 shutdown: Optional[Callable[[], None]] = None):
        self.engine, self.cfg, self.tok = engine, cfg, tokenizer
        self.token = cfg.admin_token()
        self.allow_fault_injection = allow_fault_injection
        self.shutdown = shutdown  # starts the graceful shutdown (Admin Shutdown)
        self.accepting = True
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()

    # ---- prompts → requests -----------------------------------------------------------------
    def _tokenizer(self, param: str):
        if self.tok is None:
            raise invalid(f"{param}: this model has no tokenizer; send token ids", param)
        return self.tok

    def encode_text(self, text: str, param: str) -> list[int]:
        return self._tokenizer(param).encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[dict], param: str) -> list[int]:
        """The model's own chat template, ending with the assistant's turn."""
        tok = self._tokenizer(param)
        if not messages:
            raise invalid(f"{param}: needs at least one message", param)
        for i, m in enumerate(messages):
            if m["role"] not in CHAT_ROLES:
                raise invalid(f"{param}[{i}].role: {m['role']!r} is not one of {list(CHAT_ROLES)}", f"{param}[{i}].role")
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def new_id(self, prefix: str) -> str:
        with self._id_lock:
            return f"{prefix}-{next(self._ids)}"

    def make_request(self, ids: list[int], params: dict, request_id: str,
                     names: Mapping[str, str] = {}) -> Request:
        """Validate ``params`` (SamplingParams fields) against the model and the server's limits.
        ``names`` maps a field to what the caller calls it, for error messages."""
        def name(field: str) -> str:
            return names.get(field, field)

        params = {"max_new_tokens": min(DEFAULT_MAX_NEW_TOKENS, self.cfg.max_new_tokens), **params}

        if len(ids) > self.cfg.max_prompt_tokens:
            raise invalid(f"{name('prompt')}: {len(ids)} tokens exceeds the server limit of "
                          f"{self.cfg.max_prompt_tokens}", name("prompt"))
        n = params.get("max_new_tokens")
        if n is not None and n > self.cfg.max_new_tokens:
            raise invalid(f"{name('max_new_tokens')}: {n} exceeds the server limit of {self.cfg.max_new_tokens}",
                          name("max_new_tokens"))
        try:
            return Request(request_id=request_id, prompt_token_ids=ids, params=SamplingParams(**params))
        except ValidationError as e:
            err = e.errors()[0]
            loc = [str(x) for x in err["loc"] if x != "params"]
            field = name("prompt" if loc[:1] == ["prompt_token_ids"] else loc[0]) if loc else "request"
            msg = err["msg"].removeprefix("Value error, ")
            raise invalid(f"{'.'.join([field, *loc[1:]])}: {msg}", field) from None

    def default_max_new_tokens(self, prompt_len: int) -> int:
        """As much as the model's context and the server's limit allow."""
        return max(1, min(self.cfg.max_new_tokens, self.engine.spec.max_position_embeddings - prompt_len))

    def health(self) -> Optional[str]:
        """Why the server is not serving now (None: it is). While the engine restarts, requests wait."""
        if not self.accepting:
            return "server is shutting down"
        if not self.engine.serving:
            return self.engine.failure or "the engine is starting or restarting (requests wait)"
        return None

    def submit(self, req: Request, sink: Optional[Callable[[StepOutput], None]] = None) -> RequestHandle:
        """Admit ``req``; its outputs carry text (stop strings cut). ``sink``: see RequestHandle."""
        if not self.accepting:
            raise ApiError(ErrorKind.UNAVAILABLE, "server is shutting down")
        if req.params.stop and self.tok is None:
            raise invalid("stop: stop strings need a tokenizer; this model has none", "stop")
        handle = RequestHandle(req.request_id, len(req.prompt_token_ids), sink)
        detok = Detokenizer(self.tok, req.params.stop)

        def deliver(out: StepOutput) -> None:
            if handle.finished:  # a stop string ended it; the engine's own end comes after
                return
            text, stopped = detok.add(out.token_ids, out.finished)
            if stopped:
                out = dataclasses.replace(out, finished=True, finish_reason=FinishReason.STOP)
            handle.put(dataclasses.replace(out, text=text))
            if stopped:
                self.engine.cancel(req.request_id)

        try:
            self.engine.add_request(req, deliver)
        except EngineUnavailable as e:
            raise ApiError(ErrorKind.UNAVAILABLE, str(e)) from None
        except QueueFull as e:
            raise ApiError(ErrorKind.QUEUE_FULL, str(e)) from None
        except (RequestTooLong, ValueError) as e:
            raise invalid(str(e)) from None
        return handle

    def cancel(self, request_id: str) -> bool:
        return self.engine.cancel(request_id)

    def observe(self, handle: RequestHandle, finish_reason: str) -> None:
        metrics.REQUESTS.labels(finish_reason).inc()
        t = handle.token_times
        metrics.TOKENS.inc(len(t))
        if t:
            metrics.TTFT.observe(t[0] - handle.arrival)
        if len(t) > 1:
            metrics.TPOT.observe((t[-1] - t[0]) / (len(t) - 1))

    # ---- admin --------------------------------------------------------------------------------
    def authorize(self, authorization: Optional[str]) -> None:
        """``authorization`` is the request's "Authorization" header / metadata value."""
        if self.token is None:
            return
        if not hmac.compare_digest(authorization or "", f"Bearer {self.token}"):
            raise ApiError(ErrorKind.UNAUTHENTICATED, "admin calls need 'Authorization: Bearer <token>'")

    def reconfigure(self, tp: int, pp: int, mode: str, inject_fault: str = "",
                    ep: int = 1) -> Iterator[pb.ReconfigureEvent]:
        """Start a switch in the engine core; its events (ACCEPTED, phases, COMMITTED or ROLLED_BACK)."""
        target = Topology(tp, pp, ep)
        try:
            target.validate(self.engine.spec, self.engine.world)
        except TopologyError as e:
            raise invalid(str(e), e.field) from None
        mode = mode or "migrate"
        if mode not in MODES:
            raise invalid(f"mode: {mode!r} is not one of {list(MODES)}", "mode")
        fault = self._fault(inject_fault) if inject_fault else None
        calls = self.engine.reconfigure(target, mode, fault)
        first = calls.get()
        if isinstance(first, link.Reply):  # refused: a switch is running, or the engine is restarting
            raise ApiError(ErrorKind(first.error_kind), first.error)

        def events() -> Iterator[pb.ReconfigureEvent]:
            item = first
            while not isinstance(item, link.Reply):
                yield item
                item = calls.get()
            if item.error:  # the engine core was lost mid-switch: it comes back at the old topology
                yield pb.ReconfigureEvent(kind=pb.ReconfigureEvent.ROLLED_BACK, target=str(target), reason=item.error)

        return events()

    def _fault(self, spec: str) -> Fault:
        phase, _, rank = spec.partition(":")
        if not self.allow_fault_injection:
            raise ApiError(ErrorKind.PERMISSION, "fault injection is off (--allow-fault-injection)")
        if phase not in PHASES or (rank and not rank.isdigit()):
            raise invalid(f"inject_fault: expected PHASE[:RANK], PHASE in {PHASES}", "inject_fault")
        return Fault(phase, int(rank or 0))

    def set_policy(self, enabled: bool) -> pb.PolicyState:
        reply = self.engine.set_policy(enabled).get()
        if reply.error:
            raise ApiError(ErrorKind(reply.error_kind), reply.error)
        return pb.PolicyState.FromString(reply.payload)

    def status(self) -> pb.StatusResponse:
        """From the front end's view of the engine (its load as last reported): answered while the
        engine restarts too."""
        c = self.engine
        load, topo, world = c.load(), c.topo, c.world
        ranks = []
        for r in c.ranks:
            coords = topo.coords(r.rank)
            ranks.append(pb.RankInfo(rank=r.rank, host=r.host, pid=r.pid, role="active" if coords else "standby",
                                     pp_stage=coords[0] if coords else 0, tp_rank=coords[1] if coords else 0))
        return pb.StatusResponse(
            topology=str(topo), tp=topo.tp, pp=topo.pp, ep=topo.ep, world_size=world,
            active_ranks=list(range(topo.size)), standby_ranks=list(range(topo.size, world)),
            queue_depth=load.queued, running_requests=load.running, kv_blocks_used=load.kv_blocks_used,
            kv_blocks_free=load.kv_blocks_free, kv_block_size=self.cfg.engine.block_size,
            switch_history=list(c.history), reconfiguring=c.reconfiguring,
            policy=pb.PolicyState.FromString(c.policy) if c.policy else None, dtype=c.dtype,
            serving=c.serving, restarts=c.restarts, ranks=ranks, unavailable_reason=c.failure or "")

    def request_shutdown(self) -> None:
        if self.shutdown is None:
            raise ApiError(ErrorKind.UNAVAILABLE, "this server cannot be shut down remotely")
        log.info("shutdown requested over the Admin API")
        self.shutdown()


class _LoopInbox:
    """Outputs handed from the link's thread to one event loop, with one wake-up of the loop for
    all that arrive before it runs: a step's tokens for 32 streams cost one self-pipe write, not 32
    (a syscall each, on the cores the engine steps on)."""

    _lock = threading.Lock()
    _of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInbox] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, tuple[int, StepOutput]]] = []
        self.woken = False  # a _flush is scheduled and has not run yet

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _LoopInbox:
        with cls._lock:
            if (inbox := cls._of.get(loop)) is None:
                inbox = cls._of[loop] = cls(loop)
            return inbox

    def put(self, queue: asyncio.Queue, item: tuple[int, StepOutput]) -> None:  # any thread
        with self._lock:
            self.items.append((queue, item))
            if self.woken:
                return
            self.woken = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop is closed (server stopping): nobody is reading
            pass

    def _flush(self) -> None:  # on the loop
        with self._lock:
            items, self.items, self.woken = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class AsyncRun:
    """The engine requests behind one API call (HTTP: one per prompt), read on an event loop. Outputs
    reach the loop through a non-blocking sink: no thread per stream."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop):
        self.service, self.inbox = service, _LoopInbox.of(loop)
        self.outputs: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.handles = []

    def submit(self, requests: list[Request]) -> None:
        """All or nothing: if one is refused (queue full...), those already admitted are cancelled."""
        try:
            for i, req in enumerate(requests):
                self.handles.append(self.service.submit(req, lambda out, i=i: self._deliver(i, out)))
        except ApiError:
            self.cancel()
            raise

    def _deliver(self, i: int, out: StepOutput) -> None:  # on the thread that produced it (the link's)
        self.inbox.put(self.outputs, (i, out))

    async def __aiter__(self) -> AsyncIterator[tuple[int, StepOutput]]:
        pending = len(self.handles)
        while pending:
            i, out = await self.outputs.get()
            if out.error:
                raise ApiError(ErrorKind.UNAVAILABLE, out.error)
            if out.finished:
                pending -= 1
                self.service.observe(self.handles[i], out.finish_reason.value)
            yield i, out

    def cancel(self) -> None:
        """Cancel what is still running (the caller went away, or one request was refused); each
        counts as cancelled in the metrics, since its final output is not read."""
        for h in self.handles:
            if self.service.cancel(h.request_id):  # False for the ones already finished
                self.service.observe(h, FinishReason.CANCELLED.value)
