"""Runs the adaptive topology policy in the engine core (rank 0): observe load, decide, switch.

It reads the engine's load snapshot and starts switches through the server's one
``SwitchController`` (same lock, events, history, metrics as an operator's Reconfigure), so an
operator and the policy can never switch at once.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

from remp_megatron.engine import Engine
from remp_megatron.policy import CostProfile, Decision, Policy, PolicyConfig, Signals
from remp_megatron.topology import Topology

from .api import pb
from .switching import SwitchController, SwitchRequest


class PolicyLoop:
    def __init__(self, engine: Engine, switches: SwitchController, cfg: PolicyConfig, profile: CostProfile,
                 enabled: bool):
        self.engine, self.switches, self.cfg, self.profile = engine, switches, cfg, profile
        self.t0 = time.monotonic()
        self.policy = Policy(cfg, profile, engine.topo, now=0.0)
        self.enabled = enabled
        self.decisions: deque[Decision] = deque(maxlen=50)
        self.counts: Counter[str] = Counter()  # "switch"/"stay" observations (the front end's metric)
        self._lock = threading.Lock()  # the policy is fed from this loop and from commits
        switches.on_commit.append(self._switched)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _switched(self, topo: Topology) -> None:
        with self._lock:
            self.policy.switched(topo, self.now())

    def signals(self) -> Signals:
        load = self.engine.load()
        return Signals(time=self.now(), queue_depth=load.queued, running=load.running, kv_usage=load.kv_usage)

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            if not self.enabled:
                continue
            with self._lock:
                d = self.policy.observe(self.signals())
                last = self.decisions[-1] if self.decisions else None
                if d.switch or last is None or (last.wanted, last.switch) != (d.wanted, d.switch):
                    self.decisions.append(d)  # keep changes, not every identical "stay"
            self.counts["switch" if d.switch else "stay"] += 1
            req = SwitchRequest(d.wanted, origin="policy", reason=d.reason)
            if d.switch and (events := self.switches.start(req)) is not None:
                while events.get() is not None:  # observe again only once the switch is over
                    pass

    def state(self) -> pb.PolicyState:
        return pb.PolicyState(
            enabled=self.enabled, latency_best=self.profile.latency_best.short,
            throughput_best=self.profile.throughput_best.short,
            decisions=[pb.PolicyDecision(time_s=d.time, current=d.current.short, wanted=d.wanted.short,
                                         reason=d.reason, switched=d.switch) for d in self.decisions])

    def stop(self) -> None:
        self._stop.set()
