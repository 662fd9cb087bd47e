"""GradNormScorer: method x parameter filter x backend -> ScoreResult."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backends import (
    AUTO_ORDER,
    BACKEND_CHOICES,
    BACKENDS,
    Backend,
    BackendUnsupported,
    BatchDependent,
)
from .backends.capture import HeadInputs
from .filters import ParamFilter, select_parameters
from .losses import get_method
from .outputs import (
    Batch,
    OutputError,
    OutputKey,
    as_tensor_batch,
    batch_size,
    check_output_key,
    map_batch,
    rows,
)

log = logging.getLogger("torchserve_gradnorm")

# batches in a row that the first backend refused for branching between their samples before
# ``auto`` gives up on it: each refusal costs a wasted forward
BATCH_DEPENDENT_LIMIT = 4
DIRECTIONS = ("low_norm_is_ood", "high_norm_is_ood")


@dataclass
class ScoreResult:
    logits: Tensor
    """(B, C) logits of the scoring forward pass."""
    grad_norm: Tensor
    """(B,) raw gradient norm: sum over selected parameters (squared L2 or L1)."""
    ood_score: Tensor
    """(B,) oriented score, higher = more out-of-distribution."""
    per_layer: dict[str, Tensor] | None = None
    """{parameter name: (B,) contribution}, when asked for."""
    penultimate: Tensor | None = None
    """(B, D) input of the model's last ``nn.Linear`` in the scoring forward (the penultimate
    activations, flattened per sample), when asked for."""


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Score in eval mode, then restore every submodule's own flag.

    In training mode BatchNorm normalizes with batch statistics, so one sample's gradient
    depends on the others in its batch, and dropout makes the score random.
    """
    # Only the flags that change are written back: a served model is already in eval mode,
    # and a module's __setattr__ is dear at a small model's scale.
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


class GradNormScorer:
    """Per-sample gradient-norm OOD scores for a classifier, from one batched pass.

    See the README for the two methods, the sign convention and the backends.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "confounding",
        param_filter: ParamFilter = None,
        backend: str = "auto",
        micro_batch_size: int | None = None,
        temperature: float = 1.0,
        per_layer: bool = False,
        direction: str = "low_norm_is_ood",
        output: OutputKey = None,
        penultimate: bool = False,
    ) -> None:
        self.method = get_method(method)
        self.output = check_output_key(output)
        if backend not in BACKEND_CHOICES:
            raise ValueError(
                f"unknown backend {backend!r}: expected one of {', '.join(BACKEND_CHOICES)}"
            )
        if direction not in DIRECTIONS:
            raise ValueError(
                f"unknown direction {direction!r}: expected one of {', '.join(DIRECTIONS)}"
            )
        if micro_batch_size is not None and (
            isinstance(micro_batch_size, bool)
            or not isinstance(micro_batch_size, int)
            or micro_batch_size < 1
        ):
            raise ValueError(
                f"micro_batch_size must be a positive integer or None, got {micro_batch_size!r}"
            )
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not (temperature > 0 and temperature != float("inf"))
        ):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        self.model = model
        self.temperature = float(temperature)
        self.per_layer = bool(per_layer)
        self.direction = direction
        self.micro_batch_size = micro_batch_size
        self.selected = select_parameters(model, param_filter)
        self.requested_backend = backend
        self._candidates = self._build_candidates(backend)
        self._batch_dependent_run = 0
        # kept from the scoring forward only when asked for: a hook costs every forward
        self.penultimate = bool(penultimate)
        if self.penultimate:
            head = HeadInputs(model)
            for candidate in self._candidates:
                candidate.head_inputs = head
        self._features: list[Tensor] = []

    @property
    def backend(self) -> str:
        """The backend in use now (``auto`` resolved, fallbacks applied)."""
        return self._candidates[0].name

    def _build_candidates(self, backend: str) -> list[Backend]:
        names = AUTO_ORDER if backend == "auto" else (backend,)
        built: list[Backend] = []
        for name in names:
            try:
                built.append(
                    BACKENDS[name](
                        self.model, self.selected, self.method, self.temperature, self.output
                    )
                )
            except BackendUnsupported as e:
                if backend != "auto":
                    raise ValueError(f"backend {name!r} cannot score this model: {e}") from None
                log.info("gradnorm: backend %s not used for this model: %s", name, e)
        return built

    def __call__(self, x: Batch) -> ScoreResult:
        """Score a batch: a (B, ...) Tensor, or a mapping of (B, ...) tensors that the model
        takes as keyword arguments (``model(**x)``, e.g. a tokenizer's output)."""
        x = as_tensor_batch(x)
        batch_size(x)  # refuses empty batches and tensors that disagree on B
        device = next(self.model.parameters()).device

        def ready(v: Tensor) -> Tensor:
            return (v.clone() if v.is_inference() else v).to(device)

        # TorchServe (and many callers) run inference under inference_mode or no_grad:
        # scoring needs autograd, and inference tensors cannot be saved for backward.
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(self.model):
            x = map_batch(x, ready)
            self._features = []
            logits, norms = self._score_in_chunks(x)
            features, self._features = self._features, []
        grad_norm = torch.stack(list(norms.values())).sum(0)
        ood = -grad_norm if self.direction == "low_norm_is_ood" else grad_norm.clone()
        return ScoreResult(
            logits=logits,
            grad_norm=grad_norm,
            ood_score=ood,
            per_layer=norms if self.per_layer else None,
            penultimate=torch.cat(features) if self.penultimate else None,
        )

    def _score_in_chunks(self, x: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        total = batch_size(x)
        size = self.micro_batch_size or total
        logits: list[Tensor] = []
        norms: list[dict[str, Tensor]] = []
        start = 0
        while start < total:
            chunk = rows(x, start, start + size)
            try:
                chunk_logits, chunk_norms = self._run_backend(chunk)
            except Exception as e:
                if not _is_oom(e) or size == 1:
                    raise
                size = max(1, batch_size(chunk) // 2)
                self.micro_batch_size = size
                log.warning("gradnorm: out of memory; retrying with micro_batch_size=%d", size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            logits.append(chunk_logits)
            norms.append(chunk_norms)
            start += batch_size(chunk)
        return torch.cat(logits), {n: torch.cat([c[n] for c in norms]) for n in self.selected}

    def _run_backend(self, x: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the current backend; under ``auto``, fall back to the next one that works.

        A fallback is remembered only when the next backend succeeds on the same input, so a
        bad request cannot demote the backend for good. A batch whose samples take different
        branches (``BatchDependent``) goes to a backend that runs each sample alone, and
        demotes the backend only after ``BATCH_DEPENDENT_LIMIT`` such batches in a row: a
        padded text batch may branch where the next batch does not.
        """
        errors: list[Exception] = []
        for i, backend in enumerate(self._candidates):
            if errors and isinstance(errors[0], BatchDependent):
                if not backend.runs_each_sample_alone:
                    continue
            try:
                result = backend(x)
                if self.penultimate:
                    self._features.append(backend.penultimate)
            except Exception as e:
                # no other backend finds logits the model does not return
                if self.requested_backend != "auto" or _is_oom(e) or isinstance(e, OutputError):
                    raise
                errors.append(e)
                continue
            if not i:
                self._batch_dependent_run = 0
                return result
            first = self._candidates[0].name
            if isinstance(errors[0], BatchDependent):
                self._batch_dependent_run += 1
                if self._batch_dependent_run < BATCH_DEPENDENT_LIMIT:
                    log.info(
                        "gradnorm: %s: %s; this batch scored with %s",
                        first,
                        errors[0],
                        backend.name,
                    )
                    return result
            log.warning(
                "gradnorm: backend %s failed on this model (%s: %s); using %s from now on",
                first,
                type(errors[0]).__name__,
                errors[0],
                backend.name,
            )
            self._candidates = self._candidates[i:]
            return result
        raise errors[0]
