"""The ``handler:`` section of model-config.yaml: defaults, forms, and errors that name the key.

Every refusal is a ``ConfigError`` whose ``key`` (and the start of its message) is the full
path of the offending value, e.g. ``handler.input.size[1]``, so that an operator reading the
model-load log knows which line of the YAML to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from torchserve_gradnorm.config import (
    ConfigError,
    HandlerConfig,
    InputConfig,
    LimitsConfig,
    handler_section,
    parse_handler_config,
)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "samples" / "digits" / "model-config.yaml"


def refused(raw: Any) -> ConfigError:
    """Parse ``raw`` and return the error it must raise."""
    with pytest.raises(ConfigError) as info:
        parse_handler_config(raw)
    error = info.value
    assert str(error).startswith(f"{error.key}: "), "the message starts with the key"
    return error


# --- defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, {}], ids=["no-section", "empty-section"])
def test_no_settings_means_all_defaults(raw):
    config = parse_handler_config(raw)
    assert config == HandlerConfig()
    assert config.method == "confounding"
    assert config.param_filter is None
    assert config.backend == "auto"
    assert config.micro_batch_size is None
    assert config.temperature == 1.0
    assert config.direction == "low_norm_is_ood"
    assert config.per_layer is False
    assert config.top_k == 5
    assert config.threshold is None


def test_default_input_is_an_rgb_picture_of_any_size():
    config = parse_handler_config(None).input
    assert config == InputConfig()
    assert (config.kind, config.mode, config.size, config.resample) == (
        "image",
        "RGB",
        None,
        "bilinear",
    )
    assert config.mean is None and config.std is None


def test_default_limits():
    limits = parse_handler_config(None).limits
    assert limits == LimitsConfig(
        max_pixels=16_000_000, max_tensor_elements=10_000_000, max_instances=64
    )


def test_empty_subsections_mean_defaults():
    config = parse_handler_config({"input": None, "limits": None})
    assert config.input == InputConfig()
    assert config.limits == LimitsConfig()


def test_every_setting_is_read():
    config = parse_handler_config(
        {
            "method": "kl",
            "param_filter": "head",
            "backend": "loop",
            "micro_batch_size": 4,
            "temperature": 2,
            "direction": "high_norm_is_ood",
            "per_layer": True,
            "top_k": 1,
            "threshold": -3,
            "limits": {"max_pixels": 100, "max_tensor_elements": 200, "max_instances": 3},
        }
    )
    assert config.method == "kl"
    assert config.param_filter == "head"
    assert config.backend == "loop"
    assert config.micro_batch_size == 4
    assert config.temperature == 2.0 and isinstance(config.temperature, float)
    assert config.direction == "high_norm_is_ood"
    assert config.per_layer is True
    assert config.top_k == 1
    assert config.threshold == -3.0 and isinstance(config.threshold, float)
    assert config.limits == LimitsConfig(100, 200, 3)


def test_scorer_kwargs_carry_the_scoring_settings_only():
    config = parse_handler_config({"method": "kl", "top_k": 2, "threshold": 1.5})
    assert config.scorer_kwargs() == {
        "method": "kl",
        "param_filter": None,
        "backend": "auto",
        "micro_batch_size": None,
        "temperature": 1.0,
        "direction": "low_norm_is_ood",
        "per_layer": False,
        "output": None,
    }


def test_the_config_is_frozen():
    config = parse_handler_config(None)
    with pytest.raises(AttributeError):
        config.top_k = 3  # type: ignore[misc]


# --- the demo file ---------------------------------------------------------------------------


def test_the_digits_demo_config_parses():
    document = yaml.safe_load(DEMO_CONFIG.read_text())
    config = parse_handler_config(handler_section(document))
    assert config.method == "confounding"
    assert config.param_filter is None  # 'all'
    assert config.top_k == 3
    assert config.input == InputConfig(
        kind="image", size=(8, 8), mode="L", mean=(0.3056,), std=(0.3761,), resample="box"
    )
    assert config.limits == LimitsConfig()


# --- handler_section -------------------------------------------------------------------------


def test_handler_section_picks_the_handler_key():
    assert handler_section({"minWorkers": 1, "handler": {"top_k": 2}}) == {"top_k": 2}


@pytest.mark.parametrize("document", [None, {}, {"minWorkers": 1}])
def test_handler_section_is_none_without_one(document):
    assert handler_section(document) is None
    assert parse_handler_config(handler_section(document)) == HandlerConfig()


@pytest.mark.parametrize("document", [["handler"], "handler: {}", 3])
def test_handler_section_refuses_a_document_that_is_not_a_mapping(document):
    with pytest.raises(ConfigError) as info:
        handler_section(document)
    assert info.value.key == "model-config.yaml"


# --- each key's errors name it ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("confounding", "handler"),
        (["method"], "handler"),
        ({"method": "energy"}, "handler.method"),
        ({"backend": "cuda"}, "handler.backend"),
        ({"direction": "up"}, "handler.direction"),
        ({"micro_batch_size": 0}, "handler.micro_batch_size"),
        ({"micro_batch_size": 2.5}, "handler.micro_batch_size"),
        ({"temperature": 0}, "handler.temperature"),
        ({"temperature": -1.0}, "handler.temperature"),
        ({"temperature": "1"}, "handler.temperature"),
        ({"temperature": float("nan")}, "handler.temperature"),
        ({"temperature": float("inf")}, "handler.temperature"),
        ({"temperature": True}, "handler.temperature"),
        ({"per_layer": "yes"}, "handler.per_layer"),
        ({"per_layer": 1}, "handler.per_layer"),
        ({"top_k": 0}, "handler.top_k"),
        ({"top_k": "3"}, "handler.top_k"),
        ({"top_k": True}, "handler.top_k"),
        ({"top_k": None}, "handler.top_k"),
        ({"top_k": 2.0}, "handler.top_k"),
        ({"threshold": "high"}, "handler.threshold"),
        ({"threshold": float("nan")}, "handler.threshold"),
        ({"limits": []}, "handler.limits"),
        ({"limits": {"max_pixels": 0}}, "handler.limits.max_pixels"),
        ({"limits": {"max_tensor_elements": -1}}, "handler.limits.max_tensor_elements"),
        ({"limits": {"max_instances": None}}, "handler.limits.max_instances"),
        ({"limits": {"max_instances": "8"}}, "handler.limits.max_instances"),
        ({"input": "image"}, "handler.input"),
        ({"input": {"kind": "audio"}}, "handler.input.kind"),
        ({"input": {"mode": "RGBA"}}, "handler.input.mode"),
        ({"input": {"resample": "cubic"}}, "handler.input.resample"),
        ({"input": {"size": [8]}}, "handler.input.size"),
        ({"input": {"size": [8, 8, 8]}}, "handler.input.size"),
        ({"input": {"size": "8x8"}}, "handler.input.size"),
        ({"input": {"size": [8, 0]}}, "handler.input.size[1]"),
        ({"input": {"size": [8.5, 8]}}, "handler.input.size[0]"),
        ({"input": {"mean": []}}, "handler.input.mean"),
        ({"input": {"mean": "0.5"}}, "handler.input.mean"),
        ({"input": {"mean": [0.5, "x", 0.5]}}, "handler.input.mean[1]"),
        ({"input": {"std": [0.5, 0.5, 0]}}, "handler.input.std[2]"),
        ({"input": {"std": -0.2}}, "handler.input.std[0]"),
        ({"input": {"kind": "tensor", "shape": 8}}, "handler.input.shape"),
        ({"input": {"kind": "tensor", "shape": [3, -1]}}, "handler.input.shape[1]"),
        ({"input": {"kind": "tensor", "dtype": "uint8"}}, "handler.input.dtype"),
        ({"param_filter": "everything"}, "handler.param_filter"),
        ({"param_filter": 3}, "handler.param_filter"),
        ({"param_filter": {"include": 3}}, "handler.param_filter.include"),
        ({"param_filter": {"include": [""]}}, "handler.param_filter.include"),
        ({"param_filter": {"exclude": ["fc.*", 7]}}, "handler.param_filter.exclude"),
    ],
)
def test_a_bad_value_names_its_key(raw, key):
    assert refused(raw).key == key


def test_a_choice_error_lists_the_choices():
    message = str(refused({"method": "energy"}))
    assert "confounding" in message and "kl" in message and "'energy'" in message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"topk": 3}, "handler.topk"),
        ({"top_k": 3, "treshold": 1.0}, "handler.treshold"),
        ({"input": {"sise": [8, 8]}}, "handler.input.sise"),
        ({"limits": {"max_bytes": 10}}, "handler.limits.max_bytes"),
        ({"param_filter": {"include": ["fc.*"], "only": ["x"]}}, "handler.param_filter.only"),
    ],
    ids=["top-level", "top-level-beside-a-good-key", "input", "limits", "param_filter"],
)
def test_an_unknown_key_is_named_and_the_known_ones_listed(raw, key):
    error = refused(raw)
    assert error.key == key
    assert "unknown key" in str(error)


def test_unknown_top_level_key_message_lists_the_known_keys():
    message = str(refused({"topk": 3}))
    for known in ("method", "param_filter", "top_k", "threshold", "input", "limits"):
        assert known in message


# --- input: image vs tensor ------------------------------------------------------------------


def test_image_input():
    config = parse_handler_config(
        {
            "input": {
                "size": [28, 32],
                "mode": "L",
                "mean": 0.5,
                "std": [0.25],
                "resample": "nearest",
            }
        }
    ).input
    assert config == InputConfig(
        kind="image", size=(28, 32), mode="L", mean=(0.5,), std=(0.25,), resample="nearest"
    )


def test_a_single_size_is_a_square():
    assert parse_handler_config({"input": {"size": 224}}).input.size == (224, 224)


def test_tensor_input():
    config = parse_handler_config(
        {"input": {"kind": "tensor", "shape": [3, 4], "dtype": "int64"}}
    ).input
    assert (config.kind, config.shape, config.dtype) == ("tensor", (3, 4), "int64")


def test_tensor_input_defaults_to_float32_of_any_shape():
    config = parse_handler_config({"input": {"kind": "tensor"}}).input
    assert (config.kind, config.shape, config.dtype) == ("tensor", None, "float32")


@pytest.mark.parametrize("key", ["shape", "dtype"])
def test_tensor_keys_are_refused_for_pictures(key):
    value = [3, 8, 8] if key == "shape" else "float32"
    for raw_input in ({key: value}, {"kind": "image", key: value}):
        error = refused({"input": raw_input})
        assert error.key == f"handler.input.{key}"
        assert "input.kind: tensor" in str(error)


@pytest.mark.parametrize(
    ("key", "value"),
    [("size", [8, 8]), ("mode", "L"), ("mean", [0.5]), ("std", [0.5]), ("resample", "box")],
)
def test_image_keys_are_refused_for_tensors(key, value):
    error = refused({"input": {"kind": "tensor", key: value}})
    assert error.key == f"handler.input.{key}"
    assert "input.kind: image" in str(error)


# --- input: mean/std length follows the mode -------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "values"),
    [("L", [0.5]), ("RGB", [0.5]), ("RGB", [0.485, 0.456, 0.406])],
)
@pytest.mark.parametrize("key", ["mean", "std"])
def test_mean_and_std_take_one_value_or_one_per_channel(mode, values, key):
    config = parse_handler_config({"input": {"mode": mode, key: values}}).input
    assert getattr(config, key) == tuple(values)


@pytest.mark.parametrize(
    ("mode", "values"),
    [("L", [0.5, 0.5]), ("L", [0.5, 0.5, 0.5]), ("RGB", [0.5, 0.5])],
)
@pytest.mark.parametrize("key", ["mean", "std"])
def test_mean_and_std_of_the_wrong_length_are_refused(mode, values, key):
    error = refused({"input": {"mode": mode, key: values}})
    assert error.key == f"handler.input.{key}"
    assert f"mode {mode}" in str(error)


def test_rgb_is_the_default_mode_for_the_length_check():
    assert parse_handler_config({"input": {"mean": [0.1, 0.2, 0.3]}}).input.mean == (
        0.1,
        0.2,
        0.3,
    )
    assert refused({"input": {"std": [0.1, 0.2]}}).key == "handler.input.std"


def test_mean_may_be_negative_but_std_must_be_positive():
    config = parse_handler_config({"input": {"mean": -1, "std": 2}}).input
    assert (config.mean, config.std) == ((-1.0,), (2.0,))


# --- param_filter ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["all", None])
def test_param_filter_all_means_every_parameter(value):
    assert parse_handler_config({"param_filter": value}).param_filter is None


def test_param_filter_head():
    assert parse_handler_config({"param_filter": "head"}).param_filter == "head"


def test_param_filter_include_and_exclude_lists():
    spec = {"include": ["features.*", "re:fc\\d\\.weight"], "exclude": ["*.bias"]}
    assert parse_handler_config({"param_filter": spec}).param_filter == spec


@pytest.mark.parametrize("part", ["include", "exclude"])
def test_param_filter_a_bare_string_pattern_is_a_list_of_one(part):
    config = parse_handler_config({"param_filter": {part: "fc.*"}})
    assert config.param_filter == {part: ["fc.*"]}


def test_param_filter_only_one_side():
    config = parse_handler_config({"param_filter": {"exclude": ["*.bias"]}})
    assert config.param_filter == {"exclude": ["*.bias"]}


def test_param_filter_a_list_without_include_is_refused():
    # a bare list would be ambiguous (keep them? drop them?): say include: or exclude:
    error = refused({"param_filter": ["fc.*"]})
    assert error.key == "handler.param_filter"
    assert "include" in str(error)


def test_param_filter_from_yaml():
    document = yaml.safe_load(
        """
        handler:
          param_filter:
            include: "layer4.*"
            exclude: [layer4.0.*, "re:.*\\\\.bias"]
        """
    )
    config = parse_handler_config(handler_section(document))
    assert config.param_filter == {
        "include": ["layer4.*"],
        "exclude": ["layer4.0.*", "re:.*\\.bias"],
    }


def test_text_input_keys_and_their_defaults():
    config = parse_handler_config({"input": {"kind": "text", "max_length": 128}})
    assert config.input.kind == "text" and config.input.max_length == 128
    assert config.input.truncation == "longest_first" and config.input.pairs == "optional"
    assert (
        parse_handler_config({"input": {"kind": "text", "truncation": False}}).input.truncation
        is None
    )
    assert parse_handler_config({"hf_task": "text-classification"}).input.kind == "text"
    assert parse_handler_config({"hf_task": "image-classification"}).input.kind == "image"


@pytest.mark.parametrize(
    "section, key",
    [
        ({"input": {"kind": "text", "size": 3}}, "handler.input.size"),
        ({"input": {"kind": "image", "max_length": 3}}, "handler.input.max_length"),
        ({"input": {"kind": "text", "truncation": "sideways"}}, "handler.input.truncation"),
        ({"input": {"kind": "text", "pairs": "maybe"}}, "handler.input.pairs"),
        ({"input": {"kind": "text", "max_length": 0}}, "handler.input.max_length"),
        ({"output": -1}, "handler.output"),
        ({"output": ""}, "handler.output"),
        ({"hf_task": "translation"}, "handler.hf_task"),
        ({"limits": {"max_chars": 0}}, "handler.limits.max_chars"),
    ],
)
def test_bad_text_and_model_output_settings_name_their_key(section, key):
    with pytest.raises(ConfigError) as info:
        parse_handler_config(section)
    assert info.value.key == key


def test_output_takes_a_key_or_an_index():
    assert parse_handler_config({"output": "scores"}).output == "scores"
    assert parse_handler_config({"output": 1}).scorer_kwargs()["output"] == 1
