"""Write a tiny HF safetensors model as an F32 GGUF the way llama.cpp's converter lays it out
(tensor names, Llama/Mixtral Q/K rotary permutation, experts stacked per projection), so the
GGUF importer can be checked against the safetensors importer on the same weights."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

GGUF_ARCH = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3moe", "Qwen3ForCausalLM": "qwen3"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
         "block_sparse_moe.gate": "ffn_gate_inp"}
EXPERT = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
          "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's convert_hf_to_gguf permute()
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf: Path, out: Path, rope_scaling: str | None = None) -> Path:
    import gguf

    cfg = json.loads((hf / "config.json").read_text())
    arch = GGUF_ARCH[cfg["architectures"][0]]
    w = gguf.GGUFWriter(str(out), arch)
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_rope_dimension_count(cfg["head_dim"])
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    tensors = load_file(hf / "model.safetensors")
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in sorted(tensors.items()):
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t.numpy())
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t.numpy())
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", t.numpy())
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.experts\.(\d+)\.(\w+)\.weight", name):
            stacks.setdefault(f"blk.{m[1]}.{EXPERT[m[4]]}.weight", {})[int(m[3])] = t
        else:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
            if arch == "llama" and m[2] in ("self_attn.q_proj", "self_attn.k_proj"):
                t = _permute(t, cfg["num_attention_heads" if m[2].startswith("self_attn.q") else "num_key_value_heads"])
            w.add_tensor(f"blk.{m[1]}.{LAYER[m[2]]}.weight", t.contiguous().numpy())
    for name, per_expert in stacks.items():
        w.add_tensor(name, np.stack([per_expert[e].numpy() for e in range(experts)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
