"""Top-k expert routing with HF's arithmetic, on megatron's router.

megatron's ``TopKRouter`` computes the same function as HF's Mixtral / Qwen3-MoE routers but
in another order (top-k of the logits, then a softmax over those k), which rounds differently;
HF takes a softmax over every expert in fp32, the top k of it, and renormalises them when
asked. We keep megatron's module (its weight, sharding and gating linear) and replace only
that arithmetic (and the gating linear: megatron 0.16.1's calls Transformer Engine's GEMM, a
NameError without TE), so logits match HF to rounding at every topology.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
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
