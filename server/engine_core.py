"""Rank 0's side of the link: the engine, its switches and the adaptive policy, driven by the front
end (engine_client.py). It holds no request the front end does not also hold: when this process
or any rank dies, the front end re-admits what was unfinished into the next core.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

from remp_megatron.engine import Engine
from remp_megatron.reconfigure import Fault
from remp_megatron.request import Request, SamplingParams, StepOutput
from remp_megatron.topology import Topology

from . import link
from .config import ServerConfig
from .switching import SwitchController, SwitchRequest

log = logging.getLogger("remp.core")


class EngineCore:
    def __init__(self, address: str, secret: str):
        self.secret = secret
        self.engine: Optional[Engine] = None
        self.switches: Optional[SwitchController] = None
        self.policy = None
        self._started = threading.Event()
        self._start: Optional[link.Start] = None
        self._stop = threading.Event()
        self.link = link.connect(address, self._on_message, "core-link")

    def join(self, world: int, ranks: list[link.RankInfo]) -> link.Start:
        """Ask the front end what to load (the last committed topology)."""
        self.link.send(link.Join(self.secret, world, ranks))
        if not self._started.wait(120):
            raise RuntimeError("the front end did not answer Join within 120 s")
        return self._start

    def serve(self, worker, cfg: ServerConfig, load_s: float) -> None:
        """Serve until the front end says Shutdown; then release every rank."""
        engine = self.engine = Engine(worker, cfg.engine, self._start.eos_token_ids, bounded_queue=False)
        self.switches = SwitchController(engine)
        self.switches.on_record.append(
            lambda record, phases: self.link.send(link.SwitchDone(record.SerializeToString(), phases)))
        if self._start.profile:  # the file is on the front end's host, maybe not on this one
            from remp_megatron.policy import CostProfile

            from .policy_loop import PolicyLoop

            self.policy = PolicyLoop(engine, self.switches, cfg.policy, CostProfile.from_json(self._start.profile),
                                     cfg.policy_enabled)
        topo = worker.topo
        self.link.send(link.Ready(topo.tp, topo.pp, topo.ep, engine.spec.dtype, engine.load().kv_blocks_total, load_s))
        log.info("serving %s at %s (%d ranks)", cfg.model.name, worker.topo, worker.world)
        beat = threading.Thread(target=self._beat_until_stopped, name="heartbeat", daemon=True)
        beat.start()
        engine.run_forever()  # on the thread that loaded the model: the one with several kernel threads
        beat.join()
        engine.stop_workers()
        self.link.close()

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(link.HEARTBEAT_S):
            self._heartbeat()
        if self.policy is not None:
            self.policy.stop()
        self.engine.shutdown()  # run_forever returns

    def _heartbeat(self) -> None:
        load, policy = self.engine.load(), self.policy
        self.link.send(link.Heartbeat(
            load.queued, load.running, load.kv_blocks_used, load.kv_blocks_total, self.switches.busy,
            policy.state().SerializeToString() if policy is not None else b"",
            dict(policy.counts) if policy is not None else {}))

    def _emit(self, out: StepOutput) -> None:  # on the engine thread
        self.link.send(link.TokenOutput(out.request_id, out.token_ids,
                                        out.finish_reason.value if out.finish_reason else None))

    def _on_message(self, msg) -> None:
        if isinstance(msg, link.Start):
            self._start = msg
            self._started.set()
        elif isinstance(msg, link.Shutdown):  # also while loading: serve() then stops at once
            log.info("shutdown asked by the front end")
            self._stop.set()
        elif self.engine is None:
            log.warning("ignored %s: not serving yet", type(msg).__name__)
        elif isinstance(msg, link.Add):
            req = Request(request_id=msg.request_id, prompt_token_ids=msg.prompt, params=SamplingParams(**msg.params))
            try:
                self.engine.add_request(req, self._emit, msg.output)
            except Exception as e:  # the front end checked it: this is a bug, not bad input
                log.exception("could not admit %s", msg.request_id)
                self.link.send(link.TokenOutput(msg.request_id, [], "aborted", error=f"{type(e).__name__}: {e}"))
        elif isinstance(msg, link.Cancel):
            self.engine.cancel(msg.request_id)
        elif isinstance(msg, link.Reconfigure):
            self._reconfigure(msg)
        elif isinstance(msg, link.SetPolicy):
            if self.policy is None:
                self.link.send(link.Reply(msg.call_id, error="no policy cost profile (serve --policy-profile FILE)",
                                          error_kind="conflict_error"))
            else:
                self.policy.enabled = msg.enabled
                self.link.send(link.Reply(msg.call_id, self.policy.state().SerializeToString()))

    def _reconfigure(self, msg: link.Reconfigure) -> None:
        fault = Fault(msg.fault_phase, msg.fault_rank) if msg.fault_phase else None
        events = self.switches.start(SwitchRequest(Topology(msg.tp, msg.pp, msg.ep), msg.mode, fault))
        if events is None:
            self.link.send(link.Reply(msg.call_id, error="a reconfiguration is already running",
                                      error_kind="conflict_error"))
            return

        def forward() -> None:
            for event in iter(events.get, None):
                self.link.send(link.SwitchEvent(msg.call_id, event.SerializeToString()))
            self.link.send(link.Reply(msg.call_id))

        threading.Thread(target=forward, name="switch-events", daemon=True).start()
