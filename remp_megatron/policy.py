"""Adaptive topology policy (pure: no processes, no clocks of its own).

Given a per-topology cost profile (decode latency at batch 1, throughput at full batch) and
load signals observed every few seconds, it wants the latency-optimal topology when load is
low and the throughput-optimal one when load is high, and keeps the current one in between
(a hysteresis band). A switch is proposed only after ``patience`` consecutive observations
agree and at least ``min_dwell_s`` after the previous switch, so it cannot flap.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .topology import Topology


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(1.0, gt=0, description="seconds between load observations")
    low_load: float = Field(1.0, ge=0, description="load (queued + running requests) at or below which the "
                                                  "latency-optimal topology is wanted")
    high_load: float = Field(6.0, gt=0, description="load at or above which (or with KV nearly full) the "
                                                   "throughput-optimal topology is wanted")
    kv_high: float = Field(0.9, gt=0, le=1, description="KV usage counted as nearly full")
    patience: int = Field(3, ge=1, description="consecutive agreeing observations before a switch")
    min_dwell_s: float = Field(15.0, ge=0, description="seconds after a switch before the next one")

    @model_validator(mode="after")
    def _band(self) -> "PolicyConfig":
        if self.low_load >= self.high_load:
            raise ValueError(f"low_load ({self.low_load}) must be below high_load ({self.high_load})")
        return self


@dataclass(frozen=True)
class TopologyCost:
    topology: Topology
    tpot_s: float  # decode time per token at batch 1 (latency)
    tokens_per_s: float  # throughput at a full batch


@dataclass(frozen=True)
class CostProfile:
    costs: tuple[TopologyCost, ...]

    @property
    def latency_best(self) -> Topology:
        return min(self.costs, key=lambda c: c.tpot_s).topology

    @property
    def throughput_best(self) -> Topology:
        return max(self.costs, key=lambda c: c.tokens_per_s).topology

    def best_among(self, fits: list[Topology], load: int, cfg: PolicyConfig) -> Optional[Topology]:
        """Where the policy would serve ``load`` if only ``fits`` were possible (the world shrank):
        the throughput-best at or above ``high_load``, else the latency-best; None if no topology
        in ``fits`` is profiled."""
        costs = [c for c in self.costs if c.topology in fits]
        if not costs:
            return None
        if load >= cfg.high_load:
            return max(costs, key=lambda c: c.tokens_per_s).topology
        return min(costs, key=lambda c: c.tpot_s).topology

    def to_json(self) -> str:
        return json.dumps([{**asdict(c), "topology": c.topology.short} for c in self.costs], indent=2)  # "1x3"

    @classmethod
    def from_json(cls, text: str, source: str = "cost profile") -> "CostProfile":
        try:
            rows = json.loads(text)
            costs = tuple(TopologyCost(Topology.parse(c["topology"]), float(c["tpot_s"]), float(c["tokens_per_s"]))
                          for c in rows)
        except (ValueError, TypeError, KeyError) as e:  # TopologyError is a ValueError
            raise ValueError(f"{source}: not a cost profile (a JSON list of {{topology, tpot_s, tokens_per_s}}): "
                             f"{type(e).__name__}: {e}") from e
        if not costs:
            raise ValueError(f"{source}: the cost profile lists no topology")
        return cls(costs)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "CostProfile":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"{path}: cannot read the cost profile: {e.strerror}") from e
        return cls.from_json(text, str(path))


@dataclass(frozen=True)
class Signals:
    """What the policy reads: how many requests are queued or running, and how full the KV
    cache is."""

    time: float
    queue_depth: int
    running: int
    kv_usage: float  # used / all blocks

    @property
    def load(self) -> int:
        return self.queue_depth + self.running


@dataclass(frozen=True)
class Decision:
    time: float
    current: Topology
    wanted: Topology
    reason: str
    switch: bool  # True: propose switching to ``wanted`` now


class Policy:
    def __init__(self, cfg: PolicyConfig, profile: CostProfile, current: Topology, now: float):
        self.cfg, self.profile, self.current = cfg, profile, current
        self.last_switch = now
        self._wanted: Optional[Topology] = None
        self._streak = 0

    def observe(self, s: Signals) -> Decision:
        cfg = self.cfg
        if s.load >= cfg.high_load or s.kv_usage >= cfg.kv_high:
            wanted, why = self.profile.throughput_best, (
                f"load {s.load} >= {cfg.high_load:g}" if s.load >= cfg.high_load else f"KV {s.kv_usage:.0%} full")
        elif s.load <= cfg.low_load:
            wanted, why = self.profile.latency_best, f"load {s.load} <= {cfg.low_load:g}"
        else:
            wanted, why = self.current, f"load {s.load} inside the band ({cfg.low_load:g}, {cfg.high_load:g})"
        if wanted == self.current:
            self._wanted, self._streak = None, 0
            return Decision(s.time, self.current, wanted, why + ": stay", False)
        self._streak = self._streak + 1 if wanted == self._wanted else 1
        self._wanted = wanted
        if self._streak < cfg.patience:
            return Decision(s.time, self.current, wanted, f"{why} ({self._streak}/{cfg.patience} observations)", False)
        if s.time - self.last_switch < cfg.min_dwell_s:
            return Decision(s.time, self.current, wanted,
                            f"{why}, but only {s.time - self.last_switch:.0f}s since the last switch "
                            f"(min dwell {cfg.min_dwell_s:g}s)", False)
        return Decision(s.time, self.current, wanted, f"{why} for {self._streak} observations: switch", True)

    def switched(self, topology: Topology, now: float) -> None:
        """Record a committed switch (by the policy or an operator)."""
        self.current, self.last_switch = topology, now
        self._wanted, self._streak = None, 0
