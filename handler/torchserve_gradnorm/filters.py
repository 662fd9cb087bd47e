"""Which parameters are scored: the ``param_filter`` argument, resolved to parameter names.

Accepted forms:
- ``None``: every parameter (pytorch-ood's default).
- a callable ``name -> bool`` (pytorch-ood's form).
- ``"head"``: the parameters of the last ``nn.Linear`` registered in the model, the layer
  that produces the logits in the usual classifier layout (TorchScript models included:
  their modules keep their original class names).
- a mapping ``{"include": [...], "exclude": [...]}`` of fnmatch globs over the names of
  ``named_parameters()``; a pattern that starts with ``re:`` is a regular expression
  (``re.fullmatch``). No ``include`` means all; ``exclude`` wins over ``include``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from torch import nn

ParamFilter = Union[None, str, Callable[[str], bool], Mapping[str, Any]]  # noqa: UP007

_MAPPING_KEYS = {"include", "exclude"}


def _compile_pattern(pattern: str) -> Callable[[str], bool]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"param_filter patterns must be non-empty strings, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"param_filter: bad regular expression {pattern!r}: {e}") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _patterns(spec: Mapping[str, Any], key: str) -> list[Callable[[str], bool]]:
    value = spec.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable):
        raise ValueError(f"param_filter.{key} must be a list of patterns, got {value!r}")
    return [_compile_pattern(p) for p in value]


def glob_filter(spec: Mapping[str, Any]) -> Callable[[str], bool]:
    """A name predicate from an include/exclude mapping; validates the mapping."""
    unknown = set(spec) - _MAPPING_KEYS
    if unknown:
        raise ValueError(
            f"param_filter: unknown key(s) {sorted(unknown)}; expected 'include' and/or 'exclude'"
        )
    include = _patterns(spec, "include")
    exclude = _patterns(spec, "exclude")

    def keep(name: str) -> bool:
        if include and not any(p(name) for p in include):
            return False
        return not any(p(name) for p in exclude)

    return keep


def _linear_class_names() -> set[str]:
    """nn.Linear and its subclasses (MultiheadAttention's out_proj among them), by name."""
    names, pending = set(), [nn.Linear]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending += cls.__subclasses__()
    return names


def _is_linear(module: nn.Module, linear_names: set[str]) -> bool:
    # a TorchScript module is a RecursiveScriptModule that keeps only its class's name
    return isinstance(module, nn.Linear) or getattr(module, "original_name", None) in linear_names


def head_module(model: nn.Module, purpose: str = "param_filter='head'") -> tuple[str, nn.Module]:
    """The last nn.Linear in ``named_modules()`` order, with its name: the layer that
    produces the logits in the usual classifier layout.

    Works on TorchScript modules too (scripted or traced, saved and loaded): they keep the
    module tree and each module's original class name, but not ``get_submodule``.
    """
    linear_names = _linear_class_names()
    last: tuple[str, nn.Module] | None = None
    for module_name, module in model.named_modules():
        if _is_linear(module, linear_names):
            last = (module_name, module)
    if last is None:
        raise ValueError(f"{purpose}: the model has no nn.Linear layer")
    return last


def head_parameter_names(model: nn.Module) -> list[str]:
    """The parameters of the last nn.Linear in ``named_modules()`` order (``head_module``)."""
    module_name, module = head_module(model)
    prefix = f"{module_name}." if module_name else ""
    return [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)]


def select_parameters(model: nn.Module, param_filter: ParamFilter = None) -> list[str]:
    """Names of the parameters ``param_filter`` keeps, in ``named_parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    if param_filter is None:
        keep: Callable[[str], bool] = lambda name: True  # noqa: E731
    elif isinstance(param_filter, str):
        if param_filter != "head":
            raise ValueError(
                f"param_filter: unknown string {param_filter!r}; use 'head', an "
                "include/exclude mapping or a callable"
            )
        head = set(head_parameter_names(model))
        keep = head.__contains__
    elif isinstance(param_filter, Mapping):
        keep = glob_filter(param_filter)
    elif callable(param_filter):
        keep = param_filter
    else:
        raise ValueError(f"param_filter: unsupported value {param_filter!r}")
    selected = [n for n in names if keep(n)]
    if not selected:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(
            f"param_filter selects no parameter of the model; available names: {shown or '(none)'}"
        )
    return selected
