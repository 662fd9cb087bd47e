"""Command-line selection -> the list of cases, each runnable or skipped with its reason."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from .impls import IMPLS, METHOD_CHOICES
from .measure import CONTENDED
from .zoo import ZOO


def library_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"{module} is not importable ({type(e).__name__}: {e})"
    return None


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def _chosen(values: list[str] | None, known, default: list[str], what: str) -> list[str]:
    chosen = _split(values)
    if not chosen:
        return default
    if chosen == ["all"]:
        return list(known)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"gradnorm-bench: unknown {what} {unknown}; choose from {list(known)}")
    return chosen


def _slow_reason(impl: str, spec, args: argparse.Namespace, explicit: bool) -> str | None:
    """vmap and loop are run only where affordable, unless asked for."""
    if explicit:
        return None
    if impl == "loop" and not (spec.loop_by_default or args.with_loop):
        return "one forward/backward per sample: slow at this size; pass --with-loop"
    if impl == "vmap" and not (spec.vmap_by_default or args.with_vmap or args.device == "cuda"):
        return "per-sample gradients of all parameters: GBs and slow at this size; pass --with-vmap"
    return None


def plan_cases(args: argparse.Namespace) -> list[dict]:
    models = _chosen(args.models, ZOO, [n for n, s in ZOO.items() if s.default], "model")
    methods = _chosen(args.methods, METHOD_CHOICES, list(METHOD_CHOICES), "method")
    explicit_impls = args.impls is not None
    impls = _chosen(args.impls, IMPLS, [n for n, s in IMPLS.items() if s.default], "impl")

    problems: dict[str, str | None] = {}

    def problem(module: str) -> str | None:
        if module not in problems:
            problems[module] = library_problem(module)
        return problems[module]

    cases = []
    for model in models:
        spec = ZOO[model]
        batch = args.batch or spec.batch_for(args.device, args.quick)
        for impl in impls:
            ispec = IMPLS[impl]
            for method in methods if ispec.per_method else ["-"]:
                case = {
                    "model": model,
                    "input": spec.input_desc(args.quick),
                    "batch": batch,
                    "method": method,
                    "impl": impl,
                    "device": args.device,
                    "threads": args.threads,
                    "repeats": args.repeats,
                    "warmup": args.warmup,
                    "budget_s": args.case_budget_s,
                    "quick": args.quick,
                    "compare": ispec.check and not args.no_check,
                    "ood_micro_batch": args.ood_micro_batch,
                    "scores_dir": args.scores_dir,
                }
                reason = None
                if method != "-" and method not in ispec.methods:
                    reason = ispec.method_note or f"{impl} supports only {ispec.methods}"
                for module in (*spec.needs, *ispec.needs):
                    reason = reason or problem(module)
                reason = reason or _slow_reason(impl, spec, args, explicit_impls)
                if reason:
                    case.update(status="skipped", reason=reason)
                cases.append(case)
    return cases


REUSE_FIELDS = ("model", "batch", "method", "impl", "device", "threads", "quick", "repeats")


def reuse_key(case: dict) -> tuple:
    return tuple(case.get(k) for k in REUSE_FIELDS)


def reusable_results(path: Path) -> dict[tuple, dict]:
    """The cases of an earlier run that need no rerun: ok, and not CPU-contended."""
    try:
        earlier = json.loads(Path(path).read_text())
        cases, date = earlier["cases"], earlier["meta"]["date"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"gradnorm-bench: cannot read --keep-from {path}: {e}") from None
    return {
        reuse_key(c): {**c, "kept_from": c.get("kept_from") or f"run of {date}"}
        for c in cases
        if c.get("status") == "ok" and (c.get("cpu_stall") or 0) <= CONTENDED
    }
