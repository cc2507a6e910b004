"""Runs the adaptive topology policy in rank 0's process: observe load, decide, switch.

Switches go through the front end's own switch path (same lock, events, history, metrics as
an operator's Reconfigure), so an operator and the policy can never switch at once.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque

from remp_megatron.policy import CostProfile, Decision, Policy, PolicyConfig, Signals
from remp_megatron.topology import Topology

from . import metrics
from .api import pb


class PolicyLoop:
    def __init__(self, frontend, cfg: PolicyConfig, profile: CostProfile, enabled: bool):
        self.frontend, self.cfg, self.profile = frontend, cfg, profile
        self.t0 = time.monotonic()
        self.policy = Policy(cfg, profile, frontend.engine.topo.short, now=0.0)
        self.enabled = enabled
        self.decisions: deque[Decision] = deque(maxlen=50)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def switched(self, topo: Topology) -> None:
        self.policy.switched(topo.short, self.now())

    def signals(self) -> Signals:
        fe, sched = self.frontend, self.frontend.engine.sched
        window = 10.0
        cutoff = time.monotonic() - window
        arrivals = sum(1 for t in list(fe.arrivals) if t >= cutoff)
        recent = list(fe.recent_latencies)
        return Signals(
            time=self.now(), arrival_rate=arrivals / window, queue_depth=len(sched.waiting),
            running=len(sched.running), kv_usage=1 - sched.alloc.num_free / sched.cfg.num_blocks,
            ttft_p50_s=statistics.median(r[0] for r in recent) if recent else 0.0,
            tpot_p50_s=statistics.median(r[1] for r in recent) if recent else 0.0)

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            if not self.enabled:
                continue
            d = self.policy.observe(self.signals())
            last = self.decisions[-1] if self.decisions else None
            if d.switch or last is None or (last.wanted, last.switch) != (d.wanted, d.switch):
                self.decisions.append(d)  # keep changes, not every identical "stay"
            metrics.POLICY_DECISIONS.labels("switch" if d.switch else "stay").inc()
            if d.switch:
                self.frontend.try_switch(Topology.parse(d.wanted), reason=d.reason)

    def state(self) -> pb.PolicyState:
        return pb.PolicyState(
            enabled=self.enabled, latency_best=self.profile.latency_best,
            throughput_best=self.profile.throughput_best,
            decisions=[pb.PolicyDecision(time_s=d.time, current=d.current, wanted=d.wanted, reason=d.reason,
                                         switched=d.switch) for d in self.decisions])

    def stop(self) -> None:
        self._stop.set()
