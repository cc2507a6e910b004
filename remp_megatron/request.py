"""Requests as the engine sees them: validated inputs, per-sequence state, streamed outputs."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

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
    """Rank 0's state for one request: tokens, KV position, block table, detokenised text."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int  # fixed at admission so recompute and switches resample identically
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    text: str = ""  # detokenised output so far (stop strings are cut from it)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass(frozen=True)
class StepOutput:
    """One streamed chunk for one request."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: Optional[FinishReason]
    prompt_tokens: int
    completion_tokens: int


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
