"""Engine: rank 0 decides every step and all ranks execute it.

Rank 0 owns the scheduler, the sampler and the request handles. Each step it broadcasts a
small ``Command`` over the CPU control group; every rank (standby ranks too, so all stay in
lock-step for later commands) receives it in ``worker_loop``. A step boundary is the only
place where state changes hands: ``pause()`` parks the loop there and reports the full state.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from .kv_cache import blocks_for_budget
from .model_runner import ModelRunner
from .reconfigure import MODES, Fault, KVMove, ReconfigureOrder, RolledBack, Timeline, Worker
from .request import FinishReason, Request, Sequence, SequenceState, StepOutput
from .sampler import sample_one
from .scheduler import Scheduler, SchedulerConfig, StepPlan
from .spec import ModelSpec
from .topology import Topology

log = logging.getLogger("remp.engine")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(16, ge=1)
    kv_budget_mb: float = Field(64.0, gt=0)  # per active rank, at the current topology
    num_blocks: Optional[int] = Field(None, ge=1)  # fixes the block count (overrides the budget)
    max_num_seqs: int = Field(32, ge=1)
    max_tokens_per_step: int = Field(256, ge=1)
    max_queue: int = Field(256, ge=1)
    prestage_budget_mb: float = Field(0.0, ge=0)  # > 0 enables pre-staging new weight shards
    prestage_rounds_per_step: int = Field(1, ge=1)  # bucket rounds moved at each step boundary

    def blocks_for(self, spec: ModelSpec, topo: Topology) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        return blocks_for_budget(spec, topo, self.block_size, int(self.kv_budget_mb * 2**20))


@dataclass(frozen=True)
class Command:
    """rank 0 -> every rank, over the control group."""

    kind: str  # "step" | "reconfigure" | "prestage" | "prestage_rounds" | "stop"
    payload: Any = None  # StepPlan | ReconfigureOrder | number of rounds


def exchange_command(cmd: Optional[Command], group) -> Command:
    box = [cmd]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def load_worker(rt, spec: ModelSpec, model_dir, topo: Topology, cfg: EngineConfig) -> Worker:
    """Collective: load ``topo``'s shards from a converted model dir on every rank."""
    from .model_runner import load_runner

    topo.validate(spec, rt.world_size)
    runner = load_runner(spec, model_dir, topo, rt.rank, rt.device, cfg.blocks_for(spec, topo), cfg.block_size)
    return Worker(spec, topo, runner, rt.rank, rt.world_size, rt.device, rt.control_group)


def worker_loop(worker: Worker) -> None:
    """Ranks != 0: execute rank 0's commands until told to stop."""
    while True:
        cmd = exchange_command(None, worker.group)
        if cmd.kind == "stop":
            return
        if cmd.kind == "step" and worker.runner is not None:
            worker.runner.run_step(cmd.payload)
        elif cmd.kind in ("reconfigure", "prestage"):
            try:
                getattr(worker, cmd.kind)(cmd.payload)
            except RolledBack:
                pass  # rank 0 reports it; this rank is back on its old topology
        elif cmd.kind == "prestage_rounds":
            worker.prestage_rounds(cmd.payload)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: Optional[FinishReason]


class RequestHandle:
    """A request's stream of StepOutputs (thread-safe), with its timing."""

    def __init__(self, request_id: str, prompt_tokens: int):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.arrival = time.monotonic()
        self.token_times: list[float] = []
        self._q: queue.Queue[StepOutput] = queue.Queue()

    def put(self, out: StepOutput) -> None:
        if out.token_ids:
            self.token_times.append(time.monotonic())
        self._q.put(out)

    def __iter__(self) -> Iterator[StepOutput]:
        while True:
            out = self._q.get()
            yield out
            if out.finished:
                return

    def result(self) -> Completion:
        ids, text, reason = [], "", None
        for out in self:
            ids += out.token_ids
            text += out.text
            reason = out.finish_reason
        return Completion(ids, text, reason)


@dataclass
class EngineState:
    """The engine at a step boundary."""

    topology: Topology
    steps: int
    num_blocks: int
    free_blocks: int
    block_size: int
    sequences: list[SequenceState] = field(default_factory=list)


class Engine:
    """Rank 0's engine. Thread-safe entry points: add_request, cancel, pause, resume."""

    def __init__(self, worker: Worker, cfg: EngineConfig, tokenizer: Any = None):
        self.worker, self.spec, self.group, self.cfg = worker, worker.spec, worker.group, cfg
        self.tokenizer = tokenizer
        spec = self.spec
        self.sched = Scheduler(SchedulerConfig(
            num_blocks=worker.runner.kv.buffer.shape[2], block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
            max_tokens_per_step=cfg.max_tokens_per_step, max_queue=cfg.max_queue,
            max_model_len=spec.max_position_embeddings))
        eos = set(spec.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.steps = 0
        self._lock = threading.RLock()
        self._seqs: dict[str, Sequence] = {}
        self._handles: dict[str, RequestHandle] = {}
        self._wake = threading.Event()
        self._pause_requested = threading.Event()
        self._parked = threading.Event()
        self._resume = threading.Event()
        self._stopping = False

    # ---- requests ---------------------------------------------------------------------
    def add_request(self, req: Request) -> RequestHandle:
        if req.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if any(not 0 <= t < self.spec.vocab_size for t in req.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        with self._lock:
            if req.request_id in self._seqs:
                raise ValueError(f"request id {req.request_id!r} is already in use")
            self.sched.check(len(req.prompt_token_ids), req.params.max_new_tokens)
            seed = req.params.seed if req.params.seed is not None else random.getrandbits(62)
            seq = Sequence(req.request_id, list(req.prompt_token_ids), req.params, seed)
            handle = RequestHandle(req.request_id, len(seq.prompt))
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
        """Run one step on every rank; returns the number of sequences it advanced. Pending
        pre-staging transfers advance by one chunk at each step boundary."""
        staged = self.worker.staged
        if staged is not None and staged["rounds"]:
            n = self.cfg.prestage_rounds_per_step
            exchange_command(Command("prestage_rounds", n), self.group)
            self.worker.prestage_rounds(n)
        with self._lock:
            scheduled = self.sched.schedule()
            if not scheduled:
                return 0
            plan = StepPlan.of(scheduled)
        exchange_command(Command("step", plan), self.group)
        logits = self.runner.run_step(plan)
        with self._lock:
            row = 0
            for s in scheduled:
                if s.sample:
                    row += 1
                if s.seq.request_id not in self._seqs:  # cancelled while the step ran
                    continue
                s.seq.num_computed = s.start + s.n
                if s.sample:
                    self._append_token(s.seq, logits[row - 1])
            self.steps += 1
        return len(scheduled)

    @property
    def prestaged(self) -> Optional[Topology]:
        """The target whose weights are fully pre-staged, if any."""
        st = self.worker.staged
        return st["target"] if st is not None and not st["rounds"] else None

    def prestage(self, target: Topology, bucket_mb: float = 16) -> Timeline:
        """Start moving ``target``'s weight shards while the current topology keeps serving
        (call between steps). The transfers then advance one bucket round per step boundary
        (``run_until_prestaged`` finishes them when idle); a later ``reconfigure(target)`` only
        moves KV, switches groups and commits. Needs ``prestage_budget_mb`` > 0."""
        if self.cfg.prestage_budget_mb <= 0:
            raise ValueError("pre-staging is off (set EngineConfig.prestage_budget_mb)")
        target.validate(self.spec, self.worker.world)
        order = ReconfigureOrder(target, "migrate", KVMove([], [], 0, []), self.cfg.block_size,
                                 int(bucket_mb * 2**20), weights_only=True,
                                 prestage_budget_bytes=int(self.cfg.prestage_budget_mb * 2**20))
        with self._lock:
            exchange_command(Command("prestage", order), self.group)
            return self.worker.prestage(order)

    def run_until_prestaged(self) -> None:
        while self.worker.staged is not None and self.worker.staged["rounds"]:
            self.step()

    def reconfigure(self, target: Topology, mode: str = "migrate", fault: Optional[Fault] = None,
                    bucket_mb: float = 16, phase_timeout_s: float = 120.0, progress=None) -> Timeline:
        """Switch every rank to ``target`` at this step boundary (call it between steps: in
        synchronous use, or while the serving loop is paused). Raises TopologyError/ValueError
        before anything changes, RolledBack if any rank failed before the commit point."""
        target.validate(self.spec, self.worker.world)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        try:
            if mode == "drain":  # in-flight requests finish at the old topology; queued ones wait
                self.sched.admit = False
                while self.sched.running:
                    self.step()
            with self._lock:
                if mode == "recompute":
                    self.sched.preempt_all()
                kv = KVMove.plan(self.sched.live(), self.cfg.blocks_for(self.spec, target))
                order = ReconfigureOrder(target, mode, kv, self.cfg.block_size, int(bucket_mb * 2**20),
                                         phase_timeout_s, fault)
                exchange_command(Command("reconfigure", order), self.group)
                tl = self.worker.reconfigure(order, progress)  # raises RolledBack: nothing changed
                self.sched.rebind(kv.new_num_blocks, kv.old_ids, kv.new_ids, kv.dropped)
                return tl
        finally:
            self.sched.admit = True

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def stop_workers(self) -> None:
        """Release every other rank from worker_loop (they return to their caller)."""
        exchange_command(Command("stop"), self.group)

    # ---- background loop with pause points ----------------------------------------------
    def run_forever(self) -> None:
        """Rank 0's serving loop (run it in a thread); returns after shutdown()."""
        while not self._stopping:
            if self._pause_requested.is_set():
                self._parked.set()
                self._resume.wait()
                self._resume.clear()
                self._parked.clear()
                continue
            if not self.step():
                self._wake.wait(0.05)
                self._wake.clear()

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

    def state(self) -> EngineState:
        with self._lock:
            return EngineState(self.topo, self.steps, self.sched.cfg.num_blocks, self.sched.alloc.num_free,
                               self.sched.cfg.block_size, self.sched.states())

    # ---- internals ----------------------------------------------------------------------
    def _append_token(self, seq: Sequence, logits) -> None:
        p = seq.params
        tok = sample_one(logits, p, seq.seed, len(seq.output))
        seq.output.append(tok)
        reason = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = FinishReason.STOP
        elif len(seq.output) >= p.max_new_tokens:
            reason = FinishReason.LENGTH
        delta = ""
        if self.tokenizer is not None:
            full = self.tokenizer.decode(seq.output, skip_special_tokens=True)
            cut = min((i for i in (full.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:  # a stop string wins over a length finish on the same token
                full, reason = full[:cut], FinishReason.STOP
            # Hold back a trailing partial UTF-8 character until the next token completes it
            # (on the last token there is no next one: emit what there is).
            if reason is None and full.endswith("\ufffd"):
                full = seq.text
            delta, seq.text = full[len(seq.text):], full
        self._handles[seq.request_id].put(
            StepOutput(seq.request_id, [tok], delta, reason is not None, reason, len(seq.prompt), len(seq.output)))
        if reason is not None:
            self._finish(seq, reason, emit=False)

    def _finish(self, seq: Sequence, reason: FinishReason, emit: bool = True) -> None:
        self.sched.finish(seq)
        self._seqs.pop(seq.request_id, None)
        handle = self._handles.pop(seq.request_id)
        if emit:
            handle.put(StepOutput(seq.request_id, [], "", True, reason, len(seq.prompt), len(seq.output)))
