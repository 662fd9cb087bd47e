"""Model inputs and outputs: how a batch is passed to the model, and where its logits are.

A batch is a Tensor (the model is called as ``model(x)``) or a Mapping of batched tensors
(``model(**inputs)``: Hugging Face models take ``input_ids``, ``attention_mask``, ...), all
sharing the first axis. The logits are the output itself when it is a Tensor, its first
element when it is a tuple or list, or its ``logits`` entry when it is a Mapping (a
``transformers`` ``ModelOutput`` is one); ``output`` names another key or index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

Batch = Tensor | Mapping[str, Tensor]
OutputKey = str | int | None


class OutputError(ValueError):
    """The model's output holds no logits where they were looked for."""


def check_output_key(output: Any) -> OutputKey:
    if output is None or isinstance(output, str) and output:
        return output
    if isinstance(output, int) and not isinstance(output, bool) and output >= 0:
        return output
    raise ValueError(f"output must be a key, an index >= 0 or None, got {output!r}")


def batch_size(x: Batch) -> int:
    """Number of samples; raises ValueError for an empty batch or disagreeing tensors."""
    if isinstance(x, Mapping):
        if not x or not all(isinstance(v, Tensor) for v in x.values()):
            raise ValueError("a mapping batch needs at least one tensor, and only tensors")
        sizes = {name: (len(v) if v.dim() else 0) for name, v in x.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the tensors of a batch disagree on the number of samples: {sizes}")
        n = next(iter(sizes.values()))
    else:
        n = len(x) if x.dim() else 0
    if n == 0:
        raise ValueError("GradNormScorer needs a non-empty batch (B, ...)")
    return n


def map_batch(x: Batch, fn: Any) -> Batch:
    """``fn`` applied to the tensor, or to every tensor of a mapping."""
    if isinstance(x, Mapping):
        return {name: fn(v) for name, v in x.items()}
    return fn(x)


def rows(x: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of every tensor."""
    return map_batch(x, lambda v: v[start:stop])


def call_args(x: Batch) -> tuple[tuple, dict[str, Tensor]]:
    """(args, kwargs) to call the model with."""
    return ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})


def call_model(model: Any, x: Batch) -> Any:
    args, kwargs = call_args(x)
    return model(*args, **kwargs)


def logits_of(output: Any, key: OutputKey = None) -> Tensor:
    """The (B, C) logits in a model's output (see the module docstring)."""
    if key is None:
        if isinstance(output, Tensor):
            found = output
        elif isinstance(output, Mapping):
            if "logits" not in output:
                keys = ", ".join(map(str, output))
                raise OutputError(
                    f"the model's output has no 'logits' (its keys: {keys}); "
                    "set output to the key holding the logits"
                )
            found = output["logits"]
        elif isinstance(output, Sequence) and not isinstance(output, str) and output:
            found = output[0]
        else:
            raise OutputError(f"no logits in a model output of type {type(output).__name__}")
    else:
        try:
            found = output[key]
        except (KeyError, IndexError, TypeError):
            raise OutputError(
                f"the model's output ({type(output).__name__}) has no entry {key!r}"
            ) from None
    where = "the model's output" if key is None else f"output {key!r}"
    if not isinstance(found, Tensor):
        raise OutputError(f"{where} is a {type(found).__name__}, not a tensor of logits")
    if found.dim() != 2 or not found.is_floating_point():
        raise OutputError(
            f"{where} should be (batch, classes) floating-point logits, "
            f"got {found.dtype} of shape {list(found.shape)}"
        )
    return found


def forward_logits(model: nn.Module, x: Batch, key: OutputKey = None) -> Tensor:
    return logits_of(call_model(model, x), key)


def first_input(x: Batch) -> Tensor:
    """One tensor of the batch, to read its device and dtype from."""
    return next(iter(x.values())) if isinstance(x, Mapping) else x


def as_tensor_batch(x: Any) -> Batch:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Mapping):
        return dict(x)  # a tokenizer's BatchEncoding is a Mapping; make it a plain dict
    raise TypeError(f"expected a Tensor or a mapping of tensors, got {type(x).__name__}")
