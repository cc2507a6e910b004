"""A decoder layer's small ops, each one pass of a CPU kernel (``cpu_kernels``, csrc/pointwise.cpp)
where it is built, else the torch ops it replaces (CUDA, no compiler, ``REMP_CPU_KERNELS=0``).

In torch each of these is 3-6 ops, every one a parallel region and a temporary; at 32 decoding
SmolLM2 sequences they were ~10 ms of a ~50 ms bf16 step (docs/benchmarks.md). The kernels round
as HF's Llama modules do, so the two paths differ by fp32-level rounding (a sum's order, the exp,
fused multiply-adds) and, in bf16, by HF's two roundings in RMSNorm where torch's RMSNorm rounds
once; tests/test_fused.py holds both to fp64.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from . import cpu_kernels

if TYPE_CHECKING:
    from .paged_attention import Rotary


def _kernels(x: torch.Tensor) -> Optional[ModuleType]:
    return cpu_kernels.kernels() if x.device.type == "cpu" else None


def _eps(norm: torch.nn.RMSNorm, x: torch.Tensor) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # torch's default for None


def rms_norm(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    k = _kernels(x)
    return norm(x) if k is None else k.rms_norm(x.contiguous(), norm.weight, _eps(norm, x))


def add_rms_norm(norm: torch.nn.RMSNorm, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``norm(x + residual)``, ``x + residual``): a pre-norm with the residual add before it."""
    k = _kernels(x)
    if k is None:
        total = x + residual
        return norm(total), total
    return k.add_rms_norm(x.contiguous(), residual.contiguous(), norm.weight, _eps(norm, x))


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` of a fused [gate, up] projection output."""
    k = _kernels(x)
    if k is None:
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up
    return k.silu_mul(x.contiguous())


def rope_qk(rotary: Rotary, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries [T, groups * per_group, dim] and keys [T, groups, dim] of a fused QKV output
    [T, groups, per_group + 2, dim] (each KV head's query heads, key, value), rotated."""
    k = _kernels(qkv)
    if k is not None:
        return k.rope_qk(qkv.contiguous(), rotary.cos, rotary.sin)
    tokens, per_group, dim = qkv.shape[0], qkv.shape[2] - 2, qkv.shape[3]
    qk = rotary(qkv[:, :, :per_group + 1])  # queries and keys rotated in one go
    return qk[:, :, :per_group].reshape(tokens, -1, dim), qk[:, :, per_group]
