"""Figures the README and samples/digits/README.md quote about the demo model, recomputed
from the committed files (the calibration and answer figures: tests/test_calibration.py and
tests/test_server.py; the saturated-logit ones: tests/test_saturation.py)."""

import json
import re

import numpy as np
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
