import json

import pytest

from lowmem_e5.runtime.config import QUANT_MODES, RuntimeConfig


def test_defaults_are_valid_and_round_trip_through_json():
    config = RuntimeConfig()
    assert config.max_length == 4096
    assert RuntimeConfig.from_json(config.to_json()) == config
    custom = RuntimeConfig(model="/x", quant="fp4", double_quant=True, compute_dtype="bfloat16", device="cuda:1",
                           max_length=512, token_budget=999, truncate=False, padding_side="left")
    assert RuntimeConfig.from_json(custom.to_json()) == custom
    assert json.loads(custom.to_json())["quant"] == "fp4"


@pytest.mark.parametrize(
    "field, value, expected_in_message",
    [
        ("quant", "int4", "fp32, fp16, bf16, int8, nf4, fp4"),
        ("compute_dtype", "float64", "float32, float16, bfloat16"),
        ("device", "tpu", "auto, cpu, cuda, cuda:N"),
        ("max_length", 2, ">= 3"),
        ("max_length", "512", ">= 3"),
        ("token_budget", 0, ">= 1"),
        ("padding_side", "middle", "left, right"),
        ("model", " ", "hub id"),
        ("truncate", "yes", "true or false"),
        ("cache_query_prefix", 1, "true or false"),
        ("int8_threshold", -1.0, ">= 0"),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_valid_set(field, value, expected_in_message):
    with pytest.raises(ValueError) as err:
        RuntimeConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value) and expected_in_message in str(err.value)


def test_double_quant_only_with_4bit_modes():
    for mode in QUANT_MODES:
        if mode in ("nf4", "fp4"):
            assert RuntimeConfig(quant=mode, double_quant=True).double_quant
        else:
            with pytest.raises(ValueError, match="double_quant"):
                RuntimeConfig(quant=mode, double_quant=True)


def test_full_precision_modes_compute_in_their_own_dtype():
    assert RuntimeConfig(quant="fp16").resolved_compute_dtype() == "float16"
    with pytest.raises(ValueError, match="compute_dtype='float32' is not valid with quant='fp16'"):
        RuntimeConfig(quant="fp16", compute_dtype="float32")


def test_compute_dtype_defaults_to_float32_on_cpu():
    assert RuntimeConfig(quant="nf4", device="cpu").resolved_compute_dtype() == "float32"
    assert RuntimeConfig(quant="nf4", device="cuda").resolved_compute_dtype() == "float16"
    assert RuntimeConfig(quant="nf4", device="cpu", compute_dtype="bfloat16").resolved_compute_dtype() == "bfloat16"


def test_unknown_json_field_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['quantization'\]; expected some of: .*quant"):
        RuntimeConfig.from_dict({"quantization": "nf4"})
