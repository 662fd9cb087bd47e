"""Figures the README and samples/digits/README.md quote about the demo model, recomputed
from the committed files (the calibration and answer figures: tests/test_calibration.py and
tests/test_server.py; the saturated-logit ones: tests/test_saturation.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torchserve_harness import DIGITS, REPO, load_demo_model

README = " ".join((REPO / "README.md").read_text().split())


def quoted(text: str) -> str:
    return " ".join(text.split())


def test_the_demo_models_accuracy_is_the_one_quoted():
    # python samples/digits/train.py --out DIR retrains these weights bit for bit and prints it
    digits = load_digits()
    split = json.loads((DIGITS / "split.json").read_text())
    model = load_demo_model()
    spec = (DIGITS / "model.py").read_text()
    mean = float(re.search(r"^MEAN = ([0-9.]+)", spec, re.M).group(1))
    std = float(re.search(r"^STD = ([0-9.]+)", spec, re.M).group(1))
    samples_readme = quoted((DIGITS / "README.md").read_text())
    for part in ("val", "test"):
        idx = np.array(split[part])
        x = (torch.as_tensor(digits.images[idx], dtype=torch.float32)[:, None] / 16.0 - mean) / std
        with torch.no_grad():
            correct = int((model(x).argmax(1).numpy() == digits.target[idx]).sum())
        accuracy = 100 * correct / len(idx)
        assert f"| {part} | {accuracy:.2f} % ({correct}/{len(idx)}) |" in samples_readme
        if part == "test":
            assert f"({accuracy:.1f} % test accuracy;" in README


@pytest.mark.slow
def test_the_text_shift_figures_are_the_ones_quoted(tmp_path):
    # the commands of samples/text/make_shift_sets.py's docstring, as the README gives them
    def run(*argv):
        made = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, check=False,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # the same numbers on any machine
        )  # fmt: skip
        assert made.returncode == 0, made.stderr[-3000:]

    bin_dir, out = Path(sys.executable).parent, tmp_path / "text"
    run(sys.executable, REPO / "samples/text/make_shift_sets.py", "--out", out)
    run(bin_dir / "gradnorm-archive", "--model-name", "sentiment", "--hf-model",
        REPO / "samples/text/sentiment", "--export-path", out)  # fmt: skip
    run(bin_dir / "gradnorm-eval", out / "sentiment.mar", "--id", out / "test",
        "--shift", out / "shift/cased", "--shift", out / "shift/typo",
        "--ood", REPO / "samples/text/ood", "--fit-id", out / "fit", "--fit-augment", "8",
        "--json", out / "eval.json")  # fmt: skip
    rows = json.loads((out / "eval.json").read_text())["rows"]
    share = {(r["detector"], r["set"]): f"{100 * r['flagged']:.1f} %" for r in rows}
    plain, augmented = "mahalanobis, ID only", "mahalanobis"
    assert (
        f"flags {share[plain, 'cased']} of the cased and {share[plain, 'typo']} of the "
        f"mistyped reviews; fitted with 8 perturbed copies of each, {share[augmented, 'cased']} "
        f"and {share[augmented, 'typo']} (`predicted_mahalanobis`: "
        f"{share['predicted_mahalanobis', 'cased']} and {share['predicted_mahalanobis', 'typo']}"
        f", {share['predicted_mahalanobis', 'test']} of the test reviews)"
    ) in README
    assert share["predicted_mahalanobis", "ood"] == "100.0 %"


WORDS = "none one two three four five six seven eight nine ten".split()
SEED_ROW = (  # seed, accuracy, id_test, worst shift, fewest far, fewest near, targets met, any
    # threshold
    r"^ +(\d) +([\d.]+) +[\d.]+ +\w+ +([\d.]+) +(\w+) +([\d.]+) +\w+ +[\d.]+"
    r" +(yes|NO) +(yes|NO) +(yes|NO) +(yes|NO)"
)


def above_both(row: str) -> list[bool]:
    """Per far-OOD set of an AUROC row (three numbers, then '*' when the first is highest)."""
    tokens, marks = row.split()[1:], []
    while tokens:
        tokens = tokens[3:]
        marks.append(bool(tokens) and tokens[0] == "*")
        tokens = tokens[1:] if marks[-1] else tokens
    return marks


def test_the_seed_study_figures_are_the_committed_outputs():
    # bench/results/demo-seeds.txt, from the command in bench/README.md (about 8 minutes)
    text = (REPO / "bench/results/demo-seeds.txt").read_text()
    rows = re.findall(SEED_ROW, text, re.M)
    assert [int(row[0]) for row in rows] == list(range(10))
    assert rows[0][5:] == ("yes", "yes", "yes", "yes")
    assert all(row[8] == "NO" for row in rows[1:])
    others = rows[1:]
    accuracy = [100 * float(row[1]) for row in rows]
    far = [float(row[4]) for row in others]
    far_kinds = [row[3] for row in others]
    moved = [float(row[2]) for row in others if row[5] == "NO"]
    assert all(row[6] == "NO" for row in others)
    assert f"test accuracy {min(accuracy):.1f}-{max(accuracy):.0f} %" in README
    letters, noise = (WORDS[far_kinds.count(kind)] for kind in ("letters", "noise"))
    assert (
        f"flags only {min(far):.1f}-{max(far):.1f} % of the least-flagged far-OOD set (letters "
        f"for {letters} seeds, noise for {noise})"
    ) in README
    assert (
        f"more than 7 % of the moved digits for {WORDS[len(moved)]} "
        f"(19 to 33 of 270, {min(moved):.1f}-{max(moved):.1f} %)"
    ) in README
    assert round(min(moved) * 2.7) == 19 and round(max(moved) * 2.7) == 33
    gaps = re.findall(
        r"^ +\d +[\d.]+ - [\d.]+ = ([-+][\d.]+) \([-+][\d.]+ to ([-+][\d.]+)\)", text, re.M
    )
    behind = [-float(gap[0]) for gap in gaps[1:]]
    assert all(float(gap[1]) < 0 for gap in gaps[1:])
    assert f"trails energy's by {min(behind):.3f} to {max(behind):.3f}" in README
    table = text.split("(* above both)")[1].split("letters AUROC")[0]
    marks = [above_both(row) for row in re.findall(r"^ +\d +[\d.].*$", table, re.M)][1:]
    assert len(marks) == 9 and all(photos for _, _, photos in marks)
    assert f"on noise for {WORDS[sum(noise for _, noise, _ in marks)]} of the nine" in README
    assert text.count("corner: none") == 10
    assert "The frontier reaches the corner for none of the ten." in README


def test_the_frontier_figures_are_the_committed_outputs():
    # bench/results/demo-feature-variants.txt, which tests/test_demo_eval.py regenerates
    text = (REPO / "bench/results/demo-feature-variants.txt").read_text()
    points = {
        name: (float(a), float(b), shift, float(s), far, float(f))
        for name, a, b, shift, s, far, f in re.findall(
            r"^(re-render weight [\d.]+|energy blend [\d.]+) +([\d.]+) +([\d.]+) +(\w+) +([\d.]+)"
            r" +(\w+) +([\d.]+)",
            text,
            re.M,
        )  # fmt: skip
    }
    first, last = points["re-render weight 0"], points["re-render weight 30"]
    assert f"takes letters from AUROC {first[0]:.4f} down to {last[0]:.4f}" in README
    assert (first[2], last[2]) == ("contrast", "translate")
    assert f"falls from {first[3]:.1f} % (low contrast) to {last[3]:.1f} % (moved digits)" in README
    blends = [
        v for k, v in points.items() if k.startswith("energy blend") and k != "energy blend 0"
    ]
    letters = [b[0] for b in blends]
    moved = [b[3] for b in blends]
    assert all(b[2] == "translate" for b in blends)
    assert f"lifts letters to {min(letters):.4f}-{max(letters):.4f}" in README
    assert f"moved digits rise to {min(moved):.1f}-{max(moved):.1f} %" in README
    assert points["energy blend 1"][4] == "noise"
    assert f"noise falls to {points['energy blend 1'][5]:.1f} % at weight 1" in README
    assert "corner reached by: none" in text
