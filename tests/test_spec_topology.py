"""ModelSpec and Topology: pure validation, no world."""
import json

import pytest

from remp_megatron.spec import ModelSpec, SpecError
from remp_megatron.topology import Topology, TopologyError, topology_for_world

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
    "tie_word_embeddings": False, "dtype": "float32", "eos_token_id": 2,
}


def spec(**over):
    return ModelSpec.from_hf_config({**LLAMA, **over})


def test_llama_fields():
    s = spec()
    assert (s.architecture, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == ("llama", 8, 8, 4, 8)
    assert s.rope_theta == 50000.0 and not s.qkv_bias and s.eos_token_ids == (2,)


def test_legacy_rope_theta_and_explicit_head_dim():
    cfg = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}
    s = ModelSpec.from_hf_config({**cfg, "rope_theta": 100000.0, "head_dim": 16})
    assert s.rope_theta == 100000.0 and s.head_dim == 16


def test_qwen2_has_qkv_bias_and_mistral_without_window():
    s = spec(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, sliding_window=4096)
    assert s.qkv_bias and s.sliding_window is None
    s = spec(architectures=["MistralForCausalLM"], sliding_window=None)
    assert s.architecture == "mistral" and s.sliding_window is None and s.sliding_layers == ()


def test_sliding_window_layers_as_hf_decides_them():
    assert spec(architectures=["MistralForCausalLM"], sliding_window=64).sliding_layers == tuple(range(8))
    qwen = spec(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=64, max_window_layers=5)
    assert (qwen.sliding_window, qwen.sliding_layers) == (64, (5, 6, 7))
    types = ["full_attention", "sliding_attention"] * 4
    assert spec(architectures=["Qwen3ForCausalLM"], use_sliding_window=True, sliding_window=32,
                layer_types=types).sliding_layers == (1, 3, 5, 7)
    assert spec(sliding_window=64).sliding_window is None  # Llama has no sliding window


@pytest.mark.parametrize(
    "over, field",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1.0}}, "rope_parameters.factor"),
        ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": -2.0}}, "rope_scaling.factor"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.2}},
         "rope_parameters.attention_factor"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
         "rope_parameters.partial_rotary_factor"),
        ({"attention_bias": True}, "attention_bias"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 64,
          "layer_types": ["chunked_attention"] * 8}, "layer_types"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"vocab_size": -3}, "vocab_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_config_names_the_field(over, field):
    with pytest.raises(SpecError, match=f"field '{field}'"):
        spec(**over)


ROPE_CASES = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 16.0,
     "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False},
]


@pytest.mark.parametrize("rope", ROPE_CASES, ids=lambda r: r["rope_type"])
def test_rope_scaling_equals_hf_bit_for_bit(rope):
    """Inverse frequencies and YaRN's cos/sin factor exactly as transformers computes them
    (dynamic: HF's values for sequences within max_position_embeddings, our context limit)."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import \
        _yarn_get_concentration_factor_from_config as served_factor

    from remp_megatron.model import megatron_config
    from remp_megatron.rope import inv_freq
    from remp_megatron.topology import Topology

    cfg = {**LLAMA, "rope_parameters": {**rope, "rope_theta": 10000.0}}
    hf = LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    s = ModelSpec.from_hf_config(cfg)
    got = inv_freq(s.rope, s.head_dim, s.rope_theta)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    # YaRN's cos/sin factor, as megatron's rotary kernel will read it from our config.
    assert served_factor(megatron_config(s, Topology(1, 1), torch.device("cpu"))) == want_factor
    default = inv_freq(spec().rope, s.head_dim, s.rope_theta)
    assert rope["rope_type"] == "dynamic" or not torch.equal(got, default)  # the scaling did something


def test_qwen3_has_qk_norm_and_no_qkv_bias():
    s = spec(architectures=["Qwen3ForCausalLM"], head_dim=16)
    assert s.architecture == "qwen3" and s.qk_norm and not s.qkv_bias and s.head_dim == 16


MIXTRAL = {**LLAMA, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 2}
QWEN3_MOE = {**LLAMA, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": [3]}


def test_moe_experts_and_their_layers_as_hf_decides_them():
    m = ModelSpec.from_hf_config(MIXTRAL)
    assert m.moe.model_dump() == dict(num_experts=4, top_k=2, intermediate_size=128, normalize=True,
                                      layers=tuple(range(8)))
    q = ModelSpec.from_hf_config(QWEN3_MOE)
    # Every 2nd layer (1, 3, 5, 7) except the dense mlp_only layer 3.
    assert (q.moe.num_experts, q.moe.intermediate_size, q.moe.normalize, q.moe.layers) == (8, 32, True, (1, 5, 7))
    assert q.qk_norm and spec().moe is None


@pytest.mark.parametrize("cfg, over, field", [
    (MIXTRAL, {"num_local_experts": None}, "num_local_experts"),
    (MIXTRAL, {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    (QWEN3_MOE, {"moe_intermediate_size": 0}, "moe_intermediate_size"),
])
def test_moe_errors_name_the_field(cfg, over, field):
    with pytest.raises(SpecError, match=f"field '{field}'"):
        ModelSpec.from_hf_config({**cfg, **over})


@pytest.mark.parametrize("tp, pp, ep, constraint", [
    (2, 1, 4, "ep=4 must divide tp=2"),
    (4, 1, 8, "ep=8 must divide tp=4"),
    (8, 1, 8, "must divide the number of experts 4"),
    (1, 1, 0, ">= 1"),
])
def test_impossible_expert_parallelism_names_constraint(tp, pp, ep, constraint):
    with pytest.raises(TopologyError, match=constraint) as e:
        Topology(tp, pp, ep).validate(ModelSpec.from_hf_config({**MIXTRAL, "num_attention_heads": 8,
                                                                 "num_key_value_heads": 8}), 8)
    assert e.value.field == "ep"
    with pytest.raises(TopologyError, match="needs a mixture-of-experts model"):
        Topology(2, 1, 2).validate(spec(), 4)


def test_valid_topologies_fold_experts_into_tp():
    from remp_megatron.topology import valid_topologies

    got = {t.short for t in valid_topologies(ModelSpec.from_hf_config(MIXTRAL), 4)}
    assert got == {"1x1", "2x1", "2x1x2", "1x2", "2x2", "2x2x2", "4x1", "4x1x2", "4x1x4", "1x4"}
    assert all(t.ep == 1 for t in valid_topologies(spec(), 4))


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        ModelSpec.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="config.json: not valid JSON"):
        ModelSpec.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert ModelSpec.from_file(tmp_path / "config.json").num_layers == 8


@pytest.mark.parametrize(
    "tp, pp, world, constraint",
    [
        (3, 1, 4, "must divide num_attention_heads"),
        (8, 1, 8, "must divide num_key_value_heads"),
        (1, 3, 4, "must divide num_hidden_layers"),
        (2, 4, 4, "exceeds world size"),
        (1, 2, 3, "must divide world size"),
        (0, 1, 4, ">= 1"),
        (4, 1, 4, "must divide vocab_size"),
    ],
)
def test_impossible_topology_names_constraint(tp, pp, world, constraint):
    with pytest.raises(TopologyError, match=constraint):
        Topology(tp, pp).validate(spec(vocab_size=258 if "vocab" in constraint else 256), world)


def test_a_reformed_world_keeps_the_wanted_topology_or_takes_the_largest_that_fits():
    s = spec()
    assert topology_for_world(s, Topology(2, 2), 4) == Topology(2, 2)
    assert topology_for_world(s, Topology(2, 2), 8) == Topology(2, 2)  # grown: the rest stand by
    assert topology_for_world(s, Topology(2, 2), 2) == Topology(2, 1)  # shrunk: most ranks, then most TP
    assert topology_for_world(s, Topology(1, 4), 3) == Topology(1, 1)  # only sizes dividing 3 fit
    assert topology_for_world(spec(num_key_value_heads=1, num_attention_heads=1), Topology(1, 4), 2) == Topology(1, 2)
    # a chooser (the policy's cost profile) picks among what fits; the largest when it has no answer
    seen = []
    assert topology_for_world(s, Topology(2, 2), 2, lambda fits: seen.extend(fits) or Topology(1, 2)) == Topology(1, 2)
    assert set(seen) == {Topology(1, 1), Topology(2, 1), Topology(1, 2)}
    assert topology_for_world(s, Topology(2, 2), 2, lambda fits: None) == Topology(2, 1)
    assert topology_for_world(s, Topology(2, 2), 4, lambda fits: Topology(1, 1)) == Topology(2, 2)  # fits: kept


def test_rank_map_and_standby():
    t = Topology(2, 2)
    assert [t.coords(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert t.rank_of(1, 0) == 2
    assert Topology(1, 2).coords(3) is None  # standby
    assert list(t.stage_layers(8, 1)) == [4, 5, 6, 7]
    assert list(t.kv_heads(4, 1)) == [2, 3]


@pytest.mark.parametrize("text", ["2x2", "tp2pp2", "TP2·PP2"])
def test_parse(text):
    assert Topology.parse(text) == Topology(2, 2)
    assert Topology.parse(Topology(1, 3).short) == Topology(1, 3)
    for t in ("4x1x2", "tp4pp1ep2", str(Topology(4, 1, 2)), Topology(4, 1, 2).short):
        assert Topology.parse(t) == Topology(4, 1, 2)


def test_parse_error():
    with pytest.raises(TopologyError, match="cannot parse"):
        Topology.parse("two by two")
