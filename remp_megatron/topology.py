"""Topology: a (tp, pp, ep) value plus the rank map. Pure code, no processes.

Rank map (megatron order ``tp-cp-ep-pp-dp``): global rank ``r < tp*pp`` is active with
``pp_stage = r // tp`` and ``tp_rank = r % tp``; ranks ``>= tp*pp`` are standby (megatron sees
them as data-parallel replicas, we never run a model on them).

Expert parallelism folds into a stage's TP ranks (megatron's "MoE parallel folding"): the
``ep`` expert groups of a stage each hold ``num_experts / ep`` experts, tensor-parallel over
``tp / ep`` ranks, so experts never sit on standby ranks and ``ep`` must divide ``tp``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from .spec import ModelSpec


class TopologyError(ValueError):
    """An impossible topology; the message names the violated constraint, ``field`` the size
    (tp, pp or ep) it is about."""

    def __init__(self, message: str, field: str = "tp"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, order=True)
class Topology:
    tp: int
    pp: int
    ep: int = 1

    def __str__(self) -> str:
        return f"TP{self.tp}·PP{self.pp}" + (f"·EP{self.ep}" if self.ep > 1 else "")

    @property
    def short(self) -> str:
        """'TxP' or 'TxPxE', the form ``parse`` and CLI flags use."""
        return f"{self.tp}x{self.pp}" + (f"x{self.ep}" if self.ep > 1 else "")

    @property
    def size(self) -> int:
        return self.tp * self.pp

    @property
    def expert_tp(self) -> int:
        """Ranks one expert's weights are split over."""
        return self.tp // self.ep

    def validate(self, spec: ModelSpec, world_size: int) -> None:
        if self.tp < 1 or self.pp < 1 or self.ep < 1:
            raise TopologyError(f"{self}: tp, pp and ep must be >= 1",
                                "tp" if self.tp < 1 else "pp" if self.pp < 1 else "ep")
        if spec.num_heads % self.tp:
            raise TopologyError(f"{self}: tp={self.tp} must divide num_attention_heads={spec.num_heads}")
        if spec.num_kv_heads % self.tp:
            raise TopologyError(f"{self}: tp={self.tp} must divide num_key_value_heads={spec.num_kv_heads}")
        if spec.vocab_size % self.tp:  # megatron's vocab-parallel embedding splits rows evenly
            raise TopologyError(f"{self}: tp={self.tp} must divide vocab_size={spec.vocab_size}")
        if spec.intermediate_size % self.tp:
            raise TopologyError(f"{self}: tp={self.tp} must divide intermediate_size={spec.intermediate_size}")
        if spec.num_layers % self.pp:
            raise TopologyError(f"{self}: pp={self.pp} must divide num_hidden_layers={spec.num_layers}", "pp")
        if self.ep > 1 and spec.moe is None:
            raise TopologyError(f"{self}: ep={self.ep} needs a mixture-of-experts model ({spec.architecture} has none)",
                                "ep")
        if self.tp % self.ep:
            raise TopologyError(f"{self}: ep={self.ep} must divide tp={self.tp} (experts are spread over a stage's TP ranks)",
                                "ep")
        if spec.moe is not None:
            if spec.moe.num_experts % self.ep:
                raise TopologyError(f"{self}: ep={self.ep} must divide the number of experts {spec.moe.num_experts}",
                                    "ep")
            if spec.moe.intermediate_size % self.expert_tp:
                raise TopologyError(f"{self}: tp/ep={self.expert_tp} must divide the expert intermediate size "
                                    f"{spec.moe.intermediate_size}", "ep")
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
        """'2x2', '4x1x2', 'tp2pp2', 'tp4pp1ep2' or 'TP4·PP1·EP2' -> Topology."""
        t = text.lower().replace("·", "").replace(" ", "")
        m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", t) or re.fullmatch(r"tp(\d+)pp(\d+)(?:ep(\d+))?", t)
        if m is None:
            raise TopologyError(f"cannot parse topology {text!r} (use e.g. 2x2, 4x1x2 or tp4pp1ep2)")
        return cls(int(m[1]), int(m[2]), int(m[3] or 1))


def valid_topologies(spec: ModelSpec, world_size: int) -> list[Topology]:
    """Every topology ``spec`` can be served at in a world of ``world_size`` ranks."""
    out = []
    for tp in range(1, world_size + 1):
        for pp in range(1, world_size // tp + 1):
            for ep in range(1, tp + 1):
                try:
                    Topology(tp, pp, ep).validate(spec, world_size)
                except TopologyError:
                    continue
                out.append(Topology(tp, pp, ep))
    return out


def topology_for_world(spec: ModelSpec, wanted: Topology, world_size: int,
                       prefer: Callable[[list[Topology]], Optional[Topology]] = lambda fits: None
                       ) -> Optional[Topology]:
    """Where a (re-)formed world of ``world_size`` ranks starts: ``wanted`` if it fits, else (ranks
    are gone) ``prefer``'s choice among those that do (the policy's cost profile), else the largest
    — most ranks, then most TP (lower latency); None if none fits."""
    try:
        wanted.validate(spec, world_size)
        return wanted
    except TopologyError:
        fits = valid_topologies(spec, world_size)
        return (prefer(fits) or max(fits, key=lambda t: (t.size, t.tp))) if fits else None
