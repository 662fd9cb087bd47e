"""How TorchServe delivered a request, read from the headers its frontend hands the worker.

TorchServe 0.12 passes no route or protocol to the handler, but what it passes differs:
- HTTP requests carry the client's HTTP headers (``Host`` at least) and an ``explain``
  header; ``/predictions`` and ``/explanations`` also get a ``url_path`` header, the
  KServe routes ``/v1/models/{name}:predict`` and ``/v2/models/{name}/infer`` do not.
- gRPC requests (the native ``inference.proto`` API and, with ``ts_open_inference_protocol``,
  the Open Inference Protocol service) carry no HTTP headers at all. An OIP ``ModelInfer``
  reaches the handler as a JSON v2 body with ``model_name`` and ``inputs`` (its ``outputs``,
  ``parameters`` and ``raw_input_contents`` are dropped by the frontend).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .v2_binary import HEADER_LENGTH


@dataclass(frozen=True)
class Delivery:
    http: bool = True
    kserve_route: bool = False
    """Sent to ``/v1/models/...`` or ``/v2/models/...``: errors are ``{"error": str}``."""
    header_length: str | None = None
    """The ``Inference-Header-Content-Length`` header: a binary tensor extension body."""
    json_body: bool = False
    """Sent as ``Content-Type: application/json`` (always so by KServe 0.13's model server,
    which forwards ``binary_data_output`` but cannot read a binary answer)."""

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> Delivery:
        if headers is None:  # not from TorchServe (tests, scripts): plain HTTP
            return cls()
        lower = {str(k).lower(): v for k, v in headers.items()}
        http = "host" in lower or "explain" in lower
        return cls(
            http=http,
            kserve_route=http and "explain" in lower and "url_path" not in lower,
            header_length=lower.get(HEADER_LENGTH.lower()),
            json_body=str(lower.get("content-type", "")).startswith("application/json"),
        )

    def is_oip_grpc(self, payload: Any) -> bool:
        """An Open Inference Protocol ``ModelInfer`` over gRPC."""
        return not self.http and isinstance(payload, Mapping) and "model_name" in payload

    @property
    def binary_answers(self) -> bool:
        """Binary outputs may be sent: the request was binary, or not declared JSON."""
        return self.header_length is not None or not self.json_body

    @property
    def speaks_v2(self) -> bool:
        """Errors go back as ``{"error": str}`` even when the body cannot be read."""
        return self.kserve_route or self.header_length is not None
