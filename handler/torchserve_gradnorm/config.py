"""The ``handler:`` section of model-config.yaml: schema, defaults, validation.

Parsed once, at model load (and by ``gradnorm-archive`` before packing), into a frozen
``HandlerConfig``. Every error names the offending key, as ``handler.<key>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .backends import BACKEND_CHOICES
from .detectors import DETECTORS
from .losses import METHODS
from .scorer import DIRECTIONS

SECTION = "handler"
IMAGE_MODES = ("L", "RGB")
RESAMPLE = ("nearest", "box", "bilinear", "bicubic", "lanczos")
TENSOR_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")
INPUT_KINDS = ("image", "tensor", "text")
TRUNCATION = ("longest_first", "only_first", "only_second")
PAIRS = ("optional", "required", "never")
HF_TASKS = ("text-classification", "image-classification")
_IMAGE_KEYS = ("size", "mode", "mean", "std", "resample")
_TENSOR_KEYS = ("shape", "dtype")
_TEXT_KEYS = ("max_length", "truncation", "pairs")


class ConfigError(ValueError):
    """A bad value in the handler section; the message starts with the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class InputConfig:
    kind: str = "image"
    # image
    size: tuple[int, int] | None = None  # (height, width); None keeps the picture's size
    mode: str = "RGB"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resample: str = "bilinear"
    # tensor
    shape: tuple[int, ...] | None = None  # one sample's shape, without the batch axis
    dtype: str = "float32"
    # text (tokenized with the archive's Hugging Face tokenizer)
    max_length: int | None = None  # tokens; None: the model's limit
    truncation: str | None = "longest_first"  # a tokenizer strategy; None: refuse long texts
    pairs: str = "optional"  # sentence pairs: optional, required or never


@dataclass(frozen=True)
class LimitsConfig:
    max_pixels: int = 16_000_000  # width x height of a decoded picture, read from its header
    max_tensor_elements: int = 10_000_000  # numbers in one request's tensor
    max_instances: int = 64  # samples in one {"instances": [...]} request
    max_chars: int = 100_000  # characters in one text (a sentence pair counts both)


@dataclass(frozen=True)
class HandlerConfig:
    method: str = "confounding"
    param_filter: Any = None  # None (all), "head", or {"include": [...], "exclude": [...]}
    backend: str = "auto"
    micro_batch_size: int | None = None
    temperature: float = 1.0
    direction: str = "low_norm_is_ood"
    per_layer: bool = False
    top_k: int = 5
    threshold: float | None = None
    detector: str | None = None  # None: the calibration file's detector, else "sum"
    calibration: str | None = None  # file in the archive; None: calibration.json if shipped
    output: str | int | None = None  # where the logits are in the model's output
    hf_task: str | None = None  # a save_pretrained model loaded with transformers' Auto classes
    input: InputConfig = field(default_factory=InputConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def scorer_kwargs(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "param_filter": self.param_filter,
            "backend": self.backend,
            "micro_batch_size": self.micro_batch_size,
            "temperature": self.temperature,
            "direction": self.direction,
            "per_layer": self.per_layer,
            "output": self.output,
        }


# --- value checkers: each returns the clean value or raises ConfigError(key, ...) ---


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _int(key: str, value: Any, minimum: int = 1, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _float(key: str, value: Any, positive: bool = False, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(key, f"expected a number > 0, got {value!r}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _floats(key: str, value: Any, positive: bool = False) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(key, f"expected a number or a list of numbers, got {value!r}")
    return tuple(_float(f"{key}[{i}]", v, positive=positive) for i, v in enumerate(value))


def _ints(key: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        what = f"a list of {length} positive integers" if length else "a list of positive integers"
        raise ConfigError(key, f"expected {what}, got {value!r}")
    return tuple(_int(f"{key}[{i}]", v) for i, v in enumerate(value))


def _filename(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or value.startswith("/") or ".." in value:
        raise ConfigError(key, f"expected a file name inside the archive, got {value!r}")
    return value


def _check_keys(key: str, raw: Any, allowed: set[str]) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}", f"unknown key; known keys are {', '.join(sorted(allowed))}"
        )
    return raw


def _param_filter(key: str, value: Any) -> Any:
    if value is None or value == "all":
        return None
    if value == "head":
        return "head"
    if isinstance(value, Mapping):
        spec = _check_keys(key, value, {"include", "exclude"})
        clean = {}
        for part, patterns in spec.items():
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(patterns, list) or not all(
                isinstance(p, str) and p for p in patterns
            ):
                raise ConfigError(f"{key}.{part}", f"expected a list of patterns, got {patterns!r}")
            clean[part] = list(patterns)
        return clean
    raise ConfigError(
        key, f"expected 'all', 'head' or {{include: [...], exclude: [...]}}, got {value!r}"
    )


def _only_for(key: str, spec: Mapping[str, Any], keys: tuple[str, ...], kind: str) -> None:
    for name in keys:
        if name in spec:
            raise ConfigError(f"{key}.{name}", f"only for input.kind: {kind}")


def _input(key: str, raw: Any, default_kind: str = "image") -> InputConfig:
    spec = _check_keys(key, raw, {f.name for f in fields(InputConfig)})
    kind = _choice(f"{key}.kind", spec.get("kind", default_kind), INPUT_KINDS)
    if kind != "image":
        _only_for(key, spec, _IMAGE_KEYS, "image")
    if kind != "tensor":
        _only_for(key, spec, _TENSOR_KEYS, "tensor")
    if kind != "text":
        _only_for(key, spec, _TEXT_KEYS, "text")
    if kind == "image":
        mode = _choice(f"{key}.mode", spec.get("mode", "RGB"), IMAGE_MODES)
        channels = len(mode)
        size = spec.get("size")
        if isinstance(size, int) and not isinstance(size, bool):
            size = [size, size]
        size = None if size is None else _ints(f"{key}.size", size, length=2)
        mean = _floats(f"{key}.mean", spec.get("mean"))
        std = _floats(f"{key}.std", spec.get("std"), positive=True)
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, channels):
                raise ConfigError(
                    f"{key}.{name}",
                    f"expected 1 or {channels} values for mode {mode}, got {values}",
                )
        resample = _choice(f"{key}.resample", spec.get("resample", "bilinear"), RESAMPLE)
        return InputConfig("image", size, mode, mean, std, resample)
    if kind == "text":
        truncation = spec.get("truncation", True)
        if truncation is True:
            truncation = "longest_first"
        elif truncation is False:
            truncation = None
        elif truncation not in TRUNCATION:
            raise ConfigError(
                f"{key}.truncation",
                f"expected true, false or one of {', '.join(TRUNCATION)}, got {truncation!r}",
            )
        return InputConfig(
            "text",
            max_length=_int(f"{key}.max_length", spec.get("max_length"), optional=True),
            truncation=truncation,
            pairs=_choice(f"{key}.pairs", spec.get("pairs", "optional"), PAIRS),
        )
    shape = spec.get("shape")
    shape = None if shape is None else _ints(f"{key}.shape", shape)
    dtype = _choice(f"{key}.dtype", spec.get("dtype", "float32"), TENSOR_DTYPES)
    return InputConfig("tensor", shape=shape, dtype=dtype)


def _output(key: str, value: Any) -> str | int | None:
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(
        key, f"expected the key (e.g. logits) or index (e.g. 0) of the logits, got {value!r}"
    )


def _limits(key: str, raw: Any) -> LimitsConfig:
    spec = _check_keys(key, raw, {f.name for f in fields(LimitsConfig)})
    defaults = LimitsConfig()
    return LimitsConfig(
        **{
            f.name: _int(f"{key}.{f.name}", spec.get(f.name, getattr(defaults, f.name)))
            for f in fields(LimitsConfig)
        }
    )


def parse_handler_config(raw: Any) -> HandlerConfig:
    """Validate the ``handler:`` mapping (None means all defaults)."""
    key = SECTION
    spec = _check_keys(key, raw, {f.name for f in fields(HandlerConfig)})
    d = HandlerConfig()
    hf_task = (
        None
        if spec.get("hf_task") is None
        else _choice(f"{key}.hf_task", spec["hf_task"], HF_TASKS)
    )
    return HandlerConfig(
        method=_choice(f"{key}.method", spec.get("method", d.method), tuple(METHODS)),
        param_filter=_param_filter(f"{key}.param_filter", spec.get("param_filter")),
        backend=_choice(f"{key}.backend", spec.get("backend", d.backend), BACKEND_CHOICES),
        micro_batch_size=_int(
            f"{key}.micro_batch_size", spec.get("micro_batch_size"), optional=True
        ),
        temperature=_float(
            f"{key}.temperature", spec.get("temperature", d.temperature), positive=True
        ),
        direction=_choice(f"{key}.direction", spec.get("direction", d.direction), DIRECTIONS),
        per_layer=_bool(f"{key}.per_layer", spec.get("per_layer", d.per_layer)),
        top_k=_int(f"{key}.top_k", spec.get("top_k", d.top_k)),
        threshold=_float(f"{key}.threshold", spec.get("threshold"), optional=True),
        detector=None
        if spec.get("detector") is None
        else _choice(f"{key}.detector", spec["detector"], tuple(DETECTORS)),
        calibration=_filename(f"{key}.calibration", spec.get("calibration")),
        output=_output(f"{key}.output", spec.get("output")),
        hf_task=hf_task,
        input=_input(
            f"{key}.input",
            spec.get("input"),
            "text" if hf_task == "text-classification" else "image",
        ),
        limits=_limits(f"{key}.limits", spec.get("limits")),
    )


def handler_section(model_yaml: Any) -> Any:
    """The ``handler:`` part of a whole model-config.yaml mapping."""
    if model_yaml is None:
        return None
    if not isinstance(model_yaml, Mapping):
        raise ConfigError("model-config.yaml", "expected a mapping at the top level")
    return model_yaml.get(SECTION)
