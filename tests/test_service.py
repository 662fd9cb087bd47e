"""The TorchServe-free core of the handler: one batch of requests in, one reply each out."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from torchserve_gradnorm.config import ConfigError, parse_handler_config
from torchserve_gradnorm.scorer import GradNormScorer
from torchserve_gradnorm.service import GradNormService

SCHEMA = json.loads((Path(__file__).parent.parent / "docs/response.schema.json").read_text())


class Picky(nn.Module):
    """A classifier that fails on inputs whose first value is above 100."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        if (x[:, 0] > 100).any():
            raise RuntimeError("value out of range for this model")
        return self.head(torch.tanh(self.body(x)))


def service(**handler) -> GradNormService:
    torch.manual_seed(0)
    config = parse_handler_config({"input": {"kind": "tensor", "shape": [4]}, **handler})
    return GradNormService(Picky(), config, labels={"0": "cat", "1": "dog", "2": "owl"})


def body(values) -> dict:
    return {"body": json.dumps({"data": values}).encode()}


def test_each_request_gets_its_own_answer_in_batch_order():
    svc = service()
    xs = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]]
    replies = svc.handle([body(x) for x in xs])
    expected = GradNormScorer(svc.scorer.model)(torch.tensor(xs))
    assert [r.status for r in replies] == [200, 200]
    for reply, norm in zip(replies, expected.grad_norm):
        jsonschema.validate(reply.body, SCHEMA)
        assert reply.body["ood"]["grad_norm"] == pytest.approx(norm.item(), rel=1e-6)
    assert svc.last.samples == 2 and svc.last.requests == 2


def test_a_bad_request_gets_a_4xx_and_the_rest_are_scored():
    replies = service().handle([body([1, 2, 3, 4]), {"body": b"not json"}, body([1, 2])])
    assert [r.status for r in replies] == [200, 400, 400]
    assert "expected shape [4], got [2]" in replies[2].body["error"]["message"]
    for r in replies:
        jsonschema.validate(r.body, SCHEMA)


def test_when_the_model_fails_on_one_input_the_others_are_still_answered():
    replies = service().handle([body([1, 2, 3, 4]), body([500, 0, 0, 0]), body([0, 1, 0, 1])])
    assert [r.status for r in replies] == [200, 400, 200]
    assert "value out of range" in replies[1].body["error"]["message"]


def test_threshold_sets_is_ood_and_labels_name_the_classes():
    replies = service(threshold=-0.5, top_k=2).handle([body([1, 2, 3, 4])])
    ood = replies[0].body["ood"]
    assert ood["threshold"] == -0.5 and ood["is_ood"] is (ood["score"] > -0.5)
    assert [p["label"] for p in replies[0].body["predictions"]][0] in {"cat", "dog", "owl"}
    assert len(replies[0].body["predictions"]) == 2


def test_per_layer_answers_name_every_parameter_and_sum_to_the_norm():
    reply = service(per_layer=True).handle([body([1, 2, 3, 4])])[0]
    jsonschema.validate(reply.body, SCHEMA)
    layers = reply.body["ood"]["per_layer"]
    assert set(layers) == {"body.weight", "body.bias", "head.weight", "head.bias"}
    assert sum(layers.values()) == pytest.approx(reply.body["ood"]["grad_norm"], rel=1e-6)


def test_instances_are_answered_with_a_list():
    request = {"body": json.dumps({"instances": [[1, 2, 3, 4], [4, 3, 2, 1]]}).encode()}
    reply = service().handle([request])[0]
    jsonschema.validate(reply.body, SCHEMA)
    assert isinstance(reply.body, list) and len(reply.body) == 2
    assert len(reply.ood_scores) == 2


def test_a_filter_that_selects_nothing_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^handler\.param_filter: .*selects no parameter"):
        service(param_filter={"include": ["nope"]})


def test_an_explicit_fast_backend_that_cannot_be_exact_fails_at_warm_up():
    class ScriptedInside(nn.Module):  # the fast backend cannot see inside TorchScript
        def __init__(self):
            super().__init__()
            self.layer = torch.jit.script(nn.Linear(4, 4))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.layer(x)))

    config = parse_handler_config({"backend": "fast", "input": {"kind": "tensor", "shape": [4]}})
    svc = GradNormService(ScriptedInside(), config)
    with pytest.raises(ConfigError, match=r"^handler\.backend: 'fast': .*cannot see"):
        svc.warm_up()
