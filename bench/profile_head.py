"""Where a head-only scorer call's time goes over one plain forward, in one process.

Times in turns (the order rotating every round, so that a load on the machine or a drift
falls on all alike) on one zoo model:

- ``forward``: ``model(x)`` under ``torch.no_grad()``, the bench's base;
- ``grad mode``: the same forward with grad mode on and only the head's parameters
  requiring grad (what autograd itself adds);
- ``recorded``: the fast backend's recorded forward alone (the row-wise recorder, or the
  vmap one for models that read the batch size), without the loss, backward and norms;
- ``head``: the whole ``GradNormScorer(param_filter="head")`` call,

and prints each one's median time and the median of its per-round ratios to ``forward``,
so that ``recorded / forward - grad mode / forward`` is the recorder's bookkeeping and
``head - recorded`` the loss, the graph checks, the backward and the head's norms. With
``--clock cpu`` (the default) the times are this process's CPU time, which other processes
hardly move; a small ``--batch`` shows the per-call overheads that do not grow with it.

    PYTHONPATH=handler:bench python bench/profile_head.py cifar-resnet18 swin-t --threads 1
    PYTHONPATH=handler:bench python bench/profile_head.py efficientnet-b0 --batch 1 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradnorm_bench.zoo import ZOO, build_model
from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.backends.base import requires_grad_only
from torchserve_gradnorm.backends.fast import FastBackend
from torchserve_gradnorm.outputs import call_model


def runs(model, x, method: str) -> tuple[dict, GradNormScorer]:
    scorer = GradNormScorer(model, method=method, param_filter="head", backend="fast")
    scorer(x)  # the first call settles row-wise or vmap for this input
    backend = scorer._candidates[0]
    assert isinstance(backend, FastBackend)
    recorded = backend._rowwise_forward if backend.last_forward == "rowwise" else backend._forward

    def forward() -> None:
        with torch.no_grad():
            call_model(model, x)

    def grad_mode() -> None:
        with torch.enable_grad(), requires_grad_only(model, scorer.selected):
            call_model(model, x)

    def record() -> None:
        with torch.enable_grad(), requires_grad_only(model, scorer.selected):
            recorded(x)

    def head() -> None:
        scorer(x)

    return {"forward": forward, "grad mode": grad_mode, "recorded": record, "head": head}, scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", choices=sorted(ZOO))
    p.add_argument("--method", default="confounding", choices=("confounding", "kl"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="default: the bench's CPU batch")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    for name in args.models:
        spec = ZOO[name]
        model = build_model(spec, False, torch.device("cpu"))
        batch = args.batch or spec.batch_for("cpu", False)
        x = spec.make_input(batch, False, torch.device("cpu"))
        cases, scorer = runs(model, x, args.method)
        names = list(cases)
        for run in cases.values():  # warm-up
            run()
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                start = clock()
                cases[n]()
                times[n].append((clock() - start) * 1e3)
        how = scorer._candidates[0].last_forward
        print(f"{name} {args.method} batch {batch}, {args.threads} thread(s), {how} recorder:")
        for n in names:
            ratio = statistics.median(a / b for a, b in zip(times[n], times["forward"]))
            print(f"  {n:10s} {statistics.median(times[n]):9.1f} ms  x{ratio:.3f} forward")


if __name__ == "__main__":
    main()
