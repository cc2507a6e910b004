"""The one owner of a switch's lifecycle in the server: lock, pause → reconfigure → resume,
downtime, history, metrics, events. Operator requests (Admin.Reconfigure) and the adaptive
policy both start switches here, so they can never run two at once and are recorded alike.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from remp_megatron.engine import Engine
from remp_megatron.reconfigure import Fault, RolledBack, Timeline
from remp_megatron.topology import Topology

from . import metrics
from .api import pb

log = logging.getLogger("remp.switch")

# The front end's longest wait for the first step after a switch, when measuring downtime.
_FIRST_STEP_WAIT_S = 60.0


@dataclass(frozen=True)
class SwitchRequest:
    target: Topology
    mode: str = "migrate"
    fault: Optional[Fault] = None
    origin: str = "operator"  # "operator" | "policy"
    reason: str = ""  # why (the policy's decision), logged


class SwitchController:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.history: list[pb.SwitchRecord] = []
        self.on_commit: list[Callable[[Topology], None]] = []  # e.g. the policy's bookkeeping
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def start(self, req: SwitchRequest) -> Optional[queue.Queue]:
        """Start a switch in the background; None if one is already running. The queue yields
        ReconfigureEvents (ACCEPTED, one PHASE per phase, COMMITTED or ROLLED_BACK), then None."""
        if not self._lock.acquire(blocking=False):
            return None
        events: queue.Queue = queue.Queue()
        events.put(pb.ReconfigureEvent(kind=pb.ReconfigureEvent.ACCEPTED, source=str(self.engine.topo),
                                       target=str(req.target)))
        threading.Thread(target=self._run, args=(req, events), name="switch", daemon=True).start()
        return events

    def _run(self, req: SwitchRequest, events: queue.Queue) -> None:
        try:
            record = self._switch(req, events.put)
            log.info("switch %s -> %s (%s, %s) %s, downtime %.0f ms%s", record.source, record.target, record.mode,
                     record.origin, "committed" if record.committed else "rolled back", record.downtime_s * 1e3,
                     f": {record.error}" if record.error else "")
        finally:
            self._lock.release()
            events.put(None)

    def _switch(self, req: SwitchRequest, emit: Callable[[pb.ReconfigureEvent], None]) -> pb.SwitchRecord:
        """Pause at a step boundary, reconfigure, resume; emit events; record the outcome."""
        engine = self.engine
        t0, started = time.perf_counter(), time.time()
        if req.reason:
            log.info("%s asks for %s: %s", req.origin, req.target, req.reason)

        def progress(phase: str, tl: Timeline) -> None:
            nbytes = {"move_weights": tl.weights_moved, "move_kv": tl.kv_moved}.get(phase, 0)
            metrics.SWITCH_PHASE.labels(phase).observe(tl.phases[phase])
            emit(pb.ReconfigureEvent(kind=pb.ReconfigureEvent.PHASE, phase=phase, seconds=tl.phases[phase],
                                     bytes=nbytes, source=tl.source, target=tl.target))

        reason = ""
        engine.pause()
        try:
            tl = engine.reconfigure(req.target, req.mode, req.fault, progress=progress)
        except RolledBack as e:
            tl, reason = e.timeline, str(e)
        except Exception as e:  # never leave the engine paused; report instead
            log.exception("reconfiguration failed")
            tl = Timeline(str(engine.topo), str(req.target), req.mode, failed_phase="request", error=str(e))
            reason = f"{type(e).__name__}: {e}"
        finally:
            steps = engine.steps
            engine.resume()
        # Downtime ends with the first step served after the switch (if anything is running).
        while engine.has_work and engine.steps == steps and time.perf_counter() - t0 < _FIRST_STEP_WAIT_S:
            time.sleep(0.001)
        downtime = time.perf_counter() - t0
        metrics.SWITCHES.labels("committed" if tl.committed else "rolled_back").inc()
        if tl.committed:
            metrics.SWITCH_DOWNTIME.observe(downtime)
            for listener in self.on_commit:
                listener(req.target)
        record = pb.SwitchRecord(
            source=tl.source, target=tl.target, mode=req.mode, committed=tl.committed, downtime_s=downtime,
            failed_phase=tl.failed_phase or "", error=tl.error or "", bytes_moved=tl.weights_moved + tl.kv_moved,
            started_unix=started, origin=req.origin)
        self.history.append(record)
        kind = pb.ReconfigureEvent.COMMITTED if tl.committed else pb.ReconfigureEvent.ROLLED_BACK
        emit(pb.ReconfigureEvent(kind=kind, source=tl.source, target=tl.target, reason=reason, downtime_s=downtime,
                                 peak_extra_bytes=tl.peak_extra_bytes, bytes=tl.weights_moved + tl.kv_moved,
                                 seconds=tl.seconds))
        return record
