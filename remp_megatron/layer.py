"""megatron-core's transformer layer, self-attention and MLP with a forward for inference only.

Same classes underneath (parameters, submodules, checkpoint keys, resharding unchanged); only
``forward`` is replaced by the path a serving step takes: pre-norm attention and MLP with their
residual adds. Megatron's forwards serve training and every inference mode (recompute, offload,
cross-attention, flash-decode, fused RoPE, CUDA graphs): per layer they import, enter context
managers and test ~40 flags. Running the serving path alone took a SmolLM2 fp32 decode step of
one sequence from 39.5 to 36.7 ms on CPU (~0.09 ms a layer). RoPE, the KV cache and masking live
in ``PagedAttention``. Configs needing what this path leaves out (attention output gates, an
ungated MLP, biases on the output and MLP linears, GLU clamps or offsets, NoPE layers, fused
activations) are refused when the model is built.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer


class InferenceTransformerLayer(TransformerLayer):
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **_):
        # megatron's bias-dropout-add at inference, no bias (add_bias_linear is off): residual + out.
        out, _ = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask)
        hidden_states = hidden_states + out
        out, _ = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return hidden_states + out, None


class InferenceSelfAttention(SelfAttention):
    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **_):
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        return self.linear_proj(self.core_attention(query, key, value, attention_mask))


class InferenceMLP(MLP):
    def forward(self, hidden_states: torch.Tensor, **_):
        # A gated unit (SwiGLU for every model served): megatron's glu() without its clamp and offset.
        x, _ = self.linear_fc1(hidden_states)
        gate, up = torch.chunk(x, 2, dim=-1)
        return self.linear_fc2(self.config.activation_func(gate) * up)


def check_supported(config) -> None:
    """Refuse a config whose layers need what the inference forwards above leave out."""
    unsupported = {
        "attention_output_gate": config.attention_output_gate,
        "gated_linear_unit=False": not config.gated_linear_unit,
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

