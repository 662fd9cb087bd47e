"""Hugging Face classifiers in the engine: scores of a padded batch equal each sample scored
alone and unpadded by plain autograd (float64, rtol 1e-6)."""

from __future__ import annotations

import pytest
import torch

from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.config import InputConfig, LimitsConfig
from torchserve_gradnorm.text import Text, TextEncoder

from hf_models import TEXT_MODELS, autograd_reference, text_classifier, tokenizer, vit_classifier

TEXTS = ["the cat sat on the mat", "a dog", "i liked it but not the film", "bad", "good movie"]


@pytest.mark.parametrize("kind", TEXT_MODELS)
def test_a_padded_batch_scores_every_text_as_if_it_were_alone_and_unpadded(kind):
    tok = tokenizer(kind)
    model = text_classifier(kind, len(tok), tok.pad_token_id)
    batch = dict(tok(TEXTS, padding="longest", return_tensors="pt"))
    assert (batch["attention_mask"] == 0).any(), "the batch should hold padding"
    result = GradNormScorer(model)(batch)
    for i, text in enumerate(TEXTS):
        logits, score = autograd_reference(model, dict(tok([text], return_tensors="pt")))
        torch.testing.assert_close(result.logits[i], logits, rtol=1e-6, atol=0)
        assert result.ood_score[i].item() == pytest.approx(score, rel=1e-6)


@pytest.mark.parametrize("kind", TEXT_MODELS)
def test_the_served_text_batches_are_scored_exactly_on_the_fast_backend(kind):
    # the handler's padding gives every text a masked position, so that transformers takes
    # the same mask branch for all of them and fast can score them together
    tok = tokenizer(kind)
    model = text_classifier(kind, len(tok), tok.pad_token_id)
    encoder = TextEncoder(tok, InputConfig(kind="text"), LimitsConfig())
    batch = encoder.pad([dict(tok(text)) for text in TEXTS])
    scorer = GradNormScorer(model)
    result = scorer(batch)
    assert scorer.backend == "fast"
    for i, text in enumerate(TEXTS):
        logits, score = autograd_reference(model, dict(tok([text], return_tensors="pt")))
        torch.testing.assert_close(result.logits[i], logits, rtol=1e-6, atol=0)
        assert result.ood_score[i].item() == pytest.approx(score, rel=1e-6)


@pytest.mark.parametrize("kind", TEXT_MODELS)
def test_a_batch_holding_a_text_truncated_to_max_length_stays_exact_on_fast(kind):
    tok = tokenizer(kind)
    model = text_classifier(kind, len(tok), tok.pad_token_id)
    encoder = TextEncoder(
        tok, InputConfig(kind="text", max_length=6, truncation=True), LimitsConfig()
    )
    long_text = "the cat sat on the mat and then it slept for a long while"
    samples = [encoder.tokenize(Text(t)) for t in (long_text, "bad")]
    assert len(samples[0]["input_ids"]) == 6, "the long text should be truncated"
    scorer = GradNormScorer(model)
    result = scorer(encoder.pad(samples))
    assert scorer.backend == "fast"
    for i, sample in enumerate(samples):
        alone = {name: torch.tensor([ids]) for name, ids in sample.items()}
        logits, score = autograd_reference(model, alone)
        torch.testing.assert_close(result.logits[i], logits, rtol=1e-6, atol=0)
        assert result.ood_score[i].item() == pytest.approx(score, rel=1e-6)


def test_a_vision_transformer_scores_every_picture_as_if_it_were_alone():
    model = vit_classifier()
    pictures = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    result = GradNormScorer(model)(pictures)
    for i in range(3):
        logits, score = autograd_reference(model, {"pixel_values": pictures[i : i + 1]})
        torch.testing.assert_close(result.logits[i], logits, rtol=1e-6, atol=0)
        assert result.ood_score[i].item() == pytest.approx(score, rel=1e-6)
