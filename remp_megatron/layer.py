"""megatron-core's transformer layer, self-attention and MLP with a forward for inference only.

Same classes underneath (parameters, submodules, checkpoint keys, resharding unchanged); only
``forward`` is replaced by the path a serving step takes: pre-norm attention and MLP with their
residual adds. Megatron's forwards serve training and every inference mode (recompute, offload,
cross-attention, flash-decode, fused RoPE, CUDA graphs): per layer they import, enter context
managers and test ~40 flags. Running the serving path alone took a SmolLM2 fp32 decode step of
one sequence from 39.5 to 36.7 ms on CPU (~0.09 ms a layer). The attention splits the fused QKV
into heads and applies the step's RoPE (``paged_attention.Rotary``); the KV cache and masking live
in ``PagedAttention``. Configs needing what this path leaves out (attention output gates, an
ungated MLP, biases on the output and MLP linears, GLU clamps or offsets, NoPE layers, fused
activations) are refused when the model is built.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from . import fused
from .paged_attention import step_rotary


def run_decoder(block, hidden_states: torch.Tensor) -> torch.Tensor:
    """megatron's TransformerBlock.forward at inference: the stage's layers in order, then the final
    norm where the stage has it, without the block's per-layer contexts and checks (its forward
    reads the input of a later stage from ``set_input_tensor``; here the caller passes it)."""
    for layer in block.layers:
        hidden_states, _ = layer(hidden_states)
    return hidden_states if block.final_layernorm is None else fused.rms_norm(block.final_layernorm, hidden_states)


class InferenceTransformerLayer(TransformerLayer):
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **_):
        # megatron's bias-dropout-add at inference, no bias (add_bias_linear is off): residual + out.
        out, _ = self.self_attention(fused.rms_norm(self.input_layernorm, hidden_states), attention_mask=attention_mask)
        normed, hidden_states = fused.add_rms_norm(self.pre_mlp_layernorm, out, hidden_states)
        out, _ = self.mlp(normed)
        return hidden_states + out, None


class InferenceSelfAttention(SelfAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Without QK-norm megatron builds IdentityOp norms; with it (Qwen3) both are RMSNorms.
        self.qk_norm = not isinstance(self.q_layernorm, (IdentityOp, type(None)))

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **_):
        # megatron's fused QKV output is grouped per KV head: [q_1 .. q_n, k, v] for each group
        # (topology.py keeps whole groups on each TP rank, so megatron's all-gather case never arises).
        qkv, _ = self.linear_qkv(hidden_states)
        groups, dim = self.num_query_groups_per_partition, self.hidden_size_per_attention_head
        tokens, per_group = qkv.shape[0], self.num_attention_heads_per_partition // groups
        qkv = qkv.view(tokens, groups, per_group + 2, dim)
        rotary = step_rotary()
        if self.qk_norm:  # before RoPE
            query = rotary(self.q_layernorm(qkv[:, :, :per_group])).reshape(tokens, -1, dim)
            key = rotary(self.k_layernorm(qkv[:, :, per_group:per_group + 1]))[:, :, 0]
        else:
            query, key = fused.rope_qk(rotary, qkv)
        out = self.core_attention(query, key, qkv[:, :, per_group + 1])
        return self.linear_proj(out.view(tokens, 1, -1))


class InferenceMLP(MLP):
    def forward(self, hidden_states: torch.Tensor, **_):
        # SwiGLU (every model served): megatron's glu() of silu without its clamp and offset.
        x, _ = self.linear_fc1(hidden_states)
        return self.linear_fc2(fused.silu_mul(x))


def check_supported(config) -> None:
    """Refuse a config whose layers need what the inference forwards above leave out."""
    unsupported = {
        "attention_output_gate": config.attention_output_gate,
        "gated_linear_unit=False": not config.gated_linear_unit,
        "activation_func other than silu": config.activation_func is not torch.nn.functional.silu,
        "add_bias_linear": config.add_bias_linear,
        "activation_func_clamp_value": config.activation_func_clamp_value is not None,
        "glu_linear_offset": config.glu_linear_offset != 0.0,
        "no_rope_freq": bool(config.no_rope_freq),
        "use_te_activation_func": config.use_te_activation_func,
        "bias_activation_fusion": config.bias_activation_fusion,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"remp_megatron/layer.py's inference forward does not implement {', '.join(bad)}")

