"""Fuzzing the request path with the demo digits model.

Hypothesis mixes good requests (pictures, JSON, .npy, base64, instances) with bad ones
(random bytes, truncated or corrupted PNG/JPEG, decompression bombs, JSON of wrong shapes
and types, NaN and Inf, empty bodies, arrays over the limit, JSON nested too deep) inside
one batch of ``GradNormService.handle``, the code TorchServe's worker runs. Every reply
must be 200 or a 4xx ``{"error": {"code", "message"}}``, ``handle`` must never raise, and
every request must be answered exactly as if it had been sent alone.

A real TorchServe then gets each kind of bad body inside concurrent batches of good ones,
plus a body over ``max_request_size``, and must keep the same worker.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from torchserve_harness import (
    DIGITS,
    TorchServe,
    demo_archive,
    demo_config,
    load_demo_model,
    serving,
)

from torchserve_gradnorm.config import handler_section, parse_handler_config
from torchserve_gradnorm.service import GradNormService

REPO = Path(__file__).resolve().parent.parent
PICTURE_PATHS = sorted((REPO / "samples/images").glob("*/*.png"))
MAX_TENSOR_ELEMENTS = 4096  # lowered from the default, so that "huge" stays cheap
MAX_INSTANCES = 4
MAX_PIXELS = 16_000_000  # the default, kept


def limited_config(**limits: int) -> dict:
    config = demo_config()
    config["handler"]["limits"] = limits
    return config


def make_service(**limits: int) -> GradNormService:
    config = parse_handler_config(handler_section(limited_config(**limits)))
    labels = json.loads((DIGITS / "index_to_name.json").read_text())
    service = GradNormService(load_demo_model(), config, labels)
    service.warm_up()
    return service


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a busy machine, idle-spinning intra-op threads make tiny batches very slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SERVICE = make_service(max_tensor_elements=MAX_TENSOR_ELEMENTS, max_instances=MAX_INSTANCES)


# --- bodies ----------------------------------------------------------------------------------


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR (correct CRC) + IEND claiming width x height, no pixel data."""

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def png_bomb(side: int = 6000) -> bytes:
    """A real, complete PNG of side x side black pixels: about 35 kB for 36 megapixels."""

    rows = (b"\x00" * (side + 1)) * side  # filter byte + one gray byte per pixel, per row
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def jpeg(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


PNGS = [p.read_bytes() for p in PICTURE_PATHS]
JPEGS = [jpeg(b) for b in PNGS]
TENSORS = [SERVICE.decoder.decode(b).samples[0].numpy() for b in PNGS]  # (1, 8, 8) each
BOMB = png_bomb()
SHAPE = (1, 8, 8)


@dataclass
class Case:
    kind: str
    request: dict[str, Any]
    expect: str  # "good": 200; "bad": 4xx; "any": either (a truncated picture may still decode)

    def __repr__(self) -> str:  # keep hypothesis' failure reports readable
        text = repr(self.request)
        return f"Case({self.kind}, {self.expect}, {text[:160]}{'...' if len(text) > 160 else ''})"


def case(kind: str, expect: str):
    return lambda request: Case(kind, request, expect)


# --- good requests ---

finite = st.floats(-4.0, 4.0, width=32)
tensors = st.one_of(st.sampled_from(TENSORS), hnp.arrays(np.float32, SHAPE, elements=finite)).map(
    lambda a: a.tolist()
)
good_cases = st.one_of(
    st.sampled_from(PNGS).map(lambda b: {"body": b}).map(case("png", "good")),
    st.sampled_from(JPEGS).map(lambda b: {"body": b}).map(case("jpeg", "good")),
    st.sampled_from(PNGS).map(lambda b: {"data": b}).map(case("form-field", "good")),
    tensors.map(lambda x: {"body": json.dumps({"data": x}).encode()}).map(case("json", "good")),
    tensors.map(lambda x: {"body": {"data": x}}).map(case("json-parsed", "good")),
    tensors.map(lambda x: {"body": json.dumps({"data": x})}).map(case("json-text", "good")),
    st.sampled_from(TENSORS).map(lambda a: {"body": npy(a)}).map(case("npy", "good")),
    st.lists(tensors, min_size=1, max_size=MAX_INSTANCES)
    .map(lambda xs: {"body": {"instances": xs}})
    .map(case("instances", "good")),
    st.sampled_from(PNGS)
    .map(lambda b: {"body": {"data": {"b64": base64.b64encode(b).decode()}}})
    .map(case("base64", "good")),
)

# --- bad requests ---


def nested(shape: tuple[int, ...]) -> Any:
    return np.zeros(shape).tolist()


def with_value(value: Any):
    """A right-shaped tensor whose element at a drawn position is ``value``."""

    @st.composite
    def build(draw):
        x = draw(st.sampled_from(TENSORS)).tolist()
        c, i, j = 0, draw(st.integers(0, 7)), draw(st.integers(0, 7))
        x[c][i][j] = value
        return x

    return build()


non_numbers = st.one_of(
    st.text(max_size=5), st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["data", "instances", "b64", "x"]), children, max_size=3)
    ),
    max_leaves=12,
)
shapes = st.lists(st.integers(0, 9), max_size=4).map(tuple).filter(lambda s: s != SHAPE)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
bad_cases = st.one_of(
    st.binary(max_size=300).map(lambda b: {"body": b}).map(case("random-bytes", "bad")),
    st.tuples(st.integers(4001, 2**31 - 1), st.integers(4001, 2**31 - 1))  # > MAX_PIXELS
    .map(lambda wh: {"body": png_header_only(*wh)})
    .map(case("bomb-header", "bad")),
    st.just({"body": png_header_only(60_000, 60_000)}).map(case("bomb-60000", "bad")),
    st.just({"body": BOMB}).map(case("bomb-real", "bad")),
    st.just({"body": {"data": base64.b64encode(BOMB).decode()}}).map(case("bomb-b64", "bad")),
    shapes.map(lambda s: {"body": {"data": nested(s)}}).map(case("wrong-shape", "bad")),
    shapes.map(lambda s: {"body": json.dumps({"data": nested(s)}).encode()}).map(
        case("wrong-shape-bytes", "bad")
    ),
    non_numbers.flatmap(with_value)
    .map(lambda x: {"body": {"data": x}})
    .map(case("wrong-dtype", "bad")),
    non_finite.flatmap(with_value)
    .map(lambda x: {"body": json.dumps({"data": x}).encode()})  # NaN, Infinity tokens
    .map(case("nan-inf-bytes", "bad")),
    non_finite.flatmap(with_value)
    .map(lambda x: {"body": {"data": x}})
    .map(case("nan-inf-parsed", "bad")),
    st.tuples(non_finite, st.sampled_from([np.float32, np.float64]))
    .map(lambda v: {"body": npy(np.full(SHAPE, v[0], dtype=v[1]))})
    .map(case("nan-inf-npy", "bad")),
    st.sampled_from(
        [{"body": b""}, {"body": b" \n\t"}, {}, {"body": None}, {"data": b""}, {"body": ""}]
    ).map(case("empty", "bad")),
    st.sampled_from([{"body": {}}, {"body": []}, {"body": 7}, {"a": b"1", "b": b"2"}]).map(
        case("no-data", "bad")
    ),
    st.integers(MAX_TENSOR_ELEMENTS + 1, 4 * MAX_TENSOR_ELEMENTS)
    .map(lambda n: {"body": {"data": [0.0] * n}})
    .map(case("huge-json", "bad")),
    st.integers(MAX_TENSOR_ELEMENTS + 1, 4 * MAX_TENSOR_ELEMENTS)
    .map(lambda n: {"body": npy(np.zeros(n, np.float32))})
    .map(case("huge-npy", "bad")),
    st.integers(MAX_INSTANCES + 1, 3 * MAX_INSTANCES)
    .map(lambda n: {"body": {"instances": [TENSORS[0].tolist()] * n}})
    .map(case("too-many-instances", "bad")),
    st.tuples(st.integers(900, 100_000), st.booleans())
    .map(lambda v: {"body": deep_json(*v)})
    .map(case("deep-json", "bad")),
    st.integers(4300, 6000)
    .map(lambda n: {"body": b'{"data": 1' + b"0" * n + b"}"})
    .map(case("huge-integer", "bad")),
    st.text(max_size=40).map(lambda t: {"body": {"data": t}}).map(case("bad-base64", "bad")),
    st.binary(max_size=64)
    .map(lambda b: {"body": {"data": {"b64": base64.b64encode(b).decode()}}})
    .map(case("base64-not-a-picture", "bad")),
    json_values.map(lambda v: {"body": json.dumps(v).encode()}).map(case("random-json", "bad")),
    json_values.map(lambda v: {"body": v}).map(case("random-json-parsed", "bad")),
    st.tuples(st.sampled_from(PNGS + JPEGS), st.floats(0.0, 0.999))
    .map(lambda v: {"body": v[0][: int(len(v[0]) * v[1])]})
    .map(case("truncated", "any")),
    st.tuples(
        st.sampled_from(PNGS + JPEGS),
        st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=4))),
    )
    .map(lambda v: {"body": corrupt(*v)})
    .map(case("corrupted", "any")),
)


def corrupt(body: bytes, edits: list[tuple[float, bytes]]) -> bytes:
    data = bytearray(body)
    for where, new in edits:
        at = int(where * (len(data) - 1))
        data[at : at + len(new)] = new
    return bytes(data)


def deep_json(depth: int, as_bytes: bool) -> bytes | str:
    text = "[" * depth + "]" * depth
    return text.encode() if as_bytes else text  # str: TorchServe's text/* bodies


@st.composite
def batches(draw) -> list[Case]:
    good = draw(st.lists(good_cases, max_size=4))
    bad = draw(st.lists(bad_cases, min_size=0 if good else 1, max_size=5))
    return draw(st.permutations(good + bad))


# --- checks ----------------------------------------------------------------------------------


def answers_of(body: Any) -> list[dict]:
    return body if isinstance(body, list) else [body]


def check_reply(reply, expect: str) -> None:
    assert reply.status == 200 or 400 <= reply.status < 500, reply
    json.dumps(reply.body, allow_nan=False)  # what reaches the client is strict JSON
    if reply.status != 200:
        assert set(reply.body) == {"error"}, reply.body
        assert reply.body["error"]["code"] == reply.status
        assert isinstance(reply.body["error"]["message"], str) and reply.body["error"]["message"]
    if expect == "good":
        assert reply.status == 200, reply.body
    elif expect == "bad":
        assert reply.status != 200, reply.body


def same_answer(got, alone) -> None:
    assert got.status == alone.status, (got.body, alone.body)
    if got.status != 200:
        # Pillow's messages name the BytesIO object by address: compare without addresses
        assert re.sub("0x[0-9a-f]+", "0x?", json.dumps(got.body)) == re.sub(
            "0x[0-9a-f]+", "0x?", json.dumps(alone.body)
        )
        return
    together, single = answers_of(got.body), answers_of(alone.body)
    assert len(together) == len(single)
    for a, b in zip(together, single):
        assert a["predictions"][0]["index"] == b["predictions"][0]["index"]
        assert a["ood"]["grad_norm"] == pytest.approx(b["ood"]["grad_norm"], rel=1e-5)


@settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches())
def test_every_request_of_a_fuzzed_batch_is_answered_as_if_alone(batch):
    replies = SERVICE.handle([c.request for c in batch])  # must not raise
    assert len(replies) == len(batch)
    for c, reply in zip(batch, replies):
        event(c.kind)  # pytest --hypothesis-show-statistics counts the kinds tried
        check_reply(reply, c.expect)
        same_answer(reply, SERVICE.handle([c.request])[0])
    assert SERVICE.scorer.backend == "fast"  # no bad input demoted the backend


# --- one of each, with the status it must get -------------------------------------------------

TENSOR = TENSORS[0].tolist()
NAN = [[[math.nan] + row[1:] if i == 0 else row for i, row in enumerate(TENSOR[0])]]
EXPECTED_STATUS = {
    "random bytes": ({"body": b"\x00\x01garbage\xff" * 20}, 400),
    "truncated png": ({"body": PNGS[3][: len(PNGS[3]) // 2]}, 400),
    "truncated jpeg": ({"body": JPEGS[3][: len(JPEGS[3]) // 2]}, 400),
    "png header claiming 60000x60000": ({"body": png_header_only(60_000, 60_000)}, 413),
    "png bomb 6000x6000": ({"body": BOMB}, 413),
    "json of the wrong shape": ({"body": {"data": [[1.0, 2.0], [3.0, 4.0]]}}, 400),
    "ragged json": ({"body": b'{"data": [[1, 2], [3]]}'}, 400),
    "json strings": ({"body": {"data": [[["a"] * 8] * 8]}}, 400),
    "json nulls": ({"body": {"data": [[[None] * 8] * 8]}}, 400),
    "NaN token": ({"body": json.dumps({"data": NAN}).encode()}, 400),
    "Infinity": ({"body": {"data": [[[math.inf] * 8] * 8]}}, 400),
    "NaN in npy": ({"body": npy(np.full(SHAPE, np.nan, np.float32))}, 400),
    "npy of objects": ({"body": npy(np.full(SHAPE, None, object), allow_pickle=True)}, 400),
    "empty body": ({"body": b""}, 400),
    "no body": ({}, 400),
    "huge array": ({"body": {"data": [0.0] * (MAX_TENSOR_ELEMENTS + 1)}}, 413),
    "too many instances": ({"body": {"instances": [TENSOR] * (MAX_INSTANCES + 1)}}, 413),
    "json nested 100000 deep": ({"body": b"[" * 100_000 + b"]" * 100_000}, 400),
    "json nested too deep as text": ({"body": "[" * 100_000 + "]" * 100_000}, 400),
    "integer of 5000 digits": ({"body": b'{"data": 1' + b"0" * 5000 + b"}"}, 400),
}


@pytest.mark.parametrize("name", list(EXPECTED_STATUS))
def test_each_kind_of_bad_body_gets_its_status_inside_a_good_batch(name):
    bad, status = EXPECTED_STATUS[name]
    good = [{"body": b} for b in PNGS[:3]]
    alone = [SERVICE.handle([g])[0] for g in good]
    replies = SERVICE.handle([good[0], bad, good[1], good[2]])
    assert replies[1].status == status, replies[1].body
    check_reply(replies[1], "bad")
    for got, expected in zip([replies[0], *replies[2:]], alone):
        check_reply(got, "good")
        same_answer(got, expected)


def test_limits_are_configurable():
    roomy = make_service(max_pixels=40_000_000, max_tensor_elements=2 * MAX_TENSOR_ELEMENTS)
    assert roomy.handle([{"body": {"data": [0.0] * (MAX_TENSOR_ELEMENTS + 1)}}])[0].status == 400
    assert roomy.handle([{"body": BOMB}])[0].status == 200  # 36 MP, decoded then resized
    tight = make_service(max_pixels=64 * 64 - 1)
    assert tight.handle([{"body": PNGS[0]}])[0].status == 413


@pytest.mark.parametrize("value", [1e20, 1e39])
def test_values_too_large_for_the_model_are_refused_not_answered_with_nan(value):
    reply = SERVICE.handle([{"body": {"data": [[[value] * 8] * 8]}}])[0]
    json.dumps(reply.body, allow_nan=False)
    assert 400 <= reply.status < 500


# --- a real TorchServe -----------------------------------------------------------------------

BATCH_HEADER = "X-GradNorm-Batch-Size"
MAX_REQUEST_SIZE = 6_553_500  # TorchServe's default, as in config.properties


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchserve-fuzz")
    # a long batch delay makes the concurrent requests of a round land in one batch
    limits = {"limits": {"max_tensor_elements": 100_000}}
    demo_archive(work, handler=limits, batchSize=8, maxBatchDelay=400)
    with serving(TorchServe(work, work / "model_store", ["digits"])) as ts:
        yield ts


def worker_pid(server) -> int:
    management = f"http://127.0.0.1:{server.management_port}/models/digits"
    headers = {"Authorization": f"Bearer {server.key('management')}"}
    workers = requests.get(management, headers=headers, timeout=10).json()[0]["workers"]
    assert len(workers) == 1 and workers[0]["status"] == "READY", workers
    pid = int(workers[0]["pid"])
    assert b"model_service_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert os.getpgid(pid) == server.process.pid  # one of this server's processes
    return pid


JSON = {"Content-Type": "application/json"}
ROUNDS = {
    "random bytes, truncated png, bomb header, NaN": [
        (os.urandom(300), {}, 400),
        (PNGS[5][: len(PNGS[5]) // 2], {}, 400),
        (png_header_only(60_000, 60_000), {}, 413),
        (json.dumps({"data": NAN}).encode(), JSON, 400),
    ],
    "truncated jpeg, real bomb, wrong shape, empty": [
        (JPEGS[5][: len(JPEGS[5]) // 2], {}, 400),
        (BOMB, {}, 413),
        (b'{"data": [[1, 2], [3, 4]]}', JSON, 400),
        (b"", {}, 400),
    ],
    "huge array, deep json, strings, body over max_request_size": [
        (b'{"data": [' + b"0," * 100_000 + b"0]}", JSON, 413),
        (b"[" * 100_000 + b"]" * 100_000, JSON, 400),
        (json.dumps({"data": [[["x"] * 8] * 8]}).encode(), JSON, 400),
        (b"\x00" * (MAX_REQUEST_SIZE + 1), {}, 413),  # refused by the frontend
    ],
}


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("round_name", list(ROUNDS))
def test_bad_bodies_fail_alone_in_a_real_server_and_the_worker_survives(server, round_name):
    pid = worker_pid(server)
    good = PNGS[:3]
    alone = [
        requests.post(
            f"{server.url}/predictions/digits", data=b, headers=server.headers(), timeout=60
        ).json()
        for b in good
    ]
    items = [(b, {}, 200) for b in good] + ROUNDS[round_name]
    barrier = threading.Barrier(len(items))

    def send(item):
        body, headers, _ = item
        barrier.wait()
        return requests.post(
            f"{server.url}/predictions/digits",
            data=body,
            headers={**server.headers(), **headers},
            timeout=60,
        )

    with ThreadPoolExecutor(len(items)) as pool:
        responses = list(pool.map(send, items))
    for (_, _, status), r, expected in zip(items, responses, alone):
        assert r.status_code == status == 200, r.text
        answer = r.json()
        assert answer["predictions"][0]["index"] == expected["predictions"][0]["index"]
        assert answer["ood"]["grad_norm"] == pytest.approx(expected["ood"]["grad_norm"], rel=1e-5)
    mixed = []
    for (_, _, status), r in list(zip(items, responses))[len(good) :]:
        assert r.status_code == status, (status, r.text[:300])
        if r.headers.get(BATCH_HEADER) is None:  # the frontend's own refusal, before any worker
            assert status == 413
            continue
        assert r.json()["error"]["code"] == status and r.json()["error"]["message"]
        mixed.append(int(r.headers[BATCH_HEADER]))
    assert max(mixed) > 0  # the bad bodies were refused inside batches that scored good ones
    assert worker_pid(server) == pid  # the same worker, still serving
