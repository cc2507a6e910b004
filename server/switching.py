"""The one owner of a switch's lifecycle in the engine core: lock, stage the new weights while
serving goes on → (drain) → pause → reconfigure → resume; pause, stall, drain and staging
times, events, the record. Operator requests (Admin.Reconfigure) and the adaptive policy both
start switches here, so they can never run two at once and are recorded alike (the front end
keeps the history and the metrics from each record).
"""
from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from remp_megatron.engine import Engine, RequestHandle
from remp_megatron.reconfigure import Fault, RolledBack, Timeline
from remp_megatron.topology import Topology

from .api import describe_switch, pb

log = logging.getLogger("remp.switch")

# The front end's longest wait for the first step after a switch, when measuring downtime.
_FIRST_STEP_WAIT_S = 60.0
# How often staging progress is reported (at most).
_STAGING_REPORT_S = 0.25


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
        self.on_commit: list[Callable[[Topology], None]] = []  # e.g. the policy's bookkeeping
        # Each switch's record and phase seconds, committed or not (to the front end).
        self.on_record: list[Callable[[pb.SwitchRecord, dict[str, float]], None]] = []
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
            log.info("switch %s -> %s (%s, %s) %s: %s%s", record.source, record.target, record.mode, record.origin,
                     "committed" if record.committed else "rolled back", describe_switch(record),
                     f": {record.error}" if record.error else "")
        finally:
            self._lock.release()
            events.put(None)

    def _switch(self, req: SwitchRequest, emit: Callable[[pb.ReconfigureEvent], None]) -> pb.SwitchRecord:
        """Stage the new weights while serving goes on; drain (drain mode); pause at a step
        boundary, reconfigure, resume; emit events; record the outcome."""
        started = time.time()
        if req.reason:
            log.info("%s asks for %s: %s", req.origin, req.target, req.reason)
        times = SwitchTimes()
        tl, reason = self._stage(req, emit, times), ""
        if tl is not None:  # staging failed: nothing changed, serving never stopped
            reason = f"staging failed: {tl.error}"
            tl.failed_phase = f"staging:{tl.failed_phase}"
        else:
            tl, reason = self._pause_and_switch(req, emit, times)
        if tl.committed:
            for listener in self.on_commit:
                listener(req.target)
        common = dict(source=tl.source, target=tl.target, downtime_s=times.downtime_s, pause_s=times.pause_s,
                      stall_s=times.stall_s, drain_s=times.drain_s, staging_s=times.staging_s,
                      bytes_in_pause=tl.bytes_sent_in_pause, prestaged=tl.prestaged, rss_bytes=tl.rss_bytes,
                      kv_blocks=tl.kv_blocks, kv_blocks_staged=tl.kv_blocks_staged)
        record = pb.SwitchRecord(mode=req.mode, committed=tl.committed, failed_phase=tl.failed_phase or "",
                                 error=tl.error or "", bytes_moved=tl.weights_moved + tl.kv_moved,
                                 started_unix=started, origin=req.origin, **common)
        for listener in self.on_record:
            listener(record, dict(tl.phases))
        kind = pb.ReconfigureEvent.COMMITTED if tl.committed else pb.ReconfigureEvent.ROLLED_BACK
        emit(pb.ReconfigureEvent(kind=kind, reason=reason, peak_extra_bytes=tl.peak_extra_bytes,
                                 bytes=tl.weights_moved + tl.kv_moved, seconds=tl.seconds, **common))
        return record

    def _stage(self, req: SwitchRequest, emit, times: SwitchTimes) -> Optional[Timeline]:
        """Pre-stage the target's weights while the engine serves; progress as STAGING events.
        Returns the failed staging's timeline, else None (staged, refused over the budget, or
        pre-staging off: the weights then move in the pause)."""
        engine = self.engine
        if not engine.cfg.prestaging:
            return None
        t0 = time.perf_counter()
        source, target, reported = str(engine.topo), str(req.target), -1
        try:
            job = engine.prestage(req.target, req.fault, copy_kv=req.mode == "migrate")
        except Exception as e:
            return Timeline(source, target, "prestage", failed_phase="request", error=f"{type(e).__name__}: {e}")
        while True:
            finished = job.done.wait(_STAGING_REPORT_S)
            if job.chunks and reported != job.chunks_done:  # planned: report the bytes staged so far
                reported = job.chunks_done
                total = job.timeline.weights_moved + job.timeline.weights_kept
                emit(pb.ReconfigureEvent(kind=pb.ReconfigureEvent.STAGING, source=source, target=target,
                                         seconds=time.perf_counter() - t0, bytes_total=total,
                                         bytes=total * job.chunks_done // job.chunks))
            if finished:
                break
        times.staging_s = time.perf_counter() - t0
        if job.failure is not None:
            return job.timeline
        if job.timeline.staging_refused:
            log.warning("switch to %s: %s; the weights move in the pause", target, job.timeline.staging_refused)
            emit(pb.ReconfigureEvent(kind=pb.ReconfigureEvent.STAGING, source=source, target=target,
                                     seconds=times.staging_s, reason=f"{job.timeline.staging_refused}: "
                                     "the weights move in the pause instead"))
        else:
            log.info("staged %s for %s in %.0f ms (%d chunks, %s KV blocks copied ahead) while serving", target, source,
                     times.staging_s * 1e3, job.chunks, job.kv_blocks or 0)
        return None

    def _pause_and_switch(self, req: SwitchRequest, emit, times: SwitchTimes) -> tuple[Timeline, str]:
        engine = self.engine

        def progress(phase: str, tl: Timeline) -> None:
            nbytes = {"move_weights": tl.weights_moved, "move_kv": tl.kv_moved}.get(phase, 0)
            emit(pb.ReconfigureEvent(kind=pb.ReconfigureEvent.PHASE, phase=phase, seconds=tl.phases[phase],
                                     bytes=nbytes, source=tl.source, target=tl.target))

        reason = ""
        try:
            if req.mode == "drain":  # the running requests finish at the old topology; queued ones wait
                t0 = time.perf_counter()
                engine.set_admission(False)
                while engine.load().running:
                    time.sleep(0.005)
                times.drain_s = time.perf_counter() - t0
            t_request = time.perf_counter()
            engine.pause()
            t_parked = time.perf_counter()
            streams = {h: len(h.token_times) for h in engine.running_handles()}
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
                times.pause_s = time.perf_counter() - t_parked
                engine.resume()
        finally:
            engine.set_admission(True)
        # Downtime ends with the first step served after the switch (if anything is running), the
        # stall with every in-flight stream's first token after it.
        deadline = time.perf_counter() + _FIRST_STEP_WAIT_S
        while engine.has_work and engine.steps == steps and time.perf_counter() < deadline:
            time.sleep(0.001)
        times.downtime_s = time.perf_counter() - t_request
        while any(len(h.token_times) == n and not h.finished for h, n in streams.items()) \
                and time.perf_counter() < deadline:
            time.sleep(0.001)
        times.stall_s = stream_stall(streams)
        return tl, reason


@dataclass
class SwitchTimes:
    """A switch as users feel it, in seconds."""

    staging_s: float = 0.0  # pre-staging, while serving went on
    drain_s: float = 0.0  # drain mode: admission closed until the running requests finished
    pause_s: float = 0.0  # step boundary -> serving again
    downtime_s: float = 0.0  # pause request -> the first step at the new topology
    stall_s: float = 0.0  # see stream_stall


def stream_stall(streams: dict[RequestHandle, int]) -> float:
    """The longest extra wait a stream saw across the switch: the gap between its last token
    before the pause (its ``n``-th) and its first after, minus its usual inter-token time
    (median of its last gaps before). Streams with fewer than two tokens before, or none
    after (finished or cancelled), are left out."""
    worst = 0.0
    for handle, n in streams.items():
        times = handle.token_times
        if n < 2 or len(times) <= n:
            continue
        recent = times[max(0, n - 9):n]
        usual = statistics.median(b - a for a, b in zip(recent, recent[1:]))
        worst = max(worst, times[n] - times[n - 1] - usual)
    return worst

