"""Megatron-core GPTModel for (spec, topology, this rank), and loading its shard.

The model is stock megatron-core (local spec: RMSNorm, SwiGLU, GQA, RoPE, TP linears; MoE
layers with megatron's experts and all-gather token dispatcher) with these substitutions:
``core_attention`` is our ``PagedAttention``; the TP linears run an inference-only forward
(``linear.py``); in MoE layers (``moe.py``) the router computes with HF's arithmetic and each
TP rank routes its slice of the tokens.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .paged_attention import PagedAttention
from .spec import ModelSpec
from .topology import Topology

log = logging.getLogger("remp.model")

# A converted model dir: config.json, tokenizer files, and the dist-checkpoint in here.
MEGATRON_SUBDIR = "megatron"


def megatron_config(spec: ModelSpec, topo: Topology, device: torch.device):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = spec.torch_dtype
    config = TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        tensor_model_parallel_size=topo.tp,
        pipeline_model_parallel_size=topo.pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,  # every parameter is loaded from the checkpoint
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fusions are CUDA kernels; the unfused paths are exact on every device.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        qk_layernorm=spec.qk_norm,
    )
    if spec.moe is not None:
        moe = spec.moe
        config.num_moe_experts = moe.num_experts
        config.moe_router_topk = moe.top_k
        config.moe_ffn_hidden_size = moe.intermediate_size
        config.moe_router_pre_softmax = not moe.normalize
        if len(moe.layers) < spec.num_layers:  # a pattern: megatron then keys the checkpoint per layer
            config.moe_layer_freq = [int(i in moe.layers) for i in range(spec.num_layers)]
        config.moe_router_load_balancing_type = "none"  # inference: no auxiliary losses
        config.moe_aux_loss_coeff = 0.0
        # All-gather over TP×EP and reduce-scatter back (gloo has no all-to-all); each TP rank
        # brings its slice of the tokens (moe.TokenSplitMoELayer).
        config.moe_token_dispatcher_type = "allgather"
        config.expert_model_parallel_size = topo.ep
        config.expert_tensor_parallel_size = topo.expert_tp
    if spec.rope.type == "yarn":  # megatron's rotary kernel scales cos/sin by this (MLA configs' fields)
        config.yarn_rotary_scaling_factor = spec.rope.factor
        config.yarn_mscale = spec.rope.mscale if spec.rope.mscale and spec.rope.mscale_all_dim else None
        config.yarn_mscale_all_dim = spec.rope.mscale_all_dim if config.yarn_mscale else None
    return config


def _layer_spec(spec: ModelSpec, moe: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from .layer import InferenceMLP, InferenceSelfAttention, InferenceTransformerLayer
    from .linear import InferenceColumnParallelLinear, InferenceRowParallelLinear
    from .moe import HFTopKRouter, TokenSplitMoELayer

    layer = copy.deepcopy(get_gpt_layer_local_spec(num_experts=spec.moe.num_experts if moe else None,
                                                   normalization="RMSNorm", qk_layernorm=spec.qk_norm))
    # Inference-only forwards (layer.py): same classes underneath, so assert what they replace.
    assert layer.module is TransformerLayer and layer.submodules.self_attention.module is SelfAttention
    layer.module, layer.submodules.self_attention.module = InferenceTransformerLayer, InferenceSelfAttention
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = PagedAttention
    attention.linear_qkv, attention.linear_proj = InferenceColumnParallelLinear, InferenceRowParallelLinear
    mlp = layer.submodules.mlp.submodules
    if moe:
        layer.submodules.mlp.module = TokenSplitMoELayer
        mlp.router = HFTopKRouter
        mlp = mlp.experts.submodules
    else:
        assert layer.submodules.mlp.module is MLP
        layer.submodules.mlp.module = InferenceMLP
    mlp.linear_fc1, mlp.linear_fc2 = InferenceColumnParallelLinear, InferenceRowParallelLinear
    return layer


def block_spec(spec: ModelSpec, topo: Topology, pp_stage: int):
    """The layers of one stage: dense or MoE, each as the checkpoint has it."""
    from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules

    dense = _layer_spec(spec, moe=False)
    moe = _layer_spec(spec, moe=True) if spec.moe else None
    layers = [moe if spec.moe and i in spec.moe.layers else dense for i in topo.stage_layers(spec.num_layers, pp_stage)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=LayerNormImpl)


def build_stage_model(spec: ModelSpec, topo: Topology, pp_stage: int, device: torch.device):
    """This rank's GPTModel: its stage's layers and its TP slice, uninitialised."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from .layer import check_supported
    from .linear import use_for_output_layer

    config = megatron_config(spec, topo, device)
    check_supported(config)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(spec, topo, pp_stage),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pp_stage == 0,
        post_process=pp_stage == topo.pp - 1,
        parallel_output=False,  # gather vocab-parallel logits on the last stage
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
    )
    if model.post_process:
        use_for_output_layer(model)
    for norm in model.modules():  # megatron builds torch norms in fp32 whatever params_dtype says
        if isinstance(norm, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            norm.to(spec.torch_dtype)
    return model.to(device).eval().requires_grad_(False)  # inference only: in-place reloads allowed


def load_stage_weights(model, model_dir: str | Path) -> float:
    """Load exactly this rank's shard from a converted model dir; returns seconds.

    Collective: every rank of the world calls it (standby ranks with ``model=None``).
    """
    from megatron.core import dist_checkpointing

    t0 = time.perf_counter()
    sharded = model.sharded_state_dict() if model is not None else {}
    checkpoint_dir = Path(model_dir) / MEGATRON_SUBDIR
    state = dist_checkpointing.load(sharded, str(checkpoint_dir))
    if model is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"{checkpoint_dir}: missing {missing}, unexpected {unexpected}")
    return time.perf_counter() - t0


def shared_output_weight(model) -> Optional[torch.Tensor]:
    return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
