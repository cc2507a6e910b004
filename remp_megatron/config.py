"""Engine configuration (pydantic): the one source of the engine's defaults."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from .kv_cache import blocks_for_budget
from .spec import ModelSpec, ServingDtype
from .topology import Topology


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Optional[ServingDtype] = Field(
        None, description="weights and KV cache dtype, cast at load (default: bf16 on CUDA, the checkpoint's on CPU)")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    kv_budget_mb: float = Field(64.0, gt=0, description="KV-cache MiB per active rank, at the current topology")
    num_blocks: Optional[int] = Field(None, ge=1, description="fixed KV block count (overrides the budget)")
    max_num_seqs: int = Field(32, ge=1, description="most requests running at once")
    # Prefill chunks this long keep the matmuls near their peak (SmolLM2 fp32 prefill on 2 CPU cores:
    # ~92 GFLOP/s in 256-token steps, ~145 in 1024); shorter ones stall running decodes less.
    max_tokens_per_step: int = Field(1024, ge=1, description="most tokens (prefill chunks and decodes) in one step")
    max_queue: int = Field(256, ge=1, description="most requests waiting; more are refused (RESOURCE_EXHAUSTED)")
    prestage_budget_mb: Optional[float] = Field(
        None, ge=0, description="MiB a rank may hold for a pre-staged new weight shard; a larger shard moves in the "
        "pause instead (0: pre-staging off; default: any shard, up to the whole model)")
    prestage_rounds_per_step: int = Field(1, ge=1, description="pre-staging bucket rounds per step boundary")

    @property
    def prestaging(self) -> bool:
        return self.prestage_budget_mb != 0

    @property
    def prestage_budget_bytes(self) -> Optional[int]:
        return None if self.prestage_budget_mb is None else int(self.prestage_budget_mb * 2**20)

    def blocks_for(self, spec: ModelSpec, topo: Topology) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        return blocks_for_budget(spec, topo, self.block_size, int(self.kv_budget_mb * 2**20))
