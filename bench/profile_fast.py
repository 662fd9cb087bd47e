"""Per-call overhead of the fast backend: its time over a plain pass, measured in one process.

Every timed case of a model runs in turns (forward, fwd+bwd, the scorer on all parameters,
the scorer on the head), so that a load on the machine falls on all of them alike; the
ratios are medians of per-round ratios (``--clock cpu`` times CPU time instead of wall time,
steadier on a loaded machine). ``--baseline PKG`` adds the same scorer cases from
another copy of the package (``all0``, ``head0``; e.g. an older commit's
``handler/torchserve_gradnorm`` extracted under another name onto the path), for before/after
ratios from one process. ``--cprofile`` and ``--torch-profile`` print where one scorer call
spends its time instead.

    PYTHONPATH=handler:bench python bench/profile_fast.py --models mlp digits --rounds 30
    PYTHONPATH=handler:bench python bench/profile_fast.py --models cifar-resnet18 \\
        --cases forward head --rounds 5
    PYTHONPATH=handler:bench python bench/profile_fast.py --models mlp --cprofile all
    git archive OLD handler/torchserve_gradnorm | tar -x -C /tmp/old \
        && mv /tmp/old/handler/torchserve_gradnorm /tmp/old/gn_old
    PYTHONPATH=handler:bench:/tmp/old python bench/profile_fast.py --baseline gn_old \
        --cases forward fwd+bwd all all0 head head0
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pstats
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from gradnorm_bench.zoo import ZOO, build_model
from torchserve_gradnorm import GradNormScorer

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"


def digits_model() -> tuple[nn.Module, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("digits_model", DIGITS / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.DigitsCNN()
    model.load_state_dict(torch.load(DIGITS / "digits_cnn.pt", map_location="cpu"))
    return model.eval(), torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def model_and_input(name: str, batch: int | None) -> tuple[nn.Module, torch.Tensor]:
    if name == "digits":
        model, x = digits_model()
        return model, x if batch is None else torch.randn(batch, 1, 8, 8)
    spec = ZOO[name]
    device = torch.device("cpu")
    model = build_model(spec, False, device)
    return model, spec.make_input(batch or spec.batch_for("cpu", False), False, device)


def cases(
    model: nn.Module, x: torch.Tensor, method: str, backend: str, baseline: str | None
) -> dict:
    params = list(model.parameters())
    loss = GradNormScorer(model, method=method, backend=backend).method.loss

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def fwd_bwd() -> None:
        for p in params:
            p.requires_grad_(True)
        torch.autograd.grad(loss(model(x), 1.0).sum(), params)

    everything = GradNormScorer(model, method=method, backend=backend)
    head = GradNormScorer(model, method=method, backend=backend, param_filter="head")
    run = {
        "forward": forward,
        "fwd+bwd": fwd_bwd,
        "all": lambda: everything(x),
        "head": lambda: head(x),
        "_scorers": {"all": everything, "head": head},
    }
    if baseline:
        old = importlib.import_module(baseline).GradNormScorer
        everything0 = old(model, method=method, backend=backend)
        head0 = old(model, method=method, backend=backend, param_filter="head")
        run.update(all0=lambda: everything0(x), head0=lambda: head0(x))
        run["_scorers"].update(all0=everything0, head0=head0)
    return run


def timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return (clock() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "digits"])
    parser.add_argument("--cases", nargs="+", default=["forward", "fwd+bwd", "all", "head"])
    parser.add_argument("--method", default="confounding", choices=("confounding", "kl"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--baseline", help="another copy of the package, by import name")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time, which other processes' load hardly moves "
        "(with --threads 1 it is the run's length on a quiet machine)",
    )
    parser.add_argument("--cprofile", choices=("all", "head"), help="profile one case instead")
    parser.add_argument("--torch-profile", choices=("all", "head"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for name in args.models:
        model, x = model_and_input(name, args.batch)
        run = cases(model, x, args.method, args.backend, args.baseline)
        for fn in (run[c] for c in args.cases):
            fn()  # warm-up (and auto's fallback, if any)
        backends = {k: s.backend for k, s in run["_scorers"].items()}
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.rounds):
                run[args.cprofile]()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
            continue
        if args.torch_profile:
            with torch.profiler.profile() as prof:
                for _ in range(args.rounds):
                    run[args.torch_profile]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
            continue
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times: dict[str, list[float]] = {c: [] for c in args.cases}
        for _ in range(args.rounds):
            for c in args.cases:
                times[c].append(timed(run[c], clock))
        medians = {c: statistics.median(t) for c, t in times.items()}
        line = "  ".join(f"{c} {medians[c]:8.2f} ms" for c in args.cases)
        print(f"{name:16s} {args.method:11s} backends {backends}  {line}")
        pairs = [("head", "forward"), ("head0", "forward"), ("all", "fwd+bwd"), ("all0", "fwd+bwd")]
        pairs += [("head", "head0"), ("all", "all0")]
        for num, den in pairs:
            if num in times and den in times:
                ratio = statistics.median(a / b for a, b in zip(times[num], times[den]))
                print(f"    {num}/{den}: {ratio:.3f}")


if __name__ == "__main__":
    main()
