"""Layouts and transfer plans (pure: no processes, unit-tested without a world).

A *layout* says, for one global tensor, which box of it each rank holds (megatron's
``ShardedTensor``: global offset + local shape, with prepended layer axes). A *plan*
intersects the old and new layouts: every box a rank must hold afterwards is filled either by
a local copy (the rank already holds it) or by point-to-point transfers from the primary
replicas that tile the tensor. Weights and KV use the same planner; transfers are grouped
into bounded buckets and scheduled in rounds where each rank sends to one peer and receives
from one peer, so no rank buffers more than one outgoing and one incoming bucket.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Optional


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Box:
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def intersect(self, other: "Box") -> Optional["Box"]:
        lo = tuple(max(a, b) for a, b in zip(self.offset, other.offset))
        hi = tuple(min(a + n, b + m) for a, n, b, m in zip(self.offset, self.shape, other.offset, other.shape))
        if any(h <= l for l, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def contains(self, other: "Box") -> bool:
        return self.intersect(other) == other

    def slices_in(self, outer: "Box") -> tuple[slice, ...]:
        """Index of this box inside a tensor that holds ``outer``."""
        return tuple(slice(o - p, o - p + n) for o, p, n in zip(self.offset, outer.offset, self.shape))

    def split(self, max_numel: int) -> list["Box"]:
        """Slabs along the outermost splittable axis, each at most ``max_numel`` (if possible)."""
        if self.numel <= max_numel:
            return [self]
        axis = next(i for i, n in enumerate(self.shape) if n > 1)
        inner = self.numel // self.shape[axis]
        step = max(1, max_numel // inner)
        out = []
        for start in range(0, self.shape[axis], step):
            n = min(step, self.shape[axis] - start)
            off = list(self.offset)
            off[axis] += start
            shp = list(self.shape)
            shp[axis] = n
            out += Box(tuple(off), tuple(shp)).split(max_numel)
        return out


@dataclass(frozen=True)
class Shard:
    """One rank's piece of one global tensor; ``index`` tells apart several pieces of the same
    key on one rank (e.g. the gate and up halves of a fused SwiGLU weight)."""

    key: str
    rank: int
    index: int
    box: Box
    primary: bool = True


Layout = dict[str, list[Shard]]


@dataclass(frozen=True)
class Transfer:
    key: str
    src: int
    src_index: int
    dst: int
    dst_index: int
    box: Box
    nbytes: int

    def split(self, max_bytes: int) -> list["Transfer"]:
        """This transfer as pieces of at most ``max_bytes`` (at least one element each)."""
        elem = self.nbytes // self.box.numel
        return [Transfer(self.key, self.src, self.src_index, self.dst, self.dst_index, piece, piece.numel * elem)
                for piece in self.box.split(max(1, max_bytes // elem))]


def pack(parts: list[Transfer], bucket_bytes: int) -> list[list[Transfer]]:
    """Consecutive parts (each at most ``bucket_bytes``) into buckets of at most ``bucket_bytes``."""
    buckets: list[list[Transfer]] = []
    for t in parts:
        if not buckets or sum(x.nbytes for x in buckets[-1]) + t.nbytes > bucket_bytes:
            buckets.append([])
        buckets[-1].append(t)
    return buckets


@dataclass
class Plan:
    transfers: list[Transfer] = field(default_factory=list)

    @property
    def bytes_moved(self) -> int:
        return sum(t.nbytes for t in self.transfers if t.src != t.dst)

    @property
    def bytes_kept(self) -> int:
        return sum(t.nbytes for t in self.transfers if t.src == t.dst)

    def local(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.src == t.dst == rank]

    def rounds(self, world: int, bucket_bytes: int) -> Iterator[dict[tuple[int, int], list[Transfer]]]:
        """Remote transfers in rounds {(src, dst): bucket}: in each round every rank sends at
        most one bucket (to ``rank + k``) and receives at most one (from ``rank - k``)."""
        parts: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
        for t in self.transfers:
            if t.src != t.dst:
                parts[(t.src, t.dst)] += t.split(bucket_bytes)
        pairs = {pair: pack(ps, bucket_bytes) for pair, ps in parts.items()}
        for k in range(1, world):
            depth = max((len(pairs.get((r, (r + k) % world), [])) for r in range(world)), default=0)
            for j in range(depth):
                yield {
                    (r, (r + k) % world): pairs[(r, (r + k) % world)][j]
                    for r in range(world)
                    if j < len(pairs.get((r, (r + k) % world), []))
                }


def plan_transfers(old: Layout, new: Layout, elem_bytes: dict[str, int]) -> Plan:
    """Fill every new shard: a local copy if its rank already holds the whole box, else the
    intersections with the old primary shards (which tile the tensor exactly once)."""
    plan = Plan()
    for key, dst_shards in new.items():
        srcs = old.get(key)
        if not srcs:
            raise PlanError(f"{key}: in the new layout but held by no rank in the old one")
        elem = elem_bytes[key]
        for d in dst_shards:
            local = next((s for s in srcs if s.rank == d.rank and s.box.contains(d.box)), None)
            if local is not None:
                plan.transfers.append(Transfer(key, d.rank, local.index, d.rank, d.index, d.box, d.box.numel * elem))
                continue
            covered = 0
            for s in srcs:
                inter = s.box.intersect(d.box) if s.primary else None
                if inter is not None:
                    plan.transfers.append(Transfer(key, s.rank, s.index, d.rank, d.index, inter, inter.numel * elem))
                    covered += inter.numel
            if covered != d.box.numel:
                raise PlanError(f"{key}: old primary shards cover {covered} of {d.box.numel} elements for rank {d.rank}")
    return plan
