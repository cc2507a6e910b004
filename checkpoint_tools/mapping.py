"""HF (Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen3-MoE) tensor names and layouts <-> megatron-core
GPTModel state dict.

Pure tensor math, no I/O. Megatron fuses Q/K/V per query group ([q heads of group g, k_g, v_g]
for g in groups) and gate/up into linear_fc1 ([gate; up]), in dense MLPs and in each expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from remp_megatron.spec import ModelSpec


@dataclass(frozen=True)
class Rule:
    """One megatron tensor: which HF tensors make it, and how to split it back."""

    megatron: str
    hf: tuple[str, ...]
    join: Callable[[list[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor], list[torch.Tensor]]


def _qkv_join(spec: ModelSpec):
    g, qpg, d = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim

    def join(ts: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = ts
        tail = q.shape[1:]  # (hidden,) for weights, () for biases
        q = q.reshape(g, qpg * d, *tail)
        k = k.reshape(g, d, *tail)
        v = v.reshape(g, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(g * (qpg + 2) * d, *tail)

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        tail = t.shape[1:]
        t = t.reshape(g, (qpg + 2) * d, *tail)
        q, k, v = torch.split(t, [qpg * d, d, d], dim=1)
        return [q.reshape(g * qpg * d, *tail), k.reshape(g * d, *tail), v.reshape(g * d, *tail)]

    return join, split


def _same(ts):
    return ts[0]


def _one(t):
    return [t]


def _cat(ts):
    return torch.cat(ts, dim=0)


def _halves(t):
    return list(torch.chunk(t, 2, dim=0))


def rules(spec: ModelSpec) -> list[Rule]:
    qkv_join, qkv_split = _qkv_join(spec)
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _same, _one)]
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        a = h + "self_attn."
        out += [
            Rule(m + "input_layernorm.weight", (h + "input_layernorm.weight",), _same, _one),
            Rule(
                m + "self_attention.linear_qkv.weight",
                tuple(a + f"{p}_proj.weight" for p in "qkv"),
                qkv_join,
                qkv_split,
            ),
            Rule(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",), _same, _one),
            Rule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), _same, _one),
        ]
        if spec.moe is not None and i in spec.moe.layers:
            out += _moe_rules(spec, m + "mlp.", h)
        else:
            out += _swiglu_rules(m + "mlp.", h + "mlp.", ("gate_proj", "up_proj", "down_proj"))
        if spec.qk_norm:  # Qwen3: one RMSNorm weight over head_dim, shared by every head
            out += [Rule(m + f"self_attention.{p}_layernorm.weight", (a + f"{p}_norm.weight",), _same, _one)
                    for p in "qk"]
        if spec.qkv_bias:
            out.append(
                Rule(
                    m + "self_attention.linear_qkv.bias",
                    tuple(a + f"{p}_proj.bias" for p in "qkv"),
                    qkv_join,
                    qkv_split,
                )
            )
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), _same, _one))
    if not spec.tie_word_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), _same, _one))
    return out


def _swiglu_rules(m: str, h: str, names: tuple[str, str, str]) -> list[Rule]:
    gate, up, down = (h + n + ".weight" for n in names)
    return [Rule(m + "linear_fc1.weight", (gate, up), _cat, _halves), Rule(m + "linear_fc2.weight", (down,), _same, _one)]


def _moe_rules(spec: ModelSpec, m: str, layer: str) -> list[Rule]:
    """Router and experts; megatron's state dict names experts by their index at TP1·PP1·EP1."""
    if spec.architecture == "mixtral":
        h, names = layer + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        h, names = layer + "mlp.", ("gate_proj", "up_proj", "down_proj")
    out = [Rule(m + "router.weight", (h + "gate.weight",), _same, _one)]
    for e in range(spec.moe.num_experts):
        out += _swiglu_rules(m + f"experts.local_experts.{e}.", h + f"experts.{e}.", names)
    return out


# HF tensors that carry nothing we need (tied lm_head copies, precomputed rotary buffers).
def ignorable_hf_tensor(name: str, spec: ModelSpec) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (spec.tie_word_embeddings and name == "lm_head.weight")
