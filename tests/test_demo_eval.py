"""docs/demo-eval.md is what `make eval` makes from the committed demo weights: the demo data,
the calibration (with its augmented copies) and every detector's fit are seeded, so a second
run writes the same tables byte for byte, and a stale document fails here. The same holds
for the committed output of bench/demo_feature_variants.py, which the README quotes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# one thread: the same numbers (checked), and no spinning on a loaded machine
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`make eval` into a temporary folder: the demo data, the archive and the tables."""
    out = tmp_path_factory.mktemp("demo-eval")
    run = subprocess.run(
        ["make", "-s", "-C", str(REPO), "eval", f"BIN={BIN}", "STAMP=",
         f"DEMO={out / 'demo'}", f"STORE={out / 'store'}", f"EVAL_MD={out / 'demo-eval.md'}"],
        capture_output=True, text=True, check=False, env=ONE_THREAD,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.slow
def test_make_eval_regenerates_the_committed_demo_tables(made):
    committed = (REPO / "docs/demo-eval.md").read_text()
    assert (made / "demo-eval.md").read_text() == committed, (
        "docs/demo-eval.md is stale: run `make eval` and commit it"
    )


@pytest.mark.slow
def test_demo_feature_variants_regenerates_its_committed_output(made):
    run = subprocess.run(
        [sys.executable, str(REPO / "bench/demo_feature_variants.py"),
         str(made / "store/digits.mar"), str(made / "demo")],
        capture_output=True, text=True, check=True, env=ONE_THREAD,
    )  # fmt: skip
    committed = (REPO / "bench/results/demo-feature-variants.txt").read_text()
    assert run.stdout == committed, (
        "bench/results/demo-feature-variants.txt is stale: rerun the command in bench/README.md"
    )
