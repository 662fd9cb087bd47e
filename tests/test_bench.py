"""The benchmark (bench/gradnorm_bench) end to end at tiny sizes: every implementation runs and
agrees with auto, every zoo model builds and scores, failures are rows rather than crashes,
and the README's performance block is the rendering of the committed results."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest

from gradnorm_bench import cli, impls, measure, plan, readme, report
from gradnorm_bench.impls import IMPLS, Skip
from gradnorm_bench.zoo import ZOO

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "bench.json"
    assert cli.main(["--quick", *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _by_key(result: dict) -> dict[tuple[str, str], dict]:
    return {(c["impl"], c["method"]): c for c in result["cases"]}


def test_every_implementation_runs_on_the_mlp_and_agrees_with_auto(tmp_path, capsys):
    result = _run(tmp_path, "--models", "mlp", "--impls", "all")
    cases = _by_key(result)

    for name, spec in IMPLS.items():
        for method in spec.methods if spec.per_method else ["-"]:
            case = cases[(name, method)]
            assert case["status"] == "ok", case  # pytorch-ood and BackPACK included
            assert case["median_ms"] > 0 and case["runs"] == 1 and case["peak_mb"] is not None
            if spec.check:
                assert case["check"]["ok"] and case["check"]["against"] == "auto", case
    # BackPACK has no L1 norm: its kl case is a row saying so
    assert cases[("backpack", "kl")]["status"] == "skipped"
    assert "L1" in cases[("backpack", "kl")]["reason"]

    for method in ("confounding", "kl"):
        auto = cases[("auto", method)]
        assert auto["backend"] == "fast"
        assert auto["base"] == "fwd+bwd"
        assert auto["time_vs_base"] == pytest.approx(
            auto["median_ms"] / cases[("fwd+bwd", "-")]["median_ms"]
        )
        # head-only is timed in turns with a plain forward in its own case
        head = cases[("auto-head", method)]
        paired = head["paired"]
        assert head["base"] == paired["base"] == "forward"
        assert len(paired["base_times_ms"]) == len(head["times_ms"]) == head["runs"]
        assert head["time_vs_base"] == pytest.approx(
            statistics.median(a / b for a, b in zip(head["times_ms"], paired["base_times_ms"]))
        )
    ratios = {(r["method"], r["ratio"]) for r in result["ratios"]}
    for name in ("auto/fwd+bwd", "auto-head/forward", "auto/vmap", "auto/pytorch-ood"):
        assert {("confounding", name), ("kl", name)} <= ratios
    assert ("confounding", "auto/backpack") in ratios and ("kl", "auto/backpack") not in ratios

    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["threads"] == 2 and meta["command"]
    assert meta["pytorch_ood"] and meta["backpack"]
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("# gradnorm-bench") and "| mlp |" in md
    assert "median ms" in capsys.readouterr().out


@pytest.mark.slow
def test_every_zoo_model_builds_runs_and_gets_an_auto_row(tmp_path):
    """The benchmark's side only: whether auto scores a model exactly is the engine's tests'
    job; here auto's row says ok with the backend it ran, or error with the reason."""
    argv = ["--models", "all", "--impls", "forward", "fwd+bwd", "auto", "--methods", "kl"]
    cases = _run(tmp_path, *argv)["cases"]
    assert {c["model"] for c in cases} == set(ZOO)
    for case in cases:
        if case["impl"] == "auto":
            assert case["status"] in ("ok", "error"), case
            if case["status"] == "ok":
                assert case["backend"] in ("fast", "vmap", "loop")
            else:
                assert case["reason"]
        else:
            assert case["status"] == "ok", case


def test_a_case_in_a_process_of_its_own_reports_memory_and_cpu_time(tmp_path):
    result = _run(
        tmp_path,
        "--models", "mlp", "--methods", "kl", "--impls", "auto", "pytorch-ood",
        "--isolation", "process",
    )  # fmt: skip
    for case in result["cases"]:
        assert case["status"] == "ok", case
        assert case["case_cpu_s"] > 0 and case["cpu_ms"] > 0
    assert _by_key(result)[("pytorch-ood", "kl")]["check"]["ok"]


def test_a_failing_implementation_is_an_error_row_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(model, x, method, opts):
        raise RuntimeError("broken on purpose")

    def refusing(model, x, method, opts):
        raise Skip("cannot run here")

    monkeypatch.setitem(IMPLS, "vmap", impls.ImplSpec("vmap", "broken", broken))
    monkeypatch.setitem(IMPLS, "loop", impls.ImplSpec("loop", "refusing", refusing))
    cases = _by_key(_run(tmp_path, "--models", "mlp", "--methods", "kl"))
    assert cases[("vmap", "kl")]["status"] == "error"
    assert "broken on purpose" in cases[("vmap", "kl")]["reason"]
    assert cases[("loop", "kl")]["status"] == "skipped"
    assert cases[("loop", "kl")]["reason"] == "cannot run here"
    assert cases[("auto", "kl")]["status"] == "ok"


def test_an_unimportable_library_is_a_skip_that_names_it(monkeypatch):
    real = plan.library_problem
    monkeypatch.setattr(
        plan,
        "library_problem",
        lambda m: "pytorch_ood is not importable (test)" if m == "pytorch_ood" else real(m),
    )
    args = cli.build_parser().parse_args(["--quick", "--models", "mlp"])
    args.scores_dir = None
    cli._defaults(args)
    cases = plan.plan_cases(args)
    ood = [c for c in cases if c["impl"] == "pytorch-ood"]
    assert ood and all(c["status"] == "skipped" for c in ood)
    assert all("pytorch_ood is not importable" in c["reason"] for c in ood)


def test_vmap_and_loop_run_on_the_big_models_only_when_asked():
    parser = cli.build_parser()

    def planned(*argv: str) -> dict[str, dict]:
        args = parser.parse_args(["--models", "vit-b16", "--methods", "kl", *argv])
        args.scores_dir = None
        cli._defaults(args)
        return {c["impl"]: c for c in plan.plan_cases(args)}

    default = planned()
    assert default["vmap"]["status"] == "skipped" and "--with-vmap" in default["vmap"]["reason"]
    assert default["loop"]["status"] == "skipped" and "--with-loop" in default["loop"]["reason"]
    assert "status" not in planned("--with-vmap", "--with-loop")["vmap"]
    assert "status" not in planned("--impls", "loop")["loop"]


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--models", "nope"])


def test_the_readme_table_renders_a_results_file(tmp_path):
    result = _run(tmp_path, "--models", "mlp", "--methods", "confounding")
    table = readme.render_table(result, "bench/results/x.json")
    assert "MLP 784-512-512-10" in table and "(fast)" in table
    text = f"intro\n{readme.BEGIN}\nold\n{readme.END}\noutro\n"
    assert (
        readme.replace_block(text, table)
        == f"intro\n{readme.BEGIN}\n{table}\n{readme.END}\noutro\n"
    )


def test_the_readme_performance_block_is_rendered_from_the_committed_results():
    results = sorted((ROOT / "bench/results").glob("cpu-*.json"))
    results += sorted((ROOT / "bench/results").glob("gpu-*.json"))
    assert readme.main([str(ROOT / "README.md"), *map(str, results), "--check"]) == 0


def test_results_files_named_in_the_docs_are_not_ignored_by_git():
    named = set()
    for doc in ("README.md", "bench/README.md"):
        for word in (ROOT / doc).read_text().replace("(", " ").replace(")", " ").split():
            word = word.strip("`[],.:;")
            if word.startswith("bench/results/") and "*" not in word and "<" not in word:
                named.add(word)
    assert named
    for path in sorted(named):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 1, f"{path} is named in the docs but ignored by git"


def test_targets_are_judged_from_the_run_and_a_failed_auto_misses_them():
    def case(impl, method, ms, mb=100.0, **extra):
        return {"model": "vit-b16", "method": method, "impl": impl, "status": "ok",
                "median_ms": ms, "peak_mb": mb, **extra}  # fmt: skip

    cases = [
        case("forward", "-", 10.0),
        case("fwd+bwd", "-", 30.0),
        case("auto", "confounding", 36.0, 140.0, backend="fast"),
        case("auto-head", "confounding", 12.0),
        {"model": "vit-b16", "method": "kl", "impl": "auto", "status": "error", "reason": "x"},
        # timed in turns with a forward in its own case: that ratio, not 12 / 10, is judged
        case("auto-head", "kl", 12.0, paired={"base": "forward", "time_ratio": 1.05}),
        case("auto", "confounding", 1.0, model="mlp"),  # toys have no targets
    ]
    targets = report.evaluate_targets(cases, report.compute_ratios(cases), quick=False)
    got = {(t["method"], t["target"]): (t["value"], t["met"]) for t in targets}
    assert {t["model"] for t in targets} == {"vit-b16"}
    assert got[("confounding", "auto runs the fast path")] == ("fast", True)
    assert got[("confounding", "auto <= 1.3x forward+backward")] == (pytest.approx(1.2), True)
    assert got[("confounding", "auto peak memory <= 1.5x forward+backward's")][1] is True
    assert got[("confounding", "head-only <= 1.1x plain forward")] == (pytest.approx(1.2), False)
    assert got[("kl", "auto runs the fast path")] == ("error", False)
    assert got[("kl", "head-only <= 1.1x plain forward")] == (pytest.approx(1.05), True)


def test_a_paired_case_times_its_base_in_turns_for_at_least_three_rounds():
    order: list[str] = []
    durations = {"impl": 5000.0, "base": 4000.0}  # ms: one impl run alone passes the budget

    class Memory:
        def reset_peak(self) -> None:
            order.append("reset")

        def peak_mb(self) -> float:
            return {"impl": 7.0, "base": 99.0}[order[-1]]

    def prepared(name: str):
        return impls.Prepared(lambda: order.append(name))

    def timed(run) -> float:
        run()
        return durations[order[-1]]

    impl, base = prepared("impl"), prepared("base")
    case = {"repeats": 5}
    runs = measure._timed_runs(impl, base, case, 6.0, Memory(), timed)

    assert [o for o in order if o != "reset"] == ["base", "impl", "impl", "base", "base", "impl"]
    assert runs.times == [5000.0] * 3 and runs.base_times == [4000.0] * 3
    assert runs.peak_mb == 7.0  # the base's own peak does not count
    alone = measure._timed_runs(impl, None, case, 6.0, Memory(), timed)
    assert len(alone.times) == 2 and alone.base_times == [] and alone.peak_mb is None
