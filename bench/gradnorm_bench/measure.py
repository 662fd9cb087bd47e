"""One case, in this process: build, set up, warm up, time, measure peak memory, check scores.

A case is a dict (model, method, impl, device, threads, batch, repeats, warmup, budget_s,
...) and comes back with its results filled in and ``status`` ok / skipped / error.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
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
    except Skip as e:
        out.update(status="skipped", reason=str(e))
        return out
    if prepared.options:
        out["options"] = prepared.options

    memory = CudaMemory() if device.type == "cuda" else CpuMemory()
    memory.set_baseline()
    last: list[Tensor | None] = [None]

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        last[0] = prepared.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    try:
        warm = [timed() for _ in range(min(case["warmup"], 1))]
        budget = case.get("budget_s", float("inf"))
        if warm and warm[0] / 1000 > budget:
            # One call longer than the whole budget (the big models' references on CPU): that
            # call is the measurement, first-call overheads included; the table says so.
            times, runs = warm, 0
            stall_start = stall_end = None
            cpu_ms = None
        else:
            for _ in range(case["warmup"] - len(warm)):
                timed()
            memory.reset_peak()
            stall_start, wall_start = cpu_stall_us(), time.perf_counter()
            cpu_start = time.process_time()
            # Up to `repeats` timed runs, stopping once their total passes the budget: at
            # least one always runs.
            times = []
            while len(times) < case["repeats"]:
                times.append(timed())
                if sum(times) / 1000 >= budget:
                    break
            stall_end, wall = cpu_stall_us(), time.perf_counter() - wall_start
            cpu_ms = (time.process_time() - cpu_start) * 1000 / len(times)
            runs = len(times)
    except torch.OutOfMemoryError as e:
        out.update(status="error", reason=f"out of memory: {str(e).splitlines()[0]}")
        return out
    out.update(
        status="ok",
        median_ms=statistics.median(times),
        min_ms=min(times),
        times_ms=times,
        runs=runs,
        cpu_ms=cpu_ms,
        peak_mb=memory.peak_mb(),
        memory_method=memory.method,
    )
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
