"""The implementations timed: plain passes, our scorer, and the references.

Each set-up function takes the model, the input and the method and returns a ``Prepared``:
``run()`` is what is timed; it returns the (B,) gradient norms where the implementation has
them (they are compared across implementations), else None.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.losses import get_method

METHOD_CHOICES = ("confounding", "kl")


class Skip(Exception):
    """This case cannot run here; the message says why."""


@dataclass
class Prepared:
    run: Callable[[], Tensor | None]
    options: str = ""
    """How the implementation was configured, when that matters (table's note)."""
    backend: str | None = None
    """The scorer's backend after the warm-up (``auto`` resolved, fallbacks applied)."""
    log: list[str] = field(default_factory=list)
    """What the scorer logged (why ``auto`` passed a backend over)."""


@dataclass(frozen=True)
class ImplSpec:
    name: str
    description: str
    setup: Callable[[nn.Module, Tensor, str, dict], Prepared]
    needs: tuple[str, ...] = ()
    methods: tuple[str, ...] = METHOD_CHOICES
    per_method: bool = True
    """False: the same work for every method (plain forward), run once per model."""
    check: bool = False
    """Compare its per-sample norms with ``auto``'s (rtol CHECK_RTOL)."""
    method_note: str = ""
    """Why the other methods are not run."""
    base: str | None = "fwd+bwd"
    """The plain pass its time and memory are divided by in the table."""
    paired: bool = False
    """Its base is also timed in its case, in turns with it in the same process: its time
    over the base's is then the median of those rounds' ratios, which a load on the machine
    or a slower process moves far less than a ratio of two cases' medians."""
    default: bool = True


def _all_params(model: nn.Module) -> list[Tensor]:
    return [p.requires_grad_(True) for p in model.parameters()]


def setup_forward(model: nn.Module, x: Tensor, method: str, opts: dict) -> Prepared:
    def run() -> None:
        with torch.no_grad():
            model(x)

    return Prepared(run)


def setup_fwd_bwd(model: nn.Module, x: Tensor, method: str, opts: dict) -> Prepared:
    params = _all_params(model)
    loss_fn = get_method(method).loss

    def run() -> None:
        with torch.enable_grad():
            torch.autograd.grad(loss_fn(model(x), 1.0).sum(), params)

    return Prepared(run)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line not in self.lines:
            self.lines.append(line)


def scorer_setup(backend: str, param_filter: str | None = None):
    def setup(model: nn.Module, x: Tensor, method: str, opts: dict) -> Prepared:
        records = _Records()
        logger = logging.getLogger("torchserve_gradnorm")
        logger.addHandler(records)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            scorer = GradNormScorer(
                model, method=method, param_filter=param_filter, backend=backend
            )
        except ValueError as e:  # a named backend that refuses this model
            raise Skip(str(e)) from None
        finally:
            logger.setLevel(level)
            logger.removeHandler(records)
        prepared = Prepared(lambda: None, log=records.lines)

        def run() -> Tensor:
            # The fallback of `auto` happens on a call: keep listening, record where it ends.
            logger.addHandler(records)
            logger.setLevel(logging.INFO)
            try:
                return scorer(x).grad_norm
            finally:
                logger.setLevel(level)
                logger.removeHandler(records)
                prepared.backend = scorer.backend

        prepared.run = run
        prepared.backend = scorer.backend
        return prepared

    return setup


def setup_pytorch_ood(model: nn.Module, x: Tensor, method: str, opts: dict) -> Prepared:
    from pytorch_ood.detector import GradNorm, GradUncertainty

    if method == "confounding":
        detector = GradUncertainty(model)
        options = "GradUncertainty(model), no micro-batching"
    else:
        kwargs = {}
        if opts.get("ood_micro_batch"):
            kwargs["micro_batch_size"] = opts["ood_micro_batch"]
        detector = GradNorm(model, **kwargs)
        options = f"GradNorm(model, micro_batch_size={detector.micro_batch_size})"
    return Prepared(lambda: -detector.predict(x), options=options)


def _backpack_pass(model: nn.Module, x: Tensor, loss_fn) -> None:
    from backpack import backpack
    from backpack.extensions import BatchL2Grad

    with warnings.catch_warnings():
        # BackPACK's full backward hooks warn that the input needs no gradient
        warnings.simplefilter("ignore")
        with torch.enable_grad():
            loss = loss_fn(model(x), 1.0).sum()
            with backpack(BatchL2Grad()):
                loss.backward()


def _clear_backpack(params: list[Tensor]) -> None:
    for p in params:
        p.grad = None
        if hasattr(p, "batch_l2"):
            del p.batch_l2


def setup_backpack(model: nn.Module, x: Tensor, method: str, opts: dict) -> Prepared:
    from backpack import extend

    loss_fn = get_method(method).loss
    # One call on two samples first, to find whether BackPACK runs this model at all (its
    # hooks break on in-place ops, its extend() on modules with an `output` child) and which
    # parameters it has no per-sample rule for (its norms would be partial: a wrong answer,
    # not a slow one).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extended = extend(model, use_converter=opts["backpack_converter"])
        extended.eval()
        params = _all_params(extended)
        _backpack_pass(extended, x[:2], loss_fn)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise Skip(f"BackPACK cannot run this model ({type(e).__name__}: {first})") from None
    missing = [n for n, p in extended.named_parameters() if not hasattr(p, "batch_l2")]
    _clear_backpack(params)
    if missing:
        owners = sorted(
            {type(extended.get_submodule(n.rpartition(".")[0])).__name__ for n in missing}
        )
        raise Skip(
            f"BackPACK's BatchL2Grad has no extension for {', '.join(owners)} "
            f"({len(missing)} parameters, e.g. {missing[0]}): its norms would be partial"
        )

    def run() -> Tensor:
        _backpack_pass(extended, x, loss_fn)
        norms = torch.stack([p.batch_l2 for p in params]).sum(0)
        _clear_backpack(params)
        return norms

    return Prepared(run)


IMPLS: dict[str, ImplSpec] = {
    s.name: s
    for s in (
        ImplSpec(
            "forward",
            "model(x) under torch.no_grad()",
            setup_forward,
            per_method=False,
            base=None,
        ),
        ImplSpec(
            "fwd+bwd",
            "forward + one torch.autograd.grad of the summed confounding loss w.r.t. all "
            "parameters: a training step's gradient (the loss is a few operations on the "
            "logits, so kl's costs the same: run once per model)",
            setup_fwd_bwd,
            per_method=False,
            base=None,
        ),
        ImplSpec(
            "auto",
            "GradNormScorer(backend='auto'), all parameters: what a user gets; the backend "
            "column says which backend auto ran",
            scorer_setup("auto"),
        ),
        ImplSpec(
            "auto-head",
            "GradNormScorer(backend='auto', param_filter='head'): the last Linear only",
            scorer_setup("auto", "head"),
            base="forward",
            paired=True,
        ),
        ImplSpec(
            "fast",
            "GradNormScorer(backend='fast'), all parameters (skipped where fast refuses)",
            scorer_setup("fast"),
            check=True,
            default=False,
        ),
        ImplSpec(
            "vmap",
            "GradNormScorer(backend='vmap'), all parameters",
            scorer_setup("vmap"),
            check=True,
        ),
        ImplSpec(
            "loop",
            "GradNormScorer(backend='loop'), all parameters",
            scorer_setup("loop"),
            check=True,
        ),
        ImplSpec(
            "pytorch-ood",
            "pytorch_ood.detector GradUncertainty (confounding) / GradNorm (kl), "
            "library defaults, all parameters",
            setup_pytorch_ood,
            needs=("pytorch_ood",),
            check=True,
        ),
        ImplSpec(
            "backpack",
            "BackPACK BatchL2Grad around loss.backward(), loss = sum of per-sample "
            "confounding losses (the exact method), all parameters",
            setup_backpack,
            needs=("backpack",),
            methods=("confounding",),
            check=True,
            method_note="BackPACK's BatchL2Grad gives squared L2 norms; kl needs L1",
        ),
    )
}
