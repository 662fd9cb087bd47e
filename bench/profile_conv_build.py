"""The convolution rule's calls of one zoo model, timed against another copy of the package
on the same tensors, in turns in one process (before/after a change to ``norms/conv.py``).

One fast-backend scorer call records every convolution rule call (its bound arguments and
output gradient); each is then replayed through this checkout's rule and the baseline's, in
turns, for ``--rounds`` rounds. Prints the median ms a call shape takes (summed over the
model's calls of that shape) under both, their ratio, and the totals; the replayed norms are
checked equal to the baseline's first.

    git archive OLD handler/torchserve_gradnorm | tar -x -C /tmp/old \\
        && mv /tmp/old/handler/torchserve_gradnorm /tmp/old/gn_old
    MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=handler:bench:/tmp/old \\
        python bench/profile_conv_build.py cifar-resnet18 --baseline gn_old --method kl
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from gradnorm_bench.zoo import ZOO, build_model
from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.norms import registry
from torchserve_gradnorm.norms.conv import conv_norms


def _shape(call) -> str:
    w, x = call.bound["weight"], call.bound["input"]
    return f"w={'x'.join(map(str, w.shape))} x={'x'.join(map(str, x.shape))}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(ZOO))
    ap.add_argument("--baseline", required=True, help="another copy of the package, by name")
    ap.add_argument("--method", default="kl", choices=("kl", "confounding"))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    old = importlib.import_module(f"{args.baseline}.norms.conv").conv_norms
    spec = ZOO[args.model]
    device = torch.device("cpu")
    model = build_model(spec, False, device)
    batch = args.batch or spec.batch_for("cpu", False)
    x = spec.make_input(batch, False, device)

    calls = []
    for func in (F.conv1d, F.conv2d, F.conv3d):
        rule = registry.RULES[func]

        def record(call, want, kind, _compute=rule.compute):
            calls.append((call, dict(want), kind))
            return _compute(call, want, kind)

        registry.RULES[func] = dataclasses.replace(rule, compute=record)
    GradNormScorer(model, method=args.method, backend="fast")(x)
    new_rule = conv_norms

    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"new": [], "old": []})
    for call, want, kind in calls:
        got, base = new_rule(call, want, kind), old(call, want, kind)
        for k in base:
            torch.testing.assert_close(got[k], base[k], rtol=1e-4, atol=1e-6)
    for _ in range(args.rounds):
        round_times: dict[str, dict[str, float]] = defaultdict(lambda: {"new": 0.0, "old": 0.0})
        for call, want, kind in calls:
            for name, fn in (("new", new_rule), ("old", old)):
                t0 = time.perf_counter()
                fn(call, want, kind)
                round_times[_shape(call)][name] += time.perf_counter() - t0
        for key, t in round_times.items():
            times[key]["new"].append(t["new"])
            times[key]["old"].append(t["old"])
    print(f"{args.model} batch {batch} {args.method} threads {args.threads} rounds {args.rounds}")
    rows = sorted(times.items(), key=lambda kv: -statistics.median(kv[1]["old"]))
    total_new = total_old = 0.0
    for key, t in rows:
        n, o = statistics.median(t["new"]) * 1e3, statistics.median(t["old"]) * 1e3
        total_new, total_old = total_new + n, total_old + o
        print(f"  {o:8.1f} -> {n:8.1f} ms  {n / o:5.2f}x  {key}")
    print(f"  total {total_old:.1f} -> {total_new:.1f} ms  {total_new / total_old:.3f}x")


if __name__ == "__main__":
    main()
