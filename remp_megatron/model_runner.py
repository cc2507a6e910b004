"""ModelRunner: one rank's part of a forward pass over a packed batch of sequences.

Tokens of all sequences in a step are packed along megatron's sequence axis ([T, 1, hidden]);
PagedAttention keeps the sequences apart. Stage s receives hidden states from the same TP
rank of stage s-1 and sends to stage s+1 (point-to-point on the data-plane backend); the last
stage turns the requested rows into full-vocabulary logits (megatron gathers the TP shards).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .kv_cache import KVCache
from .model import rope_table, shared_output_weight
from .paged_attention import AttentionMetadata, forward_context
from .spec import ModelSpec
from .topology import Topology


class ModelRunner:
    def __init__(self, spec: ModelSpec, topo: Topology, rank: int, model, kv: KVCache, device: torch.device):
        coords = topo.coords(rank)
        assert coords is not None, f"rank {rank} is standby at {topo}"
        self.spec, self.topo, self.model, self.kv, self.device = spec, topo, model, kv, device
        self.pp_stage, self.tp_rank = coords
        self.is_first = self.pp_stage == 0
        self.is_last = self.pp_stage == topo.pp - 1
        self.prev_rank = None if self.is_first else topo.rank_of(self.pp_stage - 1, self.tp_rank)
        self.next_rank = None if self.is_last else topo.rank_of(self.pp_stage + 1, self.tp_rank)
        self.rope = rope_table(model, spec.max_position_embeddings)

    @torch.inference_mode()
    def forward(
        self, token_ids: Optional[torch.Tensor], meta: AttentionMetadata, logit_rows: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Run this stage. Returns logits [len(logit_rows), vocab] on the last stage, else None.

        ``token_ids`` [T] is read only on the first stage; ``logit_rows`` indexes the packed
        tokens whose next-token logits are wanted.
        """
        n_tokens = meta.positions.numel()
        if self.is_first:
            hidden = self.model.embedding(
                input_ids=token_ids.to(self.device)[None], position_ids=meta.positions[None]
            )
        else:
            hidden = torch.empty(n_tokens, 1, self.spec.hidden_size, dtype=self.spec.torch_dtype, device=self.device)
            dist.recv(hidden, src=self.prev_rank)
            self.model.set_input_tensor([hidden])
        with forward_context(meta, self.kv):
            hidden = self.model.decoder(
                hidden_states=hidden, attention_mask=None, rotary_pos_emb=self.rope[meta.positions]
            )
        if not self.is_last:
            dist.send(hidden.contiguous(), dst=self.next_rank)
            return None
        logits, _ = self.model.output_layer(hidden[logit_rows.to(self.device)], weight=shared_output_weight(self.model))
        return logits[:, 0, :].float()


def load_runner(
    spec: ModelSpec, model_dir, topo: Topology, rank: int, device: torch.device, num_blocks: int, block_size: int
) -> Optional[ModelRunner]:
    """Set megatron's parallel state to ``topo``, build and load this rank's stage, allocate its
    KV cache. Collective over the world; standby ranks take part and get None."""
    from .model import build_stage_model, init_parallel_state, load_stage_weights

    init_parallel_state(topo)
    coords = topo.coords(rank)
    model = build_stage_model(spec, topo, coords[0], device) if coords else None
    load_stage_weights(model, model_dir)
    if model is None:
        return None
    kv = KVCache.allocate(spec, topo, coords[0], num_blocks, block_size, device)
    return ModelRunner(spec, topo, rank, model, kv, device)
