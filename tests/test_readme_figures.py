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
