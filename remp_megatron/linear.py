"""megatron-core's tensor-parallel linears with a forward for inference only.

Same classes underneath (parameters, TP sharding, checkpoint keys, resharding all unchanged);
only ``forward`` is replaced. Megatron's goes through an autograd Function, region-copy
Functions and per-call checks built for training: ~0.03 ms per call on CPU (SmolLM2's four
linears of a layer at batch 1: 1.48 -> 1.36 ms; ~4 ms of a 75 ms decode step). Here: the same
``matmul(x, W.t())`` (bit-identical results) and, for the row-parallel one, a sum over the TP
group (``collectives.all_reduce_sum``: on CPU one round of messages instead of gloo's ring).
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from .collectives import all_reduce_sum


def _matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # As one 2-D GEMM: torch.matmul turns a [T, 1, in] input whose strides do not fold to 2-D
    # (megatron's embedding output is a transposed view) into a bmm over T copies of the weight
    # (bf16: ~1 s for a 1024-token chunk's QKV).
    return torch.matmul(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])


class InferenceColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        # Used inside transformer layers only: no output gather, no sequence parallelism.
        assert not (self.gather_output or runtime_gather_output or self.sequence_parallel)
        out = _matmul(input_, self.weight if weight is None else weight)
        if self.skip_bias_add or self.bias is None:
            return out, self.bias if self.skip_bias_add else None
        return out + self.bias, None


class InferenceRowParallelLinear(RowParallelLinear):
    def forward(self, input_: torch.Tensor):
        assert self.input_is_parallel and not self.sequence_parallel
        out = _matmul(input_, self.weight)
        # Experts' partial sums are combined by the token dispatcher instead (megatron's rule).
        if not self.explicit_expert_comm and self.tp_group.size() > 1:
            all_reduce_sum(out, self.tp_group)
        if self.skip_bias_add or self.bias is None:
            return out, self.bias if self.skip_bias_add else None
        return out + self.bias, None
