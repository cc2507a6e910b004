"""The inference-only layer forwards (layer.py) refuse configs they do not implement, by name.
(That they compute megatron's layers is what every parity test checks.)"""
import types

import pytest
import torch

from remp_megatron.layer import check_supported

SUPPORTED = dict(attention_output_gate=False, gated_linear_unit=True, add_bias_linear=False,
                 activation_func_clamp_value=None, glu_linear_offset=0.0, no_rope_freq=None,
                 use_te_activation_func=False, bias_activation_fusion=False,
                 activation_func=torch.nn.functional.silu)


def test_a_plain_config_is_accepted():
    check_supported(types.SimpleNamespace(**SUPPORTED))


@pytest.mark.parametrize("field,value", [("attention_output_gate", True), ("gated_linear_unit", False),
                                         ("add_bias_linear", True), ("glu_linear_offset", 1.0),
                                         ("activation_func_clamp_value", 7.0), ("no_rope_freq", [1, 0]),
                                         ("activation_func", torch.nn.functional.gelu)])
def test_an_unsupported_config_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        check_supported(types.SimpleNamespace(**{**SUPPORTED, field: value}))


def test_building_a_model_checks_its_config(llama_mg, monkeypatch):
    """build_stage_model refuses before building anything (no process group needed to get there)."""
    from remp_megatron import model
    from remp_megatron.spec import ModelSpec
    from remp_megatron.topology import Topology

    real = model.megatron_config

    def gated(*args, **kwargs):
        config = real(*args, **kwargs)
        config.attention_output_gate = True
        return config

    monkeypatch.setattr(model, "megatron_config", gated)
    with pytest.raises(ValueError, match="attention_output_gate"):
        model.build_stage_model(ModelSpec.from_file(llama_mg / "config.json"), Topology(1, 1), 0, torch.device("cpu"))
