"""From the cases' results: ratios, the issue's targets, the text and markdown tables."""

from __future__ import annotations

import math

from .impls import IMPLS, METHOD_CHOICES
from .measure import CONTENDED, PAIRED_MIN_ROUNDS
from .zoo import ZOO

MIN_MB = 1.0
"""Memory ratios need a denominator of at least this: below it, RSS noise dominates."""

RATIOS = (
    # (name, numerator impl, denominator impl)
    ("auto/fwd+bwd", "auto", "fwd+bwd"),
    ("auto/pytorch-ood", "auto", "pytorch-ood"),
    ("auto/backpack", "auto", "backpack"),
    ("auto/vmap", "auto", "vmap"),
    ("auto-head/forward", "auto-head", "forward"),
)

TARGETS = (
    # (ratio name or "backend", quantity, bound, description, only this model or None)
    ("backend", "backend", "fast", "auto runs the fast path", None),
    ("auto/fwd+bwd", "time", 1.3, "auto <= 1.3x forward+backward", None),
    ("auto/fwd+bwd", "memory", 1.5, "auto peak memory <= 1.5x forward+backward's", None),
    ("auto-head/forward", "time", 1.1, "head-only <= 1.1x plain forward", None),
    ("auto/pytorch-ood", "time", 1 / 8, "auto >= 8x faster than pytorch-ood", "cifar-resnet18"),
    ("auto/backpack", "time", 1.0, "auto faster than BackPACK", "cifar-resnet18"),
)


def _key(case: dict) -> tuple[str, str, str]:
    return case["model"], case["method"], case["impl"]


def _ratio(a: float | None, b: float | None, floor: float = 0.0) -> float | None:
    if a is None or b is None or b <= floor or b <= 0:
        return None
    return max(a, 0.0) / b


def contended(case: dict) -> bool:
    return case.get("device") == "cpu" and (case.get("cpu_stall") or 0) > CONTENDED


def _base_case(ok: dict, case: dict, base: str) -> dict | None:
    method = "-" if not IMPLS[base].per_method else case["method"]
    return ok.get((case["model"], method, base))


def paired_time_ratio(case: dict, base: str) -> float | None:
    """The case's time over ``base``'s, from the rounds that timed both in the case's own
    process (``paired``), where it has them."""
    paired = case.get("paired")
    if paired and paired.get("base") == base:
        return paired["time_ratio"]
    return None


def add_base_ratios(cases: list[dict]) -> None:
    """Each ok case's time and peak memory over its base's (fwd+bwd, or forward for head-only)
    as ``time_vs_base`` / ``peak_vs_base``: the time from the case's own rounds timed in
    turns with its base where it has them (head-only), else over the base case of the same
    run, like the peak memory."""
    ok = {_key(c): c for c in cases if c.get("status") == "ok"}
    for c in ok.values():
        base = IMPLS[c["impl"]].base if c["impl"] in IMPLS else None
        if base is None:
            continue
        b = _base_case(ok, c, base)
        paired = paired_time_ratio(c, base)
        if b is None and paired is None:
            continue
        c["base"] = base
        c["time_vs_base"] = paired if paired is not None else _ratio(c["median_ms"], b["median_ms"])
        c["peak_vs_base"] = _ratio(c["peak_mb"], b["peak_mb"], MIN_MB) if b else None


def compute_ratios(cases: list[dict]) -> list[dict]:
    ok = {_key(c): c for c in cases if c.get("status") == "ok"}
    pairs = sorted({(c["model"], c["method"]) for c in cases if c["method"] != "-"})
    ratios = []
    for model, method in pairs:
        for name, num, den in RATIOS:
            a = ok.get((model, method, num))
            b = ok.get((model, "-" if not IMPLS[den].per_method else method, den))
            paired = paired_time_ratio(a, den) if a else None
            if a is None or (b is None and paired is None):
                continue
            time = paired if paired is not None else _ratio(a["median_ms"], b["median_ms"])
            ratios.append(
                {
                    "model": model,
                    "method": method,
                    "ratio": name,
                    "time": time,
                    "time_from": "paired" if paired is not None else "cases",
                    "memory": _ratio(a["peak_mb"], b["peak_mb"], MIN_MB) if b else None,
                }
            )
    return ratios


def evaluate_targets(cases: list[dict], ratios: list[dict], quick: bool) -> list[dict]:
    """The issue's targets where this run has the figures; MET / MISSED, never asserted."""
    if quick:
        return []
    by = {(r["model"], r["method"], r["ratio"]): r for r in ratios}
    autos = {
        (c["model"], c["method"]): c
        for c in cases
        if c["impl"] == "auto" and c.get("status") in ("ok", "error")
    }
    models = [m for m in dict.fromkeys(c["model"] for c in cases) if m in ZOO and ZOO[m].targets]
    out = []
    for model in models:
        for method in METHOD_CHOICES:
            for ratio, quantity, bound, desc, only in TARGETS:
                if only is not None and only != model:
                    continue
                if ratio == "backend":
                    auto = autos.get((model, method))
                    if auto is None:
                        continue
                    # an auto that failed ran no backend: the target is missed, not absent
                    value = auto.get("backend") if auto["status"] == "ok" else "error"
                    met = value == bound
                else:
                    r = by.get((model, method, ratio))
                    if r is None:
                        continue
                    value = r[quantity]
                    met = None if value is None else bool(value <= bound)
                out.append(
                    {
                        "model": model,
                        "method": method,
                        "target": desc,
                        "ratio": ratio,
                        "quantity": quantity,
                        "value": value,
                        "bound": bound,
                        "met": met,
                    }
                )
    return out


# ----------------------------------------------------------------------- tables


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def check_text(c: dict) -> str:
    chk = c.get("check")
    if not chk:
        return ""
    return f"{chk['max_rel_err']:.1e} {'ok' if chk['ok'] else 'MISMATCH'}"


def _ok_note(c: dict) -> str:
    notes = [c["options"]] if c.get("options") else []
    paired = c.get("paired")
    if paired:
        notes.append(f"{paired['base']} in turns: {fmt(paired['base_median_ms'], 2)} ms")
    if c["impl"].startswith("auto") and c.get("backend") not in (None, "fast"):
        notes += [line[:200] for line in c.get("scorer_log", [])][:2]
    if contended(c):
        notes.append(f"CPU contended {c['cpu_stall']:.0%} of the time")
    if c.get("kept_from"):
        notes.append(f"from the {c['kept_from']}")
    return "; ".join(notes)


HEADER = [
    "model", "input", "batch", "method", "impl", "backend", "runs", "median ms", "x base",
    "peak MB", "peak x base", "vs auto", "note",
]  # fmt: skip
NUMERIC = ("batch", "runs", "median ms", "x base", "peak MB", "peak x base")


def _runs(c: dict) -> str:
    """Timed runs; "cold": the one warm-up call was the measurement (longer than the budget)."""
    return "cold" if c.get("runs") == 0 else str(c.get("runs", ""))


def table_rows(cases: list[dict]) -> list[list[str]]:
    rows = []
    for c in cases:
        status = c.get("status", "?")
        ok = status == "ok"
        rows.append(
            [
                c["model"],
                c["input"],
                str(c["batch"]),
                c["method"],
                c["impl"],
                c.get("backend", "") if ok else "",
                _runs(c) if ok else "",
                fmt(c.get("median_ms"), 2) if ok else status,
                fmt(c.get("time_vs_base"), 2) if ok and c.get("base") else "",
                fmt(c.get("peak_mb"), 1) if ok else "",
                fmt(c.get("peak_vs_base"), 2) if ok and c.get("base") else "",
                check_text(c),
                _ok_note(c) if ok else c.get("reason", ""),
            ]
        )
    return rows


def format_text_table(cases: list[dict]) -> str:
    rows = [HEADER, *table_rows(cases)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = []
    for r in rows:
        cells = [
            cell.rjust(w) if h in NUMERIC else cell.ljust(w)
            for cell, w, h in zip(r, widths, HEADER)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_ratio_lines(ratios: list[dict]) -> list[str]:
    lines = []
    for r in ratios:
        t = r["time"]
        speed = ""
        if t:
            speed = f"({1 / t:.2f}x faster)" if t < 1 else f"({t:.2f}x slower)"
        turns = "in turns" if r.get("time_from") == "paired" else ""
        lines.append(
            f"{r['model']:<16} {r['method']:<12} {r['ratio']:<18} "
            f"time {fmt(t, 3):>7} {speed:<17} {turns:<8} peak memory {fmt(r['memory'], 3):>7}"
        )
    return lines


def format_target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        if t["quantity"] == "backend":
            value = f"backend = {t['value']}"
        else:
            value = f"{t['ratio']} {t['quantity']} = {fmt(t['value'], 3)} (bound {t['bound']:.3g})"
        lines.append(f"{verdict:<6} {t['model']:<16} {t['method']:<12} {t['target']:<44} {value}")
    return lines


def format_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# gradnorm-bench: {meta['device_name']} ({meta['device']})",
        "",
        f"`{meta['command']}` at commit {meta.get('commit') or 'unknown'}",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['date']}; "
        f"median of up to {meta['repeats']} runs (fewer where they passed "
        f"{meta['case_budget_s']:g} s: column runs) after {meta['warmup']} warm-up, or, where "
        "the warm-up call alone took longer (runs: cold), that one call; "
        f"peak memory: {meta['memory_method']}. x base: time over the same model's fwd+bwd "
        "case in this run; for auto-head, the median of per-round ratios to a plain forward "
        "timed in turns with it in the same process (note: that forward's median), at least "
        f"{PAIRED_MIN_ROUNDS} rounds. peak x base: peak memory over the fwd+bwd (forward) "
        "case's.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---:" if h in NUMERIC else "---" for h in HEADER) + "|",
    ]
    for r in table_rows(result["cases"]):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in r) + " |")
    lines += [
        "",
        "## Ratios (time and peak memory, numerator / denominator; in turns: time from "
        "the numerator's case, timed in turns with the denominator)",
        "",
        "```",
    ]
    lines += format_ratio_lines(result["ratios"]) + ["```"]
    if result["targets"]:
        lines += ["", "## Targets (issue 11)", "", "```"]
        lines += format_target_lines(result["targets"]) + ["```"]
    return "\n".join(lines) + "\n"
