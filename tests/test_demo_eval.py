"""docs/demo-eval.md is what `make eval` makes from the committed demo weights: the demo data,
the calibration (with its augmented copies) and every detector's fit are seeded, so a second
run writes the same tables byte for byte, and a stale document fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_make_eval_regenerates_the_committed_demo_tables(tmp_path):
    regenerated = tmp_path / "demo-eval.md"
    made = subprocess.run(
        ["make", "-s", "-C", str(REPO), "eval", f"BIN={BIN}", "STAMP=",
         f"DEMO={tmp_path / 'demo'}", f"STORE={tmp_path / 'store'}", f"EVAL_MD={regenerated}"],
        capture_output=True, text=True, check=False,
        # one thread: the same numbers (checked), and no spinning on a loaded machine
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    committed = (REPO / "docs/demo-eval.md").read_text()
    assert regenerated.read_text() == committed, (
        "docs/demo-eval.md is stale: run `make eval` and commit it"
    )
