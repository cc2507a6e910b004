"""RoPE frequencies for every scaling type we serve, as HF transformers defines them (pure).

Megatron's attention rotates Q and K by a per-token angle table; we build that table here for
all types, so the model runner has one source for it. The table stays fp32 (HF computes its
angles in fp32 whatever the model dtype). YaRN also scales cos/sin by an attention factor:
megatron applies that inside its rotary kernel (``megatron_config`` passes it on).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt

RopeType = Literal["default", "linear", "dynamic", "llama3", "yarn"]


class RopeScaling(BaseModel):
    """The ``rope_parameters`` / ``rope_scaling`` of an HF config (the fields our types read)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: RopeType = "default"
    factor: PositiveFloat = 1.0
    original_max_position_embeddings: Optional[PositiveInt] = None  # llama3 / yarn: the pre-training context
    low_freq_factor: PositiveFloat = 1.0  # llama3
    high_freq_factor: PositiveFloat = 4.0  # llama3
    beta_fast: PositiveFloat = 32.0  # yarn
    beta_slow: PositiveFloat = 1.0  # yarn
    mscale: Optional[float] = None  # yarn (DeepSeek-style attention factor)
    mscale_all_dim: Optional[float] = None  # yarn
    truncate: bool = True  # yarn


def _base_exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim


def inv_freq(r: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies in fp32, bit for bit HF's."""
    dim = head_dim
    if r.type == "yarn":
        pos_freqs = theta ** _base_exponents(dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (r.factor * pos_freqs)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
        if r.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # HF's guard against a zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
        return interpolation * (1 - keep) + extrapolation * keep
    inv = 1.0 / (theta ** _base_exponents(dim))
    if r.type == "linear":
        return inv / r.factor
    if r.type == "llama3":
        old = r.original_max_position_embeddings
        low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / r.factor, inv)
        smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    # default; dynamic NTK as HF applies it: its base grows only for sequences longer than
    # max_position_embeddings, which is also our context limit, so within it this is exact.
    return inv


def angle_table(r: RopeScaling, head_dim: int, theta: float, max_positions: int) -> torch.Tensor:
    """Megatron's rotary input for positions [0, max_positions): [P, 1, 1, head_dim] fp32."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq(r, head_dim, theta))
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
