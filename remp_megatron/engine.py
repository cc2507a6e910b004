"""Engine: rank 0 decides every step and all ranks execute it.

Rank 0 owns the scheduler, the sampler, output processing and the request handles. A step
reads schedule → run (a ``Step`` command executed by every rank's worker) → postprocess. A
step boundary is the only place where state changes hands: ``pause()`` parks the loop there
and reports the full state; switches happen there.
"""
from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from .config import EngineConfig
from .model_runner import ModelRunner
from .output import OutputProcessor
from .reconfigure import MODES, Fault, PrestageOrder, ReconfigureOrder, RolledBack, Timeline
from .request import FinishReason, Request, RequestHandle, Sequence, SequenceState, StepOutput
from .sampler import sample
from .scheduler import Load, Scheduled, Scheduler, SchedulerConfig, StepPlan
from .topology import Topology
from .worker import Prestage, PrestageKV, PrestageRounds, Reconfigure, Step, Stop, Worker

log = logging.getLogger("remp.engine")


@dataclass
class EngineState:
    """The engine at a step boundary."""

    topology: Topology
    steps: int
    num_blocks: int
    free_blocks: int
    block_size: int
    sequences: list[SequenceState] = field(default_factory=list)


@dataclass
class Staging:
    """A pre-staging job. Its first part (validate, build, plan, KV allocation) runs at the next
    step boundary, then one chunk of weight copies per boundary while serving goes on, then
    (``copy_kv``) the running requests' full KV blocks at one more boundary. ``done`` is set
    when that is finished, when staging failed (``failure``: nothing changed), was refused
    (``timeline.staging_refused``: over the budget), or was abandoned (a switch to another
    target came first)."""

    order: PrestageOrder
    copy_kv: bool = True
    timeline: Optional[Timeline] = None
    failure: Optional[RolledBack] = None
    chunks: int = 0
    chunks_done: int = 0
    staged: bool = False  # the weights are in place
    kv_blocks: Optional[int] = None  # KV blocks copied ahead (None: not yet)
    done: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Rank 0's engine. Thread-safe entry points: add_request, cancel, pause, resume."""

    def __init__(self, worker: Worker, cfg: EngineConfig, eos_token_ids: Iterable[int] = (),
                 bounded_queue: bool = True):
        """``eos_token_ids``: end-of-text ids beyond the model config's (the tokenizer's).
        ``bounded_queue``: refuse requests beyond ``cfg.max_queue`` waiting (False in the engine
        core: the front end admits, and the core takes what it was given, re-admissions included)."""
        self.worker, self.spec, self.cfg = worker, worker.spec, cfg
        spec = self.spec
        self.sched = Scheduler(SchedulerConfig(
            num_blocks=worker.runner.kv.buffer.shape[2], block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
            max_tokens_per_step=cfg.max_tokens_per_step, max_queue=cfg.max_queue if bounded_queue else None,
            max_model_len=spec.max_position_embeddings))
        self.output = OutputProcessor(frozenset(spec.eos_token_ids) | frozenset(eos_token_ids))
        self.steps = 0
        self._lock = threading.RLock()
        self._seqs: dict[str, Sequence] = {}
        self._handles: dict[str, RequestHandle] = {}
        self._wake = threading.Event()
        self._pause_requested = threading.Event()
        self._parked = threading.Event()
        self._resume = threading.Event()
        self._stopping = False
        self._staging: Optional[Staging] = None

    # ---- requests ---------------------------------------------------------------------
    def add_request(self, req: Request, sink: Optional[Callable[[StepOutput], None]] = None,
                    output: Iterable[int] = ()) -> RequestHandle:
        """Admit ``req``. ``output``: tokens it already generated (re-admitted after a restart): their
        KV is recomputed with the prompt's and sampling continues at the next index, so greedy and
        seeded requests go on exactly. Stop strings are the front end's (it sees the text)."""
        if any(not 0 <= t < self.spec.vocab_size for t in req.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        with self._lock:
            if req.request_id in self._seqs:
                raise ValueError(f"request id {req.request_id!r} is already in use")
            self.sched.check(len(req.prompt_token_ids), req.params.max_new_tokens)
            seed = req.params.seed if req.params.seed is not None else random.getrandbits(62)
            seq = Sequence(req.request_id, list(req.prompt_token_ids), req.params, seed, output=list(output))
            handle = RequestHandle(req.request_id, len(seq.prompt), sink)
            self.sched.add(seq)
            self._seqs[req.request_id] = seq
            self._handles[req.request_id] = handle
        self._wake.set()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Finish a request now and free its blocks; False if it is unknown or already done."""
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is None:
                return False
            self._finish(seq, FinishReason.CANCELLED)
            return True

    @property
    def has_work(self) -> bool:
        return self.sched.has_work

    @property
    def runner(self) -> ModelRunner:
        return self.worker.runner

    @property
    def topo(self) -> Topology:
        return self.worker.topo

    # ---- stepping ---------------------------------------------------------------------
    def step(self) -> int:
        """Run one step on every rank; returns the number of sequences it advanced. Pre-staging
        advances by one part at each step boundary."""
        if self._staging is not None:
            self._advance_staging()
        with self._lock:
            scheduled = self.sched.schedule()
            if not scheduled:
                return 0
            plan = StepPlan.of(scheduled)
        logits = self.worker.execute(Step(plan))
        with self._lock:
            self._postprocess(scheduled, logits)
            self.steps += 1
        return len(scheduled)

    def _postprocess(self, scheduled: list[Scheduled], logits) -> None:
        """Advance each sequence's KV position; sample, stream and finish where a chunk ended."""
        sampled = [s.seq for s in scheduled if s.sample]  # in the order of the logits' rows
        tokens = iter(sample(logits, [(q.params, q.seed, len(q.output)) for q in sampled]) if sampled else ())
        for s in scheduled:
            seq = s.seq
            token = next(tokens) if s.sample else None
            if seq.request_id not in self._seqs:  # cancelled while the step ran
                continue
            seq.num_computed = s.start + s.n
            if token is None:
                continue
            out = self.output.append(seq, token)
            self._handles[seq.request_id].put(out)
            if out.finished:
                self._finish(seq, out.finish_reason, emit=False)

    def prestage(self, target: Topology, fault: Optional[Fault] = None, bucket_mb: float = 16,
                 copy_kv: bool = True) -> Staging:
        """Start staging ``target``'s weight shards and KV cache while the current topology
        keeps serving (thread-safe): the work runs at the next step boundaries (the serving loop
        does not idle meanwhile; ``run_until_prestaged`` drives it in synchronous use). A later
        ``reconfigure(target)`` then only moves the KV not copied ahead (``copy_kv``: the full
        blocks of running requests, worth it for a migrate-mode switch), switches groups and
        commits."""
        if not self.cfg.prestaging:
            raise ValueError("pre-staging is off (EngineConfig.prestage_budget_mb is 0)")
        target.validate(self.spec, self.worker.world)
        job = Staging(PrestageOrder(target, self.cfg.blocks_for(self.spec, target), self.cfg.block_size,
                                    int(bucket_mb * 2**20), self.cfg.prestage_budget_bytes, fault=fault), copy_kv)
        self._abandon_staging()
        with self._lock:
            self.sched.kv_staged.clear()
        self._staging = job
        self._wake.set()
        return job

    def run_until_prestaged(self) -> None:
        while self._staging is not None:
            self.step()

    def _advance_staging(self) -> None:
        """At a step boundary: the job's first part, its next chunk of weight copies, or the KV
        copied ahead."""
        job = self._staging
        if job.staged:
            with self._lock:  # no block may be freed between choosing and recording
                ids = [b for b in self.sched.full_blocks() if b < job.order.num_blocks]
                self.worker.execute(PrestageKV(ids))
                self.sched.kv_staged = set(ids)
            job.kv_blocks = len(ids)
        elif job.timeline is None:
            try:
                job.timeline = self.worker.execute(Prestage(job.order))
            except RolledBack as e:
                job.failure, job.timeline = e, e.timeline
            except Exception as e:  # past the last vote (a collective failed): report, keep serving
                job.timeline = Timeline(str(self.topo), str(job.order.target), "prestage", failed_phase="plan",
                                        error=f"{type(e).__name__}: {e}")
                job.failure = RolledBack(job.timeline)
            if job.failure is None and not job.timeline.staging_refused:
                job.chunks = self.worker.staged.chunks
        else:
            job.staged = self.worker.execute(PrestageRounds(self.cfg.prestage_rounds_per_step))
            job.chunks_done = self.worker.staged.chunks_done
        finished = job.staged and (not job.copy_kv or job.kv_blocks is not None)
        if finished or job.failure is not None or job.timeline.staging_refused:
            self._staging = None
            job.done.set()

    def _abandon_staging(self) -> None:
        job, self._staging = self._staging, None
        if job is not None:
            with self._lock:
                self.sched.kv_staged.clear()  # copies into a cache that will not be used
            job.done.set()

    def reconfigure(self, target: Topology, mode: str = "migrate", fault: Optional[Fault] = None,
                    bucket_mb: float = 16, phase_timeout_s: float = 120.0, progress=None,
                    num_blocks: Optional[int] = None) -> Timeline:
        """Switch every rank to ``target`` at this step boundary (call it between steps: in
        synchronous use, or while the serving loop is paused). ``num_blocks`` sizes the new KV
        cache (default: the config's). Raises TopologyError/ValueError before anything changes,
        RolledBack if any rank failed before the commit point."""
        target.validate(self.spec, self.worker.world)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self._abandon_staging()  # unfinished staging (of any target) is dropped by the switch
        try:
            if mode == "drain":  # in-flight requests finish at the old topology; queued ones wait
                self.sched.admit = False
                while self.sched.running:
                    self.step()
            with self._lock:
                if mode == "recompute":
                    self.sched.preempt_all()
                move = self.sched.plan_kv_move(num_blocks or self.cfg.blocks_for(self.spec, target))
                order = ReconfigureOrder(target, mode, move, self.cfg.block_size, int(bucket_mb * 2**20),
                                         phase_timeout_s, fault)
                tl = self.worker.execute(Reconfigure(order), progress)  # raises RolledBack: nothing changed
                self.sched.apply_kv_move(move)
                return tl
        finally:
            self.sched.admit = True

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def stop_workers(self) -> None:
        """Release every other rank from worker_loop (they return to their caller)."""
        self.worker.execute(Stop())

    # ---- background loop with pause points ----------------------------------------------
    def run_forever(self) -> None:
        """Rank 0's serving loop, on the thread that initialised the rank (threads.py); other threads add
        requests, pause it and switch. Returns after shutdown()."""
        while not self._stopping:
            if self._pause_requested.is_set():
                self._parked.set()
                self._resume.wait()
                self._resume.clear()
                self._parked.clear()
                continue
            if not self.step() and self._staging is None:
                self._wake.wait(0.05)
                self._wake.clear()

    def set_admission(self, admit: bool) -> None:
        """Close (or reopen) admission: queued requests wait, running ones go on (drain)."""
        with self._lock:
            self.sched.admit = admit

    def running_handles(self) -> list[RequestHandle]:
        with self._lock:
            return [self._handles[s.request_id] for s in self.sched.running]

    def pause(self, timeout: float | None = None) -> EngineState:
        """Stop the loop at the next step boundary and report the state there."""
        self._pause_requested.set()
        self._wake.set()
        if not self._parked.wait(timeout):
            self._pause_requested.clear()
            raise TimeoutError("engine did not reach a step boundary in time")
        return self.state()

    def resume(self) -> None:
        self._pause_requested.clear()
        self._resume.set()

    def shutdown(self) -> None:
        """End run_forever(); unfinished requests are answered ABORTED."""
        with self._lock:
            for seq in list(self._seqs.values()):
                self._finish(seq, FinishReason.ABORTED)
        self._stopping = True
        self._wake.set()
        self._resume.set()

    def load(self) -> Load:
        with self._lock:
            total = self.sched.cfg.num_blocks
            return Load(len(self.sched.waiting), len(self.sched.running), total - self.sched.alloc.num_free, total)

    def state(self) -> EngineState:
        with self._lock:
            return EngineState(self.topo, self.steps, self.sched.cfg.num_blocks, self.sched.alloc.num_free,
                               self.sched.cfg.block_size, self.sched.states())

    # ---- internals ----------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: FinishReason, emit: bool = True) -> None:
        self.sched.finish(seq)
        self._seqs.pop(seq.request_id, None)
        handle = self._handles.pop(seq.request_id)
        if emit:
            handle.put(StepOutput(seq.request_id, [], True, reason, len(seq.prompt), len(seq.output)))
