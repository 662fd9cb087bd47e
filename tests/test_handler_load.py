"""Loading in the handler. A model whose load fails keeps its worker and answers every
request at once with a 503 that carries the load error, instead of leaving the requests
waiting on worker restarts; eager and TorchScript models load under every filter.

TorchServe's side is faked here (the context object the worker hands the handler); the
real-server test is in test_server.py."""

from __future__ import annotations

import logging
import shutil
import sys

import pytest
import torch
from gradnorm_handler import GradNormHandler
from torchserve_harness import DIGITS, REPO, demo_config, load_demo_model

ID_PICTURE = REPO / "samples/images/id/digit_3_idx45.png"


class FakeContext:
    """The parts of ts.context.Context the handler uses."""

    def __init__(self, model_dir, serialized_file: str, model_yaml: dict) -> None:
        self.model_yaml_config = model_yaml
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"serializedFile": serialized_file}}
        self.model_name = "mymodel"
        self.statuses: dict[int, int] = {}
        self.content_types: dict[int, str] = {}

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.statuses[idx] = code

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


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


def test_a_model_that_loads_is_not_refused(tmp_path):
    context = FakeContext(tmp_path, scripted_demo(tmp_path), demo_config())
    handler = loaded_handler(context)
    assert handler.load_error is None
    assert handler.service.scorer.selected


FILTERS = {"all": "all", "head": "head", "globs": {"include": ["*.weight"], "exclude": ["stem*"]}}


@pytest.mark.parametrize("param_filter", FILTERS.values(), ids=FILTERS.keys())
@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_eager_and_torchscript_models_load_and_score_under_every_filter(
    tmp_path, monkeypatch, kind, param_filter
):
    yaml = demo_config()
    yaml["handler"]["param_filter"] = param_filter
    if kind == "eager":
        shutil.copy(DIGITS / "model.py", tmp_path / "model.py")
        shutil.copy(DIGITS / "digits_cnn.pt", tmp_path / "digits_cnn.pt")
        monkeypatch.syspath_prepend(str(tmp_path))  # as TorchServe does for the model folder
        monkeypatch.delitem(sys.modules, "model", raising=False)
        context = FakeContext(tmp_path, "digits_cnn.pt", yaml)
        context.manifest["model"]["modelFile"] = "model.py"
    else:
        context = FakeContext(tmp_path, scripted_demo(tmp_path), yaml)
    handler = loaded_handler(context)
    assert handler.load_error is None
    (reply,) = handler.service.handle([{"body": ID_PICTURE.read_bytes()}])
    assert reply.status == 200, reply.body
    assert reply.body["predictions"][0]["index"] == 3
