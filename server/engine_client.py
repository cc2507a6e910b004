"""The front end's view of the engine core: requests in, token outputs, switch events and load out,
over the link (link.py). It outlives the engine's ranks.

Every unfinished request is kept here with the tokens already streamed. When the engine core
goes away (a rank died: torchrun tears the world down and starts it again) the requests stay;
the new core is told to load the last committed topology, and each request is re-admitted with
its prompt plus its streamed tokens, so greedy and seeded sampling continue exactly and the client
sees a pause. When torchrun gives up (restarts exhausted), every request ends with an error.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from remp_megatron.policy import CostProfile
from remp_megatron.reconfigure import Fault
from remp_megatron.request import FinishReason, Request, StepOutput
from remp_megatron.scheduler import Load, QueueFull, check_fits
from remp_megatron.spec import ModelSpec
from remp_megatron.topology import Topology, topology_for_world

from . import link, metrics
from .api import pb
from .config import ServerConfig

log = logging.getLogger("remp.frontend")


@dataclass
class _Entry:
    request: Request  # its seed fixed here, so a re-admitted request samples the same tokens
    deliver: Callable[[StepOutput], None]
    output: list[int] = field(default_factory=list)
    cancelled: bool = False


class EngineUnavailable(RuntimeError):
    """The engine is gone for good (torchrun's restarts are exhausted)."""


class EngineClient:
    def __init__(self, cfg: ServerConfig, spec: ModelSpec, world: int,
                 on_serving: Callable[[bool], None] = lambda serving: None, profile: Optional[CostProfile] = None):
        self.cfg, self.spec, self.world = cfg, spec, world
        self.profile = profile  # the policy's (--policy-profile): sent to each core; picks where a shrunk world serves
        self.topo = Topology(cfg.tp, cfg.pp, cfg.ep)  # served now
        self.wanted = self.topo  # the last committed by a switch (or the configured start): kept while it fits
        self.eos_token_ids: Optional[list[int]] = None  # the tokenizer's (set_eos): a Join waits for it
        self._pending_join: Optional[tuple[bytes, link.Join]] = None
        self.on_serving = on_serving  # health follows this
        # Ranks on other nodes (`remp join`) prove themselves with the admin token; local ones get a fresh secret.
        self.secret = cfg.admin_token() or f"{random.getrandbits(128):032x}"
        self.serving = False
        self.failure: Optional[str] = None  # why the engine is gone for good
        self.restarts = 0
        self.ranks: list[link.RankInfo] = []
        self.dtype = ""
        self.history: list[pb.SwitchRecord] = []
        self.load_now = Load()
        self.reconfiguring = False
        self.policy = b""
        self._decisions: dict[str, int] = {}
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._peer: Optional[bytes] = None  # the current core's routing id
        self._stopping = False  # the engine was told to shut down: its silence is expected
        self._last_heard = 0.0
        self._down_since = time.monotonic()
        self._calls: dict[int, queue.Queue] = {}
        self._call_ids = iter(range(1, 1 << 62))
        self.link, self.address = link.bind(cfg.host, cfg.link_port, self._on_message, "frontend-link")
        self._watch = threading.Thread(target=self._watchdog, name="link-watchdog", daemon=True)
        self._watch.start()

    # ---- requests (any thread) ----------------------------------------------------------------
    def add_request(self, req: Request, sink: Callable[[StepOutput], None]) -> None:
        """Admit ``req``; its outputs go to ``sink`` (on the link thread). The front end is the one
        admission: it raises what the engine's own would (ValueError, RequestTooLong, QueueFull) and
        EngineUnavailable when the engine is gone; the core takes whatever was admitted."""
        if any(not 0 <= t < self.spec.vocab_size for t in req.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        cache = self.load_now.kv_blocks_total or 1 << 62  # unknown until the engine first served
        check_fits(len(req.prompt_token_ids), req.params.max_new_tokens, self.spec.max_position_embeddings,
                   self.cfg.engine.block_size, cache)
        if req.params.seed is None:
            req = req.model_copy(update={"params": req.params.model_copy(update={"seed": random.getrandbits(62)})})
        with self._lock:
            if self.failure is not None:
                raise EngineUnavailable(self.failure)
            if req.request_id in self._entries:
                raise ValueError(f"request id {req.request_id!r} is already in use")
            # Waiting: what is not running (the last heartbeat's count) nor cancelled (leaving, its
            # slot is free for the client even before the core confirms).
            live = sum(not e.cancelled for e in self._entries.values())
            if live - self.load_now.running >= self.cfg.engine.max_queue:
                raise QueueFull(f"admission queue full ({self.cfg.engine.max_queue} waiting)")
            entry = self._entries[req.request_id] = _Entry(req, sink)
            if self.serving:
                self._admit(entry)

    def cancel(self, request_id: str) -> bool:
        """Finish a request now; False if it is unknown, finished or already cancelled."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None or entry.cancelled:
                return False
            entry.cancelled = True
            if self.serving:  # the core frees its blocks and sends the final output
                self.link.send(link.Cancel(request_id), self._peer)
            else:
                self._finish(entry, StepOutput(request_id, [], True, FinishReason.CANCELLED,
                                               len(entry.request.prompt_token_ids), len(entry.output)))
        return True

    def load(self) -> Load:
        return self.load_now

    def unfinished(self) -> int:
        with self._lock:
            return len(self._entries)

    def abort_all(self) -> None:
        """Shutting down: every unfinished request ends with finish_reason "aborted"."""
        with self._lock:
            for entry in list(self._entries.values()):
                self._finish(entry, StepOutput(entry.request.request_id, [], True, FinishReason.ABORTED,
                                               len(entry.request.prompt_token_ids), len(entry.output)))

    # ---- admin ---------------------------------------------------------------------------------
    def reconfigure(self, target: Topology, mode: str, fault: Optional[Fault] = None) -> queue.Queue:
        """The switch's pb.ReconfigureEvents, then the core's Reply (an error if refused or lost), then None."""
        return self._call(lambda cid: link.Reconfigure(cid, target.tp, target.pp, target.ep, mode,
                                                       fault.phase if fault else "", fault.rank if fault else 0))

    def set_policy(self, enabled: bool) -> queue.Queue:
        """The core's Reply (a pb.PolicyState, or an error), then None."""
        return self._call(lambda cid: link.SetPolicy(cid, enabled))

    def set_eos(self, eos_token_ids: list[int]) -> None:
        """The tokenizer's end-of-text ids (the front end loads it while the ranks start)."""
        with self._lock:
            self.eos_token_ids = eos_token_ids
            if self._pending_join is not None:
                self._on_join(*self._pending_join)

    def shutdown_engine(self) -> None:
        """Tell the core to stop every rank (they exit 0)."""
        with self._lock:
            self._stopping = True
            if self._peer is not None:
                self.link.send(link.Shutdown(), self._peer)

    def fail(self, reason: str) -> None:
        """The engine is gone for good: every request ends with ``reason`` (answered UNAVAILABLE)."""
        log.error("engine unavailable: %s", reason)
        with self._lock:
            self.failure = reason
            self._set_serving(False)
            for entry in list(self._entries.values()):
                self._finish(entry, StepOutput(entry.request.request_id, [], True, FinishReason.ABORTED,
                                               len(entry.request.prompt_token_ids), len(entry.output), error=reason))
            self._end_calls(f"engine unavailable: {reason}")

    # ---- internals ------------------------------------------------------------------------------
    def _call(self, make) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._lock:
            if not self.serving:
                why = self.failure or "the engine is restarting"
                q.put(link.Reply(0, error=f"engine unavailable: {why}", error_kind="service_unavailable"))
                q.put(None)
                return q
            cid = next(self._call_ids)
            self._calls[cid] = q
            self.link.send(make(cid), self._peer)
        return q

    def _admit(self, entry: _Entry) -> None:
        r = entry.request
        self.link.send(link.Add(r.request_id, r.prompt_token_ids, r.params.model_dump(), entry.output), self._peer)

    def _finish(self, entry: _Entry, out: StepOutput) -> None:
        self._entries.pop(entry.request.request_id, None)
        entry.deliver(out)

    def _set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            self.on_serving(serving)

    def _end_calls(self, why: str) -> None:
        for q in self._calls.values():
            q.put(link.Reply(0, error=why, error_kind="service_unavailable"))
            q.put(None)
        self._calls.clear()

    def _on_message(self, peer: bytes, msg) -> None:
        with self._lock:
            if isinstance(msg, link.Join):
                self._on_join(peer, msg)
                return
            if peer != self._peer:
                return  # a core that is gone (or never joined)
            self._last_heard = time.monotonic()
            if isinstance(msg, link.TokenOutput):
                self._on_output(msg)
            elif isinstance(msg, link.Heartbeat):
                self.load_now = Load(msg.queued, msg.running, msg.kv_blocks_used, msg.kv_blocks_total)
                self.reconfiguring, self.policy = msg.reconfiguring, msg.policy
                for action, n in msg.policy_decisions.items():  # counts since this core started
                    metrics.POLICY_DECISIONS.labels(action).inc(max(0, n - self._decisions.get(action, 0)))
                self._decisions = msg.policy_decisions
            elif isinstance(msg, link.Ready):
                self._on_ready(msg)
            elif isinstance(msg, link.SwitchEvent):
                if (q := self._calls.get(msg.call_id)) is not None:
                    q.put(pb.ReconfigureEvent.FromString(msg.event))
            elif isinstance(msg, link.SwitchDone):
                self._on_switch_done(msg)
            elif isinstance(msg, link.Reply):
                if (q := self._calls.pop(msg.call_id, None)) is not None:
                    q.put(msg)
                    q.put(None)

    def _on_join(self, peer: bytes, msg: link.Join) -> None:
        if msg.secret != self.secret:
            log.warning("ignored a Join without the link secret from %r", peer)
            return
        if self.eos_token_ids is None:
            self._pending_join = (peer, msg)
            return
        self._pending_join = None
        if self.serving:  # the old core went away just now, unnoticed by the watchdog
            self._down_since = time.monotonic()
        t, config = topology_for_world(self.spec, self.wanted, msg.world, self._profiled), self.cfg.model_dump_json()
        if self._stopping:  # torchrun re-formed the world while the server shuts down: its ranks just exit
            self.link.send(link.Start(config, 0, 0, 0, self.eos_token_ids, refused="the server is shutting down"), peer)
            return
        if self._peer is not None:
            self.restarts += 1
            metrics.RESTARTS.inc()
            log.warning("engine core restarted (restart %d): %d ranks on %s; loading %s", self.restarts, msg.world,
                        ", ".join(sorted({r.host for r in msg.ranks})), t or "nothing")
        self._set_serving(False)
        self._end_calls("the engine restarted")
        self._peer, self._last_heard, self.world, self.ranks = peer, time.monotonic(), msg.world, msg.ranks
        self._decisions = {}
        if t is None:
            why = f"no topology of this model fits the {msg.world} rank(s) that joined"
            self.link.send(link.Start(config, 0, 0, 0, self.eos_token_ids, refused=why), peer)
            self.fail(why)
            return
        if t != self.wanted:
            why = "the largest that does"
            if self.profile is not None:
                why = f"the cost profile's pick for {len(self._entries)} pending request(s) (else {why})"
            log.warning("%s does not fit the %d rank(s) that joined: serving at %s, %s, until the world grows back",
                        self.wanted, msg.world, t, why)
        profile = self.profile.to_json() if self.profile is not None else ""
        self.link.send(link.Start(config, t.tp, t.pp, t.ep, self.eos_token_ids, profile), peer)

    def _profiled(self, fits: list[Topology]) -> Optional[Topology]:
        """Among the topologies a shrunk world fits, where the policy would serve what is pending."""
        return self.profile.best_among(fits, len(self._entries), self.cfg.policy) if self.profile is not None else None

    def _on_ready(self, msg: link.Ready) -> None:
        self.topo, self.dtype = Topology(msg.tp, msg.pp, msg.ep), msg.dtype
        self.load_now = Load(kv_blocks_total=msg.num_blocks)
        for entry in [e for e in self._entries.values() if e.cancelled]:  # the lost core never confirmed
            self._finish(entry, StepOutput(entry.request.request_id, [], True, FinishReason.CANCELLED,
                                           len(entry.request.prompt_token_ids), len(entry.output)))
        entries = list(self._entries.values())
        for entry in entries:
            self._admit(entry)
        down = time.monotonic() - self._down_since
        log.info("engine serving at %s (%d ranks, weights loaded in %.1f s, %.1f s after %s); re-admitted %d "
                 "request(s), %d streamed tokens to recompute", self.topo, self.world, msg.load_s, down,
                 "the old core was lost" if self.restarts else "start", len(entries),
                 sum(len(e.output) for e in entries))
        if self.restarts:
            metrics.RECOVERY.observe(down)
        self._set_serving(True)

    def _on_output(self, item: link.TokenOutput) -> None:
        entry = self._entries.get(item.request_id)
        if entry is None:
            return
        entry.output += item.token_ids
        reason = FinishReason(item.finish_reason) if item.finish_reason else None
        out = StepOutput(item.request_id, item.token_ids, reason is not None, reason,
                         len(entry.request.prompt_token_ids), len(entry.output), error=item.error)
        if reason is not None:
            self._finish(entry, out)
        else:
            entry.deliver(out)

    def _on_switch_done(self, msg: link.SwitchDone) -> None:
        record = pb.SwitchRecord.FromString(msg.record)
        self.history.append(record)
        metrics.observe_switch(record, msg.phases)
        if record.committed:
            self.topo = self.wanted = Topology.parse(record.target)

    def _watchdog(self) -> None:
        """The core is silent (its process is gone or hung): not serving until a new one is ready."""
        while True:
            time.sleep(link.HEARTBEAT_S)
            with self._lock:
                silent = time.monotonic() - self._last_heard > link.LINK_TIMEOUT_S
                if self.serving and silent and not self._stopping:
                    log.warning("engine core silent for %.0f s: not serving until torchrun restarts it "
                                "(%d request(s) kept)", link.LINK_TIMEOUT_S, len(self._entries))
                    self._down_since = time.monotonic() - link.LINK_TIMEOUT_S
                    self._set_serving(False)
                    self._end_calls("the engine core was lost")
