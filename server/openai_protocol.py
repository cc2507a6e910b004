"""The OpenAI API's request bodies as pydantic models (what /v1/completions and
/v1/chat/completions accept), and how they map onto SamplingParams.

Unknown fields are refused with a 400 that names them, so a misspelt parameter is not silently
ignored. OpenAI fields this server does not implement are accepted only at their neutral value
(``n=1``, no logprobs, no penalties, ...). ``top_k``, ``ignore_eos`` and ``stop_token_ids`` are
the vLLM extensions (send them in the client's ``extra_body``).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Accepted OpenAI fields that are not implemented: the values that mean "not used".
_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, 0), "top_logprobs": (None, 0),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
}


def _neutral_only(v, info):
    allowed = _NEUTRAL[info.field_name]
    if v not in allowed:
        raise ValueError(f"not supported by this server (leave it out or use {allowed[1]!r})")
    return v


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both endpoints. Defaults are OpenAI's (temperature 1: sampling)."""

    model: Optional[str] = Field(None, description="the served model's id (GET /v1/models); default: it")
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="vLLM extension; -1 or 0: off")
    seed: Optional[int] = Field(None, ge=0)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted and ignored, as OpenAI's own logging field
    n: Any = None
    best_of: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    _neutral = field_validator(*[f for f in _NEUTRAL if f not in ("echo", "suffix")])(_neutral_only)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_new_tokens: int) -> dict:
        """SamplingParams fields (engine names)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=max(self.top_k, 0), seed=self.seed, stop=stop, stop_token_ids=self.stop_token_ids,
                    ignore_eos=self.ignore_eos)


# Engine field -> OpenAI parameter, for error messages.
PARAM_NAMES = {"max_new_tokens": "max_tokens"}


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Any = None
    suffix: Any = None

    _neutral_here = field_validator("echo", "suffix")(_neutral_only)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_of_the_prompt_shapes(cls, v):
        def ids(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if not (isinstance(v, str) or ids(v) or (isinstance(v, list) and all(isinstance(p, str) or ids(p) for p in v))):
            raise ValueError("must be a string, a list of token ids, or a list of either (a batch)")
        if not v or (isinstance(v, list) and any(not p for p in v)):
            raise ValueError("must not be empty")
        return v

    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt of the batch: text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"only text parts are supported, not {kind!r}")
        elif v is not None and not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name for max_tokens")

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class ReconfigureBody(_Body):
    tp: int = Field(ge=1)
    pp: int = Field(ge=1)
    ep: int = Field(1, ge=1)
    mode: str = "migrate"
    inject_fault: str = ""


class PolicyBody(_Body):
    enabled: bool
