"""Topology: a (tp, pp) value plus the rank map. Pure code, no processes.

Rank map (megatron order ``tp-cp-ep-pp-dp``): global rank ``r < tp*pp`` is active with
``pp_stage = r // tp`` and ``tp_rank = r % tp``; ranks ``>= tp*pp`` are standby (megatron sees
them as data-parallel replicas, we never run a model on them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .spec import ModelSpec


class TopologyError(ValueError):
    """An impossible topology; the message names the violated constraint."""


@dataclass(frozen=True, order=True)
class Topology:
    tp: int
    pp: int

    def __str__(self) -> str:
        return f"TP{self.tp}·PP{self.pp}"

    @property
    def short(self) -> str:
        """'TxP', the form ``parse`` and CLI flags use."""
        return f"{self.tp}x{self.pp}"

    @property
    def size(self) -> int:
        return self.tp * self.pp

    def validate(self, spec: ModelSpec, world_size: int) -> None:
        if self.tp < 1 or self.pp < 1:
            raise TopologyError(f"{self}: tp and pp must be >= 1")
        if spec.num_heads % self.tp:
            raise TopologyError(f"{self}: tp={self.tp} must divide num_attention_heads={spec.num_heads}")
        if spec.num_kv_heads % self.tp:
            raise TopologyError(f"{self}: tp={self.tp} must divide num_key_value_heads={spec.num_kv_heads}")
        if spec.vocab_size % self.tp:  # megatron's vocab-parallel embedding splits rows evenly
            raise TopologyError(f"{self}: tp={self.tp} must divide vocab_size={spec.vocab_size}")
        if spec.num_layers % self.pp:
            raise TopologyError(f"{self}: pp={self.pp} must divide num_hidden_layers={spec.num_layers}")
        if self.size > world_size:
            raise TopologyError(f"{self}: tp*pp={self.size} exceeds world size {world_size}")
        # megatron's parallel_state lays the world out as whole (tp*pp) replicas.
        if world_size % self.size:
            raise TopologyError(f"{self}: tp*pp={self.size} must divide world size {world_size}")

    def coords(self, rank: int) -> Optional[tuple[int, int]]:
        """(pp_stage, tp_rank) of a global rank, or None if it is standby."""
        if rank >= self.size:
            return None
        return rank // self.tp, rank % self.tp

    def rank_of(self, pp_stage: int, tp_rank: int) -> int:
        return pp_stage * self.tp + tp_rank

    def stage_layers(self, num_layers: int, pp_stage: int) -> range:
        """Global 0-based layer indices held by a stage (even split)."""
        per = num_layers // self.pp
        return range(pp_stage * per, (pp_stage + 1) * per)

    def kv_heads(self, num_kv_heads: int, tp_rank: int) -> range:
        per = num_kv_heads // self.tp
        return range(tp_rank * per, (tp_rank + 1) * per)

    @classmethod
    def parse(cls, text: str) -> "Topology":
        """'2x2', 'tp2pp2' or 'TP2·PP2' -> Topology(2, 2)."""
        t = text.lower().replace("·", "").replace(" ", "")
        try:
            if "x" in t:
                tp, pp = t.split("x")
            else:
                tp, pp = t.removeprefix("tp").split("pp")
            return cls(int(tp), int(pp))
        except ValueError:
            raise TopologyError(f"cannot parse topology {text!r} (use e.g. 2x2 or tp2pp2)") from None


def valid_topologies(spec: ModelSpec, world_size: int) -> list[Topology]:
    """Every topology ``spec`` can be served at in a world of ``world_size`` ranks."""
    out = []
    for tp in range(1, world_size + 1):
        for pp in range(1, world_size // tp + 1):
            try:
                Topology(tp, pp).validate(spec, world_size)
            except TopologyError:
                continue
            out.append(Topology(tp, pp))
    return out
