"""One server-side batch in, one answer per request out; no TorchServe types here.

Requests are decoded one by one (a bad one gets its own 4xx answer), the good ones are
stacked and scored in one batched pass, and the rows are split back to their requests. If
the batched pass fails, each request is scored alone, so one input the model chokes on
cannot fail the others.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backends import BackendUnsupported
from .backends.capture import HeadInputs
from .calibration import Calibration, CalibrationError, fingerprint
from .codecs import Decoded, RequestError, request_payload
from .config import ConfigError, HandlerConfig
from .detectors import Detector, Features, SumDetector
from .filters import select_parameters
from .outputs import OutputError
from .response import prediction_answers
from .scorer import GradNormScorer, ScoreResult
from .text import text_form_payload
from .transport import Delivery
from .v2 import (
    V2RequestDecoder,
    check_grpc_contents,
    encode_answer,
    error_body,
    grpc_error_answer,
    is_v2_error,
)
from .v2_binary import BINARY_CONTENT_TYPE, HEADER_LENGTH, binary_answer, parse_header_length

log = logging.getLogger("torchserve_gradnorm")


@dataclass
class Reply:
    status: int
    body: Any
    ood_scores: list[float] = field(default_factory=list)
    """One per scored sample (several for an ``instances`` request)."""
    flags: list[bool | None] = field(default_factory=list)
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    """Response headers beside the content type."""


def refusals(
    requests: Sequence[Mapping[str, Any]],
    headers: Sequence[Mapping[str, Any]] | None,
    status: int,
    message: str,
    model_name: str,
    model_version: str = "",
) -> list[Reply]:
    """Every request of a batch refused with one message (a model that failed to load), each
    in the shape its own protocol reads: an OIP gRPC answer (any other shape throws in
    TorchServe's frontend and restarts the worker), ``{"error": str}`` for v2 requests, the
    usual error answer otherwise."""
    replies = []
    for i, request in enumerate(requests):
        delivery = Delivery.from_headers(headers[i] if headers is not None else None)
        try:
            payload = request_payload(request)
        except RequestError:
            payload = None
        if isinstance(payload, (bytes, bytearray)):
            try:
                payload = json.loads(payload)
            except ValueError:
                pass
        if delivery.is_oip_grpc(payload):
            body = grpc_error_answer(
                str(payload.get("id") or ""), model_name, model_version, message
            )
        else:
            v2 = delivery.speaks_v2 or (isinstance(payload, Mapping) and "inputs" in payload)
            body = error_body(status, message, v2)
        reply = Reply(status, body)
        if not delivery.http:
            reply.headers["ts_stream_next"] = "false"  # see GradNormService.handle
        replies.append(reply)
    return replies


@dataclass
class BatchStats:
    requests: int = 0
    samples: int = 0
    scoring_ms: float = 0.0


def float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters, which pictures are cast to."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _finite(answer: dict[str, Any]) -> bool:
    numbers = [answer["ood"]["score"], answer["ood"]["grad_norm"]]
    numbers += [p["probability"] for p in answer["predictions"]]
    return all(math.isfinite(v) for v in numbers)


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, Mapping) else None
    return error.get("message", "") if isinstance(error, Mapping) else str(error)


class GradNormService:
    def __init__(
        self,
        model: nn.Module,
        config: HandlerConfig,
        labels: Mapping[str, Any] | None = None,
        calibration: Calibration | None = None,
        weights_sha256: str | None = None,
        model_name: str = "model",
        model_version: str = "1",
        text: Any = None,
    ) -> None:
        self.config = config
        # named in v2 (Open Inference Protocol) answers
        self.model_name = model_name
        self.model_version = model_version
        self.labels = labels
        self.calibration = calibration
        self.detector = self._detector(config, calibration)
        # errors here are configuration errors: name the key that caused them
        try:
            selected = select_parameters(model, config.param_filter)
        except ValueError as e:
            raise ConfigError("handler.param_filter", str(e)) from None
        if calibration is not None:
            try:
                calibration.check_matches(fingerprint(weights_sha256 or "", config), selected)
            except CalibrationError as e:
                raise ConfigError("handler.calibration", str(e)) from None
        kwargs = config.scorer_kwargs()
        kwargs["per_layer"] = config.per_layer or self.detector.needs_per_layer
        kwargs["penultimate"] = self.detector.needs_penultimate
        if self.detector.needs_penultimate:
            # refused under the calibration's key: the detector, not the backend, needs them
            try:
                HeadInputs(model)
            except ValueError as e:
                raise ConfigError(
                    "handler.calibration", f"the {self.detector.name} detector reads {e}"
                ) from None
        try:
            self.scorer = GradNormScorer(model, **kwargs)
        except ValueError as e:
            raise ConfigError("handler.backend", str(e)) from None
        self.threshold = config.threshold
        if self.threshold is None and calibration is not None:
            self.threshold = calibration.threshold
        self.score_reference: tuple[float, float] | None = (
            None
            if calibration is None or self.threshold is None
            else (calibration.center, self.threshold)
        )
        self.decoder = V2RequestDecoder(config.input, config.limits, text, float_dtype(model))
        self.last = BatchStats()

    @staticmethod
    def _detector(config: HandlerConfig, calibration: Calibration | None) -> Detector:
        if calibration is None:
            if config.detector not in (None, "sum"):
                raise ConfigError(
                    "handler.detector",
                    f"{config.detector!r} is fitted by gradnorm-calibrate; the archive has no "
                    "calibration file",
                )
            return SumDetector()
        if config.detector is not None and config.detector != calibration.detector:
            raise ConfigError(
                "handler.detector",
                f"{config.detector!r} asked for, but the calibration file holds a "
                f"{calibration.detector!r} detector",
            )
        return calibration.build_detector()

    def warm_up(self) -> None:
        """Score one zero sample, so that backend checks and fallbacks happen at load."""
        example = self.decoder.example()
        if example is None:
            return
        try:
            self.scorer(example)
        except BackendUnsupported as e:
            raise ConfigError("handler.backend", f"{self.scorer.backend!r}: {e}") from None
        except OutputError as e:
            raise ConfigError("handler.output", str(e)) from None

    def handle(
        self,
        requests: Sequence[Mapping[str, Any]],
        headers: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Reply]:
        """One reply per request; ``headers``: each request's headers as TorchServe hands
        them to the worker (they tell HTTP from gRPC and carry the binary extension's)."""
        replies: list[Reply | None] = [None] * len(requests)
        decoded: dict[int, Decoded] = {}
        deliveries = [
            Delivery.from_headers(headers[i] if headers is not None else None)
            for i in range(len(requests))
        ]
        oip_grpc: dict[int, str] = {}  # request -> its id
        for i, (request, delivery) in enumerate(zip(requests, deliveries)):
            try:
                payload = self._payload(request)
                if delivery.is_oip_grpc(payload):
                    oip_grpc[i] = str(payload.get("id") or "")
                    check_grpc_contents(payload)
                length = parse_header_length(delivery.header_length)
                decoded[i] = self.decoder.decode(payload, length)
            except RequestError as e:
                v2 = is_v2_error(e) or delivery.speaks_v2
                replies[i] = Reply(e.status, error_body(e.status, e.message, v2))
        start = time.perf_counter()
        if decoded:
            for i, reply in self._score(decoded).items():
                replies[i] = reply
        scoring_ms = (time.perf_counter() - start) * 1000.0
        done = [r for r in replies if r is not None]
        for i, reply in enumerate(done):
            if i in oip_grpc and reply.status != 200:
                reply.body = grpc_error_answer(
                    oip_grpc[i], self.model_name, self.model_version, _message(reply.body)
                )
            elif i in decoded and reply.status == 200 and decoded[i].v2 is not None:
                binary = set(decoded[i].v2.binary_outputs)
                if binary and deliveries[i].binary_answers:
                    reply.body, length = binary_answer(reply.body, binary)
                    reply.content_type = BINARY_CONTENT_TYPE
                    reply.headers[HEADER_LENGTH] = str(length)
            if not deliveries[i].http:
                # TorchServe's gRPC StreamPredictions ends its stream on this header (without
                # it the frontend throws and restarts the worker); other calls ignore it
                reply.headers["ts_stream_next"] = "false"
        self.last = BatchStats(
            len(requests), sum(len(d.samples) for d in decoded.values()), scoring_ms
        )
        return done

    def _score(self, decoded: dict[int, Decoded]) -> dict[int, Reply]:
        try:
            return self._score_together(decoded)
        except Exception as e:
            if len(decoded) == 1:
                (i,) = decoded
                log.warning("gradnorm: the model could not score request %d: %s", i, e)
                # out of memory even for this request alone is the server's trouble, and may
                # pass; anything else the model raises on one input is about that input
                status = 503 if isinstance(e, torch.OutOfMemoryError) else 400
                message = f"the model could not score this input: {type(e).__name__}: {e}"
                return {i: Reply(status, error_body(status, message, decoded[i].v2 is not None))}
            log.warning("gradnorm: batched scoring failed (%s); scoring requests one by one", e)
            replies: dict[int, Reply] = {}
            for i, d in decoded.items():
                replies.update(self._score({i: d}))
            return replies

    def _payload(self, request: Mapping[str, Any]) -> Any:
        if self.decoder.text is not None:
            form = text_form_payload(request)
            if form is not None:
                return form
        return request_payload(request)

    def _score_together(self, decoded: dict[int, Decoded]) -> dict[int, Reply]:
        batch = self.decoder.batch([d.samples for d in decoded.values()])
        result = self.scorer(batch)
        answers = self._answers(result)
        replies: dict[int, Reply] = {}
        row = 0
        for i, d in decoded.items():
            first, row = row, row + len(d.samples)
            mine = answers[first:row]
            if not all(_finite(a) for a in mine):
                message = "the model's outputs for this input are not finite (values too large?)"
                replies[i] = Reply(400, error_body(400, message, d.v2 is not None))
                continue
            if d.v2 is not None:
                body = encode_answer(
                    d.v2, self.model_name, self.model_version, result.logits[first:row], mine
                )
            else:
                body = mine if d.many else mine[0]
            replies[i] = Reply(
                200,
                body,
                [a["ood"]["score"] for a in mine],
                [a["ood"]["is_ood"] for a in mine],
            )
        return replies

    def _answers(self, result: ScoreResult) -> list[dict[str, Any]]:
        if isinstance(self.detector, SumDetector):
            scores = result.ood_score
        else:
            scores = torch.from_numpy(self.detector.score(Features.from_result(result)))
        return prediction_answers(
            result.logits,
            result.grad_norm,
            scores,
            method=self.config.method,
            top_k=self.config.top_k,
            threshold=self.threshold,
            labels=self.labels,
            per_layer=result.per_layer if self.config.per_layer else None,
            detector=None if self.calibration is None else self.detector.name,
        )
