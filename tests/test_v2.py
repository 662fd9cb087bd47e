"""Open Inference Protocol (KServe v2) requests: decoded by the handler itself, so that they
batch server-side like any other request. Offline through the service, then on a real
TorchServe at /v2/models/{name}/infer (no envelope configured)."""

from __future__ import annotations

import base64
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
import requests
import torch
import yaml
from torch import nn
from torchserve_harness import (
    DIGITS,
    REPO,
    SUM_FLAGGED,
    TorchServe,
    demo_archive,
    demo_sum_threshold,
    load_demo_model,
    serving,
)

from torchserve_gradnorm.config import handler_section, parse_handler_config
from torchserve_gradnorm.service import GradNormService
from torchserve_gradnorm.v2 import OUTPUT_NAMES

SCHEMA = json.loads((REPO / "docs/response.schema.json").read_text())
ID_PICTURES = sorted((REPO / "samples/images/id").glob("*.png"))
OOD_PICTURE = SUM_FLAGGED[0]
THRESHOLD = demo_sum_threshold()  # flags OOD_PICTURE and none of ID_PICTURES
BATCH_HEADER = "X-GradNorm-Batch-Size"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def v2_body(datatype: str, shape: list[int], data: list) -> dict:
    return {"inputs": [{"name": "input-0", "shape": shape, "datatype": datatype, "data": data}]}


def outputs(answer: dict) -> dict[str, dict]:
    return {o["name"]: o for o in answer["outputs"]}


# --- offline: the service decodes and answers v2 ---


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def tensor_service(**handler) -> GradNormService:
    config = parse_handler_config(
        {"input": {"kind": "tensor", "shape": [4]}, "top_k": 2, **handler}
    )
    svc = GradNormService(Tiny(), config, labels={"0": "cat", "1": "dog", "2": "owl"})
    svc.model_name = "tiny"
    return svc


def digits_service(**handler) -> GradNormService:
    config = yaml.safe_load((DIGITS / "model-config.yaml").read_text())
    config["handler"].update(handler)
    labels = json.loads((DIGITS / "index_to_name.json").read_text())
    svc = GradNormService(load_demo_model(), parse_handler_config(handler_section(config)), labels)
    svc.model_name = "digits"
    return svc


def handle(svc: GradNormService, *bodies) -> list:
    replies = svc.handle([{"body": b} for b in bodies])
    for r in replies:
        jsonschema.validate(r.body, SCHEMA)
    return replies


XS = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0], [3.0, 0.0, -2.0, 1.0]]


def test_a_v2_tensor_request_with_n_samples_gets_v2_outputs_equal_to_the_v1_answers():
    svc = tensor_service(threshold=0.0)
    flat = [v for x in XS for v in x]
    (v2,) = handle(svc, {"id": "req-7", **v2_body("FP32", [3, 4], flat)})
    (v1,) = handle(svc, {"instances": XS})
    assert v2.status == 200
    assert v2.body["model_name"] == "tiny" and v2.body["id"] == "req-7"
    out = outputs(v2.body)
    assert list(out) == list(OUTPUT_NAMES)
    probs = torch.tensor(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert out["probabilities"]["datatype"] == "FP32" and probs.shape == (3, 3)
    assert probs.sum(1).tolist() == pytest.approx([1.0] * 3, rel=1e-6)
    expected = [a["ood"] for a in v1.body]
    assert out["ood_score"]["data"] == pytest.approx([e["score"] for e in expected], rel=1e-9)
    assert out["grad_norm"]["data"] == pytest.approx([e["grad_norm"] for e in expected], rel=1e-9)
    assert out["is_ood"]["data"] == [e["is_ood"] for e in expected]
    assert out["predicted_index"]["data"] == [a["predictions"][0]["index"] for a in v1.body]
    assert out["predicted_label"]["data"] == [a["predictions"][0]["label"] for a in v1.body]
    assert probs.argmax(1).tolist() == out["predicted_index"]["data"]
    for name, datatype in [("predicted_index", "INT64"), ("ood_score", "FP64"), ("is_ood", "BOOL")]:
        assert out[name]["datatype"] == datatype and out[name]["shape"] == [3]
    # the metrics see one request with three samples
    assert v2.ood_scores == out["ood_score"]["data"] and len(v2.flags) == 3


def test_nested_data_a_sample_without_batch_axis_and_integer_datatypes_are_accepted():
    svc = tensor_service()
    nested = handle(svc, v2_body("FP64", [2, 4], XS[:2]))[0].body
    flat = handle(svc, v2_body("FP32", [2, 4], [v for x in XS[:2] for v in x]))[0].body
    assert outputs(nested)["grad_norm"]["data"] == pytest.approx(
        outputs(flat)["grad_norm"]["data"], rel=1e-6
    )
    one = handle(svc, v2_body("FP32", [4], XS[0]))[0].body
    assert outputs(one)["ood_score"]["shape"] == [1]
    ints = handle(svc, v2_body("INT32", [1, 4], [1, 2, 3, 4]))[0]
    assert ints.status == 200


def test_requested_outputs_only_and_no_is_ood_without_threshold():
    svc = tensor_service()
    body = {**v2_body("FP32", [1, 4], XS[0]), "outputs": [{"name": "ood_score"}]}
    (reply,) = handle(svc, body)
    assert [o["name"] for o in reply.body["outputs"]] == ["ood_score"]
    (reply,) = handle(svc, v2_body("FP32", [1, 4], XS[0]))
    assert "is_ood" not in outputs(reply.body)
    assert reply.body["id"]  # a request without id gets one


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"inputs": []}, 400, "non-empty list"),
        ({"inputs": [1]}, 400, "must be an object"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}, 400, "'data'"),
        (v2_body("FP32", [2, 4], [0.0] * 4), 400, "holds 8 values"),
        (v2_body("FP32", [1, 3], [0.0] * 3), 400, "expected shape [4]"),
        (v2_body("FP32", [1, 4], ["a", "b", "c", "d"]), 400, "numbers only"),
        (v2_body("FP32", [1, 4], [0.0, 1.0, float("nan"), 2.0]), 400, "NaN"),
        (v2_body("INT8", [1, 4], [1, 2, 3, 300]), 400, "range of INT8"),
        (v2_body("INT64", [1, 4], [1, 2, 3, 4.5]), 400, "takes integers"),
        (v2_body("BOOL", [1, 4], [True] * 4), 400, "unsupported datatype"),
        (v2_body("FP32", [-1, 4], [0.0] * 4), 400, "full shape"),
        (v2_body("BYTES", [1], [b64(ID_PICTURES[0])]), 415, "not BYTES pictures"),
        (v2_body("FP32", [65, 4], [0.0] * 260), 413, "65 samples exceed"),
        (v2_body("FP32", [1, 4], [0.0] * 4) | {"id": 5}, 400, "'id' must be a string"),
        (v2_body("FP32", [1, 4], [0.0] * 4) | {"outputs": [{"name": "x"}]}, 400, "unknown output"),
        ({"inputs": v2_body("FP32", [1, 4], [0.0] * 4)["inputs"] * 2}, 400, "one input tensor"),
    ],
)
def test_bad_v2_requests_get_a_v2_error_and_the_rest_of_the_batch_is_answered(
    body, status, message
):
    replies = handle(tensor_service(), v2_body("FP32", [1, 4], XS[0]), body, {"data": XS[1]})
    assert [r.status for r in replies] == [200, status, 200]
    assert set(replies[1].body) == {"error"} and message in replies[1].body["error"]
    assert "outputs" in replies[0].body and "ood" in replies[2].body


def test_v2_pictures_as_base64_bytes_score_like_the_picture_bodies():
    svc = digits_service(threshold=THRESHOLD)
    pictures = [ID_PICTURES[3], OOD_PICTURE]
    (v2,) = handle(svc, v2_body("BYTES", [2], [b64(p) for p in pictures]))
    plain = handle(svc, *[p.read_bytes() for p in pictures])
    out = outputs(v2.body)
    assert out["predicted_label"]["data"][0] == "three"
    assert out["grad_norm"]["data"] == pytest.approx(
        [r.body["ood"]["grad_norm"] for r in plain], rel=1e-5
    )
    assert out["is_ood"]["data"] == [False, True]
    assert out["probabilities"]["shape"] == [2, 10]
    shape_minus_one = handle(svc, v2_body("BYTES", [-1], [b64(p) for p in pictures]))[0]
    assert outputs(shape_minus_one.body)["grad_norm"]["shape"] == [2]
    bad = handle(svc, v2_body("BYTES", [1], ["not base64!"]))[0]
    assert bad.status == 400 and "base64" in bad.body["error"]


def test_a_model_failure_on_a_v2_request_answers_a_v2_error():
    class Picky(Tiny):
        def forward(self, x):
            if (x[:, 0] > 100).any():
                raise RuntimeError("value out of range for this model")
            return super().forward(x)

    config = parse_handler_config({"input": {"kind": "tensor", "shape": [4]}})
    svc = GradNormService(Picky(), config)
    replies = handle(svc, v2_body("FP32", [1, 4], [500.0, 0, 0, 0]), {"data": XS[0]})
    assert replies[0].status == 400 and "out of range" in replies[0].body["error"]
    assert replies[1].status == 200


# --- a real TorchServe ---


KSERVE_CONFIG = REPO / "deploy/kserve/config.properties"
# what the test server sets itself (loopback ports, paths); the rest comes from KServe's file
LOCAL_KEYS = {
    "inference_address", "management_address", "metrics_address", "grpc_inference_port",
    "grpc_management_port", "metrics_config", "model_store",
}  # fmt: skip


def kserve_settings() -> dict[str, str]:
    lines = KSERVE_CONFIG.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_the_kserve_config_has_what_kserve_and_the_handler_need():
    settings = kserve_settings()
    # KServe's model server (kserve_wrapper) reads these
    for key in ("inference_address", "management_address", "grpc_inference_port", "model_store"):
        assert settings[key]
    snapshot = json.loads(settings["model_snapshot"])
    (version,) = snapshot["models"]["digits"].values()
    assert version["marName"] == "digits.mar" and version["batchSize"] > 1
    assert settings["model_store"] == "/mnt/models/model-store"
    assert settings["metrics_config"] == "/mnt/models/config/metrics.yaml"
    assert settings["metrics_mode"] == "prometheus"
    assert settings["metrics_address"].endswith(":8082")
    # v2 bodies reach the handler as they are: no envelope, and none from the environment
    assert "service_envelope" not in settings
    assert settings["enable_envvars_config"] == "false"
    service = yaml.safe_load((REPO / "deploy/kserve/inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"


class KServeLikeTorchServe(TorchServe):
    """TorchServe configured by deploy/kserve/config.properties (token authorization off)."""

    def key(self, api: str = "inference") -> str:
        return "unused"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchserve-v2")
    demo_archive(work, handler={"threshold": THRESHOLD})
    settings = {k: v for k, v in kserve_settings().items() if k not in LOCAL_KEYS}
    snapshot = json.loads(settings["model_snapshot"])
    for version in snapshot["models"]["digits"].values():
        # one worker and a long batch delay, so that concurrent test requests share a batch
        version.update(minWorkers=1, maxWorkers=1, maxBatchDelay=400)
    settings["model_snapshot"] = json.dumps(snapshot)
    ts = KServeLikeTorchServe(work, work / "model_store", ["digits"])
    ts.extra_config = [f"{k}={v}" for k, v in settings.items()]
    # what KServe's runtime sets for protocolVersion v2: must be ignored
    os.environ["TS_SERVICE_ENVELOPE"] = "kservev2"
    try:
        with serving(ts) as running:
            yield running
    finally:
        os.environ.pop("TS_SERVICE_ENVELOPE", None)


def infer(server, body, path="/v2/models/digits/infer") -> requests.Response:
    r = requests.post(server.url + path, json=body, headers=server.headers(), timeout=60)
    jsonschema.validate(r.json(), SCHEMA)
    return r


@pytest.mark.server
@pytest.mark.slow
def test_v2_infer_endpoint_answers_predictions_and_ood_outputs(server):
    r = infer(
        server, {"id": "abc", **v2_body("BYTES", [2], [b64(ID_PICTURES[3]), b64(OOD_PICTURE)])}
    )
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "digits" and r.json()["id"] == "abc"
    out = outputs(r.json())
    assert out["predicted_label"]["data"][0] == "three"
    assert out["is_ood"]["data"] == [False, True]
    assert int(r.headers[BATCH_HEADER]) == 2
    # the same body on /predictions gets the same answer
    same = infer(
        server,
        {"id": "abc", **v2_body("BYTES", [2], [b64(ID_PICTURES[3]), b64(OOD_PICTURE)])},
        "/predictions/digits",
    )
    assert outputs(same.json())["grad_norm"]["data"] == pytest.approx(
        out["grad_norm"]["data"], rel=1e-6
    )


@pytest.mark.server
@pytest.mark.slow
def test_v2_errors_keep_the_v2_error_shape(server):
    r = infer(server, v2_body("FP32", [1, 3], [0.0, 1.0, 2.0]))
    assert r.status_code == 400
    assert "expected shape [1, 8, 8]" in r.json()["error"]


@pytest.mark.server
@pytest.mark.slow
def test_concurrent_v2_requests_are_scored_in_one_batch(server):
    pictures = ID_PICTURES[:6]
    alone = [infer(server, v2_body("BYTES", [1], [b64(p)])).json() for p in pictures]
    barrier = threading.Barrier(len(pictures))

    def send(picture: Path) -> requests.Response:
        barrier.wait()
        return infer(server, {"id": picture.name, **v2_body("BYTES", [1], [b64(picture)])})

    with ThreadPoolExecutor(len(pictures)) as pool:
        together = list(pool.map(send, pictures))
    assert all(r.status_code == 200 for r in together)
    assert max(int(r.headers[BATCH_HEADER]) for r in together) > 1
    for picture, expected, r in zip(pictures, alone, together):
        got = outputs(r.json())
        assert r.json()["id"] == picture.name
        assert got["predicted_index"]["data"] == outputs(expected)["predicted_index"]["data"]
        assert got["grad_norm"]["data"] == pytest.approx(
            outputs(expected)["grad_norm"]["data"], rel=1e-5
        )
