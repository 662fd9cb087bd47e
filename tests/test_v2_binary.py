"""The Open Inference Protocol's binary tensor extension and the ways TorchServe delivers a
request, offline through the service. Request bodies are built, and answers read, by
tritonclient's own (server-free) functions: the format is the client's, not ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_v2 import ID_PICTURES, OOD_PICTURE, THRESHOLD, XS, b64, digits_service, outputs
from test_v2 import tensor_service as tiny_service

from torchserve_gradnorm.transport import Delivery
from torchserve_gradnorm.v2_binary import HEADER_LENGTH

Client = triton_http.InferenceServerClient
# what TorchServe's frontend hands the worker (seen on TorchServe 0.12)
HTTP_V2 = {"Host": "127.0.0.1:8080", "explain": "False", "Content-Type": "application/json"}
HTTP_PREDICTIONS = {"Host": "127.0.0.1:8080", "explain": "False", "url_path": ""}
GRPC = {"body": "{'content-type': 'application/json'}"}


def binary_request(inputs, outputs=None, **kwargs) -> tuple[bytes, dict[str, str]]:
    body, json_size = Client.generate_request_body(inputs, outputs=outputs, **kwargs)
    headers = dict(HTTP_V2, **{"Content-Type": "application/octet-stream"})
    if json_size is not None:
        headers[HEADER_LENGTH] = str(json_size)
    return body, headers


def tensor_input(array: np.ndarray, binary: bool = True):
    tensor = triton_http.InferInput("x", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array.astype(np.float32), binary_data=binary)
    return tensor


def parse(reply):
    length = reply.headers.get(HEADER_LENGTH)
    body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
    return Client.parse_response_body(body, header_length=None if length is None else int(length))


def test_binary_tensors_in_and_out_equal_the_json_answer():
    svc = tiny_service(threshold=0.0)
    body, headers = binary_request([tensor_input(np.array(XS))])  # all outputs binary
    (reply,) = svc.handle([{"body": body}], [headers])
    assert reply.status == 200 and reply.content_type == "application/octet-stream"
    (plain,) = svc.handle([{"body": {"inputs": [{**_json_tensor(XS)}]}}])
    result, expected = parse(reply), outputs(plain.body)
    for name in ("ood_score", "grad_norm", "predicted_index", "is_ood"):
        assert result.as_numpy(name).tolist() == expected[name]["data"], name
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, 3) and probs.ravel().tolist() == pytest.approx(
        expected["probabilities"]["data"], rel=1e-7
    )
    assert [s.decode() for s in result.as_numpy("predicted_label")] == expected["predicted_label"][
        "data"
    ]


def _json_tensor(xs) -> dict:
    return {"name": "x", "shape": [len(xs), 4], "datatype": "FP32", "data": xs}


def test_binary_outputs_only_when_asked_per_output():
    svc = tiny_service()
    asked = [
        triton_http.InferRequestedOutput("ood_score", binary_data=True),
        triton_http.InferRequestedOutput("predicted_label", binary_data=False),
    ]
    body, headers = binary_request([tensor_input(np.array(XS))], outputs=asked)
    (reply,) = svc.handle([{"body": body}], [headers])
    header = json.loads(reply.body[: int(reply.headers[HEADER_LENGTH])])
    by_name = {o["name"]: o for o in header["outputs"]}
    assert set(by_name) == {"ood_score", "predicted_label"}
    assert by_name["ood_score"]["parameters"]["binary_data_size"] == 3 * 8
    assert "data" in by_name["predicted_label"] and "data" not in by_name["ood_score"]
    # JSON inputs with JSON outputs stay a JSON answer
    asked = [triton_http.InferRequestedOutput("ood_score", binary_data=False)]
    body, headers = binary_request([tensor_input(np.array(XS), binary=False)], outputs=asked)
    (reply,) = svc.handle([{"body": body}], [headers])
    assert isinstance(reply.body, dict) and HEADER_LENGTH not in reply.headers


def test_binary_pictures_score_like_picture_bodies_and_without_the_length_header():
    svc = digits_service(threshold=THRESHOLD)
    pictures = [ID_PICTURES[3], OOD_PICTURE]
    tensor = triton_http.InferInput("pictures", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in pictures], dtype=np.object_))
    body, headers = binary_request([tensor])
    without_length = {k: v for k, v in headers.items() if k != HEADER_LENGTH}
    replies = svc.handle(
        [{"body": body}, {"body": body}, *[{"body": p.read_bytes()} for p in pictures]],
        [headers, without_length, HTTP_PREDICTIONS, HTTP_PREDICTIONS],
    )
    assert [r.status for r in replies] == [200] * 4
    expected = [r.body["ood"]["score"] for r in replies[2:]]
    for reply in replies[:2]:
        assert parse(reply).as_numpy("ood_score").tolist() == pytest.approx(expected, rel=1e-5)
        assert parse(reply).as_numpy("is_ood").tolist() == [False, True]


def test_a_request_declared_json_gets_a_json_answer_even_if_it_asks_for_binary_outputs():
    # KServe 0.13's model server forwards binary_data_output with Content-Type:
    # application/json and parses the answer as JSON
    svc = tiny_service()
    body = {**_v2(XS), "parameters": {"binary_data_output": True}}
    as_json = {**HTTP_V2, "Content-Type": "application/json"}
    unlabelled = {k: v for k, v in HTTP_V2.items() if k != "Content-Type"}
    json_reply, binary_reply = svc.handle([{"body": body}, {"body": body}], [as_json, unlabelled])
    assert isinstance(json_reply.body, dict) and "data" in json_reply.body["outputs"][0]
    assert binary_reply.content_type == "application/octet-stream"


def _v2(xs) -> dict:
    return {"inputs": [_json_tensor(xs)]}


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b, n: (b, n + 5), "invalid JSON header"),
        (lambda b, n: (b, len(b) + 1), "does not fit"),
        (lambda b, n: (b[:-4], n), "binary_data_size"),
        (lambda b, n: (b + b"\x00" * 4, n), "binary_data_size"),
        (lambda b, n: (b, "twelve"), "must be a number"),
    ],
    ids=["header-too-long", "past-the-end", "truncated", "extra-bytes", "length-not-a-number"],
)
def test_broken_binary_bodies_get_a_v2_error_and_the_batch_goes_on(mangle, message):
    svc = tiny_service()
    body, headers = binary_request([tensor_input(np.array(XS))])
    bad_body, length = mangle(body, int(headers[HEADER_LENGTH]))
    replies = svc.handle(
        [{"body": bad_body}, {"body": {"data": XS[0]}}],
        [{**headers, HEADER_LENGTH: str(length)}, None],
    )
    assert replies[0].status == 400 and set(replies[0].body) == {"error"}
    assert message in replies[0].body["error"]
    assert replies[1].status == 200


def test_the_kserve_routes_answer_v2_errors_even_to_unreadable_bodies():
    svc = digits_service()
    bodies = [b'{"inputs": [', b"\x00 neither JSON nor a picture", b"{}"]
    v2 = svc.handle([{"body": b} for b in bodies], [HTTP_V2] * len(bodies))
    assert all(r.status == 400 and isinstance(r.body["error"], str) for r in v2)
    plain = svc.handle([{"body": bodies[1]}], [HTTP_PREDICTIONS])
    assert plain[0].body["error"]["code"] == 400  # /predictions keeps its own error shape


def test_oip_grpc_requests_get_answers_torchserve_grpc_frontend_can_convert():
    svc = digits_service()
    svc.model_version = "1.0"
    good = {"id": "a", "model_name": "digits", "inputs": [_picture_tensor(ID_PICTURES[0])]}
    bad = {"id": "b", "model_name": "digits", "inputs": [{"name": "x", "shape": [1]}]}
    answer, refusal = svc.handle([{"body": good}, {"body": bad}], [GRPC, GRPC])
    # GRPCJob reads exactly these; any missing one throws in the frontend
    for reply in (answer, refusal):
        assert {"id", "model_name", "model_version", "outputs"} <= set(reply.body)
        assert reply.body["model_version"] == "1.0"
    assert answer.status == 200 and "ood_score" in outputs(answer.body)
    assert refusal.body["id"] == "b" and list(outputs(refusal.body)) == ["error"]
    assert "input tensor without" in outputs(refusal.body)["error"]["data"][0]


def test_oip_grpc_inputs_whose_raw_contents_the_frontend_dropped_are_named_as_such():
    svc = digits_service()
    # what TorchServe 0.12 hands over for a ModelInfer that used raw_input_contents
    dropped = {"id": "c", "model_name": "digits", "inputs": [{**_picture_tensor(ID_PICTURES[0]),
                                                             "data": []}]}  # fmt: skip
    (reply,) = svc.handle([{"body": dropped}], [GRPC])
    assert "raw_input_contents" in outputs(reply.body)["error"]["data"][0]


def _picture_tensor(picture) -> dict:
    return {"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(picture)]}


def test_grpc_answers_end_a_torchserve_stream_and_http_answers_do_not():
    svc = digits_service()
    picture = ID_PICTURES[0].read_bytes()
    grpc_reply, http_reply = svc.handle(
        [{"data": picture}, {"body": picture}], [{"data": "{}"}, HTTP_PREDICTIONS]
    )
    assert grpc_reply.headers["ts_stream_next"] == "false"
    assert "ts_stream_next" not in http_reply.headers


@pytest.mark.parametrize(
    "headers, http, kserve_route",
    [
        (HTTP_V2, True, True),
        ({"host": "h", "explain": "False"}, True, True),  # a client's lower-case names
        (HTTP_PREDICTIONS, True, False),
        (GRPC, False, False),
        ({"data": "{'content-type': ''}"}, False, False),
        (None, True, False),
    ],
    ids=["v2-route", "lower-case", "predictions", "oip-grpc", "native-grpc", "no-headers"],
)
def test_the_delivery_is_read_from_the_headers_torchserve_hands_the_worker(
    headers, http, kserve_route
):
    delivery = Delivery.from_headers(headers)
    assert (delivery.http, delivery.kserve_route) == (http, kserve_route)


def _maybe(*strategies):
    return st.one_of(st.none(), *strategies)


_INPUT = st.fixed_dictionaries(
    {
        "name": st.text(max_size=3),
        "shape": st.lists(st.integers(-2, 5), max_size=3),
        "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "x"]),
    },
    optional={
        "parameters": _maybe(
            st.lists(st.integers()),
            st.fixed_dictionaries({"binary_data_size": st.integers(-2, 40)}),
        ),
        "data": st.lists(st.floats(allow_nan=True), max_size=4),
    },
)
_OUTPUT = st.fixed_dictionaries(
    {"name": st.sampled_from(["ood_score", "probabilities", "nope"])},
    optional={
        "parameters": _maybe(st.integers(), st.fixed_dictionaries({"binary_data": st.booleans()}))
    },
)
_HEADER = st.fixed_dictionaries(
    {"inputs": st.lists(_INPUT, max_size=2)},
    optional={
        "outputs": st.lists(_OUTPUT, max_size=3),
        "parameters": _maybe(
            st.text(max_size=2), st.fixed_dictionaries({"binary_data_output": st.booleans()})
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_HEADER, raw=st.binary(max_size=40), length_shift=st.sampled_from([0, 0, 0, -2, 3]))
def test_any_binary_body_gets_an_answer_or_a_v2_refusal_never_an_exception(
    header, raw, length_shift
):
    svc = tiny_service()
    head = json.dumps(header).encode()
    headers = {**HTTP_V2, HEADER_LENGTH: str(len(head) + length_shift)}
    (reply,) = svc.handle([{"body": head + raw}], [headers])
    assert reply.status == 200 or (400 <= reply.status < 500 and set(reply.body) == {"error"})
