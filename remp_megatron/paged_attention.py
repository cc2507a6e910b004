"""Paged attention as megatron-core's ``core_attention``.

Megatron's ``SelfAttention`` keeps its fused QKV projection, QK-norm and TP row/column linears
(its inference forward, ``layer.py``, splits the heads and applies this step's RoPE, ``Rotary``:
cos/sin per token position, taken once per step for all layers); this module replaces the
attention kernel: it writes K/V into the paged cache and attends all sequences over their
cached tokens in one batched call per group (decodes, prefill chunks). Prefill chunks (and
decodes without the CPU kernel) gather their keys by block table for one SDPA call; on CPU,
decodes run ``cpu_kernels.paged_decode``, which reads the cache in place. Flash-attn's
block-table kernels are CUDA-only.

The step's metadata and rotary reach every layer through ``forward_context`` (set by the model
runner around one stage forward), the way vLLM passes its attention metadata.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@dataclass
class AttentionGroup:
    """Sequences attended in one batched SDPA call: queries padded to the group's longest
    chunk ([B, Qmax]), keys gathered a whole cache block at a time ([B, W * block_size], W the
    longest block table: one index per block, not per slot), an additive mask (0 / -inf) that
    is causal and hides the padding."""

    q_index: torch.Tensor  # [B * Qmax] packed row of each query (row 0 where padding)
    valid: torch.Tensor  # [real queries] their index in q_index, in packed-row order
    rows: torch.Tensor  # [real queries] their packed rows
    kv_blocks: torch.Tensor  # [B * W] cache block of each key block (the sequence's first where padding)
    mask: torch.Tensor  # [B, 1, Qmax, W * block_size] 0 where a query may attend, -inf elsewhere
    window_mask: Optional[torch.Tensor] = None  # the mask of sliding-window layers
    whole: bool = False  # the step's only group, one query per sequence: q_index, valid and rows are 0..B-1
    lens: Optional[torch.Tensor] = None  # decodes: [B] keys of each sequence, its query the last one
    first_block: Optional[int] = None  # one sequence whose blocks are consecutive from here: keys read in place


@dataclass
class AttentionMetadata:
    """What one step's attention needs; built identically on every rank from the step plan,
    once per step (all layers share it). Decodes (one query each) and prefill chunks form two
    groups, so a long prefill chunk does not pad every decode to its length."""

    positions: torch.Tensor  # [T] position of each new token
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    groups: list[AttentionGroup]
    block_size: int
    window_layers: frozenset[int] = frozenset()  # global 0-based layers that use window_mask
    window: int = 0  # their window (0: none)

    @classmethod
    def build(cls, starts: list[int], query_lens: list[int], block_tables: list[list[int]], block_size: int,
              device, window: Optional[int] = None, window_layers: tuple[int, ...] = (),
              dtype: torch.dtype = torch.float32) -> "AttentionMetadata":
        """``window``: in ``window_layers`` a query at position p sees keys in (p - window, p]
        (HF's sliding window). All keys stay cached; the mask hides the old ones. ``dtype``:
        the masks' (attention's compute dtype)."""
        start, n = torch.tensor(starts), torch.tensor(query_lens)
        offset = torch.cumsum(n, 0) - n
        width = max(map(len, block_tables))
        table = torch.tensor([t + [t[0]] * (width - len(t)) for t in block_tables], dtype=torch.long)

        everyone = torch.arange(len(starts))
        qpos = start[:, None] + torch.arange(int(n.max()))[None, :]
        valid = torch.arange(int(n.max()))[None, :] < n[:, None]
        positions = qpos[valid]
        pos = torch.where(valid, qpos, 0)
        slot_mapping = (table[everyone[:, None], pos // block_size] * block_size + pos % block_size)[valid]
        groups = []
        for rows in (everyone[n == 1], everyone[n > 1]):
            if len(rows) == 0:
                continue
            qmax = int(n[rows].max())
            blocks = -(-int((start + n)[rows].max()) // block_size)
            q = torch.arange(qmax)[None, :]
            q_valid = q < n[rows, None]
            k = torch.arange(blocks * block_size)[None, None, :]
            # Causal: key position <= query position (keys past a sequence's end are padding).
            # Padded query rows (past the chunk's end) then see only real keys, so no row is
            # fully masked (no NaN), and they are dropped.
            qpos_rows = (start[rows, None] + q)[:, :, None]
            allowed = k <= qpos_rows
            # Padded query rows keep the plain causal mask: a window could leave them no key.
            in_window = None if window is None else allowed & ((k > qpos_rows - window) | ~q_valid[:, :, None])
            q_index = torch.where(q_valid, offset[rows, None] + q, 0).flatten()
            valid_q = q_valid.flatten().nonzero()[:, 0]
            first = None
            if len(rows) == 1:  # a lone sequence's blocks are often consecutive (free ones are handed out in order)
                own = block_tables[int(rows[0])][:blocks]
                first = own[0] if own == list(range(own[0], own[0] + blocks)) else None
            groups.append(AttentionGroup(
                q_index.to(device), valid_q.to(device), q_index[valid_q].to(device),
                table[rows, :blocks].flatten().to(device), _additive(allowed, dtype, device),
                None if in_window is None else _additive(in_window, dtype, device),
                whole=qmax == 1 and len(rows) == len(starts), first_block=first,
                lens=(start + n)[rows].to(device) if qmax == 1 else None))
        return cls(positions.to(device), slot_mapping.to(device), groups, block_size,
                   frozenset(window_layers) if window is not None else frozenset(), window or 0)


def _additive(allowed: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    # Built once per step: SDPA would turn a boolean mask into this in every layer.
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return mask[:, None].to(device)


@dataclass
class Rotary:
    """RoPE of one step's tokens, cos and sin computed once for every layer ([T, dim], the
    model's dtype), applied by the attention to [T, groups, heads, dim] query and key heads.
    Megatron's unfused rotary is ``t * cos + rotate_half(t) * sin`` with rotate_half(t) =
    [-t2, t1]; here [t2, t1] (one ``roll``) times sin with its first half negated: the same
    products, bit for bit, in fewer ops (megatron would also take cos and sin again in every layer).
    ``fused.rope_qk`` computes the same in one pass."""

    cos: torch.Tensor
    sin: torch.Tensor  # first half negated

    @classmethod
    def of(cls, angles: torch.Tensor, mscale: float, dtype: torch.dtype) -> "Rotary":
        """``angles``: [T, ..., dim], megatron's rotary input for the step's positions."""
        angles = angles.reshape(angles.shape[0], angles.shape[-1])
        sin = (torch.sin(angles) * mscale).to(dtype)
        half = sin.shape[-1] // 2
        return cls((torch.cos(angles) * mscale).to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1))

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.cos[:, None, None] + t.roll(t.shape[-1] // 2, -1) * self.sin[:, None, None]


@dataclass
class _Context:
    meta: AttentionMetadata
    kv: KVCache
    rotary: Optional[Rotary]
    decode_kernel: Optional[Callable]


_current: Optional[_Context] = None


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata, kv: KVCache, rotary: Optional[Rotary] = None,
                    decode_kernel: Optional[Callable] = None) -> Iterator[None]:
    """``rotary``: the step's RoPE, applied by the layers' attention (``step_rotary``); the model
    then gets no rotary_pos_emb. ``decode_kernel``: ``cpu_kernels.paged_decode()`` for the decodes
    (None: they gather and use SDPA like prefill chunks)."""
    global _current
    _current, saved = _Context(meta, kv, rotary, decode_kernel), _current
    try:
        yield
    finally:
        _current = saved


def step_rotary() -> Rotary:
    assert _current is not None and _current.rotary is not None, "no step RoPE: run inside forward_context(.., rotary)"
    return _current.rotary


class PagedAttention(torch.nn.Module):
    """In megatron's layer spec in place of DotProductAttention (same constructor); layer.py's
    attention calls it with its heads split and rotated."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type, softmax_scale=None, **_):
        super().__init__()
        self.layer_number = layer_number  # global, 1-based
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [T, heads, dim], key/value [T, kv_heads, dim], RoPE applied -> [T, heads * dim]."""
        ctx = _current
        assert ctx is not None, "PagedAttention called outside forward_context()"
        meta = ctx.meta
        k_cache, v_cache = ctx.kv.layer(self.layer_number - 1)
        k_cache.index_copy_(0, meta.slot_mapping, key)
        v_cache.index_copy_(0, meta.slot_mapping, value)
        k_blocks, v_blocks = ctx.kv.layer_blocks(self.layer_number - 1)

        tokens, heads, dim = query.shape
        windowed = self.layer_number - 1 in meta.window_layers
        out = None
        for g in meta.groups:  # one call per group for all its sequences
            # A decode-only step's queries already are in the group's order: no gather, no scatter.
            q = query if g.whole else query.index_select(0, g.q_index)
            if g.lens is not None and ctx.decode_kernel is not None:
                o = ctx.decode_kernel(q, k_blocks, v_blocks, g.kv_blocks.view(len(g.lens), -1), g.lens,
                                      self.softmax_scale, meta.window if windowed else 0).view(-1, heads * dim)
            else:
                o = self._sdpa(q, g, meta.block_size, k_blocks, v_blocks, windowed)
            if g.whole:
                return o
            if out is None:
                out = query.new_empty(tokens, heads * dim)
            out.index_copy_(0, g.rows, o if g.lens is not None else o.index_select(0, g.valid))
        return out

    def _sdpa(self, query: torch.Tensor, g: AttentionGroup, block_size: int, k_blocks: torch.Tensor,
              v_blocks: torch.Tensor, windowed: bool) -> torch.Tensor:
        """The group's keys gathered by block table (or read in place for one sequence whose blocks
        are consecutive), one SDPA call -> [B * Qmax, heads * dim], padded query rows included."""
        heads, dim, kv_heads = query.shape[1], query.shape[2], k_blocks.shape[2]
        mask = g.window_mask if windowed else g.mask
        b, qmax, width = mask.shape[0], mask.shape[2], mask.shape[3]

        def keys(blocks: torch.Tensor) -> torch.Tensor:  # -> [B, kv_heads, width, dim]
            if g.first_block is not None:
                x = blocks.narrow(0, g.first_block, width // block_size)
            else:  # whole blocks along dim 0: CPU advanced indexing is ~10x slower than index_select
                x = blocks.index_select(0, g.kv_blocks)
            if x.dtype != mask.dtype:
                x = x.to(mask.dtype)
            return x.view(b, width, kv_heads, dim).transpose(1, 2)

        k, v = keys(k_blocks), keys(v_blocks)
        q = query
        if q.dtype != mask.dtype:
            q = q.to(mask.dtype)
        if qmax == 1 and mask.dtype == torch.bfloat16:
            # bf16 decodes: a KV head's query heads as that many query rows of one head (as HF
            # does): CPU SDPA's bf16 kernel is ~4x slower on one query row per head with GQA
            # (B=32: 4.8 vs 1.3 ms a layer). In fp32 the GQA call is a few % faster.
            q = q.reshape(b, kv_heads, heads // kv_heads, dim)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        elif qmax == 1:  # [B, heads, 1, dim]: the query axis needs no transposing
            o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=self.softmax_scale,
                                               enable_gqa=True)
        else:
            q = q.reshape(b, qmax, heads, dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=True)
            o = o.transpose(1, 2)
        o = o.reshape(b * qmax, heads * dim)
        return o if o.dtype == query.dtype else o.to(query.dtype)
