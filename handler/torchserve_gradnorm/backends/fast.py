"""fast backend: exact per-sample norms from one forward and one backward to the points where
the parameters meet the batch.

1. The forward runs once, batched, and every torch call where a selected parameter (or a
   tensor computed from parameters alone) meets per-sample data is recorded with its
   per-sample arguments. Models made of calls that treat each sample's rows apart (CNNs,
   MLPs) run their own batched forward under a ``RowWiseRecorder`` (rowwise.py), which
   follows the samples' dimension call by call; any other model, or one that steps outside
   those calls, runs under ``torch.func.vmap`` with a ``UseRecorder`` (recording.py), and
   its input shape goes straight to vmap from then on.
2. One backward of the summed per-sample losses to the outputs of those calls gives every
   sample's output gradient there; autograd computes no weight gradient. Each call's
   gradient is handed to its rule as the backward reaches it (streaming.py), so that only
   one layer's output gradient is held at a time.
3. A rule per torch function (``norms/``: linear, addmm, conv, the norms, embedding,
   broadcast add and mul) turns each call's inputs and output gradient into per-sample
   norms without building per-sample gradients where a closed form exists; any other call
   (MultiheadAttention, ``cat`` with a class token, ...) gets its per-sample gradients from
   a vmap'd vjp of that call alone.
4. A parameter used more than once (shared layers, tied embeddings) or through
   parameter-only computations (an expanded class token, a gathered bias table) has its
   per-sample gradients built, summed over its uses (cross terms count), and pulled back
   through those computations with one batched ``autograd.grad``; its norm is taken last.

Exactness is checked on every call: every selected parameter must reach the loss only
through recorded calls (else something the recorder cannot see consumed it), and no
recorded input may be modified in place afterwards. What fails a check, and anything the
per-sample forward cannot run (``.item()``, data-dependent control flow, TorchScript),
raises ``BackendUnsupported`` with the reason, and ``auto`` moves on.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch._C import _functorch as functorch
from torch.utils._pytree import tree_flatten

from ..losses import per_sample_norm
from ..norms import OpCall, per_sample_vjp, rule_for
from ..outputs import Batch, batch_size, call_model, first_input, logits_of, map_batch
from .base import Backend, BackendUnsupported, is_torchscript, requires_grad_only
from .capture import rows_of, watching
from .recording import Use, UseRecorder
from .rowwise import NotRowWise, RowWiseRecorder, UnknownOrigin, model_constants
from .streaming import stream_output_grads

log = logging.getLogger("torchserve_gradnorm")


def _parameters_behind(
    tensors: list[Tensor], wanted: dict[int, str], continue_at: dict[int, list] | None = None
) -> set[int]:
    """ids of the wanted parameters that the autograd graphs of ``tensors`` reach; at a node
    of ``continue_at``, the walk goes on only at the nodes it lists."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = [t.grad_fn for t in tensors]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if continue_at and id(node) in continue_at:
            stack.extend(continue_at[id(node)])
            continue
        var = getattr(node, "variable", None)
        if var is not None and id(var) in wanted:
            found.add(id(var))
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


MAX_SIGNATURES = 1024


def _signature(x: Batch) -> tuple:
    if isinstance(x, Tensor):
        return (tuple(x.shape), x.dtype)
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(x.items()))


def _is_vmap_limit(error: Exception) -> bool:
    return isinstance(error, RuntimeError) and ("vmap" in str(error) or "functorch" in str(error))


class FastBackend(Backend):
    name = "fast"

    @classmethod
    def unsupported_reason(cls, model: nn.Module, selected: list[str]) -> str | None:
        if is_torchscript(model):
            return "torch function modes cannot see inside a TorchScript model"
        return None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._vmap_only: dict[tuple, str] = {}
        """Input signatures on which the row-wise forward stopped, and why."""
        self.last_forward = ""
        """How the last call recorded the uses: ``rowwise`` or ``vmap``."""
        self._constants: list[Tensor] | None = None
        """The model's parameters and buffers, for the row-wise recorder."""

    def __call__(self, x: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        with requires_grad_only(self.model, self.selected) as params:
            key = _signature(x)
            if key not in self._vmap_only:
                try:
                    self.last_forward = "rowwise"
                    return self._score(x, params, self._rowwise_forward)
                except Exception as e:
                    # whatever the row-wise forward cannot do, the vmap one may: it decides
                    if isinstance(e, torch.OutOfMemoryError):
                        raise
                    if len(self._vmap_only) >= MAX_SIGNATURES:
                        self._vmap_only.clear()
                    self._vmap_only[key] = str(e)
                    log.debug("gradnorm: fast backend on vmap for %s: %s", key, e)
            self.last_forward = "vmap"
            return self._score(x, params, self._forward)

    def _score(self, x: Batch, params: list[Tensor], forward) -> tuple[Tensor, dict]:
        names = {id(p): n for n, p in zip(self.selected, params)}
        logits, recorder = forward(x)
        uses = recorder.uses
        loss = self.loss(logits).sum()
        behind_loss = _parameters_behind([loss], names, recorder.continue_at)
        if behind_loss:
            name = names[next(iter(behind_loss))]
            raise BackendUnsupported(
                f"parameter {name} reaches the loss through an operation the recorder cannot see"
            )
        for use in uses:
            for tensor, version in use.versions:
                if tensor._version != version:
                    raise BackendUnsupported(
                        f"an input of {use.func} was modified in place after use"
                    )
        norms = self._norms(loss, uses, params, names, batch_size(x))
        return logits.detach(), {n: norms[n] for n in self.selected}

    def _rowwise_forward(self, x: Batch) -> tuple[Tensor, RowWiseRecorder]:
        # The model's parameters and buffers, listed once: walking every module costs a few
        # milliseconds a call on a deep model. A tensor the model got since then is of
        # unknown origin to the recorder: the list is made again and the forward retried.
        cached = self._constants is not None
        if not cached:
            self._constants = model_constants(self.model)
        try:
            return self._rowwise_forward_with(x, self._constants)
        except UnknownOrigin:
            if not cached:
                raise
            self._constants = model_constants(self.model)
            return self._rowwise_forward_with(x, self._constants)

    def _rowwise_forward_with(
        self, x: Batch, constants: list[Tensor]
    ) -> tuple[Tensor, RowWiseRecorder]:
        recorder = RowWiseRecorder(batch_size(x), constants)
        map_batch(x, recorder.mark_input)
        head = self.head_inputs
        with watching(head), recorder:
            out = call_model(self.model, x)
            features = None if head is None else head.take()
        if recorder.stopped:  # the model caught the stop and went on
            raise recorder.stop()
        logits = logits_of(out, self.output)
        if logits.dim() == 0 or recorder.marks.get(logits) != 0:
            raise NotRowWise("the logits are not the samples' rows")
        if features is not None:
            dim = recorder.marks.get(features)
            if dim is None or dim < 0:
                raise NotRowWise("the last linear layer's input is not the samples' rows")
            self.penultimate = rows_of(features.movedim(dim, 0), batch_size(x))
        return logits, recorder

    def _forward(self, x: Batch) -> tuple[Tensor, UseRecorder]:
        recorder = UseRecorder()
        model, output, head = self.model, self.output, self.head_inputs

        def one_sample(xi: Batch) -> tuple[Tensor, ...]:
            recorder.level = functorch.maybe_get_level(first_input(xi))
            with recorder:
                out = call_model(model, map_batch(xi, lambda v: v.unsqueeze(0)))
            out = logits_of(out, output)
            if out.dim() == 0 or out.shape[0] != 1:
                raise BackendUnsupported("the model does not return (B, C) logits")
            # the head's input leaves vmap beside the logits
            features = () if head is None else (rows_of(head.take(), 1).squeeze(0),)
            return (out.squeeze(0), *features)

        try:
            with watching(head):
                logits, *features = torch.func.vmap(one_sample)(x)
        except RuntimeError as e:
            if not _is_vmap_limit(e):
                raise
            raise BackendUnsupported(f"the per-sample forward failed: {e}") from e
        self.penultimate = features[0] if features else None
        return logits, recorder

    def _norms(
        self, loss: Tensor, uses: list[Use], params: list[Tensor], names: dict[int, str], batch
    ) -> dict[str, Tensor]:
        kind = self.method.norm
        # which parameter-side tensors need their per-sample gradient built (see step 4)
        direct: dict[int, int] = defaultdict(int)
        computed = []
        for use in uses:
            for original in use.tracked.values():
                if id(original) in names:
                    direct[id(original)] += 1
                else:
                    computed.append(original)
        through_computations = _parameters_behind(computed, names) if computed else set()

        def need(t: Tensor) -> str:
            single = direct.get(id(t)) == 1 and id(t) not in through_computations
            return "norm" if id(t) in names and single else "grad"

        norms: dict[str, Tensor] = {}
        built: dict[int, Tensor] = {}
        keep: dict[int, Tensor] = {}

        def add(original: Tensor, value: Tensor, how: str) -> None:
            if how == "norm":
                norms[names[id(original)]] = value
                return
            if value.shape != (batch, *original.shape):
                raise BackendUnsupported(
                    f"a rule gave per-sample gradients of shape {tuple(value.shape)} for a "
                    f"tensor of shape {tuple(original.shape)} and a batch of {batch}"
                )
            keep[id(original)] = original
            built[id(original)] = built[id(original)] + value if id(original) in built else value

        def ready(use: Use, grads: list[Tensor | None]) -> None:
            grad_outputs = []
            for dim, view, edge, grad in zip(use.out_dims, use.views, use.edges, grads):
                if grad is None:  # the output does not reach the loss
                    grad = loss.new_zeros(edge.node._input_metadata[edge.output_nr].shape)
                grad = view.read(grad) if view is not None else grad
                grad_outputs.append(use.laid_out(grad, dim))
            call = OpCall(use.func, use.args, use.kwargs, use.per_sample, grad_outputs)
            self._apply(use, call, need, add, kind)
            use.args, use.kwargs, use.versions = (), {}, []  # its inputs can go now

        stream_output_grads(loss, uses, ready)

        if computed:
            sources = [keep[id(t)] for t in computed if id(t) in built]
            sources = list({id(t): t for t in sources}.values())
            targets = [p for p in params if id(p) in through_computations]
            if sources and targets:
                pulled = torch.autograd.grad(
                    sources,
                    targets,
                    [built.pop(id(t)) for t in sources],
                    is_grads_batched=True,
                    allow_unused=True,
                )
                for p, g in zip(targets, pulled):
                    if g is not None:
                        add(p, g, "grad")
        for key, grad in built.items():
            if key in names:
                norms[names[key]] = per_sample_norm(grad, kind)
        zeros = loss.new_zeros(batch)
        return {n: norms.get(n, zeros) for n in names.values()}

    @staticmethod
    def _apply(use: Use, call: OpCall, need, add, kind: str) -> None:
        rule = rule_for(use.func)
        arguments = rule.bind(call, set(use.tracked)) if rule else None
        if arguments is not None and rule.unsupported_reason(arguments) is None:
            call.bound = arguments
            owners = {
                name: use.tracked[id(v)]
                for name, v in arguments.items()
                if isinstance(v, Tensor) and id(v) in use.tracked
            }
            want = {name: need(original) for name, original in owners.items()}
            result = rule.compute(call, want, kind)
            for name, original in owners.items():
                add(original, result[name], want[name])
            return
        aliases = _aliases(use)
        grads = per_sample_vjp(call, aliases, use.outputs)
        for alias, grad in zip(aliases, grads):
            add(use.tracked[id(alias)], grad, "grad")


def _aliases(use: Use) -> list[Tensor]:
    leaves, _ = tree_flatten((use.args, use.kwargs))
    unique: dict[int, Tensor] = {}
    for v in leaves:
        if isinstance(v, Tensor) and id(v) in use.tracked:
            unique.setdefault(id(v), v)
    return list(unique.values())
