"""The command line: ``python -m gradnorm_bench`` (``make bench``, ``bench/run_gpu.sh``)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import environment
from .impls import IMPLS, METHOD_CHOICES
from .isolation import ISOLATIONS, CaseRunner, wait_for_quiet_cpu
from .measure import CONTENDED, check_rtol
from .plan import plan_cases, reusable_results, reuse_key
from .report import (
    add_base_ratios,
    check_text,
    compute_ratios,
    contended,
    evaluate_targets,
    format_markdown,
    format_ratio_lines,
    format_target_lines,
    format_text_table,
)
from .zoo import ZOO


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gradnorm_bench",
        description="Time and peak memory of per-sample gradient-norm scoring on a model zoo: "
        "GradNormScorer (auto, and the named backends) against pytorch-ood, BackPACK and "
        "plain forward / forward+backward passes.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--models",
        nargs="+",
        help=f"of {', '.join(ZOO)}, or all (default: all but "
        + ", ".join(n for n, s in ZOO.items() if not s.default)
        + ")",
    )
    p.add_argument("--methods", nargs="+", help=f"of {', '.join(METHOD_CHOICES)} (default both)")
    p.add_argument(
        "--impls",
        nargs="+",
        help=f"of {', '.join(IMPLS)}, or all (default: all but "
        + ", ".join(n for n, s in IMPLS.items() if not s.default)
        + "; vmap and loop only where affordable unless named here)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs, at most (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 1)")
    p.add_argument(
        "--case-budget-s",
        type=float,
        default=6.0,
        help="stop a case's timed runs once they took this long in total (default 6; at "
        "least one run always); a case whose warm-up call alone takes longer is measured by "
        "that one call (runs: cold)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--with-loop", action="store_true", help="also time loop on the big models")
    p.add_argument("--with-vmap", action="store_true", help="also time vmap on the big models")
    p.add_argument(
        "--ood-micro-batch",
        type=int,
        default=None,
        help="micro_batch_size for pytorch-ood's GradNorm (default: the library's, 32)",
    )
    p.add_argument("--no-check", action="store_true", help="do not compare norms with auto's")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (for tests)")
    p.add_argument(
        "--isolation",
        choices=ISOLATIONS,
        default="auto",
        help="auto: a fresh process per case on CPU (clean peak RSS), in-process on CUDA and "
        "with --quick",
    )
    p.add_argument(
        "--retry-contended",
        type=int,
        default=None,
        metavar="N",
        help="CPU: rerun a case up to N times while other processes competed for the CPU "
        "during its timed runs, keeping the least contended run (default 1; quick 0)",
    )
    p.add_argument(
        "--keep-from",
        type=Path,
        metavar="JSON",
        help="reuse the uncontended ok cases of an earlier run's JSON (same model, batch, "
        "method, impl, device, threads, repeats); run only the others",
    )
    p.add_argument(
        "--case-timeout", type=float, default=300, help="seconds per case's process (default 300)"
    )
    p.add_argument(
        "--time-limit-min",
        type=float,
        default=None,
        help="start no case after this many minutes; the rest are listed as not run (cases "
        "run plain passes and auto first, then head-only, then the references, vmap and loop)",
    )
    p.add_argument(
        "--profile",
        type=int,
        metavar="ROWS",
        default=0,
        help="instead of the timing table, torch.profiler every case and print its top ROWS ops",
    )
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/latest-<dev>.json)")
    return p


def profile_case(case: dict, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    from .zoo import build_model

    torch.set_num_threads(case["threads"])
    spec = ZOO[case["model"]]
    device = torch.device(case["device"])
    method = case["method"] if case["method"] != "-" else "confounding"
    model = build_model(spec, case["quick"], device)
    x = spec.make_input(case["batch"], case["quick"], device)
    opts = {"backpack_converter": spec.backpack_converter, "ood_micro_batch": None}
    prepared = IMPLS[case["impl"]].setup(model, x, method, opts)
    for _ in range(max(case["warmup"], 1)):
        prepared.run()
    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(case["repeats"]):
            prepared.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="gradnorm-bench-") as scores_dir:
            args.scores_dir = scores_dir
            return _bench(args, sys.argv[1:] if argv is None else list(argv))
    finally:  # called in-process (tests): leave the caller's thread count as it was
        torch.set_num_threads(threads)


def _defaults(args: argparse.Namespace) -> str | None:
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but torch.cuda.is_available() is False"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1
    if args.quick:  # one timed run of a tiny model, however busy the machine: never "cold"
        args.case_budget_s = float("inf")
    if args.retry_contended is None:
        args.retry_contended = 0 if args.quick else 1
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.case_budget_s <= 0:
        return "--repeats, --threads and --case-budget-s must be positive, --warmup >= 0"
    if args.isolation == "auto":
        args.isolation = "in-process" if args.device == "cuda" or args.quick else "process"
    return None


RUN_ORDER = {"forward": 0, "fwd+bwd": 0, "auto": 0, "auto-head": 1, "pytorch-ood": 2, "backpack": 2}
"""Which cases run first (others last): every model's plain passes and auto before the
references, so that a run cut short by --time-limit-min loses the least."""


def _run_all(args: argparse.Namespace, cases: list[dict]) -> list[dict]:
    kept = reusable_results(args.keep_from) if args.keep_from else {}
    runner = CaseRunner(args.isolation, args.case_timeout)
    results = list(cases)
    order = sorted(
        range(len(cases)),
        key=lambda i: (RUN_ORDER.get(cases[i]["impl"], 3), ZOO[cases[i]["model"]].cost),
    )
    deadline = time.monotonic() + args.time_limit_min * 60 if args.time_limit_min else None
    for i in order:
        c = cases[i]
        if c.get("status") == "skipped":
            continue
        previous = kept.get(reuse_key(c))
        if previous is not None:
            print(f"keep {c['model']} {c['method']} {c['impl']} from {args.keep_from}")
            results[i] = previous
            continue
        if deadline is not None and time.monotonic() > deadline:
            reason = f"not run: the run reached --time-limit-min {args.time_limit_min:g}"
            results[i] = {**c, "status": "skipped", "reason": reason}
            continue
        print(f"run  {c['model']} {c['method']} {c['impl']} ...", end=" ", flush=True)
        start = time.perf_counter()
        r = runner(c)
        for attempt in range(2, args.retry_contended + 2):
            if r.get("status") != "ok" or not contended(r):
                break
            print(f"CPU contended {r['cpu_stall']:.0%}, again ...", end=" ", flush=True)
            wait_for_quiet_cpu(60)
            again = runner(c)
            if again.get("status") == "ok" and again.get("cpu_stall", 1) < r["cpu_stall"]:
                r = again
            r["attempts"] = attempt
        r["wall_s"] = round(time.perf_counter() - start, 1)
        results[i] = r
        cpu = f", CPU {r['case_cpu_s']:.0f} s" if "case_cpu_s" in r else ""
        if r["status"] == "ok":
            stall = f" (CPU contended {r['cpu_stall']:.0%})" if contended(r) else ""
            backend = f" [{r['backend']}]" if r.get("backend") else ""
            print(
                f"{r['median_ms']:.2f} ms x{r['runs'] or 'cold'}{backend}, {r['peak_mb']:.1f} MB "
                f"{check_text(r)}{stall} ({r['wall_s']:.0f} s{cpu})",
                flush=True,
            )
        else:
            reason = r.get("reason", "")
            print(f"{r['status']}: {reason} ({r['wall_s']:.0f} s{cpu})", flush=True)
    return results


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    problem = _defaults(args)
    if problem:
        print(f"gradnorm-bench: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    # Read by OpenMP/MKL when a case's process first runs a parallel region.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    cases = plan_cases(args)
    for c in cases:
        if c.get("status") == "skipped" and c["impl"] not in ("loop", "vmap"):
            print(f"skip {c['model']} {c['method']} {c['impl']}: {c['reason']}", flush=True)

    if args.profile:
        for c in cases:
            if c.get("status") == "skipped":
                continue
            print(f"\n=== profile {c['model']} {c['method']} {c['impl']} batch {c['batch']} ===")
            print(profile_case(c, args.profile), flush=True)
        return 0

    load_start, started = environment.loadavg(), time.perf_counter()
    results = _run_all(args, cases)
    for r in results:
        r.pop("scores_dir", None)
    add_base_ratios(results)
    ratios = compute_ratios(results)
    targets = evaluate_targets(results, ratios, args.quick)
    memory_methods = {r["memory_method"] for r in results if r.get("memory_method")}
    name = environment.device_name(args.device)
    meta = {
        "device": args.device,
        "device_name": name,
        **environment.versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "case_budget_s": args.case_budget_s,
        "time_limit_min": args.time_limit_min,
        "quick": args.quick,
        "isolation": args.isolation,
        "memory_method": "; ".join(sorted(memory_methods)) or "-",
        "loadavg_start": load_start,
        "loadavg_end": environment.loadavg(),
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "command": shlex.join(["python", "-m", "gradnorm_bench", *argv]),
        "commit": environment.commit(),
        "check_rtol": check_rtol(torch.device(args.device)),
        "implementations": {k: v.description for k, v in IMPLS.items()},
        "models": {k: v.title for k, v in ZOO.items()},
    }
    result = {"meta": meta, "cases": results, "ratios": ratios, "targets": targets}

    print()
    print(f"{name} ({args.device}), torch {torch.__version__}, {args.threads} threads")
    print(format_text_table(results))
    print()
    print("ratios (numerator / denominator; < 1 means the numerator is faster / smaller):")
    print("\n".join(format_ratio_lines(ratios)) or "(none)")
    if targets:
        print()
        print("targets (issue 11; figures, not assertions):")
        print("\n".join(format_target_lines(targets)))
    busy = [r for r in results if r.get("status") == "ok" and contended(r)]
    if busy:
        print(
            f"WARNING: {len(busy)} case(s) ran while other processes wanted the CPU "
            f"(PSI cpu 'some' > {CONTENDED:.0%} of their timed runs; see the note column): "
            "rerun them on a quiet machine"
        )
    for r in results:
        if r.get("check") and not r["check"]["ok"]:
            print(
                f"WARNING: {r['model']} {r['method']} {r['impl']} norms differ from auto's by "
                f"{r['check']['max_rel_err']:.2e} (rtol {r['check']['rtol']:g})"
            )

    out = args.out or Path("bench/results") / f"latest-{environment.slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(format_markdown(result))
    print(f"\nwrote {out} and {out.with_suffix('.md')} in {meta['elapsed_s']:.0f} s")
    return 0
