"""Real clients against a real TorchServe: tritonclient (HTTP, binary tensor extension and
JSON, sync and async), the Open Inference Protocol over gRPC and TorchServe's native gRPC
API (stubs generated from the .proto files in TorchServe's jar). Every OOD score must equal
the ``/predictions`` answer for the same input."""

from __future__ import annotations

import asyncio
import base64
import json

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
import yaml
from torchserve_grpc import generate_stubs
from torchserve_harness import (
    REPO,
    SUM_FLAGGED,
    TorchServe,
    demo_archive,
    demo_config,
    demo_sum_threshold,
    serving,
    with_config,
)
from tritonclient.utils import InferenceServerException

from torchserve_gradnorm.codecs import RequestDecoder
from torchserve_gradnorm.config import handler_section, parse_handler_config

pytestmark = [pytest.mark.server, pytest.mark.slow]


PICTURES = [
    *sorted((REPO / "samples/images/id").glob("*.png"))[:3],
    SUM_FLAGGED[0],
]
THRESHOLD = demo_sum_threshold()  # flags the last picture only


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchserve-clients")
    demo_archive(work, handler={"threshold": THRESHOLD})
    # a model whose load fails (gradnorm-archive refuses to pack it: edited after packing)
    good = demo_archive(work, "good")
    broken = demo_config()
    broken["handler"]["top_k"] = 0
    (work / "broken.yaml").write_text(yaml.safe_dump(broken))
    with_config(good, work / "model_store/broken.mar", work / "broken.yaml")
    good.unlink()
    ts = TorchServe(work, work / "model_store", ["digits", "broken"])
    ts.extra_config = ["ts_open_inference_protocol=true"]  # OIP health and gRPC service
    with serving(ts, ready_models=["digits"]) as running:
        yield running


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return generate_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="module")
def expected(server) -> dict[str, dict]:
    """The /predictions answer for each picture, by file name."""
    answers = {}
    for picture in PICTURES:
        r = requests.post(
            f"{server.url}/predictions/digits",
            data=picture.read_bytes(),
            headers=server.headers(),
            timeout=60,
        )
        assert r.status_code == 200, r.text
        answers[picture.name] = r.json()
    return answers


def scores(expected: dict[str, dict]) -> list[float]:
    return [expected[p.name]["ood"]["score"] for p in PICTURES]


def labels(expected: dict[str, dict]) -> list[str]:
    return [expected[p.name]["predictions"][0]["label"] for p in PICTURES]


def pixel_tensors() -> np.ndarray:
    """The pictures as the model's FP32 input, (n, 1, 8, 8): what the handler decodes."""
    config = parse_handler_config(handler_section(demo_config()))
    decoder = RequestDecoder(config.input, config.limits)
    return np.stack([decoder.decode(p.read_bytes()).samples[0].numpy() for p in PICTURES])


def triton_inputs(module, binary: bool) -> list:
    if binary:  # raw picture bytes
        data = np.array([p.read_bytes() for p in PICTURES], dtype=np.object_)
    else:  # JSON carries BYTES as text: base64
        data = np.array([base64.b64encode(p.read_bytes()) for p in PICTURES], dtype=np.object_)
    pictures = module.InferInput("pictures", [len(PICTURES)], "BYTES")
    pictures.set_data_from_numpy(data, binary_data=binary)
    tensors = module.InferInput("pixels", list(pixel_tensors().shape), "FP32")
    tensors.set_data_from_numpy(pixel_tensors(), binary_data=binary)
    return [pictures, tensors]


def check_result(result, expected: dict[str, dict]) -> None:
    assert result.as_numpy("ood_score").tolist() == pytest.approx(scores(expected), rel=1e-5)
    got = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("predicted_label")]
    assert got == labels(expected)
    assert result.as_numpy("is_ood").tolist() == [False, False, False, True]
    assert result.as_numpy("probabilities").shape == (len(PICTURES), 10)


# --- tritonclient over HTTP ------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_gets_predictions_and_the_predictions_ood_scores(
    server, expected, binary
):
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live(headers=server.headers())
    assert client.is_server_ready(headers=server.headers())
    assert client.get_server_metadata(headers=server.headers())["name"] == "Torchserve"
    # not served by TorchServe 0.12's HTTP frontend (docs/clients.md): gRPC ModelReady is
    assert not client.is_model_ready("digits", headers=server.headers())
    pictures, tensors = triton_inputs(triton_http, binary)
    outputs = [
        triton_http.InferRequestedOutput(name, binary_data=binary)
        for name in ("probabilities", "predicted_label", "ood_score", "is_ood")
    ]
    for sent in (pictures, tensors):
        result = client.infer("digits", [sent], outputs=outputs, headers=server.headers())
        check_result(result, expected)
    # tritonclient's defaults: binary inputs, all outputs binary (binary_data_output)
    default = client.infer("digits", triton_inputs(triton_http, True)[:1], headers=server.headers())
    check_result(default, expected)
    assert default.get_response()["model_name"] == "digits"


def test_tritonclient_http_async_client_gets_the_same_answers(server, expected):
    async def run() -> list:
        client = triton_http_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            return await asyncio.gather(
                *[
                    client.infer("digits", [sent], headers=server.headers())
                    for sent in triton_inputs(triton_http_aio, True)
                ]
            )
        finally:
            await client.close()

    for result in asyncio.run(run()):
        check_result(result, expected)


def test_tritonclient_reads_v2_errors_even_for_unreadable_bodies(server):
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    wrong = triton_http.InferInput("pixels", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"expected shape \[1, 8, 8\]"):
        client.infer("digits", [wrong], headers=server.headers())
    url = f"{server.url}/v2/models/digits/infer"
    for body, extra in [
        (b'{"inputs": [', {}),  # truncated JSON
        (b"\x00\x01 not a picture", {}),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}),  # too long
    ]:
        r = requests.post(url, data=body, headers={**server.headers(), **extra}, timeout=60)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), r.text


# --- Open Inference Protocol over gRPC -------------------------------------------------------


def grpc_metadata(server) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {server.key()}")]


def worker_pids(server, model: str = "digits") -> list[int]:
    r = requests.get(
        f"http://127.0.0.1:{server.management_port}/models/{model}",
        headers={"Authorization": f"Bearer {server.key('management')}"},
        timeout=10,
    )
    return [w["pid"] for w in r.json()[0]["workers"]]


def test_oip_grpc_model_infer_answers_predictions_and_ood_outputs(server, stubs, expected):
    pb, service = stubs["open_inference_grpc_pb2"], stubs["open_inference_grpc_pb2_grpc"]
    tensor = pb.ModelInferRequest.InferInputTensor
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service.GRPCInferenceServiceStub(channel)
        meta = grpc_metadata(server)
        assert stub.ServerLive(pb.ServerLiveRequest(), metadata=meta).live
        assert stub.ModelReady(pb.ModelReadyRequest(name="digits"), metadata=meta).ready
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), metadata=meta).name
        pids = worker_pids(server)
        requests_ = [
            tensor(
                name="pictures",
                datatype="BYTES",
                shape=[len(PICTURES)],
                contents=pb.InferTensorContents(bytes_contents=[p.read_bytes() for p in PICTURES]),
            ),
            tensor(
                name="pixels",
                datatype="FP32",
                shape=list(pixel_tensors().shape),
                contents=pb.InferTensorContents(fp32_contents=pixel_tensors().ravel().tolist()),
            ),
        ]
        for sent in requests_:
            answer = stub.ModelInfer(
                pb.ModelInferRequest(model_name="digits", id="r1", inputs=[sent]), metadata=meta
            )
            out = {o.name: o for o in answer.outputs}
            assert answer.id == "r1" and answer.model_name == "digits"
            assert list(out["ood_score"].contents.fp64_contents) == pytest.approx(
                scores(expected), rel=1e-5
            )
            assert list(out["is_ood"].contents.bool_contents) == [False, False, False, True]
            # TorchServe's frontend writes BYTES outputs as JSON text (quoted)
            got = [json.loads(b) for b in out["predicted_label"].contents.bytes_contents]
            assert got == labels(expected)
        # a refusal comes back as an "error" output, and the worker lives on
        bad = tensor(
            name="pixels",
            datatype="FP32",
            shape=[1, 3],
            contents=pb.InferTensorContents(fp32_contents=[0.0, 1.0, 2.0]),
        )
        answer = stub.ModelInfer(
            pb.ModelInferRequest(model_name="digits", id="r2", inputs=[bad]), metadata=meta
        )
        (error,) = answer.outputs
        assert error.name == "error" and answer.id == "r2"
        assert "expected shape [1, 8, 8]" in json.loads(error.contents.bytes_contents[0])
        # raw_input_contents (tritonclient's and KServe's way) is dropped by the frontend
        raw = pb.ModelInferRequest(
            model_name="digits",
            inputs=[tensor(name="pixels", datatype="FP32", shape=list(pixel_tensors().shape))],
            raw_input_contents=[pixel_tensors().astype(np.float32).tobytes()],
        )
        (error,) = stub.ModelInfer(raw, metadata=meta).outputs
        assert "raw_input_contents" in json.loads(error.contents.bytes_contents[0])
        assert worker_pids(server) == pids
        with pytest.raises(grpc.RpcError) as denied:
            stub.ServerReady(pb.ServerReadyRequest())
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_oip_grpc_to_a_model_that_failed_to_load_gets_the_load_error_and_no_worker_restart(
    server, stubs
):
    pb, service = stubs["open_inference_grpc_pb2"], stubs["open_inference_grpc_pb2_grpc"]
    sent = pb.ModelInferRequest.InferInputTensor(
        name="pixels",
        datatype="FP32",
        shape=list(pixel_tensors().shape),
        contents=pb.InferTensorContents(fp32_contents=pixel_tensors().ravel().tolist()),
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service.GRPCInferenceServiceStub(channel)
        pids = worker_pids(server, "broken")
        for n in range(2):
            answer = stub.ModelInfer(
                pb.ModelInferRequest(model_name="broken", id=f"b{n}", inputs=[sent]),
                metadata=grpc_metadata(server),
                timeout=30,
            )
            (error,) = answer.outputs
            assert (answer.id, error.name) == (f"b{n}", "error")
            assert json.loads(error.contents.bytes_contents[0]) == (
                "model 'broken' failed to load: invalid model-config.yaml: "
                "handler.top_k: expected an integer >= 1, got 0"
            )
        assert worker_pids(server, "broken") == pids


def test_standard_oip_grpc_clients_find_no_service_in_torchserve_0_12(server):
    # they call inference.GRPCInferenceService; TorchServe names it under its own package
    client = triton_grpc.InferenceServerClient(server.grpc_target)
    with pytest.raises(InferenceServerException, match="UNIMPLEMENTED|unimplemented"):
        client.is_server_live(headers={"authorization": f"Bearer {server.key()}"})


# --- TorchServe's native gRPC API ------------------------------------------------------------


def test_native_grpc_predictions_and_stream_answer_like_predictions(server, stubs, expected):
    pb, service = stubs["inference_pb2"], stubs["inference_pb2_grpc"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service.InferenceAPIsServiceStub(channel)
        meta = grpc_metadata(server)
        pids = worker_pids(server)
        for picture in PICTURES:
            request = pb.PredictionsRequest(
                model_name="digits", input={"data": picture.read_bytes()}
            )
            answer = json.loads(stub.Predictions(request, metadata=meta).prediction)
            assert answer["ood"]["score"] == pytest.approx(
                expected[picture.name]["ood"]["score"], rel=1e-5
            )
            (streamed,) = stub.StreamPredictions(request, metadata=meta, timeout=60)
            assert json.loads(streamed.prediction)["ood"] == answer["ood"]
        bad = pb.PredictionsRequest(model_name="digits", input={"data": b"not a picture"})
        refusal = json.loads(stub.Predictions(bad, metadata=meta).prediction)
        assert refusal["error"]["code"] == 400
        assert worker_pids(server) == pids
        with pytest.raises(grpc.RpcError) as denied:
            stub.Predictions(bad)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_served_config_binds_grpc_to_loopback_with_explicit_ports_and_tokens():
    lines = (REPO / "config.properties").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if "=" in line and line[0] != "#")
    assert settings["grpc_inference_address"] == settings["grpc_management_address"]
    assert settings["grpc_inference_address"] == "127.0.0.1"
    assert (settings["grpc_inference_port"], settings["grpc_management_port"]) == ("7070", "7071")
    assert settings["disable_token_authorization"] == "false"
    # a boolean in config.properties (TS_OPEN_INFERENCE_PROTOCOL=oip in the environment)
    assert settings["ts_open_inference_protocol"] == "true"
