"""The inference-only layer forwards (layer.py) refuse configs they do not implement, by name.
(That they compute megatron's layers is what every parity test checks.)"""
import types

import pytest

from remp_megatron.layer import check_supported

SUPPORTED = dict(attention_output_gate=False, activation_func_clamp_value=None, glu_linear_offset=0.0,
                 no_rope_freq=None, use_te_activation_func=False, bias_activation_fusion=False)


def test_a_plain_config_is_accepted():
    check_supported(types.SimpleNamespace(**SUPPORTED))


@pytest.mark.parametrize("field,value", [("attention_output_gate", True), ("glu_linear_offset", 1.0),
                                         ("activation_func_clamp_value", 7.0), ("no_rope_freq", [1, 0])])
def test_an_unsupported_config_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        check_supported(types.SimpleNamespace(**{**SUPPORTED, field: value}))
