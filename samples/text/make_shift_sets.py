"""Text sets to evaluate the sample sentiment model as samples/make_demo_data.py does the
digits: generated reviews to fit on and to test on, the test reviews typed differently (to
be answered as ID), and the other-topic lines of samples/text/ood as OOD. Deterministic.

    python samples/text/make_shift_sets.py --out build/text
    gradnorm-archive --model-name sentiment --hf-model samples/text/sentiment \\
        --export-path build/text
    gradnorm-eval build/text/sentiment.mar --id build/text/test \\
        --shift build/text/shift/cased --shift build/text/shift/typo \\
        --ood samples/text/ood --fit-id build/text/fit --fit-augment 8

Shifts, written independently of augment_text.py so that the augmentation is not graded on
its own perturbations: ``cased`` (a capital first letter and a final full stop, which the
model's vocabulary lacks) and ``typo`` (one letter of one word of four letters or more
replaced by any letter, not a keyboard neighbour).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_sentiment import review


def write(folder: Path, texts: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def one_typo(text: str, rng: random.Random) -> str:
    words = text.split()
    long = [i for i, w in enumerate(words) if len(w) >= 4]
    if not long:
        return text
    i = rng.choice(long)
    j = rng.randrange(1, len(words[i]))
    words[i] = words[i][:j] + rng.choice("abcdefghijklmnopqrstuvwxyz") + words[i][j + 1 :]
    return " ".join(words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    out = p.parse_args().out
    # the held-out reviews of make_sentiment.py (seeds 1000+), and others to fit on
    test = [review(random.Random(1000 + i))[0] for i in range(200)]
    write(out / "fit", [review(random.Random(5000 + i))[0] for i in range(200)])
    write(out / "test", test)
    write(
        out / "shift/cased", [t[0].upper() + t[1:] + ("" if t[-1] in ".!?" else ".") for t in test]
    )
    rng = random.Random(7)
    write(out / "shift/typo", [one_typo(t, rng) for t in test])


if __name__ == "__main__":
    main()
