"""Model outputs and mapping inputs: where the logits are, and model(**inputs) batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.outputs import OutputError, logits_of

BACKENDS = ("fast", "vmap", "loop")


class Returns(nn.Module):
    """A linear classifier whose forward wraps its logits in ``wrap``."""

    def __init__(self, wrap) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4, 3).double()
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.head(x))


class KeywordModel(nn.Module):
    """Token ids and a mask as keyword arguments; masked tokens do not count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6, padding_idx=0)
        self.ff = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.ff(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"logits": self.head((h * mask).sum(1) / mask.sum(1))}


def test_logits_are_taken_from_a_tensor_a_tuple_a_mapping_or_a_model_output():
    from transformers.modeling_outputs import SequenceClassifierOutput

    z = torch.randn(2, 3)
    assert logits_of(z) is z
    assert logits_of((z, torch.zeros(1))) is z
    assert logits_of([z]) is z
    assert logits_of({"hidden": torch.zeros(2, 8), "logits": z}) is z
    assert logits_of(SequenceClassifierOutput(logits=z)) is z


def test_an_output_key_or_index_names_other_logits():
    z = torch.randn(2, 3)
    assert logits_of({"scores": z}, "scores") is z
    assert logits_of((torch.zeros(2, 8), z), 1) is z
    x = torch.randn(5, 4, dtype=torch.float64)
    plain = GradNormScorer(Returns(lambda z: z))(x)
    keyed = GradNormScorer(Returns(lambda z: {"scores": z}), output="scores")(x)
    indexed = GradNormScorer(Returns(lambda z: (z.detach() * 0, z)), output=1)(x)
    for r in (keyed, indexed):
        torch.testing.assert_close(r.ood_score, plain.ood_score, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ("auto", *BACKENDS))
def test_a_model_output_without_logits_is_an_error_naming_the_key(backend):
    scorer = GradNormScorer(Returns(lambda z: {"scores": z}), backend=backend)
    with pytest.raises(OutputError, match="no 'logits'.*scores"):
        scorer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(OutputError, match="no entry 'probs'"):
        GradNormScorer(Returns(lambda z: {"scores": z}), output="probs")(
            torch.randn(2, 4, dtype=torch.float64)
        )


def test_an_output_key_that_is_not_a_key_or_index_is_refused_at_construction():
    with pytest.raises(ValueError, match="output must be"):
        GradNormScorer(Returns(lambda z: z), output=-1)


def _keyword_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0], [1, 2, 3, 9], [8, 0, 0, 0], [2, 2, 5, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_scores_a_mapping_batch_like_each_sample_alone(backend):
    model = KeywordModel().double()
    batch = _keyword_batch()
    result = GradNormScorer(model, backend=backend, per_layer=True)(batch)
    assert result.logits.shape == (5, 3)
    for i in range(5):
        length = int(batch["attention_mask"][i].sum())
        alone = {k: v[i : i + 1, :length] for k, v in batch.items()}  # unpadded
        one = GradNormScorer(model, backend="loop")(alone)
        torch.testing.assert_close(result.ood_score[i : i + 1], one.ood_score, rtol=1e-6, atol=0)
        torch.testing.assert_close(result.logits[i : i + 1], one.logits, rtol=1e-6, atol=0)


def test_micro_batches_split_every_tensor_of_a_mapping():
    model = KeywordModel().double()
    whole = GradNormScorer(model)(_keyword_batch())
    chunked = GradNormScorer(model, micro_batch_size=2)(_keyword_batch())
    torch.testing.assert_close(chunked.ood_score, whole.ood_score, rtol=1e-10, atol=0)


def test_out_of_memory_halving_splits_a_mapping_batch(monkeypatch):
    model = KeywordModel().double()
    scorer = GradNormScorer(model, backend="fast")
    backend = scorer._candidates[0]
    seen: list[int] = []
    real = type(backend).__call__

    def small_memory(self, x):
        seen.append(len(x["input_ids"]))
        if len(x["input_ids"]) > 2:
            raise torch.OutOfMemoryError("fake")
        return real(self, x)

    monkeypatch.setattr(type(backend), "__call__", small_memory)
    result = scorer(_keyword_batch())
    assert scorer.micro_batch_size == 2 and seen[:2] == [5, 2]
    expected = GradNormScorer(model, backend="loop")(_keyword_batch())
    torch.testing.assert_close(result.ood_score, expected.ood_score, rtol=1e-8, atol=0)


def test_tensors_of_a_mapping_that_disagree_on_the_batch_size_are_refused():
    batch = _keyword_batch()
    batch["attention_mask"] = batch["attention_mask"][:3]
    with pytest.raises(ValueError, match="disagree"):
        GradNormScorer(KeywordModel())(batch)


class BroadcastPositions(nn.Module):
    """Position embeddings looked up with (1, T) ids and broadcast over the batch (BERT)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(10, 6)
        self.positions = nn.Embedding(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(torch.tanh(self.words(ids) + self.positions(positions)).mean(1))


def test_fast_scores_an_input_broadcast_over_the_batch_exactly():
    model = BroadcastPositions().double()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    scorer = GradNormScorer(model, per_layer=True)
    result = scorer(ids)
    assert scorer.backend == "fast" and result.ood_score.shape == (3,)
    expected = GradNormScorer(model, backend="loop", per_layer=True)(ids)
    for name in expected.per_layer:
        torch.testing.assert_close(
            result.per_layer[name], expected.per_layer[name], rtol=1e-8, atol=0
        )
