"""ModelSpec: the architecture facts we need, read from an HF ``config.json``.

Everything downstream (megatron config, topology validation, KV cache sizing, conversion)
reads this one validated value instead of poking at raw HF configs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError, ValidationInfo, field_validator

from .rope import RopeScaling, RopeType

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
Architecture = Literal["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"]
# Our field name -> the config.json field it came from, so errors name what the user wrote.
_HF_FIELD = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "eos_token_ids": "eos_token_id",
}
# float64 is for exactness tests (parity worlds), not for serving.
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# What a server may be asked to serve in (`--dtype`), by its short name.
ServingDtype = Literal["fp32", "bf16", "fp16"]
_SERVING = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class SpecError(ValueError):
    """A config.json we cannot serve; the message names the file and the field."""


class MoE(BaseModel):
    """Mixture of experts in the MLP of ``layers``: each token goes to ``top_k`` of ``num_experts``
    SwiGLU experts, weighted by the router's softmax (renormalised over the top k if ``normalize``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_experts: PositiveInt
    top_k: PositiveInt
    intermediate_size: PositiveInt  # of each expert
    normalize: bool
    layers: tuple[int, ...]  # 0-based; the other layers keep a dense MLP

    @field_validator("top_k")
    @classmethod
    def _top_k_at_most_experts(cls, v: int, info: ValidationInfo) -> int:
        experts = info.data.get("num_experts")
        if experts and v > experts:
            raise ValueError(f"num_experts_per_tok={v} exceeds the number of experts {experts}")
        return v


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: Architecture
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    rope_theta: float
    rope: RopeScaling = RopeScaling()
    rms_norm_eps: float
    max_position_embeddings: PositiveInt
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's Q and K before RoPE
    sliding_window: Optional[PositiveInt] = None  # a query sees only the last this-many positions...
    sliding_layers: tuple[int, ...] = ()  # ...in these layers (0-based); the others attend to everything
    moe: Optional[MoE] = None
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    eos_token_ids: tuple[int, ...] = ()

    @field_validator("num_kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, v: int, info: ValidationInfo) -> int:
        heads = info.data.get("num_heads")
        if heads and heads % v:
            raise ValueError(f"num_key_value_heads={v} must divide num_attention_heads={heads}")
        return v

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def served_in(self, dtype: Optional[ServingDtype], device: torch.device) -> "ModelSpec":
        """This model as served: weights and KV cache in ``dtype``, cast from the checkpoint's
        dtype at load (and kept in it when shards move). None: bf16 on CUDA; elsewhere the
        checkpoint's own dtype (CPU stays exact by default: fp32 or fp64 checkpoints)."""
        if dtype is None:
            dtype = "bf16" if device.type == "cuda" else None
        return self if dtype is None else self.model_copy(update={"dtype": _SERVING[dtype]})

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelSpec":
        def fail(field: str, why: str) -> SpecError:
            return SpecError(f"{source}: field '{field}': {why}")

        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise fail(
                "architectures",
                f"{archs or 'missing'} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})",
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise fail("hidden_act", f"{cfg['hidden_act']!r} is not supported (only 'silu' / SwiGLU)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        scaling = _rope_scaling(rope, cfg, lambda key, why: fail(f"{rope_field}.{key}", why))
        for flag in ("mlp_bias",) + (("attention_bias",) if arch != "qwen2" else ()):
            if cfg.get(flag):
                raise fail(flag, "biases outside Qwen2's QKV bias are not supported")
        window, window_layers = _sliding_window(arch, cfg, fail)
        moe = _moe(arch, cfg, fail)
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
        eos = cfg.get("eos_token_id")
        heads = cfg.get("num_attention_heads")
        values = dict(
            architecture=arch,
            vocab_size=cfg.get("vocab_size"),
            hidden_size=cfg.get("hidden_size"),
            intermediate_size=cfg.get("intermediate_size"),
            num_layers=cfg.get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope=scaling,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            sliding_window=window,
            sliding_layers=window_layers,
            moe=moe,
            dtype=dtype,
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        )
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            field = _HF_FIELD.get(str(err["loc"][0]), str(err["loc"][0])) if err["loc"] else "config"
            raise SpecError(f"{source}: field '{field}': {err['msg']}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"{path}: file not found") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_config(cfg, source=str(path))


def _rope_scaling(rope: dict[str, Any], cfg: dict[str, Any], fail) -> RopeScaling:
    """The scaling part of an HF RoPE config, with HF's defaults filled in."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in get_args(RopeType):
        raise fail("rope_type", f"{rope_type!r} is not supported (supported: {', '.join(get_args(RopeType))})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise fail("partial_rotary_factor", "partial rotary embeddings are not supported")
    if rope_type == "yarn" and rope.get("attention_factor") is not None:
        raise fail("attention_factor", "an explicit YaRN attention factor is not supported "
                   "(leave it out: it is derived from factor, mscale and mscale_all_dim)")
    values = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                                   "mscale", "mscale_all_dim", "truncate") if rope.get(k) is not None}
    if rope_type in ("llama3", "yarn"):
        original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") \
            or cfg.get("max_position_embeddings")
        values["original_max_position_embeddings"] = original
        if rope_type == "yarn" and "factor" not in values and original:
            values["factor"] = cfg.get("max_position_embeddings", original) / original
    if rope_type != "default" and "factor" not in values:
        raise fail("factor", f"rope_type {rope_type!r} needs a scaling factor")
    try:
        return RopeScaling(type=rope_type, **values)
    except ValidationError as e:
        err = e.errors()[0]
        raise fail(".".join(map(str, err["loc"])) or "rope", err["msg"]) from None


def _sliding_window(arch: str, cfg: dict[str, Any], fail) -> tuple[Optional[int], tuple[int, ...]]:
    """The window and the layers that use it, as HF's Mistral / Qwen2 / Qwen3 decide them."""
    window = cfg.get("sliding_window")
    every_layer = arch in ("mistral", "mixtral")
    if arch == "llama" or window is None or (not every_layer and not cfg.get("use_sliding_window", False)):
        return None, ()
    layers = cfg.get("num_hidden_layers") or 0
    types = cfg.get("layer_types")
    if types is not None:
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise fail("layer_types", f"{sorted(unknown)} not supported (only sliding_attention, full_attention)")
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif every_layer or arch == "qwen3_moe":
        sliding = tuple(range(layers))
    else:  # Qwen2/Qwen3: the layers from max_window_layers on
        sliding = tuple(range(cfg.get("max_window_layers", 28), layers))
    return (window, sliding) if sliding else (None, ())


def _moe(arch: str, cfg: dict[str, Any], fail) -> Optional[MoE]:
    """The experts of a Mixtral / Qwen3-MoE config, in the layers HF gives them."""
    if arch not in ("mixtral", "qwen3_moe"):
        return None
    layers = cfg.get("num_hidden_layers") or 0
    if arch == "mixtral":  # every layer; the top-k weights always renormalised
        values = dict(num_experts=cfg.get("num_local_experts"), intermediate_size=cfg.get("intermediate_size"),
                      normalize=True, layers=tuple(range(layers)))
    else:
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
        values = dict(num_experts=cfg.get("num_experts") or cfg.get("num_local_experts"),
                      intermediate_size=cfg.get("moe_intermediate_size"),
                      normalize=bool(cfg.get("norm_topk_prob", False)),
                      layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0))
    try:
        return MoE(top_k=cfg.get("num_experts_per_tok"), **values)
    except ValidationError as e:
        err = e.errors()[0]
        names = {"num_experts": "num_local_experts" if arch == "mixtral" else "num_experts",
                 "top_k": "num_experts_per_tok",
                 "intermediate_size": "intermediate_size" if arch == "mixtral" else "moe_intermediate_size"}
        raise fail(names.get(str(err["loc"][0]), str(err["loc"][0])), err["msg"]) from None
