"""Text requests through the service (no TorchServe): every request form, padding-exact
scores with the archive's tokenizer, and a 4xx of its own for each bad text."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchserve_gradnorm.codecs import RequestError
from torchserve_gradnorm.config import ConfigError, parse_handler_config
from torchserve_gradnorm.hf import load_model, load_text_encoder
from torchserve_gradnorm.service import GradNormService

from hf_models import LABELS, autograd_reference, bpe_vocab, text_model_dir, tokenizer

SCHEMA = json.loads((Path(__file__).parent.parent / "docs/response.schema.json").read_text())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return text_model_dir("bert", tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def bert(bert_dir) -> GradNormService:
    """The served BERT, with a small character limit (shared: its backend choice is cached)."""
    return service(bert_dir, limits={"max_chars": 40})


def service(folder: Path, **handler) -> GradNormService:
    config = parse_handler_config({"hf_task": "text-classification", **handler})
    model = load_model(folder, config.hf_task)
    labels = {str(i): name for i, name in LABELS.items()}
    text = load_text_encoder(folder, model, config)
    svc = GradNormService(model, config, labels, text=text)
    svc.warm_up()
    return svc


@cache
def _loaded(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return load_model(folder, "text-classification"), tokenizer


def reference(folder: Path, text: str, pair: str | None = None) -> float:
    """The score of one text alone, unpadded, by plain autograd."""
    model, tokenizer = _loaded(folder)
    return autograd_reference(model, dict(tokenizer(text, pair, return_tensors="pt")))[1]


def test_every_request_form_is_answered_with_id2label_labels(bert):
    replies = bert.handle(
        [
            {"body": "the cat sat"},  # text/plain, decoded by TorchServe
            {"body": b"the cat sat"},  # raw UTF-8 bytes
            {"body": {"text": "the cat sat"}},
            {"data": {"data": "the cat sat"}},
            {"body": b'{"text": "the cat sat"}'},  # JSON sent as bytes
            {"text": b"the cat sat"},  # form field
            {"body": {"inputs": "the cat sat"}},  # Hugging Face Inference API
            {"body": {"instances": ["the cat sat", {"text": "the cat sat"}]}},
            {"body": {"inputs": ["the cat sat"]}},
        ]
    )
    assert [r.status for r in replies] == [200] * 9
    bodies = [r.body for r in replies[:7]] + replies[7].body + replies[8].body
    first = bodies[0]
    for b in bodies:
        jsonschema.validate(b, SCHEMA)
        assert b["ood"]["score"] == pytest.approx(first["ood"]["score"], rel=1e-9)
        assert {p["label"] for p in b["predictions"]} == set(LABELS.values())


def test_scores_in_a_padded_batch_equal_each_text_alone_unpadded(bert, bert_dir):
    texts = ["the cat sat on the mat", "dog", "i liked the film but not the cat", "bad"]
    svc = bert
    replies = svc.handle([{"body": t} for t in texts])
    assert svc.last.samples == 4
    for text, reply in zip(texts, replies):
        assert reply.body["ood"]["score"] == pytest.approx(reference(bert_dir, text), rel=1e-6)


def test_sentence_pairs_from_json_form_fields_and_v2(bert, bert_dir):
    svc = bert
    v2 = {"name": "t", "shape": [1, 2], "datatype": "BYTES", "data": [["a dog", "the mat"]]}
    replies = svc.handle(
        [
            {"body": {"text": "a dog", "text_pair": "the mat"}},
            {"text": b"a dog", "text_pair": b"the mat"},
            {"body": {"instances": [{"text": "a dog", "text_pair": "the mat"}, "a dog"]}},
            {"body": {"inputs": [v2]}},
        ]
    )
    assert [r.status for r in replies] == [200] * 4
    expected = reference(bert_dir, "a dog", "the mat")
    assert replies[0].body["ood"]["score"] == pytest.approx(expected, rel=1e-6)
    assert replies[1].body["ood"]["score"] == pytest.approx(expected, rel=1e-6)
    assert replies[2].body[0]["ood"]["score"] == pytest.approx(expected, rel=1e-6)
    assert replies[2].body[1]["ood"]["score"] == pytest.approx(
        reference(bert_dir, "a dog"), rel=1e-6
    )
    scores = next(o for o in replies[3].body["outputs"] if o["name"] == "ood_score")
    assert scores["data"][0] == pytest.approx(expected, rel=1e-6)


def test_v2_bytes_elements_are_texts(bert, bert_dir):
    tensor = {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["the cat", "a dog sat"]}
    (reply,) = bert.handle([{"body": {"inputs": [tensor]}}])
    assert reply.status == 200
    outputs = {o["name"]: o for o in reply.body["outputs"]}
    assert outputs["predicted_label"]["data"][0] in LABELS.values()
    assert outputs["ood_score"]["data"] == pytest.approx(
        [reference(bert_dir, "the cat"), reference(bert_dir, "a dog sat")], rel=1e-6
    )


@pytest.mark.parametrize(
    "request_, status, message",
    [
        ({"body": b"\xff\xfe not utf-8"}, 400, "not valid UTF-8"),
        ({"text": b"\xc3\x28"}, 400, "form field 'text' is not valid UTF-8"),
        ({"body": ""}, 400, "empty"),
        ({"body": "   \n"}, 400, "empty text"),
        ({"body": {"text": ""}}, 400, "empty text"),
        ({"body": {"text": "a", "text_pair": " "}}, 400, "empty text"),
        ({"body": {"text": 3}}, 400, "'text' must be a string"),
        ({"body": {"instances": ["ok", 7]}}, 400, "per instance"),
        ({"body": {"instances": []}}, 400, "non-empty list"),
        ({"body": {"sentence": "a"}}, 400, 'JSON body must be {"text"'),
        ({"body": '{"text": "unclosed}'}, 400, "invalid JSON"),
        ({"body": "x" * 41}, 413, "41 characters exceeds the limit of 40"),
        ({"body": {"text": "x" * 30, "text_pair": "y" * 11}}, 413, "limit of 40"),
    ],
)
def test_each_bad_text_gets_its_own_4xx_and_its_neighbours_are_answered(
    bert, request_, status, message
):
    replies = bert.handle([{"body": "the cat"}, request_, {"body": {"text": "a dog"}}])
    assert [r.status for r in replies] == [200, status, 200]
    assert message in replies[1].body["error"]["message"]
    jsonschema.validate(replies[1].body, SCHEMA)


def test_too_many_tokens_are_refused_without_truncation_and_cut_with_it(bert_dir):
    long = " ".join(["the cat sat on the mat"] * 4)  # 24 words + 2 special tokens
    strict = service(bert_dir, input={"max_length": 10, "truncation": False})
    ok, refused = strict.handle([{"body": "a dog"}, {"body": long}])
    assert ok.status == 200 and refused.status == 413
    assert "26 tokens exceeds the model's 10" in refused.body["error"]["message"]
    (cut,) = service(bert_dir, input={"max_length": 10}).handle([{"body": long}])
    head = " ".join(long.split()[:8])  # 8 words + [CLS] and [SEP] = 10 tokens
    assert cut.body["ood"]["score"] == pytest.approx(reference(bert_dir, head), rel=1e-6)


def test_pairs_required_or_never(bert_dir):
    required = service(bert_dir, input={"pairs": "required"})
    alone, pair = required.handle([{"body": "a dog"}, {"body": {"text": "a", "text_pair": "b"}}])
    assert alone.status == 400 and "sentence pairs" in alone.body["error"]["message"]
    assert pair.status == 200
    never = service(bert_dir, input={"pairs": "never"})
    (pair,) = never.handle([{"body": {"text": "a", "text_pair": "b"}}])
    assert pair.status == 400 and "not text_pair" in pair.body["error"]["message"]


def test_a_model_output_without_logits_fails_at_load_naming_the_key(bert_dir):
    with pytest.raises(ConfigError, match=r"handler\.output: .*no entry 'scores'"):
        service(bert_dir, output="scores")


def test_the_model_inputs_follow_its_forward_signature(tmp_path):
    folder = text_model_dir("distilbert", tmp_path)
    svc = service(folder)
    batch = svc.decoder.batch([svc.decoder.decode("the cat").samples])
    assert set(batch) == {"input_ids", "attention_mask"}  # DistilBERT takes no token types
    assert isinstance(batch["input_ids"], torch.Tensor)


class BagOfWords(torch.nn.Module):
    """An eager model of one's own that takes a tokenizer's output as keyword arguments."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))


def test_an_eager_model_takes_text_with_a_tokenizer_shipped_beside_it(tmp_path):
    tok = tokenizer("bert")
    tok.save_pretrained(tmp_path)  # what --extra-files puts at the archive root
    model = BagOfWords(len(tok)).double().eval()
    config = parse_handler_config({"input": {"kind": "text"}})
    svc = GradNormService(model, config, text=load_text_encoder(tmp_path, model, config))
    svc.warm_up()
    assert svc.scorer.backend == "fast"
    texts = ["the cat sat on the mat", "a dog"]
    replies = svc.handle([{"body": t} for t in texts])
    for text, reply in zip(texts, replies):
        alone = {k: v for k, v in tok(text, return_tensors="pt").items() if k != "token_type_ids"}
        logits = model(**alone)
        loss = -torch.log_softmax(logits, -1).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected = -sum(float(g.square().sum()) for g in grads)
        assert reply.body["ood"]["score"] == pytest.approx(expected, rel=1e-6)


BODIES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    st.fixed_dictionaries(
        {"text": st.one_of(st.text(max_size=60), st.integers(), st.none())},
        optional={"text_pair": st.one_of(st.text(max_size=60), st.binary(max_size=8))},
    ),
    st.fixed_dictionaries(
        {"instances": st.lists(st.one_of(st.text(max_size=30), st.floats()), max_size=70)}
    ),
)


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODIES)
def test_any_body_is_tokenized_or_refused_with_a_4xx(bert, body):
    try:
        decoded = bert.decoder.decode(body)
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message
        return
    batch = bert.decoder.batch([decoded.samples])
    assert batch["input_ids"].shape[0] == len(decoded.samples) >= 1
    assert batch["input_ids"].shape[1] <= bert.decoder.text.max_length


def test_a_tokenizer_without_a_padding_token_is_a_config_error(tmp_path):
    import transformers

    vocab, merges = bpe_vocab(["<|endoftext|>"])
    tok = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)  # GPT-2 has no pad token
    tok.save_pretrained(tmp_path)
    model = BagOfWords(len(tok))
    config = parse_handler_config({"input": {"kind": "text"}})
    with pytest.raises(ConfigError, match=r"handler\.input\.kind: .*no padding token"):
        load_text_encoder(tmp_path, model, config)
