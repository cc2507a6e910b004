"""ModelRunner: one rank's part of a forward pass over a packed batch of sequences.

Tokens of all sequences in a step are packed along megatron's sequence axis ([T, 1, hidden]);
PagedAttention keeps the sequences apart. Stage s receives hidden states from the same TP
rank of stage s-1 and sends to stage s+1 (point-to-point on the data-plane backend); the last
stage turns the sampled rows into full-vocabulary logits (megatron gathers the TP shards) and
its TP rank 0 sends them to the driver (rank 0), which samples.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)

from . import cpu_kernels
from .kv_cache import KVCache
from .layer import run_decoder
from .linear import (PACKED_MAX_ROWS, has_packed_path, pack_linear, pack_weights, unpacked_linears,
                     use_packed_weights)
from .model import shared_output_weight
from .paged_attention import AttentionMetadata, Rotary, forward_context
from .rope import angle_table
from .scheduler import StepPlan
from .spec import ModelSpec
from .step_tuner import StepTuner
from .threads import check_kernel_thread
from .topology import Topology


_LOGITS_TAG = 1 << 20  # tag space for last stage -> driver logits, apart from activations
# Packing a new model's weights (linear.py) takes 0.12 s for SmolLM2 fp32: after a switch it is
# spread over the first steps, this much per step, so neither the pause nor one step pays it all.
_PACK_SECONDS_PER_STEP = 0.002


class ModelRunner:
    def __init__(self, spec: ModelSpec, topo: Topology, rank: int, model, kv: KVCache, device: torch.device):
        coords = topo.coords(rank)
        assert coords is not None, f"rank {rank} is standby at {topo}"
        self.spec, self.topo, self.model, self.kv, self.device = spec, topo, model, kv, device
        self.rank = rank
        self.pp_stage, self.tp_rank = coords
        self.is_first = self.pp_stage == 0
        self.is_last = self.pp_stage == topo.pp - 1
        self.prev_rank = None if self.is_first else topo.rank_of(self.pp_stage - 1, self.tp_rank)
        self.next_rank = None if self.is_last else topo.rank_of(self.pp_stage + 1, self.tp_rank)
        self.unpacked = unpacked_linears(model)  # packed a few per step (pack_some)
        # Decode-sized steps: packed weights or MKL's GEMM, whichever is faster here (True: packed).
        self.gemm = StepTuner((True, False)) if has_packed_path(model) else None
        self._packed_now = True
        self.rope = angle_table(spec.rope, spec.head_dim, spec.rope_theta, spec.max_position_embeddings).to(device)
        self.rope_mscale = _yarn_get_concentration_factor_from_config(model.config)
        # CPU SDPA has no fast fp16 kernel (2-2.5x slower than fp32 for prefill and decode): attend in fp32 there.
        self.attn_dtype = torch.float32 if device.type == "cpu" and spec.torch_dtype == torch.float16 \
            else spec.torch_dtype
        kernels = cpu_kernels.kernels() if device.type == "cpu" else None
        self.decode_kernel = kernels.paged_decode if kernels is not None else None

    def run_step(self, plan: StepPlan, driver: int = 0) -> Optional[torch.Tensor]:
        """Execute one step on this rank. On the driver rank returns fp32 logits (fp64 for an
        fp64 model) [len(plan.logit_rows()), vocab] for the sampled rows; elsewhere None."""
        check_kernel_thread()
        tokens = len(plan.token_ids)
        tuned = self.gemm is not None and tokens <= PACKED_MAX_ROWS
        if tuned:
            packed = self.gemm.choose(tokens)
            if packed != self._packed_now:
                use_packed_weights(self.model, packed)
                self._packed_now = packed
        t0 = time.perf_counter()
        logits = self._run(plan, driver)
        if tuned:
            self.gemm.record(tokens, packed, time.perf_counter() - t0)
        self.pack_some()
        return logits

    @torch.inference_mode()
    def _run(self, plan: StepPlan, driver: int) -> Optional[torch.Tensor]:
        """With PP>1 the batch is split into micro-batches so stage s works on micro-batch m+1
        while stage s+1 works on m. Every send is non-blocking (waited at the end) so no
        stage blocks its predecessor; tags keep micro-batches apart.
        """
        mbs = plan.microbatches(self.topo.pp)
        is_driver = self.rank == driver
        pending: list = []
        from_last: list[torch.Tensor] = []
        if is_driver and not self.is_last:
            src = self.topo.rank_of(self.topo.pp - 1, 0)
            for i, mb in enumerate(mbs):
                buf = torch.empty(len(mb.logit_rows()), self.spec.vocab_size, device=self.device,
                                  dtype=torch.promote_types(self.spec.torch_dtype, torch.float32))
                pending.append(dist.irecv(buf, src=src, tag=_LOGITS_TAG + i))
                from_last.append(buf)
        results = []
        for i, mb in enumerate(mbs):
            meta = AttentionMetadata.build(mb.starts, mb.query_lens, mb.block_tables, self.kv.block_size, self.device,
                                           self.spec.sliding_window, self.spec.sliding_layers, self.attn_dtype)
            hidden = self._stage_forward(mb, meta, tag=i)
            if not self.is_last:
                pending.append(dist.isend(hidden, dst=self.next_rank, tag=i))
                continue
            rows = torch.tensor(mb.logit_rows(), dtype=torch.long, device=self.device)
            logits, _ = self.model.output_layer(hidden[rows], weight=shared_output_weight(self.model))
            # At least fp32 for sampling; fp64 models (exactness tests) keep fp64.
            logits = logits[:, 0, :].to(torch.promote_types(self.spec.torch_dtype, torch.float32))
            if is_driver:
                results.append(logits)
            elif self.tp_rank == 0:
                pending.append(dist.isend(logits, dst=driver, tag=_LOGITS_TAG + i))
        for work in pending:
            work.wait()
        if not is_driver:
            return None
        parts = from_last or results
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu()  # one micro-batch: no copy

    def pack_some(self) -> None:
        """Pack the next unpacked linears, at least one, for up to ``_PACK_SECONDS_PER_STEP``."""
        t0 = time.perf_counter()
        while self.unpacked and (time.perf_counter() - t0 < _PACK_SECONDS_PER_STEP):
            pack_linear(*self.unpacked.pop(0))

    def _stage_forward(self, mb: StepPlan, meta: AttentionMetadata, tag: int) -> torch.Tensor:
        if self.is_first:
            ids = torch.tensor(mb.token_ids, dtype=torch.long, device=self.device)
            hidden = self.model.embedding(input_ids=ids[None], position_ids=meta.positions[None])
        else:
            shape = (len(mb.token_ids), 1, self.spec.hidden_size)
            hidden = torch.empty(shape, dtype=self.spec.torch_dtype, device=self.device)
            dist.recv(hidden, src=self.prev_rank, tag=tag)
        rotary = Rotary.of(self.rope[meta.positions], self.rope_mscale, self.spec.torch_dtype)
        with forward_context(meta, self.kv, rotary, self.decode_kernel):  # RoPE is applied by the layers' attention
            out = run_decoder(self.model.decoder, hidden)
        return out.contiguous()


def load_runner(
    spec: ModelSpec, model_dir, topo: Topology, rank: int, device: torch.device, num_blocks: int, block_size: int
) -> Optional[ModelRunner]:
    """Set megatron's parallel state to ``topo``, build and load this rank's stage, allocate its
    KV cache. Collective over the world; standby ranks take part and get None."""
    from . import groups
    from .model import build_stage_model, load_stage_weights

    groups.activate(topo)
    coords = topo.coords(rank)
    model = build_stage_model(spec, topo, coords[0], device) if coords else None
    load_stage_weights(model, model_dir)
    if model is None:
        return None
    kv = KVCache.allocate(spec, topo, coords[0], num_blocks, block_size, device)
    pack_weights(model)  # at load all at once; no pause to keep short
    return ModelRunner(spec, topo, rank, model, kv, device)
