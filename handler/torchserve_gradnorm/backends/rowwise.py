"""Records parameter uses in the model's own batched forward, for models made of calls that
treat each row of their input on its own.

The vmap recorder (recording.py) knows the samples' dimension of every tensor whatever the
model does, at a price per torch call that a small model, or a head-only selection on a
large one, pays on every request. This recorder runs the plain forward of the whole batch
and follows the samples' dimension itself, through the calls listed in ``RULES``:
convolutions, batch norm on running statistics, group and layer norm, linear maps, pooling,
the elementwise maps, broadcast arithmetic, flatten / view / permute, reductions over other
dimensions. Each computes row b of its output from row b of its per-sample inputs and
tensors that do not depend on the input, so the batched forward equals the per-sample
forwards stacked, call by call, and the recorded calls are those the vmap recorder would
record.

It stops (``NotRowWise``), and the backend runs the vmap recorder instead, at the first
call that could break that: a call not listed, or listed but with arguments outside its
rule (a reduction over the samples, a constant with several rows broadcast against the
samples, batch statistics), a tensor of unknown origin meeting per-sample data (made by
a call this mode cannot see), a Python value read from a per-sample tensor, or the batch
size itself read by the model's code (each sample's forward would read 1 there).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .recording import (
    Use,
    _is_in_place,
    _map_tensors,
    _name,
    _storage,
    new_use,
    replay_for,
)


class NotRowWise(Exception):
    """The plain forward cannot be proven to equal the per-sample forwards."""


class UnknownOrigin(NotRowWise):
    """A tensor the recorder neither was given nor saw made met per-sample data."""


CONSTANT = -1
"""The mark of a tensor that does not depend on the input (samples' dimension: none)."""

# A rule checks a call's arguments and returns the samples' dimension of its output, or a
# function of the output that does (view / reshape); ``dim`` gives an argument's mark.
Rule = Callable[[tuple, dict, "CallDims"], "int | Callable[[Tensor], int]"]
RULES: dict[Any, Rule] = {}


def rule(*funcs: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for f in funcs:
            if f is not None:
                RULES[f] = fn
        return fn

    return register


def _stop(why: str):
    raise NotRowWise(why)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _only_first_per_sample(args: tuple, kwargs: dict, dim: CallDims) -> int:
    d = dim(args[0]) if args else None
    if d is None or d == CONSTANT:
        _stop("the per-sample tensor is not the first argument")
    if dim.per_sample != 1:  # args[0] is one of them
        _stop("a second per-sample argument")
    return d


def _tensors(values, found: list[Tensor]) -> None:
    """The tensors among ``values``, through lists, tuples and dicts (where torch functions
    take tensors; one hidden elsewhere stays unmarked: of unknown origin)."""
    for v in values:
        if isinstance(v, Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            _tensors(v, found)
        elif isinstance(v, dict):
            _tensors(v.values(), found)


class Marks:
    """Tensor -> samples' dimension, by identity, not keeping the tensors alive."""

    def __init__(self) -> None:
        self._marks: dict[int, tuple[weakref.ref, int]] = {}

    def get(self, t: Tensor) -> int | None:
        entry = self._marks.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def __setitem__(self, t: Tensor, mark: int) -> None:
        self._marks[id(t)] = (weakref.ref(t), mark)


class CallDims:
    """The ``dim`` a rule gets: the samples' dimension of each tensor argument of one call
    (CONSTANT for anything else), from the marks ``_handle`` already read, and how many of
    the call's tensor arguments (repeats counted) hold samples."""

    __slots__ = ("known", "marks", "per_sample")

    def __init__(self, known: dict[int, int], marks: Marks, per_sample: int) -> None:
        self.known = known
        self.marks = marks
        self.per_sample = per_sample

    def __call__(self, v: Any) -> int | None:
        if not isinstance(v, Tensor):
            return CONSTANT
        # an argument of this call is alive, so its id is its own
        d = self.known.get(id(v), _UNSEEN)
        return self.marks.get(v) if d is _UNSEEN else d


_UNSEEN = object()

_IN_PLACE: dict[Any, bool] = {}


def _in_place(func: Any) -> bool:
    known = _IN_PLACE.get(func)
    if known is None:
        known = _IN_PLACE[func] = _is_in_place(func)
    return known


def _norm(d: int, n: int) -> int:
    return d + n if d < 0 else d


@rule(
    F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6, F.hardtanh,
    F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, torch.sigmoid,
    Tensor.sigmoid, torch.tanh, Tensor.tanh, F.softplus, Tensor.contiguous, Tensor.clone,
    torch.clone, Tensor.float, Tensor.exp, torch.exp, Tensor.neg, Tensor.__neg__,
    Tensor.square, Tensor.sqrt, torch.sqrt, Tensor.rsqrt, torch.rsqrt,
)  # fmt: skip
def elementwise(args, kwargs, dim):
    return _only_first_per_sample(args, kwargs, dim)


@rule(F.dropout)
def dropout(args, kwargs, dim):
    if _arg(args, kwargs, 2, "training", True):
        _stop("dropout in training mode")
    return _only_first_per_sample(args, kwargs, dim)


BINARY = [
    "add", "sub", "mul", "div", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__",
    "__rmul__", "__truediv__", "__rtruediv__", "add_", "sub_", "mul_", "div_", "__iadd__",
    "__isub__", "__imul__", "__itruediv__",
]  # fmt: skip


@rule(*[getattr(Tensor, n) for n in BINARY], torch.add, torch.sub, torch.mul, torch.div)
def broadcast(args, kwargs, dim):
    """Elementwise arithmetic with broadcasting: the per-sample operands must meet at one
    output dimension, and no other operand may have more than one row there."""
    operands = [_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")]
    tensors = [t for t in operands if isinstance(t, Tensor)]
    n = max(t.dim() for t in tensors)
    at = {n - t.dim() + dim(t) for t in tensors if dim(t) != CONSTANT}
    if len(at) != 1:
        _stop("per-sample operands on different dimensions")
    (d,) = at
    for t in tensors:
        if dim(t) == CONSTANT:
            k = d - (n - t.dim())
            if k >= 0 and t.shape[k] != 1:
                _stop("a constant with several rows along the samples")
    if "out" in kwargs:
        _stop("an out= argument")
    return d


def _first_at_zero(args, kwargs, dim, spatial: int | None = None) -> int:
    x = args[0]
    d = _only_first_per_sample(args, kwargs, dim)
    if d != 0 or (spatial is not None and x.dim() != spatial + 2):
        _stop("samples not along the batch dimension of the call")
    return 0


@rule(torch.conv1d, torch.conv2d, torch.conv3d)
def convolution(args, kwargs, dim):
    weight = _arg(args, kwargs, 1, "weight")
    return _first_at_zero(args, kwargs, dim, weight.dim() - 2)


@rule(F.batch_norm)
def batch_norm(args, kwargs, dim):
    stats = (_arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var"))
    if _arg(args, kwargs, 5, "training", False) or any(s is None for s in stats):
        _stop("batch norm on batch statistics")
    return _first_at_zero(args, kwargs, dim)


@rule(F.group_norm)
def group_norm(args, kwargs, dim):
    return _first_at_zero(args, kwargs, dim)


@rule(F.layer_norm)
def layer_norm(args, kwargs, dim):
    d = _only_first_per_sample(args, kwargs, dim)
    shape = _arg(args, kwargs, 1, "normalized_shape")
    if d >= args[0].dim() - len(shape):
        _stop("layer norm over the samples")
    return d


POOLS = {
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    getattr(F, "_max_pool1d", None): 1, getattr(F, "_max_pool2d", None): 2,
    getattr(F, "_max_pool3d", None): 3,
}  # fmt: skip


def _pool(spatial: int) -> Rule:
    def pool(args, kwargs, dim):
        return _first_at_zero(args, kwargs, dim, spatial)

    return pool


for _f, _spatial in POOLS.items():
    rule(_f)(_pool(_spatial))


@rule(F.linear)
def linear(args, kwargs, dim):
    d = _only_first_per_sample(args, kwargs, dim)
    if d == args[0].dim() - 1:
        _stop("a linear map over the samples")
    return d


@rule(torch.flatten, Tensor.flatten)
def flatten(args, kwargs, dim):
    d = _only_first_per_sample(args, kwargs, dim)
    n = args[0].dim()
    start = _norm(_arg(args, kwargs, 1, "start_dim", 0), n)
    end = _norm(_arg(args, kwargs, 2, "end_dim", -1), n)
    if start <= d <= end and end > start:
        _stop("flatten across the samples")
    return d if d < start else d - max(end - start, 0)


@rule(Tensor.view, Tensor.reshape, torch.reshape)
def reshape(args, kwargs, dim):
    x = args[0]
    d = _only_first_per_sample(args, kwargs, dim)
    shape = (
        args[1:]
        if len(args) > 2 or isinstance(_arg(args, kwargs, 1, "shape"), int)
        else (_arg(args, kwargs, 1, "shape"))
    )
    if isinstance(shape, torch.dtype) or not all(isinstance(n, int) for n in shape):
        _stop("a view as another dtype, or sizes given as tensors")
    # the shape each sample's forward asks for, from its own (..., 1, ...) value
    one = x.numel() // x.shape[d] if x.shape[d] else 0
    known = math.prod(n for n in shape if n != -1)
    wanted = [one // known if n == -1 and known else n for n in shape]
    before = math.prod(x.shape[:d])

    def where(out: Tensor) -> int:
        # row-major: the samples stay one dimension where the elements before them are as
        # many as before, and each sample's forward gets that shape with 1 for the samples
        for k in range(out.dim()):
            if math.prod(out.shape[:k]) == before and out.shape[k] == x.shape[d]:
                if wanted == [*out.shape[:k], 1, *out.shape[k + 1 :]]:
                    return k
        _stop("a reshape across the samples, or to sizes that depend on the batch size")

    return where


@rule(torch.permute, Tensor.permute)
def permute(args, kwargs, dim):
    d = _only_first_per_sample(args, kwargs, dim)
    order = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
    order = kwargs.get("dims", order)
    n = args[0].dim()
    return [_norm(i, n) for i in order].index(d)


@rule(torch.transpose, Tensor.transpose)
def transpose(args, kwargs, dim):
    d = _only_first_per_sample(args, kwargs, dim)
    n = args[0].dim()
    a, b = _norm(_arg(args, kwargs, 1, "dim0"), n), _norm(_arg(args, kwargs, 2, "dim1"), n)
    return b if d == a else a if d == b else d


@rule(Tensor.mean, torch.mean, Tensor.sum, torch.sum, Tensor.amax, torch.amax)
def reduction(args, kwargs, dim):
    d = _only_first_per_sample(args, kwargs, dim)
    dims = _arg(args, kwargs, 1, "dim")
    if dims is None or isinstance(dims, torch.dtype):
        _stop("a reduction over every dimension")
    n = args[0].dim()
    dims = {_norm(i, n) for i in ((dims,) if isinstance(dims, int) else dims)}
    if d in dims:
        _stop("a reduction over the samples")
    if _arg(args, kwargs, 2, "keepdim", False):
        return d
    return d - sum(i < d for i in dims)


@rule(torch.unsqueeze, Tensor.unsqueeze)
def unsqueeze(args, kwargs, dim):
    d = _only_first_per_sample(args, kwargs, dim)
    k = _norm(_arg(args, kwargs, 1, "dim"), args[0].dim() + 1)
    return d + 1 if k <= d else d


@rule(torch.cat, torch.concat)
def cat(args, kwargs, dim):
    tensors = list(args[0])
    marks = {dim(t) for t in tensors}
    if len(marks) != 1 or CONSTANT in marks or None in marks:
        _stop("cat of per-sample and other tensors")
    (d,) = marks
    if _norm(_arg(args, kwargs, 1, "dim", 0), tensors[0].dim()) == d or "out" in kwargs:
        _stop("cat along the samples")
    return d


# Calls that read what does not depend on the batch size
METADATA = {
    Tensor.dim, Tensor.ndimension, Tensor.is_floating_point, Tensor.is_complex,
    Tensor.element_size, Tensor.ndim.__get__, Tensor.dtype.__get__,
    Tensor.device.__get__, Tensor.layout.__get__, Tensor.requires_grad.__get__,
    Tensor.is_cuda.__get__, Tensor.is_sparse.__get__, Tensor.grad_fn.__get__,
}  # fmt: skip


BATCH_SIZE = {Tensor.size, Tensor.shape.__get__, Tensor.__len__, Tensor.numel, Tensor.nelement}


class RowWiseRecorder(TorchFunctionMode):
    """Follows the samples' dimension through the plain forward and records the uses (the
    ``Use`` of recording.py, laid out (B, ...) per sample)."""

    def __init__(self, batch: int, constants: list[Tensor]) -> None:
        super().__init__()
        self.batch = batch
        self.marks = Marks()
        for t in constants:
            self.marks[t] = CONSTANT
        self.uses: list[Use] = []
        self.continue_at: dict[int, list] = {}
        self.stopped: str | None = None
        self._stop_type: type[NotRowWise] = NotRowWise

    def mark_input(self, t: Tensor) -> None:
        self.marks[t] = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stopped:  # a model that catches exceptions must not go on half-followed
            raise self.stop()
        try:
            return self._handle(func, args, kwargs)
        except NotRowWise as e:
            self.stopped = f"{_label(func)}: {e}"
            self._stop_type = type(e)
            raise self.stop() from None

    def stop(self) -> NotRowWise:
        """Why the forward was not followed to its end, as the exception first raised."""
        return self._stop_type(self.stopped)

    def _handle(self, func, args: tuple, kwargs: dict):
        if func in METADATA:  # ndim, dtype...: a third of the calls of some models
            return func(*args, **kwargs)
        tensors: list[Tensor] = []
        _tensors(args, tensors)
        if kwargs:
            _tensors(kwargs.values(), tensors)
        get = self.marks.get
        marks = [get(t) for t in tensors]
        per_sample = 0
        unknown = parameter_side = False
        for t, m in zip(tensors, marks):
            if m is None:
                unknown = True
            elif m != CONSTANT:
                per_sample += 1
            elif t.requires_grad:
                parameter_side = True
        if not per_sample:
            out = func(*args, **kwargs)
            if not unknown:  # else its outputs stay of unknown origin
                self._mark(out, CONSTANT)
            return out
        if unknown:
            raise UnknownOrigin("a tensor of unknown origin meets per-sample ones")
        if func is Tensor.size and len(args) + len(kwargs) > 1:
            d = _norm(_arg(args, kwargs, 1, "dim"), args[0].dim())
            if d != marks[0]:
                return func(*args, **kwargs)
        if func in BATCH_SIZE:
            _stop("the model reads the batch size (each sample's forward reads 1)")
        spec = RULES.get(func)
        if spec is None:
            _stop("not known to treat the samples' rows apart")
        if _in_place(func) and marks[0] == CONSTANT:
            _stop("per-sample values written into a tensor that is not")
        dims = CallDims({id(t): m for t, m in zip(tensors, marks)}, self.marks, per_sample)
        try:
            out_dim = spec(args, kwargs, dims)
        except (IndexError, KeyError, TypeError, ValueError) as e:  # arguments it cannot read
            raise NotRowWise(f"arguments outside the rule ({e})") from None
        use = None
        if parameter_side and torch.is_grad_enabled():
            out, use = self._record(func, args, kwargs, tensors)
        else:
            out = func(*args, **kwargs)
        if callable(out_dim):
            out_dim = out_dim(out)
        self._mark(out, out_dim)
        if use is not None:
            use.out_dims = [out_dim] * len(use.outputs)
            self.uses.append(use)
        return out

    def _mark(self, out: Any, d: int) -> None:
        if isinstance(out, Tensor):
            outputs = [out]
        elif out is None or isinstance(out, (bool, int, float)):  # torch._assert, ...
            return
        else:
            outputs = tree_flatten(out)[0]
        for o in outputs:
            if isinstance(o, Tensor):
                if d != CONSTANT and (o.dim() <= d or o.shape[d] != self.batch):
                    _stop("the samples' rows did not come out of the call")
                self.marks[o] = d

    def _record(self, func, args: tuple, kwargs: dict, tensors: list[Tensor]):
        replay = replay_for(func)
        physical: dict[int, Tensor] = {}
        tracked: dict[int, Tensor] = {}
        storages: set[int] = set()
        input_nodes = []
        for t in tensors:
            d = self.marks.get(t)
            if d == CONSTANT:
                if t.requires_grad:
                    tracked[id(t)] = t
                continue
            if id(t) not in physical:
                input_nodes.append(t.grad_fn)
                storages.add(_storage(t))
                # each sample's forward has its own batch dimension of size 1 there
                p = t.detach().unsqueeze(d).movedim(d + 1, 0)
                physical[id(t)] = p.clone() if replay is not func else p
        storages.update(_storage(t) for t in tracked.values())
        recorded = _map_tensors((args, kwargs), lambda t: physical.get(id(t), t))
        out = func(*args, **kwargs)

        leaves = [out] if isinstance(out, Tensor) else tree_flatten(out)[0]
        produced = [
            (k, o) for k, o in enumerate(leaves) if isinstance(o, Tensor) and o.grad_fn is not None
        ]
        if not produced:
            return out, None
        # the outputs' samples' dimension (out_dims) is the rule's answer, set by the caller
        use = new_use(
            func, replay, recorded, physical, tracked, produced, [], storages, input_nodes,
            self.continue_at,
        )  # fmt: skip
        use.whole_batch = True
        return out, use


def _label(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and hasattr(owner, "__name__"):
        return f"Tensor.{owner.__name__}"  # a property: x.shape
    return _name(func)


def model_constants(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]
