"""Paged KV cache: a block allocator (pure, rank 0's bookkeeping) and each rank's KV tensor.

Layout per rank (megatron's dynamic-context layout):
    buffer[2 (K,V), local_layers, num_blocks, block_size, local_kv_heads, head_dim]
Block ids are global: rank 0 allocates them and every rank of every stage uses the same ids,
so ``KV[layer, block, kv_head]`` is owned by ``(pp_stage(layer), tp_rank(kv_head))``. Keys are
stored after RoPE.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .spec import ModelSpec
from .topology import Topology


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, used: frozenset[int] = frozenset()):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(b for b in range(num_blocks) if b not in used)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_ids(self) -> list[int]:
        """The free block ids, in the order they will be handed out."""
        return list(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def block_bytes(spec: ModelSpec, topo: Topology, block_size: int) -> int:
    """Bytes one block takes on one active rank at this topology."""
    elem = spec.torch_dtype.itemsize
    layers = spec.num_layers // topo.pp
    heads = spec.num_kv_heads // topo.tp
    return 2 * layers * block_size * heads * spec.head_dim * elem


def blocks_for_budget(spec: ModelSpec, topo: Topology, block_size: int, budget_bytes: int) -> int:
    """Global block count that fits a per-rank byte budget at this topology."""
    n = budget_bytes // block_bytes(spec, topo, block_size)
    if n < 1:
        raise ValueError(
            f"KV budget {budget_bytes} B is below one block ({block_bytes(spec, topo, block_size)} B at {topo})"
        )
    return int(n)


@dataclass
class KVCache:
    buffer: torch.Tensor  # [2, local_layers, num_blocks, block_size, local_kv_heads, head_dim]
    first_layer: int  # global 0-based index of local layer 0
    # Per local layer: K and V by slot [num_blocks*block_size, heads, dim] and by block
    # [num_blocks, block_size, heads, dim]; views made once (a step asks for them in every layer).
    _slots: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)
    _blocks: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self):
        self._blocks = [(self.buffer[0, i], self.buffer[1, i]) for i in range(self.buffer.shape[1])]
        self._slots = [(k.flatten(0, 1), v.flatten(0, 1)) for k, v in self._blocks]

    @classmethod
    def allocate(
        cls, spec: ModelSpec, topo: Topology, pp_stage: int, num_blocks: int, block_size: int, device
    ) -> "KVCache":
        shape = (
            2,
            spec.num_layers // topo.pp,
            num_blocks,
            block_size,
            spec.num_kv_heads // topo.tp,
            spec.head_dim,
        )
        buf = torch.zeros(shape, dtype=spec.torch_dtype, device=device)
        return cls(buf, topo.stage_layers(spec.num_layers, pp_stage).start)

    @property
    def block_size(self) -> int:
        return self.buffer.shape[3]

    def layer(self, global_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer as flat slot-addressed views [num_blocks*block_size, heads, dim]."""
        return self._slots[global_layer - self.first_layer]

    def layer_blocks(self, global_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer by block [num_blocks, block_size, heads, dim] (views of the same memory)."""
        return self._blocks[global_layer - self.first_layer]
