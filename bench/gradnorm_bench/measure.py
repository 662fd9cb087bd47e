"""One case, in this process: build, set up, warm up, time, measure peak memory, check scores.

A case is a dict (model, method, impl, device, threads, batch, repeats, warmup, budget_s,
...) and comes back with its results filled in and ``status`` ok / skipped / error.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from torchserve_gradnorm import GradNormScorer

from .impls import IMPLS, Skip
from .zoo import ZOO, build_model

CHECK_RTOL = 1e-3
"""Per-sample relative tolerance when another implementation's norms are compared with
``auto``'s."""
CHECK_RTOL_TF32 = 1e-2
"""The same on CUDA where convolutions or matrix products may run in TF32 (PyTorch's default
for cuDNN convolutions): 10-bit mantissas, so two exact methods differ around 1e-3."""


def check_rtol(device: torch.device) -> float:
    if device.type == "cuda" and (
        torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    ):
        return CHECK_RTOL_TF32
    return CHECK_RTOL


CONTENDED = 0.05
"""A CPU case whose timed runs saw runnable tasks waiting for a CPU more than this fraction
of the time was measured on a busy machine: its timings are flagged."""


# ------------------------------------------------------------------------ memory


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuMemory:
    """Peak RSS above a baseline. VmHWM reset through clear_refs where Linux allows it,
    else ru_maxrss (which cannot be reset: a high-water mark from before the baseline
    then hides the case's own peak)."""

    def __init__(self) -> None:
        self.baseline_kb = 0
        self.resettable = self._reset_peak()
        self.method = (
            "VmHWM (reset via /proc/self/clear_refs) - VmRSS before the first run"
            if self.resettable
            else "ru_maxrss - RSS before the first run (peak not resettable)"
        )

    @staticmethod
    def _reset_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _proc_status_kb("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _rss_kb() -> int:
        rss = _proc_status_kb("VmRSS")
        if rss is not None:
            return rss
        try:
            import psutil

            return psutil.Process().memory_info().rss // 1024
        except ImportError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def set_baseline(self) -> None:
        gc.collect()
        self.baseline_kb = self._rss_kb()
        self.reset_peak()

    def reset_peak(self) -> None:
        if self.resettable:
            self._reset_peak()

    def peak_mb(self) -> float:
        if self.resettable:
            peak = _proc_status_kb("VmHWM") or 0
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - self.baseline_kb) / 1024


class CudaMemory:
    method = "torch.cuda.max_memory_allocated - memory_allocated before the first run"

    def __init__(self) -> None:
        self.baseline = 0

    def set_baseline(self) -> None:
        gc.collect()
        torch.cuda.synchronize()
        self.baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.baseline) / 2**20


def cpu_stall_us() -> int | None:
    """Linux PSI: total microseconds during which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(re.search(r"^some .*total=(\d+)", f.read(), re.M).group(1))
    except (OSError, AttributeError, ValueError):
        return None


# ------------------------------------------------------------------------ checks


def max_rel_err(ours: Tensor, ref: Tensor) -> float:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return float(((ours - ref).abs() / scale).max())


def _scores_path(case: dict) -> Path | None:
    folder = case.get("scores_dir")
    return Path(folder) / f"{case['model']}-{case['method']}.pt" if folder else None


def _auto_scores(case: dict, x: Tensor) -> Tensor:
    """``auto``'s norms for this model and method: saved by the auto case of this run, else
    computed now on a fresh model."""
    path = _scores_path(case)
    if path is not None and path.exists():
        return torch.load(path)
    spec = ZOO[case["model"]]
    fresh = build_model(spec, case["quick"], torch.device(case["device"]))
    return GradNormScorer(fresh, method=case["method"], backend="auto")(x).grad_norm


# ------------------------------------------------------------------------- a case

PAIRED_MIN_ROUNDS = 3
"""A case timed in turns with its base runs at least this many rounds (``--repeats``
permitting), however long they take: its ratio to the base is a median of per-round ratios."""


@dataclass
class _Runs:
    times: list[float]
    """Wall ms of each timed run of the implementation."""
    cpu_ms: float | None = None
    """This process's CPU time per run of the implementation (all threads)."""
    base_times: list[float] = field(default_factory=list)
    """Wall ms of the base's run of each round (paired cases)."""
    peak_mb: float | None = None
    """Paired cases: the highest peak over the implementation's own runs."""


def _timed_runs(prepared, base, case: dict, budget: float, memory, timed) -> _Runs:
    """Up to ``repeats`` timed runs, stopping once their total passes the budget: at least
    one always runs. With a base (paired), each round also times the base, before the
    implementation in even rounds and after it in odd ones (a cache or frequency drift
    then falls on both alike); the budget counts the implementation's runs only, and at
    least PAIRED_MIN_ROUNDS rounds run."""
    times: list[float] = []
    base_times: list[float] = []
    cpu = 0.0
    peak = None
    least = 1 if base is None else min(PAIRED_MIN_ROUNDS, case["repeats"])
    while len(times) < case["repeats"]:
        base_first = base is not None and len(times) % 2 == 0
        if base_first:
            base_times.append(timed(base.run))
        if base is not None:
            memory.reset_peak()  # the peak of the implementation's run alone
        cpu_start = time.process_time()
        times.append(timed(prepared.run))
        cpu += time.process_time() - cpu_start
        if base is not None:
            peak = max(peak or 0.0, memory.peak_mb())
            if not base_first:
                base_times.append(timed(base.run))
        if sum(times) / 1000 >= budget and len(times) >= least:
            break
    return _Runs(times, cpu * 1000 / len(times), base_times, peak)


def run_case(case: dict) -> dict:
    """Run one case in this process; returns the case with its results filled in."""
    out = dict(case)
    device = torch.device(case["device"])
    torch.set_num_threads(case["threads"])
    spec = ZOO[case["model"]]
    impl = IMPLS[case["impl"]]
    method = case["method"] if case["method"] != "-" else "confounding"
    quick = case["quick"]
    try:
        model = build_model(spec, quick, device)
        x = spec.make_input(case["batch"], quick, device)
        opts = {
            "backpack_converter": spec.backpack_converter,
            "ood_micro_batch": case.get("ood_micro_batch"),
        }
        prepared = impl.setup(model, x, method, opts)
        base = IMPLS[impl.base].setup(model, x, method, opts) if impl.paired else None
    except Skip as e:
        out.update(status="skipped", reason=str(e))
        return out
    if prepared.options:
        out["options"] = prepared.options

    memory = CudaMemory() if device.type == "cuda" else CpuMemory()
    memory.set_baseline()
    last: list[Tensor | None] = [None]

    def timed(run) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run is prepared.run:
            last[0] = result
        return (time.perf_counter() - start) * 1000

    try:
        warm = [timed(prepared.run) for _ in range(min(case["warmup"], 1))]
        budget = case.get("budget_s", float("inf"))
        if warm and warm[0] / 1000 > budget:
            # One call longer than the whole budget (the big models' references on CPU): that
            # call is the measurement, first-call overheads included; the table says so.
            runs = _Runs(times=warm)
            stall_start = stall_end = None
            runs_count = 0
        else:
            for _ in range(case["warmup"] - len(warm)):
                timed(prepared.run)
            if base is not None:
                for _ in range(case["warmup"]):
                    timed(base.run)
            memory.reset_peak()
            stall_start, wall_start = cpu_stall_us(), time.perf_counter()
            runs = _timed_runs(prepared, base, case, budget, memory, timed)
            stall_end, wall = cpu_stall_us(), time.perf_counter() - wall_start
            runs_count = len(runs.times)
    except torch.OutOfMemoryError as e:
        out.update(status="error", reason=f"out of memory: {str(e).splitlines()[0]}")
        return out
    times = runs.times
    out.update(
        status="ok",
        median_ms=statistics.median(times),
        min_ms=min(times),
        times_ms=times,
        runs=runs_count,
        cpu_ms=runs.cpu_ms,
        peak_mb=memory.peak_mb() if runs.peak_mb is None else runs.peak_mb,
        memory_method=memory.method,
    )
    if runs.base_times:
        ratios = [a / b for a, b in zip(times, runs.base_times)]
        out["paired"] = {
            "base": impl.base,
            "base_median_ms": statistics.median(runs.base_times),
            "base_times_ms": runs.base_times,
            "time_ratios": ratios,
            "time_ratio": statistics.median(ratios),
        }
    if prepared.backend:
        out["backend"] = prepared.backend
    if prepared.log:
        out["scorer_log"] = prepared.log
    if stall_start is not None and stall_end is not None and wall > 0:
        # PSI totals advance in coarse steps: over a sub-millisecond run they can exceed it
        out["cpu_stall"] = round(min((stall_end - stall_start) / 1e6 / wall, 1.0), 3)

    scores = last[0]
    path = _scores_path(case)
    if case["impl"] == "auto" and scores is not None and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(scores.detach().cpu(), path)
    if case.get("compare") and scores is not None:
        del prepared
        err = max_rel_err(scores, _auto_scores(case, x))
        rtol = check_rtol(device)
        out["check"] = {"against": "auto", "max_rel_err": err, "rtol": rtol, "ok": err <= rtol}
    return out


def run_case_guarded(case: dict) -> dict:
    try:
        return run_case(case)
    except Exception as e:  # a broken implementation must not stop the other cases
        msg = str(e).strip().splitlines()
        return {**case, "status": "error", "reason": f"{type(e).__name__}: {msg[0] if msg else ''}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
