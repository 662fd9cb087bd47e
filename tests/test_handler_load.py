"""Loading in the handler. A model whose load fails keeps its worker and answers every
request at once with a 503 that carries the load error, instead of leaving the requests
waiting on worker restarts (eager and TorchScript models under every filter: test_archive.py).

TorchServe's side is faked here (``FakeContext``, what the worker hands the handler); the
real-server tests are in test_server.py."""

from __future__ import annotations

import logging

import torch
from gradnorm_handler import GradNormHandler
from torchserve_harness import FakeContext, demo_config, load_demo_model


def scripted_demo(model_dir) -> str:
    torch.jit.save(torch.jit.script(load_demo_model()), model_dir / "model.pt")
    return "model.pt"


def loaded_handler(context: FakeContext) -> GradNormHandler:
    handler = GradNormHandler()
    handler.initialize(context)  # must not raise: a raise restarts the worker in a loop
    return handler


def test_a_bad_handler_config_is_answered_with_a_503_naming_the_key(tmp_path, caplog):
    yaml = demo_config()
    yaml["handler"]["top_k"] = 0
    context = FakeContext(tmp_path, scripted_demo(tmp_path), yaml)
    with caplog.at_level(logging.ERROR):
        handler = loaded_handler(context)
    lines = [r.getMessage() for r in caplog.records if "gradnorm" in r.getMessage()]
    assert lines == [
        "gradnorm: model not loaded, invalid model-config.yaml: "
        "handler.top_k: expected an integer >= 1, got 0"
    ]
    answers = handler.handle([{"body": b"picture"}, {"data": b"another"}], context)
    assert context.statuses == {0: 503, 1: 503}
    assert context.content_types == {0: "application/json", 1: "application/json"}
    for answer in answers:
        assert answer["error"]["code"] == 503
        assert answer["error"]["message"] == (
            "model 'mymodel' failed to load: invalid model-config.yaml: "
            "handler.top_k: expected an integer >= 1, got 0"
        )


def test_weights_that_do_not_load_are_answered_with_a_503_carrying_the_error(tmp_path):
    # a state_dict packed without --model-file: TorchServe tries it as TorchScript
    torch.save(load_demo_model().state_dict(), tmp_path / "model.pt")
    context = FakeContext(tmp_path, "model.pt", demo_config())
    handler = loaded_handler(context)
    (answer,) = handler.handle([{"body": b"picture"}], context)
    assert context.statuses == {0: 503}
    assert answer["error"]["message"].startswith("model 'mymodel' failed to load: RuntimeError: ")


def test_a_failed_load_answers_each_protocol_in_its_own_error_shape(tmp_path):
    yaml = demo_config()
    yaml["handler"]["top_k"] = 0
    context = FakeContext(tmp_path, scripted_demo(tmp_path), yaml)
    context.manifest["model"]["modelVersion"] = "2.0"
    handler = loaded_handler(context)
    v2_body = {"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [0]}]}
    requests = [
        {"body": v2_body},  # KServe v2 route over HTTP
        {"body": {"model_name": "mymodel", "id": "r7", **v2_body}},  # OIP ModelInfer, gRPC
        {"body": b"picture"},  # native gRPC Predictions
    ]
    context.request_headers = [{"Host": "x", "explain": "False"}, {}, {}]
    v2, oip, native = handler.handle(requests, context)
    message = (
        "model 'mymodel' failed to load: invalid model-config.yaml: "
        "handler.top_k: expected an integer >= 1, got 0"
    )
    assert v2 == {"error": message}
    # TorchServe's OIP frontend builds its answer from these fields, or restarts the worker
    assert (oip["id"], oip["model_name"], oip["model_version"]) == ("r7", "mymodel", "2.0")
    assert oip["outputs"] == [
        {"name": "error", "datatype": "BYTES", "shape": [1], "data": [message]}
    ]
    assert native["error"] == {"code": 503, "message": message}
    assert context.statuses == {0: 503, 1: 503, 2: 503}
    # the gRPC stream ends on this header instead of waiting for more parts
    assert [context.response_headers[i].get("ts_stream_next") for i in range(3)] == [
        None,
        "false",
        "false",
    ]


def test_a_model_that_loads_is_not_refused(tmp_path):
    context = FakeContext(tmp_path, scripted_demo(tmp_path), demo_config())
    handler = loaded_handler(context)
    assert handler.load_error is None
    assert handler.service.scorer.selected


def test_a_backend_that_cannot_score_torchscript_is_one_line_naming_the_key(tmp_path, caplog):
    yaml = demo_config()
    yaml["handler"]["backend"] = "fast"
    context = FakeContext(tmp_path, scripted_demo(tmp_path), yaml)
    with caplog.at_level(logging.ERROR):
        handler = loaded_handler(context)
    (line,) = [r.getMessage() for r in caplog.records if "gradnorm" in r.getMessage()]
    assert line.startswith(
        "gradnorm: model not loaded, invalid model-config.yaml: handler.backend: "
    )
    assert "TorchScript" in line and "\n" not in line
    assert not any(r.exc_info for r in caplog.records)  # no traceback for a setting
    (answer,) = handler.handle([{"body": b"picture"}], context)
    assert "handler.backend" in answer["error"]["message"]
