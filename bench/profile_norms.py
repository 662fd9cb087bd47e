"""Where the fast backend's time goes, per phase and per norm rule call, against one
forward+backward of the same model measured in the same process (interleaved).

    MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=handler:bench \
        python bench/profile_norms.py cifar-resnet18 --method kl

Prints the fastest of the repeats (the least disturbed by other load on the machine) of:
fwd+bwd, the fast backend, its recorded forward, its rule calls (summed; they now run inside
the backward), the rest (the backward to the recorded outputs, bookkeeping); the peak RSS of
each (VmHWM reset through clear_refs; the malloc setting makes freed tensors leave the RSS);
and the dearest rule calls by (function, weight, input) shape. For scale, two plain passes
bound what any one-backward method can reach: the forward, and the forward plus the backward
to the input only (no weight gradient; what the fast backend's own backward has to do).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import torch

from gradnorm_bench.measure import CpuMemory
from gradnorm_bench.zoo import ZOO, build_model
from torchserve_gradnorm.backends.fast import FastBackend
from torchserve_gradnorm.losses import get_method
from torchserve_gradnorm.norms import registry


def _shape(v) -> str:
    return "x".join(map(str, v.shape)) if isinstance(v, torch.Tensor) else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(ZOO))
    ap.add_argument("--method", default="kl", choices=("kl", "confounding"))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = ZOO[args.model]
    device = torch.device("cpu")
    model = build_model(spec, False, device)
    batch = args.batch or spec.batch_for("cpu", False)
    x = spec.make_input(batch, False, device)
    method = get_method(args.method)
    names = [n for n, p in model.named_parameters()]
    backend = FastBackend(model, names, method, 1.0)

    per_call: dict[str, list[float]] = defaultdict(list)
    current: dict[str, float] = defaultdict(float)
    for func, rule in list(registry.RULES.items()):

        def timed(call, want, kind, _compute=rule.compute, _func=func):
            t0 = time.perf_counter()
            out = _compute(call, want, kind)
            w = call.bound.get("weight")
            per_sample = [k for k, v in call.bound.items() if call.is_per_sample(v)]
            x0 = call.bound[per_sample[0]] if per_sample else None
            key = f"{_func.__name__} w={_shape(w)} x={_shape(x0)} {sorted(want.items())}"
            current[key] += time.perf_counter() - t0
            return out

        registry.RULES[func] = dataclasses.replace(rule, compute=timed)

    forward_time = [0.0]

    def timed_forward(original):
        def forward(self, xb):
            t0 = time.perf_counter()
            out = original(self, xb)
            forward_time[0] += time.perf_counter() - t0
            return out

        return forward

    # the row-wise forward (CNNs, MLPs) or the vmap one (the others), whichever runs
    FastBackend._forward = timed_forward(FastBackend._forward)
    FastBackend._rowwise_forward = timed_forward(FastBackend._rowwise_forward)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        method.loss(model(x), 1.0).sum().backward()
        model.zero_grad(set_to_none=True)

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    def fwd_bwd_activations() -> None:
        frozen = [p.requires_grad_(False) for p in model.parameters()]
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(method.loss(model(xg), 1.0).sum(), xg)
        for p in frozen:
            p.requires_grad_(True)

    memory = CpuMemory()
    memory.set_baseline()
    rows = defaultdict(list)
    with torch.enable_grad():
        fwd_bwd()
        backend(x)  # warm-up
        for _ in range(args.repeats):
            memory.reset_peak()
            t0 = time.perf_counter()
            fwd_bwd()
            rows["fwd+bwd"].append(time.perf_counter() - t0)
            rows["fwd+bwd peak MB"].append(memory.peak_mb())
            t0 = time.perf_counter()
            fwd()
            rows["forward (plain, no grad)"].append(time.perf_counter() - t0)
            if x.is_floating_point():  # token ids have no gradient
                t0 = time.perf_counter()
                fwd_bwd_activations()
                rows["fwd + bwd to the input only"].append(time.perf_counter() - t0)
            current.clear()
            forward_time[0] = 0.0
            memory.reset_peak()
            t0 = time.perf_counter()
            backend(x)
            total = time.perf_counter() - t0
            rows["fast peak MB"].append(memory.peak_mb())
            rows["fast"].append(total)
            rows["  recorded forward"].append(forward_time[0])
            rows["  rules"].append(sum(current.values()))
            rows["  rest (autograd.grad, bookkeeping)"].append(
                total - forward_time[0] - sum(current.values())
            )
            for k, v in current.items():
                per_call[k].append(v)
    base = min(rows["fwd+bwd"])
    print(f"{args.model} batch {batch} {args.method} threads {args.threads}")
    for k, v in rows.items():
        m = min(v)
        if k.endswith("MB"):
            print(f"{k:40s} {m:9.1f} MB")
        else:
            print(f"{k:40s} {m * 1e3:9.1f} ms  {m / base:5.2f}x fwd+bwd")
    fwd_peak = min(rows["fwd+bwd peak MB"])
    print(f"{'peak ratio':40s} {min(rows['fast peak MB']) / fwd_peak:9.2f}x")
    print("dearest rule calls (fastest ms, summed over same-shape calls):")
    top = sorted(per_call.items(), key=lambda kv: -min(kv[1]))[: args.rows]
    for k, v in top:
        print(f"  {min(v) * 1e3:8.1f}  {k}")


if __name__ == "__main__":
    main()
