"""Executing layout plans between live ranks: weights and KV, peer to peer, in buckets.

Weight layouts come from megatron-core's own ``sharded_state_dict`` (factories applied, so the
fused SwiGLU weight shows up as its two halves, each a view of the parameter) and are
exchanged over the control group; KV layouts are derived from the topology (pure). A
``Region`` reads and writes a global box of one local tensor; for KV its block axis is
indirect (compact live-block index -> block id), so only live blocks are read or written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .layout import Box, Layout, Plan, Shard, Transfer
from .spec import ModelSpec
from .topology import Topology

KV_KEY = "kv"
KV_BLOCK_AXIS = 2  # [2, layers, blocks, block_size, kv_heads, head_dim]


@dataclass
class Region:
    tensor: torch.Tensor  # shaped like ``box`` (block axis: all physical blocks)
    box: Box
    block_ids: Optional[torch.Tensor] = None  # compact index -> physical block (KV only)

    def _index(self, b: Box):
        idx = list(b.slices_in(self.box))
        if self.block_ids is not None:
            idx[KV_BLOCK_AXIS] = self.block_ids[idx[KV_BLOCK_AXIS]].to(self.tensor.device)
        return tuple(idx)

    def read(self, b: Box) -> torch.Tensor:
        return self.tensor[self._index(b)]

    def write(self, b: Box, value: torch.Tensor) -> None:
        self.tensor[self._index(b)] = value.view(b.shape).to(self.tensor.dtype)


Regions = dict[tuple[str, int], Region]


def weight_regions(model, rank: int) -> tuple[list[Shard], Regions]:
    """This rank's weight shards, from megatron's sharded state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    if model is None:
        return [], {}
    sd = model.sharded_state_dict()
    apply_factories(sd)
    shards, regions, count = [], {}, {}
    for st in nested_values(sd):
        if not isinstance(st, ShardedTensor):
            continue
        shape = (1,) * st.prepend_axis_num + tuple(st.data.shape)
        box = Box(tuple(st.global_offset), shape)  # megatron's offsets are in elements
        index = count.get(st.key, 0)
        count[st.key] = index + 1
        primary = all(r == 0 for r in (st.replica_id if isinstance(st.replica_id, tuple) else (st.replica_id,)))
        shards.append(Shard(st.key, rank, index, box, primary))
        regions[(st.key, index)] = Region(st.data.view(shape), box)
    return shards, regions


def gather_layout(local: list[Shard], group) -> Layout:
    """Everyone's shards, by key (collective over ``group``)."""
    everything: list[Optional[list[Shard]]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everything, local, group=group)
    layout: Layout = {}
    for shards in everything:
        for s in shards:
            layout.setdefault(s.key, []).append(s)
    return layout


def kv_layout(spec: ModelSpec, topo: Topology, num_live: int, block_size: int) -> Layout:
    """The live KV as one global tensor [2, layers, live blocks, block, kv_heads, dim]: each
    active rank holds its stage's layers and its TP rank's KV heads (pure)."""
    shards = []
    for rank in range(topo.size):
        stage, tp_rank = topo.coords(rank)
        layers = topo.stage_layers(spec.num_layers, stage)
        heads = topo.kv_heads(spec.num_kv_heads, tp_rank)
        box = Box((0, layers.start, 0, 0, heads.start, 0),
                  (2, len(layers), num_live, block_size, len(heads), spec.head_dim))
        shards.append(Shard(KV_KEY, rank, 0, box))
    return {KV_KEY: shards}


def kv_region(buffer: torch.Tensor, layout: Layout, rank: int, block_ids: list[int]) -> Regions:
    shard = next((s for s in layout[KV_KEY] if s.rank == rank), None)
    if shard is None:
        return {}
    return {(KV_KEY, 0): Region(buffer, shard.box, torch.tensor(block_ids, dtype=torch.long))}


@dataclass
class MoveStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_local: int = 0
    peak_bucket_bytes: int = 0  # largest send + receive buffers held at once


def local_pieces(plan: Plan, rank: int, bucket_bytes: int) -> list[Transfer]:
    """This rank's local copies, split into bucket-sized slabs (bounded memory, and pre-staging
    can spread them over step boundaries)."""
    return [piece for t in plan.local(rank) for piece in t.split(bucket_bytes)]


def copy_pieces(pieces: list[Transfer], src: Regions, dst: Regions, stats: MoveStats) -> None:
    for t in pieces:
        dst[(t.key, t.dst_index)].write(t.box, src[(t.key, t.src_index)].read(t.box))
        stats.bytes_local += t.nbytes


def run_rounds(rounds: list[dict], rank: int, src: Regions, dst: Regions, device: torch.device,
               dtype: torch.dtype, stats: MoveStats) -> None:
    """Collective over the world: each rank sends/receives its bucket of every round."""
    for rnd in rounds:
        works, inbox, held = [], None, 0
        for (s, d), bucket in rnd.items():
            if s == rank:
                out = torch.cat([src[(t.key, t.src_index)].read(t.box).reshape(-1).to(dtype) for t in bucket])
                works.append(dist.isend(out.contiguous(), dst=d))
                stats.bytes_sent += out.numel() * out.element_size()
                held += out.numel() * out.element_size()
            if d == rank:
                inbox = (bucket, torch.empty(sum(t.box.numel for t in bucket), dtype=dtype, device=device))
                works.append(dist.irecv(inbox[1], src=s))
                held += inbox[1].numel() * inbox[1].element_size()
        for w in works:
            w.wait()
        stats.peak_bucket_bytes = max(stats.peak_bucket_bytes, held)
        if inbox is not None:
            bucket, buf = inbox
            offset = 0
            for t in bucket:
                dst[(t.key, t.dst_index)].write(t.box, buf[offset: offset + t.box.numel])
                offset += t.box.numel
            stats.bytes_received += buf.numel() * buf.element_size()
