"""Where the fast backend's time and memory go on one zoo model, against forward+backward.

Runs forward+backward and the scorer (backend ``fast``) interleaved in this one process
(so that a busy machine slows both alike), prints the median time and peak-RSS ratios, then
splits the scorer's last run into phases (the recorded forward, the one ``autograd.grad``,
each rule by torch function, the per-sample vjp fallback, the pull-back through
parameter-side computations) with the CPU time and the peak RSS above the call's start of each.

    PYTHONPATH=handler:bench python bench/profile_phases.py bert-base --method kl --threads 1

Peak memory is RSS above the call's start with glibc's mmap threshold at 1 MiB (set here):
every large tensor is then its own mapping, returned when freed, so RSS follows the live
tensors (the benchmark's fresh-process peaks also count the allocator's retained memory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from gradnorm_bench.measure import _proc_status_kb
from gradnorm_bench.zoo import ZOO, build_model
from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.backends import fast
from torchserve_gradnorm.losses import get_method


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kb("VmRSS") or 0


def peak_mb(baseline_kb: int) -> float:
    return ((_proc_status_kb("VmHWM") or 0) - baseline_kb) / 1024


def timed(run) -> tuple[float, float, float]:
    """Wall time, CPU time of this process (with one thread, the one to compare on a machine
    that other work keeps busy) and peak RSS above the start."""
    base = reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu, peak_mb(base)


class Phases:
    """Time and peak RSS (above the scorer call's start) per phase of one scorer call."""

    def __init__(self) -> None:
        self.time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.peak: dict[str, float] = defaultdict(float)
        self.start_kb = 0
        self.depth = 0

    @contextmanager
    def phase(self, name: str):
        if self.depth:  # inside another phase (the vjp fallback's own autograd.grad)
            yield
            return
        self.depth += 1
        start = time.process_time()
        try:
            yield
        finally:
            self.depth -= 1
            self.time[name] += time.process_time() - start
            self.calls[name] += 1
            self.peak[name] = max(self.peak[name], peak_mb(self.start_kb))


def instrument(phases: Phases):
    backend = fast.FastBackend
    forward, apply, grad = backend._forward, backend._apply, torch.autograd.grad

    def _forward(self, x):
        with phases.phase("forward (recorded, vmap)"):
            return forward(self, x)

    def _apply(use, call, need, add, kind):
        rule = fast.rule_for(use.func)
        name = getattr(use.func, "__name__", str(use.func))
        bound = rule.bind(call, set(use.tracked)) if rule else None
        how = "rule" if bound is not None and rule.unsupported_reason(bound) is None else "vjp"
        shapes = "x".join(str(tuple(a.shape)) for a in call.args if isinstance(a, torch.Tensor))[
            :60
        ]
        with phases.phase(f"{how} {name} {shapes}"):
            return apply(use, call, need, add, kind)

    def autograd_grad(*args, **kwargs):
        label = "pull-back" if kwargs.get("is_grads_batched") else "autograd.grad to uses"
        with phases.phase(label):
            return grad(*args, **kwargs)

    backend._forward = _forward
    backend._apply = staticmethod(_apply)
    torch.autograd.grad = autograd_grad

    def undo():
        backend._forward, backend._apply, torch.autograd.grad = forward, apply, grad

    return undo


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc then returns every large freed block at once, so that RSS follows the live
        # tensors and one process can measure both passes' peaks in turn
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(ZOO))
    p.add_argument("--method", default="kl", choices=("confounding", "kl"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rows", type=int, default=25, help="phases to list")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    spec = ZOO[args.model]
    model = build_model(spec, False, torch.device("cpu"))
    x = spec.make_input(args.batch or spec.batch["cpu"], False, torch.device("cpu"))
    params = [q.requires_grad_(True) for q in model.parameters()]
    loss_fn = get_method(args.method).loss
    scorer = GradNormScorer(model, method=args.method, backend="fast")

    def fwd_bwd() -> None:
        torch.autograd.grad(loss_fn(model(x), 1.0).sum(), params)

    def forward() -> None:  # what the recorded forward compares with
        loss_fn(model(x), 1.0).sum()

    def score() -> None:
        scorer(x)

    runs = {"forward": forward, "fwd+bwd": fwd_bwd, "fast": score}
    for run in runs.values():  # warm-up
        run()
    times, cpus, peaks = defaultdict(list), defaultdict(list), defaultdict(list)
    for _ in range(args.repeats):
        for name, run in runs.items():
            t, cpu, mem = timed(run)
            times[name].append(t)
            cpus[name].append(cpu)
            peaks[name].append(mem)
    print(f"{args.model} {args.method} batch {len(x)} threads {args.threads}, medians:")
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in
           (("wall", times), ("cpu", cpus), ("peak", peaks))}  # fmt: skip
    for name in runs:
        print(
            f"{name:8} wall {med['wall'][name] * 1e3:9.1f} ms "
            f"x{med['wall'][name] / med['wall']['fwd+bwd']:.3f}   "
            f"cpu {med['cpu'][name] * 1e3:9.1f} ms x{med['cpu'][name] / med['cpu']['fwd+bwd']:.3f}"
            f"   peak {med['peak'][name]:8.1f} MB x{med['peak'][name] / med['peak']['fwd+bwd']:.3f}"
        )

    phases = Phases()
    undo = instrument(phases)
    try:
        phases.start_kb = reset_peak()
        start = time.process_time()
        scorer(x)
        total = time.process_time() - start
    finally:
        undo()
    peak = peak_mb(phases.start_kb)
    print(f"\none instrumented call: {total * 1e3:.1f} ms CPU time, {peak:.1f} MB peak")
    print(f"{'phase':<90} {'calls':>5} {'cpu ms':>9} {'%':>5} {'peak MB':>8}")
    for name in sorted(phases.time, key=phases.time.get, reverse=True)[: args.rows]:
        ms = phases.time[name] * 1e3
        print(
            f"{name:<90} {phases.calls[name]:>5} {ms:9.1f} {100 * ms / total / 1e3:5.1f} "
            f"{phases.peak[name]:8.1f}"
        )


if __name__ == "__main__":
    main()
