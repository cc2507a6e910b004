"""megatron-core's tensor-parallel linears with a forward for inference only.

Same classes underneath (parameters, TP sharding, checkpoint keys, resharding all unchanged);
only ``forward`` is replaced. Megatron's goes through an autograd Function, region-copy
Functions and per-call checks built for training: ~0.03 ms per call on CPU (SmolLM2's four
linears of a layer at batch 1: 1.48 -> 1.36 ms; ~4 ms of a 75 ms decode step). Here: one GEMM
and, for the row-parallel one, a sum over the TP group (``collectives.all_reduce_sum``: on CPU
one round of messages instead of gloo's ring).

GPTModel builds its output layer itself (no spec entry): ``use_for_output_layer`` gives it this
forward too (one GEMM, then megatron's gather of the vocabulary shards).

On CPU in fp32/bf16 the GEMM uses a copy of the weight in oneDNN's blocked layout for
decode-sized batches (packed all at load; after a switch a few per step, never in its pause): MKL's
GEMM reads a cold row-major weight at a few rows far below its peak (SmolLM2's 120 layer GEMMs, weights cold:
fp32 41 -> 27 ms at 1 row, 82 -> 47 ms at 32; bf16 19 -> 13 / 33 -> 24 ms, on an AMD EPYC). Not on
every CPU at every batch size: the runner measures which is faster (step_tuner.py). Another kernel, so
another summation order than ``x @ W.t()`` (fp32 rounding, no more); fp64 keeps ``matmul``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from .collectives import all_reduce_sum

_PACKED_FOR_ROWS = 32  # oneDNN's layout hint; any row count runs on it (measured best for 1 to 1024)
# oneDNN keeps what it builds for each GEMM shape for the process's life (~0.6 MB per shape, not
# bounded by its cache-capacity variables here: 350 distinct row counts grew RSS by 600 MB). So
# only decode-sized batches take the packed path, their rows padded to a power of two: at most 7
# shapes per weight. Prefill chunks (more rows, compute-bound) keep MKL's GEMM.
PACKED_MAX_ROWS = 64


class _Packable:
    packed: Optional[torch.Tensor] = None  # the weight in oneDNN's layout (pack_linear), not a parameter
    use_packed = True  # the runner's choice for this step (use_packed_weights)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``weight``: this layer's, or (a tied output layer owns none) the embedding's it was packed from."""
        # As one 2-D GEMM: torch.matmul turns a [T, 1, in] input whose strides do not fold to 2-D
        # (megatron's embedding output is a transposed view) into a bmm over T copies of the weight
        # (bf16: ~1 s for a 1024-token chunk's QKV).
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if self.use_packed and self.packed is not None and (weight is self.weight or self.weight is None) \
                and n <= PACKED_MAX_ROWS:
            pad = (1 << (n - 1).bit_length()) - n
            out = torch.ops.mkldnn._linear_pointwise(F.pad(rows, (0, 0, 0, pad)) if pad else rows, self.packed,
                                                     None, "none", [], "")
            if pad:
                out = out[:n]
        else:
            out = F.linear(rows, weight)  # matmul(rows, weight.t()): the same GEMM
        return out.view(*x.shape[:-1], weight.shape[0])


class InferenceColumnParallelLinear(_Packable, ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        # Used inside transformer layers only: no output gather, no sequence parallelism.
        assert not (self.gather_output or runtime_gather_output or self.sequence_parallel)
        out = self._gemm(input_, self.weight if weight is None else weight)
        if self.skip_bias_add or self.bias is None:
            return out, self.bias if self.skip_bias_add else None
        return out + self.bias, None


class InferenceRowParallelLinear(_Packable, RowParallelLinear):
    def forward(self, input_: torch.Tensor):
        assert self.input_is_parallel and not self.sequence_parallel
        out = self._gemm(input_, self.weight)
        # Experts' partial sums are combined by the token dispatcher instead (megatron's rule).
        if not self.explicit_expert_comm and self.tp_group.size() > 1:
            all_reduce_sum(out, self.tp_group)
        if self.skip_bias_add or self.bias is None:
            return out, self.bias if self.skip_bias_add else None
        return out + self.bias, None


class InferenceOutputLayer(_Packable, ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        out = self._gemm(input_, self.weight if weight is None else weight)
        if self.gather_output and self.tp_group.size() > 1:
            out = gather_from_tensor_model_parallel_region(out, self.tp_group)
        return out, None


def use_for_output_layer(model) -> None:
    """Give a last stage's GPTModel output layer the forward above (same object, parameters and
    checkpoint keys: the class adds no state)."""
    assert type(model.output_layer) is ColumnParallelLinear and model.output_layer.bias is None
    model.output_layer.__class__ = InferenceOutputLayer


def unpacked_linears(model: torch.nn.Module) -> list[tuple[_Packable, torch.Tensor]]:
    """``model``'s linears whose weight would be faster in oneDNN's layout (CPU, fp32/bf16) and is
    not yet, each with that weight (a tied output layer's is the embedding's). Pack once the
    weights are final: a serving model's weights never change in place (a switch builds a new
    model), so the copy stays valid for the model's life."""
    if not torch.backends.mkldnn.is_available():
        return []
    found = []
    for m in model.modules():
        if isinstance(m, _Packable) and m.packed is None:
            weight = m.weight if m.weight is not None else model.shared_embedding_or_output_weight()
            if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16):
                found.append((m, weight))
    return found


def has_packed_path(model: torch.nn.Module) -> bool:
    """Whether any of ``model``'s linears runs (or, once packed, will run) on a packed weight."""
    return any(isinstance(m, _Packable) and m.packed is not None for m in model.modules()) \
        or bool(unpacked_linears(model))


def use_packed_weights(model: torch.nn.Module, on: bool) -> None:
    """Whether ``model``'s packed linears run on their packed weights (else on MKL's GEMM) from
    now on: which is faster at a batch size depends on the CPU (step_tuner.py)."""
    for m in model.modules():
        if isinstance(m, _Packable):
            m.use_packed = on


def pack_linear(linear: _Packable, weight: torch.Tensor) -> None:
    linear.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACKED_FOR_ROWS)


def pack_weights(model: torch.nn.Module) -> None:
    """Pack every linear of ``model`` that would gain from it (SmolLM2 whole: 0.12 s fp32, 0.07 s bf16)."""
    for m, weight in unpacked_linears(model):
        pack_linear(m, weight)
