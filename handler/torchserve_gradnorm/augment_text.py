"""Light text perturbations for calibration (``gradnorm-calibrate --augment`` on text).

The text counterpart of ``augment.py``: people type the same request with other casing,
punctuation, a typo or a word more or less, and a detector fitted on clean text alone flags
that as OOD. Each copy draws, per text, with some probability: a casing change (all lower
case, or a capital first letter), the final punctuation dropped or one added where none was,
typos in a few longer words (two neighbouring letters swapped, a letter dropped or doubled,
or a neighbouring key on a QWERTY keyboard: the natural-noise kinds of Belinkov & Bisk,
"Synthetic and Natural Noise Both Break Neural Machine Translation", ICLR 2018), a word
dropped and two neighbouring words swapped (random deletion and swap, at a lower rate than
Wei & Zou's "EDA", EMNLP 2019). Nothing reads a dictionary (words are split at spaces;
other letters than a-z get the other typo kinds); everything is seeded, so a calibration is
reproducible. The perturbations are light
on purpose: a word dropped can still flip a sentence's meaning ("not"), and a rate that
rewrites texts would teach the detector to accept what it should flag.
"""

from __future__ import annotations

import numpy as np

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
KEY_NEIGHBOURS = {
    key: "".join(
        _ROWS[r][c]
        for r in range(max(0, row - 1), min(len(_ROWS), row + 2))
        for c in (col - 1, col, col + 1)
        if (r, c) != (row, col) and 0 <= c < len(_ROWS[r])
    )
    for row, keys in enumerate(_ROWS)
    for col, key in enumerate(keys)
}
"""Keys next to each letter key (same row, and the rows above and below, same columns)."""

TYPO_RATE = 0.08
"""Share of words of four or more letters that get one typo."""
DROP_RATE = 0.05
"""Share of words dropped (texts of four words or more, never all)."""
ENDINGS = (".", "!", "?")


def typo(word: str, rng: np.random.Generator) -> str:
    """One typo inside ``word`` (its first letter kept, as people rarely mistype it)."""
    i = int(rng.integers(1, len(word)))
    kind = int(rng.integers(4))
    if kind == 0 and i < len(word) - 1 and word[i] != word[i + 1]:  # neighbours swapped
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind <= 1:  # dropped (also a swap that would change nothing)
        return word[:i] + word[i + 1 :]
    if kind == 2:  # doubled
        return word[: i + 1] + word[i:]
    near = KEY_NEIGHBOURS.get(word[i].lower())
    if not near:
        return word[: i + 1] + word[i:]
    key = near[int(rng.integers(len(near)))]
    return word[:i] + (key.upper() if word[i].isupper() else key) + word[i + 1 :]


def _words(words: list[str], rng: np.random.Generator) -> list[str]:
    words = [typo(w, rng) if len(w) >= 4 and rng.random() < TYPO_RATE else w for w in words]
    if len(words) >= 4:
        kept = [w for w in words if rng.random() >= DROP_RATE]
        words = kept or words
    if len(words) >= 2 and rng.random() < 0.1:
        i = int(rng.integers(len(words) - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


def augment_text(text: str, rng: np.random.Generator) -> str:
    """One randomly perturbed copy of ``text`` (never empty when ``text`` is not)."""
    words = _words(text.split(), rng)
    if not words:
        return text
    out = " ".join(words)
    casing = rng.random()
    if casing < 0.2:
        out = out.lower()
    elif casing < 0.4:
        out = out[0].upper() + out[1:]
    if rng.random() < 0.3:  # the final punctuation dropped, or one added where none was
        if out[-1] in ENDINGS:
            out = out[:-1].rstrip() or out
        else:
            out += ENDINGS[int(rng.integers(len(ENDINGS)))]
    return out


def augmented_texts(
    text: str, text_pair: str | None, copies: int, seed: int | tuple[int, ...]
) -> list[tuple[str, str | None]]:
    """``copies`` perturbed copies of a text (and of its pair's second text, separately)."""
    rng = np.random.default_rng(seed)
    return [
        (augment_text(text, rng), None if text_pair is None else augment_text(text_pair, rng))
        for _ in range(copies)
    ]
