"""The Open Inference Protocol's binary tensor extension: raw tensor bytes beside the JSON.

A binary request body is the JSON header (``Inference-Header-Content-Length`` bytes long)
followed by the raw contents of the inputs whose ``parameters`` carry ``binary_data_size``,
in the order of ``inputs``. A binary answer is laid out the same way, for the outputs asked
for with ``binary_data: true`` (or all, with the request parameter ``binary_data_output``).
Raw contents are little-endian and row-major; BOOL is one byte per element; BYTES elements
are each a 4-byte little-endian length followed by that many bytes (tritonclient's format).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .codecs import RequestError

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
_RAW_DTYPES = {
    "BOOL": np.dtype("?"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
}


def split_body(body: bytes, header_length: int | None) -> tuple[Any, bytes]:
    """The JSON header of a binary request (parsed) and the raw bytes after it.

    Without the header's length (a client that did not send it, a transport that dropped
    it), the header is read as the first JSON value of the body."""
    if header_length is None:
        # latin-1 keeps character and byte offsets equal; JSON's structure is ASCII
        try:
            _, header_length = json.JSONDecoder().raw_decode(body.decode("latin-1"))
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"invalid JSON header: {e}") from None
    if not 0 < header_length <= len(body):
        raise RequestError(
            400, f"{HEADER_LENGTH} {header_length} does not fit a body of {len(body)} bytes"
        )
    try:
        return json.loads(body[:header_length].decode("utf-8")), body[header_length:]
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"invalid JSON header: {e}") from None


def parse_header_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise RequestError(400, f"{HEADER_LENGTH} must be a number, got {value!r}") from None


def binary_size(tensor: Mapping[str, Any]) -> int | None:
    """The tensor's ``binary_data_size`` parameter, checked; None when its data is JSON."""
    parameters = tensor.get("parameters")
    if parameters is None:
        return None
    if not isinstance(parameters, Mapping):
        raise RequestError(400, "'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(400, f"'binary_data_size' must be a byte count, got {size!r}")
    return size


def raw_values(raw: bytes, datatype: str, count: int | None) -> list[Any] | np.ndarray:
    """Raw contents -> a flat array (numbers) or a list of bytes objects (BYTES)."""
    if datatype == "BYTES":
        return _bytes_elements(raw)
    dtype = _RAW_DTYPES.get(datatype)
    if dtype is None:
        raise RequestError(400, f"unsupported datatype {datatype!r}")
    if len(raw) % dtype.itemsize:
        raise RequestError(400, f"{len(raw)} bytes of {datatype} is not a whole number of elements")
    values = np.frombuffer(raw, dtype=dtype)
    if count is not None and values.size != count:
        raise RequestError(400, f"binary data holds {values.size} values, the shape {count}")
    return values


def _bytes_elements(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestError(400, "truncated BYTES element length in binary data")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise RequestError(400, "truncated BYTES element in binary data")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def raw_contents(datatype: str, data: list[Any]) -> bytes:
    """One output's flat ``data`` -> its raw contents."""
    if datatype == "BYTES":
        parts = []
        for item in data:
            encoded = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(encoded)) + encoded)
        return b"".join(parts)
    return np.asarray(data, dtype=_RAW_DTYPES[datatype]).tobytes()


def binary_answer(answer: Mapping[str, Any], binary: set[str]) -> tuple[bytes, int]:
    """The answer with the outputs named in ``binary`` moved behind the JSON header; returns
    the body and the header's length (for ``Inference-Header-Content-Length``)."""
    outputs, raw = [], []
    for output in answer["outputs"]:
        if output["name"] in binary:
            contents = raw_contents(output["datatype"], output["data"])
            raw.append(contents)
            output = {k: v for k, v in output.items() if k != "data"}
            output["parameters"] = {"binary_data_size": len(contents)}
        outputs.append(output)
    header = json.dumps({**answer, "outputs": outputs}).encode("utf-8")
    return header + b"".join(raw), len(header)
