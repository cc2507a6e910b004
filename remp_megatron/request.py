"""Requests as the engine sees them: validated inputs, per-sequence state, streamed outputs."""
from __future__ import annotations

import enum
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1)
    prompt_token_ids: list[int] = Field(min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens
    CANCELLED = "cancelled"
    ABORTED = "aborted"  # the server shut down before it finished


class Status(enum.Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


@dataclass
class Sequence:
    """Rank 0's state for one request: tokens, KV position, block table."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int  # fixed at admission so recompute and switches resample identically
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass(frozen=True)
class StepOutput:
    """One streamed chunk for one request. The engine streams token ids; the front end adds their
    ``text`` (and cuts stop strings); ``error``: the request failed (the engine is gone for good)."""

    request_id: str
    token_ids: list[int]
    finished: bool
    finish_reason: Optional[FinishReason]
    prompt_tokens: int
    completion_tokens: int
    text: str = ""
    error: str = ""


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: Optional[FinishReason]
    error: str = ""


class RequestHandle:
    """A request's stream of StepOutputs, with its timing. Read it by iterating (thread-safe), or
    give a ``sink`` that each output is handed to on the producing thread instead (an event loop's
    queue: it must not block)."""

    def __init__(self, request_id: str, prompt_tokens: int, sink: Optional[Callable[[StepOutput], None]] = None):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.arrival = time.monotonic()
        self.token_times: list[float] = []
        self.finished = False
        self._q: queue.Queue[StepOutput] = queue.Queue()
        self._sink = sink or self._q.put

    def put(self, out: StepOutput) -> None:
        if out.token_ids:
            self.token_times.append(time.monotonic())
        self.finished = out.finished
        self._sink(out)

    def __iter__(self) -> Iterator[StepOutput]:
        while True:
            out = self._q.get()
            yield out
            if out.finished:
                return

    def result(self) -> Completion:
        ids, text, reason, error = [], "", None, ""
        for out in self:
            ids += out.token_ids
            text += out.text
            reason, error = out.finish_reason, out.error
        return Completion(ids, text, reason, error)


@dataclass(frozen=True)
class SequenceState:
    """A request as reported at a pause point: enough to rebuild its cache elsewhere."""

    request_id: str
    status: str
    prompt: list[int]
    output: list[int]
    num_computed: int
    block_table: list[int]
    seed: int
    params: SamplingParams
