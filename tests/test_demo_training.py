"""samples/digits/train.py's seed: another seed trains another model on the same split (what
bench/demo_seeds.py relies on to show how much of the demo's figures is one seed)."""

import json
import subprocess
import sys

import torch
from torchserve_harness import DIGITS


def test_another_seed_trains_other_weights_on_the_committed_split(tmp_path):
    run = subprocess.run(
        [sys.executable, str(DIGITS / "train.py"), "--out", str(tmp_path), "--seed", "1"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    split = json.loads((tmp_path / "split.json").read_text())
    assert split == json.loads((DIGITS / "split.json").read_text())
    trained = torch.load(tmp_path / "digits_cnn.pt", weights_only=True)
    committed = torch.load(DIGITS / "digits_cnn.pt", weights_only=True)
    assert trained.keys() == committed.keys()
    assert not torch.equal(trained["head.weight"], committed["head.weight"])
    accuracy = float(run.stdout.split("test accuracy")[1].split()[0])
    assert accuracy >= 0.97
