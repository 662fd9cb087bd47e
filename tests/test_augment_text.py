"""Text augmentation for calibration: light, seeded perturbations of every text of a folder,
tokenized as the server tokenizes requests."""

from __future__ import annotations

import json
import string

import numpy as np

from torchserve_gradnorm.augment_text import (
    KEY_NEIGHBOURS,
    augment_text,
    augmented_texts,
    typo,
)
from torchserve_gradnorm.codecs import RequestDecoder
from torchserve_gradnorm.config import InputConfig, LimitsConfig
from torchserve_gradnorm.datasets import augmented_samples, iter_folder
from torchserve_gradnorm.text import TextEncoder

from hf_models import WORDS, tokenizer

SENTENCES = [
    "the central bank raised interest rates by half a point",
    "I enjoyed this story , it was wonderful!",
    "error 404 : page not found",
    "preheat the oven and whisk two eggs with sugar",
]


def edits(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of
    neighbouring letters, one each."""
    d = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    d[:, 0], d[0, :] = range(len(a) + 1), range(len(b) + 1)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i, j] = min(
                d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (a[i - 1] != b[j - 1])
            )
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i, j] = min(d[i, j], d[i - 2, j - 2] + 1)
    return int(d[-1, -1])


def test_a_typo_is_one_edit_away_and_keeps_the_first_letter():
    rng = np.random.default_rng(0)
    for word in ["wonderful", "bank", "Interest", "zzzz", "1234", "eggs"] * 20:
        mistyped = typo(word, rng)
        assert mistyped[0] == word[0]
        assert edits(word, mistyped) == 1


def test_keyboard_neighbours_are_mutual_and_never_the_key_itself():
    assert set(KEY_NEIGHBOURS) == set(string.ascii_lowercase)
    for key, near in KEY_NEIGHBOURS.items():
        assert key not in near and near
        assert all(key in KEY_NEIGHBOURS[n] for n in near)


def test_copies_are_reproducible_from_their_seed():
    assert augmented_texts(SENTENCES[0], None, 5, (0, 1)) == augmented_texts(
        SENTENCES[0], None, 5, (0, 1)
    )
    assert augmented_texts(SENTENCES[0], None, 5, (0, 1)) != augmented_texts(
        SENTENCES[0], None, 5, (0, 2)
    )


def test_copies_change_many_texts_but_keep_most_of_each():
    rng = np.random.default_rng(1)
    changed, kept = 0, []
    for _ in range(200):
        for sentence in SENTENCES:
            copy = augment_text(sentence, rng)
            assert copy.strip()
            changed += copy != sentence

            def words(text):
                return {w.strip(".!?").lower() for w in text.split()} - {""}

            kept.append(len(words(copy) & words(sentence)) / len(words(sentence)))
    assert changed > 0.5 * 200 * len(SENTENCES)
    assert np.mean(kept) > 0.9 and min(kept) >= 0.5


def test_both_texts_of_a_pair_are_perturbed_and_a_single_text_stays_single():
    pairs = augmented_texts("a man plays a guitar", "a person makes music", 20, 0)
    assert all(pair is not None for _, pair in pairs)
    assert len({pair for _, pair in pairs}) > 1
    assert all(pair is None for _, pair in augmented_texts("a dog", None, 3, 0))


def text_decoder() -> RequestDecoder:
    tok = tokenizer("bert")
    encoder = TextEncoder(tok, InputConfig(kind="text"), LimitsConfig())
    return RequestDecoder(InputConfig(kind="text"), LimitsConfig(), text=encoder)


def test_a_text_folder_gets_tokenized_copies_of_every_txt_and_jsonl_text(tmp_path):
    vocabulary = " ".join(WORDS[:12])
    (tmp_path / "a.txt").write_text(vocabulary)
    lines = [{"text": " ".join(WORDS[3:9])}, {"text": "the cat", "text_pair": " ".join(WORDS[:6])}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    decoder = text_decoder()
    originals = [s for part in iter_folder(tmp_path, decoder) for s in part]
    copies = augmented_samples(tmp_path, decoder, copies=4)
    assert len(copies) == 4 * len(originals) == 12
    assert copies == augmented_samples(tmp_path, decoder, copies=4)
    ids = [tuple(c["input_ids"]) for c in copies]
    assert len(set(ids)) > 3  # not every copy the same
    # the pair's copies keep two segments, as the original pair's tokens do
    assert all(max(c["token_type_ids"]) == 1 for c in copies[8:])
    assert all(max(c["token_type_ids"]) == 0 for c in copies[:8])
