"""gradnorm-bench end to end on the tiny MLP (--quick): every implementation is timed,
its scores agree with the fast backend, and the ratios are written."""

from __future__ import annotations

import importlib.util
import json

import pytest

from torchserve_gradnorm.cli import bench

HAVE = {m: importlib.util.find_spec(m) is not None for m in ("pytorch_ood", "backpack")}


def _ok(cases, impl, method=None):
    return [
        c
        for c in cases
        if c["impl"] == impl and (method is None or c["method"] == method) and c["status"] == "ok"
    ]


def test_quick_mlp_writes_every_implementation(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--models", "mlp", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cases = result["cases"]

    for impl, spec in bench.IMPLS.items():
        missing_lib = [m for m in spec.needs if not HAVE.get(m, True)]
        if missing_lib:
            skipped = [c for c in cases if c["impl"] == impl]
            assert skipped and all(c["status"] == "skipped" for c in skipped)
            assert all(missing_lib[0] in c["reason"].lower() for c in skipped)
            continue
        methods = ["-"] if not spec.per_method else list(spec.methods)
        for method in methods:
            (case,) = _ok(cases, impl, method)
            assert case["median_ms"] > 0 and all(t > 0 for t in case["times_ms"])
            assert case["peak_mb"] is not None
            if spec.check:
                assert case["check"]["ok"], case["check"]

    # BackPACK has no L1 norm: the kl case is listed as skipped, with a reason
    (bp_kl,) = [c for c in cases if c["impl"] == "backpack" and c["method"] == "kl"]
    assert bp_kl["status"] == "skipped" and bp_kl["reason"]

    ratios = {(r["method"], r["ratio"]): r for r in result["ratios"]}
    wanted = ["fast/fwd+bwd", "fast-head/forward", "fast/vmap"]
    wanted += ["fast/pytorch-ood"] if HAVE["pytorch_ood"] else []
    for name in wanted:
        for method in ("confounding", "kl"):
            assert ratios[(method, name)]["time"] > 0
    if HAVE["backpack"]:
        assert ratios[("confounding", "fast/backpack")]["time"] > 0
        assert ("kl", "fast/backpack") not in ratios

    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["threads"] == 2 and meta["torch"]
    assert meta["device_name"] and meta["date"]
    assert out.with_suffix(".md").read_text().startswith("# gradnorm-bench")
    printed = capsys.readouterr().out
    assert "median ms" in printed and "fast/fwd+bwd" in printed


def test_subprocess_isolation_and_missing_library(tmp_path, monkeypatch):
    """The CPU default: one subprocess per case; an unimportable library is a skip."""
    real = bench._library_problem
    monkeypatch.setattr(
        bench,
        "_library_problem",
        lambda m: "pytorch_ood is not importable (test)" if m == "pytorch_ood" else real(m),
    )
    out = tmp_path / "iso.json"
    argv = ["--quick", "--models", "mlp", "--methods", "kl", "--isolation", "subprocess"]
    argv += ["--impls", "fast", "pytorch-ood", "--out", str(out)]
    assert bench.main(argv) == 0
    cases = {c["impl"]: c for c in json.loads(out.read_text())["cases"]}
    assert cases["fast"]["status"] == "ok" and cases["fast"]["median_ms"] > 0
    assert cases["pytorch-ood"]["status"] == "skipped"
    assert "not importable" in cases["pytorch-ood"]["reason"]


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--models", "nope"])
