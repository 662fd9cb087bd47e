"""Records, during a per-sample forward, every call where the parameters meet the batch.

The forward runs under ``torch.func.vmap`` (one logical sample of batch size 1 per row of
the input), and this torch-function mode watches every torch call. Tensors computed from
the selected parameters alone (the parameters themselves, a reshaped layer scale, BERT's
position-embedding lookup, Swin's gathered relative position bias, a ViT class token
expanded) are ordinary tensors that require grad; tensors that depend on the input are
vmap's batched tensors, which know which physical dimension holds the samples. A call that
takes at least one of each and returns a batched tensor is a *use*: it is recorded with
its arguments laid out (B, ...) per sample and the autograd node of each output. Calls on
parameter-side tensors alone stay in the autograd graph: the backend pulls per-sample
gradients back through them.

Because the samples' dimension is vmap's own, the rows a rule sees are the batch's samples
by construction, whatever the model reshapes, transposes or flattens (B*windows, T*B...).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C import _functorch as functorch
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .base import BackendUnsupported, BatchDependent
from .decompositions import DECOMPOSITIONS

# In-place calls that can meet a parameter-side operand, and their out-of-place forms (the
# rules replay calls and must not modify the recorded input).
IN_PLACE = {
    Tensor.__iadd__: Tensor.__add__,
    Tensor.add_: Tensor.add,
    Tensor.__isub__: Tensor.__sub__,
    Tensor.sub_: Tensor.sub,
    Tensor.__imul__: Tensor.__mul__,
    Tensor.mul_: Tensor.mul,
    Tensor.__itruediv__: Tensor.__truediv__,
    Tensor.div_: Tensor.div,
}


# Calls that turn a tensor into a Python value. On a per-sample tensor vmap refuses them
# (a branch that could differ between samples); HF's mask helpers ask ``mask.all()``, GPT-2
# ``pad_id in input_ids``. Each sample's own forward would see its own value, so when every
# sample gives the same value, that value is the answer for all of them.
VALUE_QUERIES = {
    Tensor.__bool__,
    Tensor.item,
    Tensor.__int__,
    Tensor.__float__,
    Tensor.__index__,
    Tensor.__contains__,
    Tensor.tolist,
}


CONVOLUTIONS = {torch.conv1d, torch.conv2d, torch.conv3d}
ATTENTION = torch.nn.functional.scaled_dot_product_attention


def _sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
): ...


SDPA_SIGNATURE = inspect.signature(_sdpa)


def _batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
): ...


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5): ...


# Normalizations of each row of their input on its own (batch norm on running statistics),
# so that rows from several samples can share one call.
ROW_NORMS = {
    F.batch_norm: inspect.signature(_batch_norm),
    F.group_norm: inspect.signature(_group_norm),
}


# Calls on the last dimensions of their first argument alone: the samples' dimension,
# moved first, is one more leading dimension to them.
LAST_DIMS = {F.linear, F.layer_norm}


def _meets_batch(args: tuple, kwargs: dict) -> bool:
    """Whether a call takes both a parameter-side tensor (requires grad, not batched) and a
    per-sample one: most calls take neither, and this tells them apart without pytree. A
    container it does not look into hides a use from the recording, not from autograd: the
    backend's graph check then refuses the model."""
    seen = [False, False]
    _scan(args, seen)
    if kwargs and not all(seen):
        _scan(kwargs.values(), seen)
    return all(seen)


def _map_tensors(value, fn):
    """``value`` with ``fn`` applied to every tensor in it, through the containers that
    ``_scan`` looks into."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, tuple):
        items = [_map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _scan(values, seen: list[bool]) -> None:
    for v in values:
        if isinstance(v, Tensor):
            if functorch.is_batchedtensor(v):
                seen[1] = True
            elif v.requires_grad:
                seen[0] = True
        elif isinstance(v, (list, tuple)):
            _scan(v, seen)
        elif isinstance(v, dict):
            _scan(v.values(), seen)


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


def _is_in_place(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or (
        name.startswith("__i") and name.endswith("__")
    )


@dataclass(frozen=True)
class ViewOfBase:
    """A physical output that vmap made as a view of a whole base tensor (a reshape or
    movedim of the real result). A later in-place op on the output (``relu(inplace=True)``)
    would detach the view's own autograd node from the graph, so the gradient is taken at
    the base and read back through the view's geometry."""

    shape: torch.Size
    stride: tuple[int, ...]
    offset: int
    base_shape: torch.Size
    base_stride: tuple[int, ...]

    def read(self, grad_base: Tensor) -> Tensor:
        if grad_base.stride() != self.base_stride:
            laid_out = grad_base.new_empty_strided(self.base_shape, self.base_stride)
            grad_base = laid_out.copy_(grad_base)
        return grad_base.as_strided(
            self.shape, self.stride, grad_base.storage_offset() + self.offset
        )


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def output_edge(p: Tensor, inputs: set[int]) -> tuple[GradientEdge, ViewOfBase | None]:
    """The autograd edge to take the gradient of physical output ``p`` at; ``inputs`` are the
    storages of the call's arguments (a view of one of those is the call's own result)."""
    base = p._base
    if (
        base is None
        or base.numel() != p.numel()
        or base.grad_fn is None
        or _storage(base) in inputs
    ):
        return get_gradient_edge(p), None
    view = ViewOfBase(
        p.shape, p.stride(), p.storage_offset() - base.storage_offset(), base.shape, base.stride()
    )
    return get_gradient_edge(base), view


@dataclass
class Use:
    """One call where parameter-side tensors meet per-sample ones."""

    func: Any
    args: tuple
    kwargs: dict
    per_sample: set[int]
    """ids of the (B, ...) argument tensors in args/kwargs."""
    tracked: dict[int, Tensor]
    """The parameter-side tensors among the arguments, by id."""
    outputs: list[int]
    """Positions of the per-sample outputs among the call's output leaves."""
    edges: list[GradientEdge]
    out_dims: list[int]
    """The samples' dimension of each per-sample output, physically."""
    views: list[ViewOfBase | None]
    versions: list[tuple[Tensor, int]] = field(default_factory=list)
    whole_batch: bool = False
    """Recorded in the batched forward (rowwise.py): the outputs hold the samples' rows at
    ``out_dims`` where each sample's forward has a dimension of size 1."""

    def laid_out(self, grad: Tensor, dim: int) -> Tensor:
        """The gradient at an output laid out (B, *one sample's output shape)."""
        if self.whole_batch:
            return grad.unsqueeze(dim).movedim(dim + 1, 0)
        return grad.movedim(dim, 0)


def replay_for(func: Any) -> Any:
    """The call a rule replays: an in-place call's out-of-place form (rules replay calls and
    must not modify the recorded input)."""
    if not _is_in_place(func):
        return func
    if func not in IN_PLACE:
        raise BackendUnsupported(f"in-place {_name(func)} with a parameter operand")
    return IN_PLACE[func]


def new_use(
    func: Any,
    replay: Any,
    recorded: tuple[tuple, dict],
    physical: dict[int, Tensor],
    tracked: dict[int, Tensor],
    produced: list[tuple[int, Tensor]],
    out_dims: list[int],
    storages: set[int],
    input_nodes: list,
    continue_at: dict[int, list],
) -> Use:
    """The use of one call, from its per-sample arguments (``physical``, by the id of the
    argument they stand for) and its physical outputs (``produced``: position among the
    output leaves, tensor). Notes, at each output's autograd node, where the graph below it
    goes on without the parameter side."""
    outputs, edges, views, watched = [], [], [], []
    for k, p in produced:
        outputs.append(k)
        edge, view = output_edge(p, storages)
        edges.append(edge)
        views.append(view)
        continue_at.setdefault(id(edge.node), []).extend(n for n in input_nodes if n is not None)
        if view is None and p._is_view():
            watched.append(p)
    rec_args, rec_kwargs = recorded
    use = Use(
        replay, rec_args, rec_kwargs, {id(p) for p in physical.values()}, tracked,
        outputs, edges, out_dims, views,
    )  # fmt: skip
    checked = [*physical.values()] if replay is func else []
    use.versions = [(t, t._version) for t in checked + watched]
    return use


class UseRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.level: int | None = None
        self.uses: list[Use] = []
        self.continue_at: dict[int, list] = {}
        """id of a recorded output's autograd node -> the nodes of the call's per-sample
        inputs: the graph below that node, minus the parameter side, goes on from there."""

    def _physical(self, t: Tensor) -> Tensor:
        if functorch.maybe_get_level(t) != self.level:
            raise BackendUnsupported("a batched tensor of another vmap level (nested vmap)")
        return functorch.get_unwrapped(t).movedim(functorch.maybe_get_bdim(t), 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in VALUE_QUERIES and args and functorch.is_batchedtensor(args[0]):
            return self._common_value(func, args, kwargs)
        if func in DECOMPOSITIONS:
            with self:  # the parts are recorded one by one
                out = DECOMPOSITIONS[func](*args, **kwargs)
            if out is not NotImplemented:
                return out
        if not torch.is_grad_enabled() or not _meets_batch(args, kwargs):
            return self._call(func, args, kwargs)
        return self._record(func, args, kwargs)

    # vmap's own batching of some calls is far slower than the batched call itself (grouped
    # and depthwise convolutions, CPU attention, which it runs sample by sample; batch norm,
    # which it splits into a normalization and a separate scale and shift: 10x a plain call
    # on CPU; linear, whose bias it adds apart from the product); these fold the samples
    # into the call's own batch dimension instead, the same arithmetic.
    def _call(self, func, args: tuple, kwargs: dict):
        if func in CONVOLUTIONS:
            folded = self._folded_conv(func, args, kwargs)
        elif func is ATTENTION:
            folded = self._folded_attention(args, kwargs)
        elif func in ROW_NORMS:
            folded = self._folded_row_norm(func, args, kwargs)
        elif func in LAST_DIMS:
            folded = self._on_last_dims(func, args, kwargs)
        elif func is torch.addmm:
            folded = self._folded_addmm(args, kwargs)
        else:
            folded = None
        return func(*args, **kwargs) if folded is None else folded

    def _unbatched(self, *values) -> bool:
        return not any(isinstance(v, Tensor) and functorch.is_batchedtensor(v) for v in values)

    def _fold(self, t: Tensor) -> Tensor:
        p = self._physical(t)
        return p.reshape(-1, *p.shape[2:])

    def _unfold(self, out: Tensor, batch: int) -> Tensor:
        return functorch._add_batch_dim(out.reshape(batch, -1, *out.shape[1:]), 0, self.level)

    def _folded_conv(self, func, args: tuple, kwargs: dict):
        if not args or kwargs or not functorch.is_batchedtensor(args[0]):
            return None
        x, rest = args[0], args[1:]
        if not self._unbatched(*rest) or x.dim() != rest[0].dim():
            return None  # a per-sample weight, or an unbatched (C, *spatial) input
        batch = self._physical(x).shape[0]
        return self._unfold(func(self._fold(x), *rest), batch)

    def _folded_row_norm(self, func, args: tuple, kwargs: dict):
        try:
            bound = ROW_NORMS[func].bind(*args, **kwargs)
        except TypeError:
            return None
        a = bound.arguments
        x = a["input"]
        others = [v for k, v in a.items() if k != "input"]
        if not functorch.is_batchedtensor(x) or x.dim() < 2 or not self._unbatched(*others):
            return None
        # batch statistics normalize over the batch: folded, they would mix the samples
        if func is F.batch_norm:
            stats = (a.get("running_mean"), a.get("running_var"))
            if a.get("training", False) or any(t is None for t in stats):
                return None
        a["input"] = self._fold(x)
        return self._unfold(func(**a), self._physical(x).shape[0])

    def _on_last_dims(self, func, args: tuple, kwargs: dict):
        x = args[0] if args else None
        if not (isinstance(x, Tensor) and functorch.is_batchedtensor(x)):
            return None
        if not self._unbatched(*args[1:], *kwargs.values()):
            return None
        p = self._physical(x)
        if func is F.linear and p.dim() > 2:
            # one matrix product with the bias fused, as torch does for a 3-d input
            out = func(p.reshape(-1, p.shape[-1]), *args[1:], **kwargs)
            out = out.reshape(*p.shape[:-1], out.shape[-1])
        else:
            out = func(p, *args[1:], **kwargs)
        return functorch._add_batch_dim(out, 0, self.level)

    def _folded_addmm(self, args: tuple, kwargs: dict):
        # Hugging Face's Conv1D: addmm(bias, x (N, d_in), weight) per sample
        if len(args) != 3 or not self._unbatched(args[0], args[2], *kwargs.values()):
            return None
        bias, x, weight = args
        if not functorch.is_batchedtensor(x) or bias.dim() > 1:
            return None
        p = self._physical(x)
        out = torch.addmm(bias, p.reshape(-1, p.shape[-1]), weight, **kwargs)
        return functorch._add_batch_dim(out.reshape(*p.shape[:-1], -1), 0, self.level)

    def _folded_attention(self, args: tuple, kwargs: dict):
        try:
            bound = SDPA_SIGNATURE.bind(*args, **kwargs)
        except TypeError:
            return None
        a = bound.arguments
        q, k, v = a["query"], a["key"], a["value"]
        mask = a.get("attn_mask")
        if a.get("dropout_p", 0.0) or a.get("enable_gqa", False) or q.dim() != 4:
            return None
        if not all(functorch.is_batchedtensor(t) for t in (q, k, v)):
            return None
        batch, n = self._physical(q).shape[:2]
        if mask is not None:
            if functorch.is_batchedtensor(mask):
                m = self._physical(mask)
                m = m.reshape(batch, *[1] * (5 - m.dim()), *m.shape[1:])
                m = m.expand(batch, n, *m.shape[2:]).reshape(batch * n, *m.shape[2:])
            elif mask.dim() == 4 and mask.shape[0] != 1:
                return None
            else:
                m = mask
            a["attn_mask"] = m
        a["query"], a["key"], a["value"] = self._fold(q), self._fold(k), self._fold(v)
        return self._unfold(ATTENTION(**a), batch)

    def _common_value(self, func, args: tuple, kwargs: dict):
        if any(isinstance(a, Tensor) and functorch.is_batchedtensor(a) for a in args[1:]):
            raise BackendUnsupported(f"{_name(func)} on per-sample tensors")
        samples = self._physical(args[0])
        values = [func(sample, *args[1:], **kwargs) for sample in samples]
        if any(v != values[0] for v in values[1:]):
            raise BatchDependent(
                f"data-dependent control flow ({_name(func)}) that differs between samples"
            )
        return values[0]

    def _record(self, func, args: tuple, kwargs: dict):
        replay = replay_for(func)
        # per-sample arguments, physically (B, ...), detached; an in-place call's target is
        # copied first, since the call overwrites it
        physical: dict[int, Tensor] = {}
        tracked: dict[int, Tensor] = {}
        storages: set[int] = set()
        input_nodes = []

        def laid_out(v: Tensor) -> Tensor:
            if not functorch.is_batchedtensor(v):
                if v.requires_grad:
                    tracked[id(v)] = v
                return v
            if id(v) not in physical:
                p = self._physical(v)
                input_nodes.append(p.grad_fn)
                storages.add(_storage(p))
                p = p.detach()
                physical[id(v)] = p.clone() if replay is not func else p
            return physical[id(v)]

        recorded = _map_tensors((args, kwargs), laid_out)
        storages.update(_storage(t) for t in tracked.values())
        out = self._call(func, args, kwargs)

        produced, dims = [], []
        for k, o in enumerate([out] if isinstance(out, Tensor) else tree_flatten(out)[0]):
            if isinstance(o, Tensor) and functorch.is_batchedtensor(o):
                p = functorch.get_unwrapped(o)
                if p.grad_fn is not None:
                    produced.append((k, p))
                    dims.append(functorch.maybe_get_bdim(o))
        if produced:
            self.uses.append(
                new_use(
                    func, replay, recorded, physical, tracked, produced, dims, storages,
                    input_nodes, self.continue_at,
                )
            )  # fmt: skip
        return out
