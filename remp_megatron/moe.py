"""Mixture-of-experts layers on megatron-core, as HF computes them and without TP-redundant work.

Two substitutions in megatron's MoE layer (the rest is stock: expert weights, sharding,
``SequentialMLP``, all-gather token dispatcher):

- ``HFTopKRouter``: megatron's ``TopKRouter`` computes HF's function in another order (top-k of
  the logits, then a softmax over those k), which rounds differently; HF (Mixtral, Qwen3-MoE)
  takes a softmax over every expert in fp32, the top k of it, and renormalises them when asked.
  The gating linear is replaced too: megatron 0.16.1's calls Transformer Engine's GEMM, a
  NameError without TE.
- ``TokenSplitMoELayer``: without sequence parallelism every TP rank of a stage holds all
  tokens. Megatron's all-gather dispatcher would then gather TP copies of each token and every
  rank would run its experts on all of them: expert compute not split at all. Each TP rank
  instead routes only its 1/TP slice of the tokens; the dispatcher's all-gather over TP×EP (the
  same ranks) then sees each token once, and the slices are gathered back afterwards.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter


class HFTopKRouter(TopKRouter):
    # megatron's flag: softmax before top-k means the k weights are not renormalised.
    @property
    def normalize(self) -> bool:
        return not self.config.moe_router_pre_softmax

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """(probs, routing_map), both [tokens, experts]: the top k softmax weights in place."""
        logits = logits.view(-1, self.config.num_moe_experts)
        # fp32 as HF (fp64 stays fp64: the exactness tests' oracle computes it so).
        scores = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        top, index = torch.topk(scores, self.topk, dim=-1)
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(logits).scatter(1, index, top.to(logits.dtype))
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)
        return probs, routing_map


class TokenSplitMoELayer(MoELayer):
    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        group = self.attn_tp_group
        tp = group.size()
        if tp == 1:
            return super().forward(hidden_states)
        tokens = hidden_states.shape[0]
        per = -(-tokens // tp)  # padded rows route somewhere harmless and are cut off below
        padded = F.pad(hidden_states, (0, 0, 0, 0, 0, per * tp - tokens))
        rank = group.rank()
        out, bias = super().forward(padded[rank * per:(rank + 1) * per].contiguous())
        full = torch.empty((per * tp, *out.shape[1:]), dtype=out.dtype, device=out.device)
        dist.all_gather_into_tensor(full, out.contiguous(), group=group)
        return full[:tokens], bias
