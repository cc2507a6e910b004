"""Paged attention as megatron-core's ``core_attention``.

Megatron's ``SelfAttention`` keeps doing what it does well (fused QKV projection, GQA split,
RoPE from per-token frequencies, TP row/column linears); this module replaces only the
attention kernel: it writes this step's K/V into the paged cache and attends all sequences
over their cached tokens in one batched SDPA call per group (decodes, prefill chunks), keys
gathered by block table. Flash-attn's block-table kernels are CUDA-only; this is plain torch.

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
class AttentionGroup:
    """Sequences attended in one batched SDPA call: queries and cached keys padded to the
    group's longest ([B, Qmax] / [B, Lmax]), a causal mask that also hides the padding."""

    q_index: torch.Tensor  # [B * Qmax] packed row of each query (row 0 where padding)
    valid: torch.Tensor  # [real queries] their index in q_index, in packed-row order
    rows: torch.Tensor  # [real queries] their packed rows
    kv_slots: torch.Tensor  # [B * Lmax] cache slot of each key (the sequence's first slot where padding)
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] True where a query may attend
    window_mask: Optional[torch.Tensor] = None  # the mask of sliding-window layers


@dataclass
class AttentionMetadata:
    """What one step's attention needs; built identically on every rank from the step plan,
    once per step (all layers share it). Decodes (one query each) and prefill chunks form two
    groups, so a long prefill chunk does not pad every decode to its length."""

    positions: torch.Tensor  # [T] position of each new token
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    groups: list[AttentionGroup]
    window_layers: frozenset[int] = frozenset()  # global 0-based layers that use window_mask

    @classmethod
    def build(cls, starts: list[int], query_lens: list[int], block_tables: list[list[int]], block_size: int,
              device, window: Optional[int] = None, window_layers: tuple[int, ...] = ()) -> "AttentionMetadata":
        """``window``: in ``window_layers`` a query at position p sees keys in (p - window, p]
        (HF's sliding window). All keys stay cached; the mask hides the old ones."""
        start, n = torch.tensor(starts), torch.tensor(query_lens)
        offset = torch.cumsum(n, 0) - n
        width = max(map(len, block_tables))
        table = torch.tensor([t + [t[0]] * (width - len(t)) for t in block_tables], dtype=torch.long)

        def slots(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # cache slot of each position
            return table[rows[:, None], pos // block_size] * block_size + pos % block_size

        everyone = torch.arange(len(starts))
        qpos = start[:, None] + torch.arange(int(n.max()))[None, :]
        valid = torch.arange(int(n.max()))[None, :] < n[:, None]
        positions, slot_mapping = qpos[valid], slots(everyone, torch.where(valid, qpos, 0))[valid]
        groups = []
        for rows in (everyone[n == 1], everyone[n > 1]):
            if len(rows) == 0:
                continue
            qmax, lmax = int(n[rows].max()), int((start + n)[rows].max())
            q = torch.arange(qmax)[None, :]
            q_valid = q < n[rows, None]
            k = torch.arange(lmax)[None, :].expand(len(rows), lmax)
            k_valid = k < (start + n)[rows, None]
            kv_slots = torch.where(k_valid, slots(rows, torch.where(k_valid, k, 0)), slots(rows, k[:, :1]))
            # Causal: key position <= query position. Padded query rows (past the sequence end)
            # then see only real keys, so no row is fully masked (no NaN), and they are dropped.
            qpos_rows = (start[rows, None] + q)[:, :, None]
            mask = k[:, None, :] <= qpos_rows
            # Padded query rows keep the plain causal mask: a window could leave them no key.
            window_mask = None if window is None else \
                mask & ((k[:, None, :] > qpos_rows - window) | ~q_valid[:, :, None])
            q_index = torch.where(q_valid, offset[rows, None] + q, 0).flatten()
            valid = q_valid.flatten().nonzero()[:, 0]
            groups.append(AttentionGroup(q_index.to(device), valid.to(device), q_index[valid].to(device),
                                         kv_slots.flatten().to(device), mask[:, None].to(device),
                                         None if window_mask is None else window_mask[:, None].to(device)))
        return cls(positions.to(device), slot_mapping.to(device), groups,
                   frozenset(window_layers) if window is not None else frozenset())


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

        q_packed = query[:, 0]
        out = torch.empty_like(q_packed)
        windowed = self.layer_number - 1 in meta.window_layers
        # CPU SDPA in bf16/fp16 runs ~3x slower than in fp32 (no half kernel): attend in fp32 there.
        dtype = torch.float32 if q_packed.device.type == "cpu" and q_packed.element_size() < 4 else q_packed.dtype
        for g in meta.groups:  # one SDPA per group for all its sequences
            mask = g.window_mask if windowed else g.mask
            b, qmax, lmax = mask.shape[0], mask.shape[2], mask.shape[3]

            def gather(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:  # -> [B, heads, n, dim]
                # index_select on the flat slot axis: ~10x faster than advanced indexing on CPU.
                return x.index_select(0, index).to(dtype).view(b, n, *x.shape[1:]).transpose(1, 2)

            o = F.scaled_dot_product_attention(
                gather(q_packed, g.q_index, qmax), gather(k_cache, g.kv_slots, lmax),
                gather(v_cache, g.kv_slots, lmax), attn_mask=mask, scale=self.softmax_scale, enable_gqa=True)
            o = o.transpose(1, 2).reshape(b * qmax, *q_packed.shape[1:])
            out.index_copy_(0, g.rows, o.index_select(0, g.valid).to(out.dtype))
        return out.reshape(out.shape[0], 1, -1)
