"""Open Inference Protocol (KServe v2) requests and answers, inside the handler.

TorchServe routes ``POST /v2/models/{name}/infer`` to the model like ``/predictions``
and, with no ``service_envelope`` configured, hands the handler the JSON body unchanged.
Decoding v2 bodies here (instead of in TorchServe's ``kservev2`` envelope, which answers
503 as soon as a server-side batch holds more than one request) keeps server-side batching:
each v2 request is one request of the batch and may itself carry n samples.

Request (``V2RequestDecoder`` sends every JSON body with an ``inputs`` key here, and binary
tensor extension bodies, see ``v2_binary``)::

    {"id": "optional string",
     "inputs": [{"name": "any", "shape": [n, *sample shape], "datatype": "FP32",
                 "data": [flat row-major values, or the same nested]}],
     "outputs": [{"name": "ood_score"}, ...]}            # optional: a subset of the outputs

- exactly one input tensor; its first axis counts samples (a shape equal to the model's
  ``input.shape`` without that axis is read as one sample);
- numeric datatypes ``FP16 FP32 FP64 INT8 INT16 INT32 INT64 UINT8 UINT16 UINT32 UINT64``
  (the values must fit the declared type; they are then converted to the model's
  ``input.dtype``), or ``BYTES`` with one base64-encoded picture per element for
  ``input.kind: image`` (shape ``[n]``, ``[n, 1]`` or ``[-1]``), or one UTF-8 text per
  element for ``input.kind: text`` (``[n, 2]``: n sentence pairs);
- the handler's limits apply: ``limits.max_instances`` samples, ``limits.max_tensor_elements``
  numbers in the request, ``limits.max_pixels`` per picture.

Answer (one per request, n rows each)::

    {"model_name": "digits", "model_version": "1.0",
     "id": "<the request's id, or a new UUID>",
     "outputs": [
       {"name": "probabilities",   "datatype": "FP32",  "shape": [n, C], "data": [...]},
       {"name": "predicted_index", "datatype": "INT64", "shape": [n],    "data": [...]},
       {"name": "predicted_label", "datatype": "BYTES", "shape": [n],    "data": [...]},
       {"name": "ood_score",       "datatype": "FP64",  "shape": [n],    "data": [...]},
       {"name": "grad_norm",       "datatype": "FP64",  "shape": [n],    "data": [...]},
       {"name": "is_ood",          "datatype": "BOOL",  "shape": [n],    "data": [...]}]}

``is_ood`` only when a threshold is set. Outputs asked for with ``binary_data`` (or all, with
the request parameter ``binary_data_output``) go as raw bytes after the JSON header. Errors
answer a 4xx status with the v2 error shape ``{"error": "message"}``.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .codecs import Decoded, RequestDecoder, RequestError
from .response import error_answer
from .v2_binary import binary_size, raw_values, split_body

NUMERIC_DATATYPES: dict[str, np.dtype] = {
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
}
OUTPUT_NAMES = (
    "probabilities",
    "predicted_index",
    "predicted_label",
    "ood_score",
    "grad_norm",
    "is_ood",
)


@dataclass(frozen=True)
class V2Request:
    """What the answer needs from a v2 request."""

    id: str
    outputs: tuple[str, ...] | None = None
    """The outputs asked for, in OUTPUT_NAMES order; None for all."""
    binary_outputs: frozenset[str] = frozenset()
    """The outputs to send as raw bytes after the JSON header (binary tensor extension)."""


class V2RequestError(RequestError):
    """A refused v2 request: answered with ``{"error": message}``."""

    v2 = True


def error_body(status: int, message: str, v2: bool) -> dict[str, Any]:
    """The error answer in the request's protocol."""
    return {"error": message} if v2 else error_answer(status, message)


def is_v2_error(error: Exception) -> bool:
    return isinstance(error, V2RequestError)


# --- requests ---


class V2RequestDecoder(RequestDecoder):
    """A ``RequestDecoder`` that also takes v2 requests: JSON bodies with an ``inputs`` key
    (wherever they are sent) and binary tensor extension bodies."""

    def decode(self, payload: Any, header_length: int | None = None) -> Decoded:
        """Any body ``RequestDecoder`` takes, v2 JSON, and binary tensor extension bodies:
        those with an ``Inference-Header-Content-Length`` (``header_length``) or, without
        it, a JSON header naming a ``binary_data_size``."""
        if header_length is not None and isinstance(payload, (bytes, bytearray, memoryview, str)):
            body = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
            return self.decode_binary(body, header_length)
        try:
            return super().decode(payload)
        except RequestError:
            # a binary body whose client (or a proxy) left out the length header
            if isinstance(payload, (bytes, bytearray, memoryview)):
                body = bytes(payload)
                if body.startswith(b"{") and b'"binary_data_size"' in body:
                    return self.decode_binary(body, None)
            raise

    def _json(self, obj: Any) -> Decoded:
        if isinstance(obj, Mapping) and "inputs" in obj:
            return decode_v2(self, obj)
        return super()._json(obj)

    def decode_binary(self, body: bytes, header_length: int | None) -> Decoded:
        """A binary tensor extension body; ``header_length`` from its
        ``Inference-Header-Content-Length`` header (None: the first JSON value)."""
        try:
            obj, raw = split_body(body, header_length)
        except RequestError as e:
            raise V2RequestError(e.status, e.message) from None
        if not isinstance(obj, Mapping) or "inputs" not in obj:
            raise V2RequestError(400, 'the JSON header must be a v2 request {"inputs": [...]}')
        return decode_v2(self, obj, raw)


def decode_v2(decoder: RequestDecoder, obj: Mapping[str, Any], raw: bytes = b"") -> Decoded:
    """A v2 inference request -> ``Decoded`` (n samples) carrying a ``V2Request``; ``raw``:
    the bytes after the JSON header of a binary tensor extension body."""
    try:
        outputs = _requested_outputs(obj.get("outputs"))
        request = V2Request(_request_id(obj.get("id")), outputs, _binary_outputs(obj, outputs))
        tensor = _the_input(obj["inputs"])
        data = _tensor_data(tensor, raw)
        datatype = tensor["datatype"]
        if datatype == "BYTES" and decoder.text is not None:
            samples = _texts(decoder, tensor, data)
        elif datatype == "BYTES":
            samples = _pictures(decoder, tensor, data)
        elif datatype in NUMERIC_DATATYPES:
            samples = _numbers(decoder, tensor, data, NUMERIC_DATATYPES[datatype])
        else:
            known = ", ".join([*NUMERIC_DATATYPES, "BYTES"])
            raise RequestError(400, f"unsupported datatype {datatype!r}; use one of {known}")
    except V2RequestError:
        raise
    except RequestError as e:
        raise V2RequestError(e.status, e.message) from None
    except RecursionError:
        raise V2RequestError(400, "'data' is nested too deeply") from None
    return Decoded(samples, many=True, v2=request)


def _tensor_data(tensor: Mapping[str, Any], raw: bytes) -> Any:
    """The input's values: its JSON ``data``, or its raw bytes (binary tensor extension)."""
    size = binary_size(tensor)
    if size is None:
        if "data" not in tensor:
            raise RequestError(400, "input tensor without 'data' or 'binary_data_size'")
        if raw:
            raise RequestError(400, "binary data after the JSON header, but no input takes it")
        if not isinstance(tensor["data"], list):
            raise RequestError(400, "'data' must be a list")
        return tensor["data"]
    if "data" in tensor:
        raise RequestError(400, "an input tensor has either 'data' or 'binary_data_size'")
    if size != len(raw):
        raise RequestError(
            400, f"'binary_data_size' is {size}, but {len(raw)} bytes follow the JSON header"
        )
    shape = tensor["shape"]
    count = None if -1 in shape else math.prod(shape)
    return raw_values(raw, tensor["datatype"], count)


def _binary_outputs(obj: Mapping[str, Any], outputs: tuple[str, ...] | None) -> frozenset[str]:
    """Outputs asked for as raw bytes: per output (``binary_data``) or all of them
    (the request parameter ``binary_data_output``)."""
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise RequestError(400, "'parameters' must be an object")
    everything = parameters.get("binary_data_output") is True
    binary = set(OUTPUT_NAMES) if everything and outputs is None else set()
    for output in obj.get("outputs") or []:
        options = output.get("parameters") or {}
        if not isinstance(options, Mapping):
            raise RequestError(400, "an output's 'parameters' must be an object")
        if options.get("binary_data", everything) is True:
            binary.add(output["name"])
    return frozenset(binary)


def _request_id(value: Any) -> str:
    if value is None:
        return str(uuid.uuid4())
    if not isinstance(value, str):
        raise RequestError(400, f"'id' must be a string, got {type(value).__name__}")
    return value


def _requested_outputs(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(o, Mapping) and isinstance(o.get("name"), str) for o in value
    ):
        raise RequestError(400, "'outputs' must be a list of {\"name\": ...} objects")
    names = {o["name"] for o in value}
    unknown = sorted(names - set(OUTPUT_NAMES))
    if unknown:
        raise RequestError(
            400, f"unknown output {unknown[0]!r}; outputs are {', '.join(OUTPUT_NAMES)}"
        )
    return tuple(n for n in OUTPUT_NAMES if n in names)


def _the_input(inputs: Any) -> Mapping[str, Any]:
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:
        raise RequestError(400, f"this model takes one input tensor, got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, Mapping):
        raise RequestError(400, "an input tensor must be an object")
    missing = [k for k in ("name", "shape", "datatype") if k not in tensor]
    if missing:
        raise RequestError(400, f"input tensor without {', '.join(repr(k) for k in missing)}")
    if not isinstance(tensor["name"], str) or not isinstance(tensor["datatype"], str):
        raise RequestError(400, "an input tensor's 'name' and 'datatype' must be strings")
    shape = tensor["shape"]
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape)
    ):
        raise RequestError(400, f"'shape' must be a non-empty list of sizes, got {shape!r}")
    return tensor


def _numbers(
    decoder: RequestDecoder, tensor: Mapping[str, Any], data: Any, dtype: np.dtype
) -> torch.Tensor:
    shape = list(tensor["shape"])
    if -1 in shape:
        raise RequestError(400, f"a numeric tensor needs a full shape, got {shape}")
    total = math.prod(shape)
    limit = decoder.limits.max_tensor_elements
    if total > limit:
        raise RequestError(413, f"{total} numbers exceed the limit of {limit}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ragged lists
            array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, Warning):
        raise RequestError(400, "'data' must be a flat or rectangular list of numbers") from None
    if array.dtype.kind not in "iuf":  # strings, booleans, null, objects, huge integers
        raise RequestError(400, "'data' must hold numbers only")
    if array.size != total:
        raise RequestError(400, f"shape {shape} holds {total} values, 'data' has {array.size}")
    array = _as_datatype(array.reshape(shape), dtype, tensor["datatype"])
    sample_shape = decoder.shape
    if sample_shape is not None and tuple(shape) == tuple(sample_shape):
        array = array[None]  # one sample sent without the batch axis
    if array.ndim < 1 or array.shape[0] < 1:
        raise RequestError(400, f"no samples in shape {shape}")
    _check_count(decoder, array.shape[0])
    return torch.stack([decoder._check_array(sample) for sample in array])


def _as_datatype(array: np.ndarray, dtype: np.dtype, datatype: str) -> np.ndarray:
    if dtype.kind == "f":
        return array.astype(dtype)
    if array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise RequestError(400, f"datatype {datatype} takes integers")
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise RequestError(400, f"values out of the range of {datatype}")
    return array.astype(dtype)


def _bytes_elements(tensor: Mapping[str, Any], data: Any, what: str) -> list[Any]:
    """A BYTES input's elements, as many as its shape says (and at least one)."""
    items = list(_flatten(data))
    shape = tensor["shape"]
    if -1 not in shape and math.prod(shape) != len(items):
        raise RequestError(400, f"shape {shape} holds {math.prod(shape)} values, got {len(items)}")
    if not items:
        raise RequestError(400, f"no {what} in 'data'")
    return items


def _pictures(decoder: RequestDecoder, tensor: Mapping[str, Any], data: Any) -> torch.Tensor:
    items = _bytes_elements(tensor, data, "pictures")
    if decoder.input.kind != "image":
        raise RequestError(415, "this model takes numeric tensors, not BYTES pictures")
    _check_count(decoder, len(items))
    pictures = []
    for item in items:
        if isinstance(item, bytes):  # binary tensor extension: the picture itself
            pictures.append(decoder._image(item))
            continue
        if not isinstance(item, str):
            raise RequestError(400, "BYTES elements must be base64 strings of pictures")
        try:
            raw = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "invalid base64 picture in BYTES data") from None
        pictures.append(decoder._image(raw))
    try:
        return torch.stack(pictures)
    except RuntimeError:
        raise RequestError(
            400, "pictures of different sizes: set input.size to resize them"
        ) from None


def _texts(decoder: RequestDecoder, tensor: Mapping[str, Any], data: Any) -> list[Any]:
    """BYTES elements as UTF-8 texts: shape [n] or [n, 1], or [n, 2] for sentence pairs."""
    items = _bytes_elements(tensor, data, "texts")
    shape = tensor["shape"]
    pairs = len(shape) == 2 and shape[1] == 2
    _check_count(decoder, len(items) // 2 if pairs else len(items))
    return decoder.text.texts_from_elements(items, pairs)


def _flatten(data: Any) -> Any:
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _check_count(decoder: RequestDecoder, n: int) -> None:
    limit = decoder.limits.max_instances
    if n > limit:
        raise RequestError(413, f"{n} samples exceed the limit of {limit}")


# --- answers ---


def encode_answer(
    request: V2Request,
    model_name: str,
    model_version: str,
    logits: torch.Tensor,
    answers: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The v2 answer for one request: ``logits`` (n, C) and its n answer objects."""
    probs = torch.softmax(logits.detach().float(), dim=1).cpu()
    n = probs.shape[0]
    values = {
        "probabilities": ("FP32", [n, probs.shape[1]], probs.reshape(-1).tolist()),
        "predicted_index": ("INT64", [n], [a["predictions"][0]["index"] for a in answers]),
        "predicted_label": ("BYTES", [n], [a["predictions"][0]["label"] for a in answers]),
        "ood_score": ("FP64", [n], [a["ood"]["score"] for a in answers]),
        "grad_norm": ("FP64", [n], [a["ood"]["grad_norm"] for a in answers]),
    }
    flags = [a["ood"]["is_ood"] for a in answers]
    if all(f is not None for f in flags):
        values["is_ood"] = ("BOOL", [n], flags)
    names = request.outputs if request.outputs is not None else OUTPUT_NAMES
    outputs = []
    for name in names:
        if name in values:
            datatype, shape, data = values[name]
            outputs.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
    return {
        "model_name": model_name,
        "model_version": model_version,
        "id": request.id,
        "outputs": outputs,
    }


def check_grpc_contents(obj: Mapping[str, Any]) -> None:
    """An OIP gRPC ModelInfer whose values did not arrive: TorchServe 0.12's frontend passes
    on each input's ``contents`` only, and drops ``raw_input_contents`` (what tritonclient
    and KServe send), which leaves ``data`` empty."""
    inputs = obj.get("inputs")
    if isinstance(inputs, list) and any(
        isinstance(t, Mapping) and t.get("data") == [] for t in inputs
    ):
        raise V2RequestError(
            400,
            "an input arrived without values: TorchServe's OIP gRPC frontend drops "
            "raw_input_contents; send the values in the tensor's contents",
        )


def grpc_error_answer(
    request_id: str, model_name: str, model_version: str, message: str
) -> dict[str, Any]:
    """A refusal in the only shape TorchServe 0.12's OIP gRPC frontend can pass on.

    Its ``GRPCJob`` ignores the status the handler sets and builds a ModelInferResponse
    from ``id``, ``model_name``, ``model_version`` and ``outputs`` (a missing one throws in
    the frontend and restarts the worker), so the message travels as a BYTES output
    named ``error``."""
    return {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id,
        "outputs": [{"name": "error", "datatype": "BYTES", "shape": [1], "data": [message]}],
        "error": message,
    }
