"""Paged attention as megatron-core's ``core_attention``.

Megatron's ``SelfAttention`` keeps doing what it does well (fused QKV projection, GQA split,
RoPE from per-token frequencies, TP row/column linears); this module replaces only the
attention kernel: it writes this step's K/V into the paged cache and attends each sequence
over its cached tokens. Flash-attn's block-table kernels are CUDA-only; this is plain torch.

The step's metadata reaches every layer through ``forward_context`` (set by the model runner
around one stage forward), the way vLLM passes its attention metadata.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@dataclass
class AttentionMetadata:
    """What one step's attention needs; built identically on every rank from the step plan."""

    positions: torch.Tensor  # [T] position of each new token
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    query_lens: list[int]  # new tokens per sequence, in order
    seq_slots: list[torch.Tensor]  # per sequence: cache slots of all its tokens up to this step
    masks: list[torch.Tensor]  # per sequence: [new tokens, cached tokens] causal mask (shared by all layers)

    @classmethod
    def build(
        cls, starts: list[int], query_lens: list[int], block_tables: list[list[int]], block_size: int, device
    ) -> "AttentionMetadata":
        positions, slots, seq_slots, masks = [], [], [], []
        for start, n, table in zip(starts, query_lens, block_tables):
            pos = torch.arange(start + n)
            blocks = torch.tensor(table, dtype=torch.long)[pos // block_size]
            s = blocks * block_size + pos % block_size
            positions.append(pos[start:])
            slots.append(s[start:])
            seq_slots.append(s.to(device))
            masks.append((pos[None, :] <= pos[start:, None]).to(device))
        return cls(
            torch.cat(positions).to(device), torch.cat(slots).to(device), list(query_lens), seq_slots, masks
        )


@dataclass
class _Context:
    meta: AttentionMetadata
    kv: KVCache


_current: Optional[_Context] = None


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata, kv: KVCache) -> Iterator[None]:
    global _current
    _current, saved = _Context(meta, kv), _current
    try:
        yield
    finally:
        _current = saved


class PagedAttention(torch.nn.Module):
    """Drop-in for megatron's DotProductAttention in a layer spec (same constructor)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type, softmax_scale=None, **_):
        super().__init__()
        self.layer_number = layer_number  # global, 1-based
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # query [T, 1, heads, dim]; key/value [T, 1, kv_heads, dim]; positions are per token.
        ctx = _current
        assert ctx is not None, "PagedAttention called outside forward_context()"
        meta = ctx.meta
        k_cache, v_cache = ctx.kv.layer(self.layer_number - 1)
        k_cache.index_copy_(0, meta.slot_mapping, key[:, 0])
        v_cache.index_copy_(0, meta.slot_mapping, value[:, 0])

        out = torch.empty_like(query[:, 0])
        start = 0
        for n, slots, mask in zip(meta.query_lens, meta.seq_slots, meta.masks):
            q = query[start : start + n, 0].transpose(0, 1)  # [heads, n, dim]
            k = k_cache[slots].transpose(0, 1)  # [kv_heads, ctx, dim]
            v = v_cache[slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=True
            )
            out[start : start + n] = o.transpose(0, 1)
            start += n
        return out.reshape(out.shape[0], 1, -1)
