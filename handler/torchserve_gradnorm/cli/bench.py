"""gradnorm-bench: time and memory of per-sample gradient norms, ours against the references.

Cases are model x method x implementation. Every case builds its model (fixed seed) and
input, sets its implementation up, runs it ``--warmup`` times, then ``--repeats`` timed
times, and reports the median time and the peak memory of the timed runs above what was
allocated before the first run (model, input and set-up excluded).

On CPU each case runs in a fresh subprocess (``python -m torchserve_gradnorm.cli.bench
--single-case ...``): peak RSS is read from ``/proc/self/status`` (VmHWM, reset through
``/proc/self/clear_refs`` after the warm-up) so that no allocator cache or library loaded by
an earlier case shows up in a later one. On CUDA cases run in this process and peak memory
is ``torch.cuda.max_memory_allocated`` (reset per case).

Implementations whose library is not importable (pytorch-ood, BackPACK, torchvision for the
ResNets) are skipped with the reason printed, never a crash: the GPU script runs this module
from a checkout on a machine that may have only torch and torchvision.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.losses import get_method

RESULT_MARKER = "@@GRADNORM-BENCH-RESULT@@ "
METHOD_CHOICES = ("confounding", "kl")
CHECK_RTOL = 1e-3
"""Per-sample relative tolerance when a reference's scores are compared with ours."""


# --------------------------------------------------------------------------- models


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm statistics and affine parameters that are not the identity.

    A freshly initialized ResNet has running mean 0 / variance 1 and weight 1 / bias 0;
    the norms are then unusually regular. Perturbing them keeps every rule exercised.
    """
    g = _seeded(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return model


def _resnet(arch: str, quick: bool) -> nn.Module:
    import torchvision

    return _randomize_batchnorm(getattr(torchvision.models, arch)(num_classes=10), 0)


def _mlp(quick: bool) -> nn.Module:
    width, inp = (32, 64) if quick else (512, 784)
    return nn.Sequential(
        nn.Linear(inp, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention from two nn.Linear layers (no fused kernel, no parameters
    outside Linear modules), so that every backend, and BackPACK's hooks, can see them."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class SmallEncoder(nn.Module):
    """Pre-norm transformer encoder classifier over token ids, mean-pooled.

    Built only from Embedding, Linear and LayerNorm modules; the positions are an
    nn.Embedding looked up with (B, T) ids, so the fast backend covers every parameter.
    """

    def __init__(
        self, vocab: int, seq_len: int, dim: int, heads: int, layers: int, classes: int = 10
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, 4 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).expand(b, t)
        x = self.tokens(ids) + self.positions(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


TRANSFORMER_SHAPES = {
    False: dict(vocab=1000, seq_len=32, dim=128, heads=4, layers=2),
    True: dict(vocab=50, seq_len=8, dim=32, heads=2, layers=1),
}


def _transformer(quick: bool) -> nn.Module:
    return SmallEncoder(**TRANSFORMER_SHAPES[quick])


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[bool], nn.Module]
    batch: int
    quick_batch: int
    shape: Callable[[bool], tuple[int, ...]]
    """Per-sample input shape (float inputs) or (seq_len,) for token ids."""
    tokens: bool = False
    needs: tuple[str, ...] = ()
    cuda_only: bool = False
    loop_by_default: bool = False
    backpack_converter: bool = False

    def input_desc(self, quick: bool) -> str:
        shape = "x".join(str(s) for s in self.shape(quick))
        return f"{shape} tokens" if self.tokens else shape

    def make_input(self, batch: int, quick: bool, device: torch.device) -> Tensor:
        g = _seeded(1234)
        if self.tokens:
            vocab = TRANSFORMER_SHAPES[quick]["vocab"]
            x = torch.randint(0, vocab, (batch, *self.shape(quick)), generator=g)
        else:
            x = torch.randn(batch, *self.shape(quick), generator=g)
        return x.to(device)


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(
        "resnet18",
        lambda q: _resnet("resnet18", q),
        batch=64,
        quick_batch=4,
        shape=lambda q: (3, 16, 16) if q else (3, 32, 32),
        needs=("torchvision",),
        backpack_converter=True,
    ),
    "mlp": ModelSpec(
        "mlp",
        _mlp,
        batch=64,
        quick_batch=8,
        shape=lambda q: (64,) if q else (784,),
        loop_by_default=True,
    ),
    "transformer": ModelSpec(
        "transformer",
        _transformer,
        batch=64,
        quick_batch=4,
        shape=lambda q: (TRANSFORMER_SHAPES[q]["seq_len"],),
        tokens=True,
    ),
    "resnet50": ModelSpec(
        "resnet50",
        lambda q: _resnet("resnet50", q),
        batch=64,
        quick_batch=2,
        shape=lambda q: (3, 32, 32) if q else (3, 224, 224),
        needs=("torchvision",),
        cuda_only=True,
        backpack_converter=True,
    ),
}


def build_model(spec: ModelSpec, quick: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return spec.build(quick).to(device).eval()


# ------------------------------------------------------------------ implementations


@dataclass(frozen=True)
class ImplSpec:
    name: str
    description: str
    needs: tuple[str, ...] = ()
    methods: tuple[str, ...] = METHOD_CHOICES
    per_method: bool = True
    """False: the same work for every method (plain forward), run once per model."""
    check: bool = False
    """Compare its per-sample norms with the fast backend's (rtol CHECK_RTOL)."""
    method_note: str = ""
    """Why the other methods are not run."""


IMPLS: dict[str, ImplSpec] = {
    s.name: s
    for s in (
        ImplSpec("forward", "model(x) under torch.no_grad()", per_method=False),
        ImplSpec(
            "fwd+bwd",
            "forward + one torch.autograd.grad of the summed loss w.r.t. all parameters",
        ),
        ImplSpec("fast", "GradNormScorer(backend='fast'), all parameters"),
        ImplSpec("fast-head", "GradNormScorer(backend='fast', param_filter='head')"),
        ImplSpec("vmap", "GradNormScorer(backend='vmap'), all parameters", check=True),
        ImplSpec("loop", "GradNormScorer(backend='loop'), all parameters", check=True),
        ImplSpec(
            "pytorch-ood",
            "pytorch_ood.detector GradUncertainty (confounding) / GradNorm (kl), "
            "library defaults, all parameters",
            needs=("pytorch_ood",),
            check=True,
        ),
        ImplSpec(
            "backpack",
            "BackPACK BatchL2Grad around loss.backward(), loss = sum of per-sample "
            "confounding losses (the exact method), all parameters",
            needs=("backpack",),
            methods=("confounding",),
            check=True,
            method_note="BackPACK's BatchL2Grad gives squared L2 norms; kl needs L1",
        ),
    )
}
DEFAULT_IMPLS = tuple(IMPLS)


class Skip(Exception):
    """This case cannot run here; the message says why."""


def _all_params(model: nn.Module) -> list[Tensor]:
    return [p.requires_grad_(True) for p in model.parameters()]


def _setup_forward(model, x, method, opts):
    def run():
        with torch.no_grad():
            model(x)

    return run, None


def _setup_fwd_bwd(model, x, method, opts):
    params = _all_params(model)
    loss_fn = get_method(method).loss

    def run():
        with torch.enable_grad():
            torch.autograd.grad(loss_fn(model(x), 1.0).sum(), params)

    return run, None


def _scorer_setup(backend: str, param_filter=None):
    def setup(model, x, method, opts):
        scorer = GradNormScorer(model, method=method, param_filter=param_filter, backend=backend)

        def run():
            return scorer(x).grad_norm

        return run, run

    return setup


def _setup_pytorch_ood(model, x, method, opts):
    from pytorch_ood.detector import GradNorm, GradUncertainty

    if method == "confounding":
        detector = GradUncertainty(model)
        opts["options"] = "GradUncertainty(model), no micro-batching"
    else:
        kwargs = {}
        if opts.get("ood_micro_batch"):
            kwargs["micro_batch_size"] = opts["ood_micro_batch"]
        detector = GradNorm(model, **kwargs)
        opts["options"] = f"GradNorm(model, micro_batch_size={detector.micro_batch_size})"

    def run():
        return -detector.predict(x)

    return run, run


def _setup_backpack(model, x, method, opts):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    loss_fn = get_method(method).loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extended = extend(model, use_converter=opts["backpack_converter"])
    extended.eval()
    params = _all_params(extended)

    def run():
        with warnings.catch_warnings():
            # BackPACK's full backward hooks warn that the input needs no gradient
            warnings.simplefilter("ignore")
            with torch.enable_grad():
                loss = loss_fn(extended(x), 1.0).sum()
                with backpack(BatchL2Grad()):
                    loss.backward()
        norms = torch.stack([p.batch_l2 for p in params]).sum(0)
        for p in params:
            p.grad = None
            del p.batch_l2
        return norms

    # One call now, to find parameters BackPACK has no per-sample rule for.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.enable_grad():
            loss = loss_fn(extended(x), 1.0).sum()
            with backpack(BatchL2Grad()):
                loss.backward()
    missing = [n for n, p in extended.named_parameters() if not hasattr(p, "batch_l2")]
    owners = sorted({type(extended.get_submodule(n.rpartition(".")[0])).__name__ for n in missing})
    for p in params:
        p.grad = None
        if hasattr(p, "batch_l2"):
            del p.batch_l2
    if missing:
        raise Skip(
            f"BackPACK's BatchL2Grad has no extension for {', '.join(owners)} "
            f"({len(missing)} parameters, e.g. {missing[0]}): its norms would be partial"
        )
    return run, run


SETUPS = {
    "forward": _setup_forward,
    "fwd+bwd": _setup_fwd_bwd,
    "fast": _scorer_setup("fast"),
    "fast-head": _scorer_setup("fast", "head"),
    "vmap": _scorer_setup("vmap"),
    "loop": _scorer_setup("loop"),
    "pytorch-ood": _setup_pytorch_ood,
    "backpack": _setup_backpack,
}


# ----------------------------------------------------------------------- memory


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


# ------------------------------------------------------------------------ cases

CONTENDED = 0.05
"""A CPU case whose timed runs saw runnable tasks waiting for a CPU more than this fraction
of the time was measured on a busy machine: its timings are flagged."""


def _cpu_stall_us() -> int | None:
    """Linux PSI: total microseconds during which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(re.search(r"^some .*total=(\d+)", f.read(), re.M).group(1))
    except (OSError, AttributeError, ValueError):
        return None


def _case_key(case: dict) -> tuple[str, str, str]:
    return case["model"], case["method"], case["impl"]


def _max_rel_err(ours: Tensor, ref: Tensor) -> float:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return float(((ours - ref).abs() / scale).max())


def run_case(case: dict) -> dict:
    """Run one case in this process; returns the case dict with its results filled in."""
    out = dict(case)
    device = torch.device(case["device"])
    torch.set_num_threads(case["threads"])
    spec = MODELS[case["model"]]
    method = case["method"] if case["method"] != "-" else "confounding"
    quick = case["quick"]
    try:
        model = build_model(spec, quick, device)
        x = spec.make_input(case["batch"], quick, device)
        opts = {
            "backpack_converter": spec.backpack_converter,
            "ood_micro_batch": case.get("ood_micro_batch"),
        }
        run, scores_fn = SETUPS[case["impl"]](model, x, method, opts)
    except Skip as e:
        out.update(status="skipped", reason=str(e))
        return out
    if "options" in opts:
        out["options"] = opts["options"]

    memory = CudaMemory() if device.type == "cuda" else CpuMemory()
    memory.set_baseline()

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    try:
        for _ in range(case["warmup"]):
            timed()
        memory.reset_peak()
        stall_start, wall_start = _cpu_stall_us(), time.perf_counter()
        times = [timed() for _ in range(case["repeats"])]
        stall_end, wall = _cpu_stall_us(), time.perf_counter() - wall_start
    except torch.OutOfMemoryError as e:
        out.update(status="error", reason=f"out of memory: {str(e).splitlines()[0]}")
        return out
    out.update(
        status="ok",
        median_ms=statistics.median(times),
        min_ms=min(times),
        times_ms=times,
        peak_mb=memory.peak_mb(),
        memory_method=memory.method,
    )
    if stall_start is not None and stall_end is not None and wall > 0:
        out["cpu_stall"] = round((stall_end - stall_start) / 1e6 / wall, 3)

    if case.get("compare") and scores_fn is not None:
        ref = scores_fn()
        del run, scores_fn
        fresh = build_model(spec, quick, device)
        ours = GradNormScorer(fresh, method=method, backend="fast")(x).grad_norm
        err = _max_rel_err(ours, ref)
        out["check"] = {
            "against": "fast",
            "max_rel_err": err,
            "rtol": CHECK_RTOL,
            "ok": bool(err <= CHECK_RTOL),
        }
    return out


def run_case_subprocess(case: dict, timeout: float) -> dict:
    env = dict(os.environ)
    threads = str(case["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cmd = [
        sys.executable,
        "-m",
        "torchserve_gradnorm.cli.bench",
        "--single-case",
        json.dumps(case),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "status": "error", "reason": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {
        **case,
        "status": "error",
        "reason": f"subprocess exited {proc.returncode}: {' | '.join(tail)}",
    }


REUSE_FIELDS = ("model", "batch", "method", "impl", "device", "threads", "quick", "repeats")


def _reuse_key(case: dict) -> tuple:
    return tuple(case.get(k) for k in REUSE_FIELDS)


def _reusable_results(path: Path) -> dict[tuple, dict]:
    """The cases of an earlier run that need no rerun: ok, and not CPU-contended."""
    try:
        earlier = json.loads(Path(path).read_text())
        cases, date = earlier["cases"], earlier["meta"]["date"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"gradnorm-bench: cannot read --keep-from {path}: {e}") from None
    return {
        _reuse_key(c): {**c, "kept_from": c.get("kept_from") or f"run of {date}"}
        for c in cases
        if c.get("status") == "ok" and not _contended(c)
    }


def run_one(case: dict, isolation: str, timeout: float) -> dict:
    if isolation == "subprocess":
        return run_case_subprocess(case, timeout)
    return run_case_guarded(case)


def _wait_for_quiet_cpu(max_wait: float) -> None:
    """Wait (at most max_wait s) until the CPU pressure of the last 10 s is below CONTENDED."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        try:
            with open("/proc/pressure/cpu") as f:
                avg10 = float(re.search(r"^some avg10=([\d.]+)", f.read(), re.M).group(1))
        except (OSError, AttributeError, ValueError):
            return
        if avg10 < CONTENDED * 100:
            return
        time.sleep(2)


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


# -------------------------------------------------------------------- planning


def _library_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"{module} is not importable ({type(e).__name__}: {e})"
    return None


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def plan_cases(args: argparse.Namespace) -> list[dict]:
    models = _split(args.models) or [
        m for m, s in MODELS.items() if not s.cuda_only or args.device == "cuda"
    ]
    methods = _split(args.methods) or list(METHOD_CHOICES)
    impls = _split(args.impls)
    explicit_impls = impls is not None
    impls = impls or list(DEFAULT_IMPLS)
    for name, known, what in (
        (models, MODELS, "model"),
        (methods, METHOD_CHOICES, "method"),
        (impls, IMPLS, "implementation"),
    ):
        unknown = [n for n in name if n not in known]
        if unknown:
            raise SystemExit(f"gradnorm-bench: unknown {what} {unknown}; choose from {list(known)}")

    problems: dict[str, str | None] = {}

    def problem(module: str) -> str | None:
        if module not in problems:
            problems[module] = _library_problem(module)
        return problems[module]

    cases = []
    for model in models:
        spec = MODELS[model]
        batch = args.batch or (spec.quick_batch if args.quick else spec.batch)
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
                    "quick": args.quick,
                    "compare": ispec.check and not args.no_check,
                    "ood_micro_batch": args.ood_micro_batch,
                }
                reason = None
                if method != "-" and method not in ispec.methods:
                    reason = ispec.method_note or f"{impl} supports only {ispec.methods}"
                for module in (*spec.needs, *ispec.needs):
                    reason = reason or problem(module)
                if (
                    reason is None
                    and impl == "loop"
                    and not spec.loop_by_default
                    and not (args.with_loop or explicit_impls)
                ):
                    reason = "one forward/backward per sample is slow here; pass --with-loop"
                if reason:
                    case.update(status="skipped", reason=reason)
                cases.append(case)
    return cases


# --------------------------------------------------------------------- reporting

RATIOS = (
    # (name, numerator impl, denominator impl, denominator method is "-")
    ("fast/pytorch-ood", "fast", "pytorch-ood", False),
    ("fast/backpack", "fast", "backpack", False),
    ("fast/fwd+bwd", "fast", "fwd+bwd", False),
    ("fast/vmap", "fast", "vmap", False),
    ("fast-head/forward", "fast-head", "forward", True),
)

TARGETS = (
    # (ratio name, quantity, bound, description); evaluated on resnet18 (full size)
    ("fast/pytorch-ood", "time", 1 / 6, "fast >= 6x faster than pytorch-ood"),
    ("fast/backpack", "time", 1.0, "fast no slower than BackPACK"),
    ("fast/fwd+bwd", "time", 1.5, "fast <= 1.5x forward+backward"),
    ("fast/pytorch-ood", "memory", 0.25, "fast peak memory <= 1/4 of pytorch-ood's"),
    ("fast-head/forward", "time", 1.2, "head-only <= 1.2x plain forward"),
)
TARGET_MODEL = "resnet18"


MIN_MB = 1.0
"""Memory ratios need a denominator of at least this: below it, RSS noise dominates."""


def _ratio(a: float | None, b: float | None, floor: float = 0.0) -> float | None:
    if a is None or b is None or b <= floor or b <= 0:
        return None
    return max(a, 0.0) / b


def compute_ratios(cases: list[dict]) -> list[dict]:
    ok = {_case_key(c): c for c in cases if c.get("status") == "ok"}
    pairs = sorted({(c["model"], c["method"]) for c in cases if c["method"] != "-"})
    ratios = []
    for model, method in pairs:
        for name, num, den, den_any_method in RATIOS:
            a = ok.get((model, method, num))
            b = ok.get((model, "-" if den_any_method else method, den))
            if a is None or b is None:
                continue
            ratios.append(
                {
                    "model": model,
                    "method": method,
                    "ratio": name,
                    "time": _ratio(a["median_ms"], b["median_ms"]),
                    "memory": _ratio(a["peak_mb"], b["peak_mb"], MIN_MB),
                }
            )
    return ratios


def evaluate_targets(ratios: list[dict], quick: bool) -> list[dict]:
    if quick:
        return []
    by = {(r["model"], r["method"], r["ratio"]): r for r in ratios}
    out = []
    for method in METHOD_CHOICES:
        for ratio, quantity, bound, desc in TARGETS:
            r = by.get((TARGET_MODEL, method, ratio))
            if r is None:
                continue
            value = r[quantity]
            out.append(
                {
                    "model": TARGET_MODEL,
                    "method": method,
                    "target": desc,
                    "ratio": ratio,
                    "quantity": quantity,
                    "value": value,
                    "bound": bound,
                    "met": None if value is None else bool(value <= bound),
                }
            )
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _check_text(c: dict) -> str:
    chk = c.get("check")
    if not chk:
        return ""
    return f"{chk['max_rel_err']:.1e} {'ok' if chk['ok'] else 'MISMATCH'}"


def _contended(c: dict) -> bool:
    return c.get("device") == "cpu" and (c.get("cpu_stall") or 0) > CONTENDED


def _ok_note(c: dict) -> str:
    notes = [c["options"]] if c.get("options") else []
    if _contended(c):
        notes.append(f"CPU contended {c['cpu_stall']:.0%} of the time")
    if c.get("kept_from"):
        notes.append(f"from the {c['kept_from']}")
    return "; ".join(notes)


def table_rows(cases: list[dict]) -> list[list[str]]:
    rows = []
    for c in cases:
        status = c.get("status", "?")
        rows.append(
            [
                c["model"],
                c["input"],
                str(c["batch"]),
                c["method"],
                c["impl"],
                _fmt(c.get("median_ms"), 2) if status == "ok" else status,
                _fmt(c.get("peak_mb"), 1) if status == "ok" else "",
                _check_text(c),
                c.get("reason", "") if status != "ok" else _ok_note(c),
            ]
        )
    return rows


HEADER = ["model", "input", "batch", "method", "impl", "median ms", "peak MB", "vs fast", "note"]
NUMERIC = ("batch", "median ms", "peak MB")


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
        lines.append(
            f"{r['model']:<12} {r['method']:<12} {r['ratio']:<18} "
            f"time {_fmt(t, 3):>7} {speed:<17} peak memory {_fmt(r['memory'], 3):>7}"
        )
    return lines


def format_target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(
            f"{verdict:<6} {t['model']} {t['method']:<12} {t['target']:<42} "
            f"{t['ratio']} {t['quantity']} = {_fmt(t['value'], 3)} (bound {t['bound']:.3g})"
        )
    return lines


def format_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# gradnorm-bench: {meta['device_name']} ({meta['device']})",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['date']}; "
        f"median of {meta['repeats']} runs after {meta['warmup']} warm-up; "
        f"peak memory: {meta['memory_method']}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---:" if h in NUMERIC else "---" for h in HEADER) + "|",
    ]
    for r in table_rows(result["cases"]):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in r) + " |")
    lines += ["", "## Ratios (time and peak memory, numerator / denominator)", "", "```"]
    lines += format_ratio_lines(result["ratios"]) + ["```"]
    if result["targets"]:
        lines += ["", "## Targets", "", "```"]
        lines += format_target_lines(result["targets"]) + ["```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- meta


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the machine distort CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def _versions() -> dict[str, str | None]:
    out = {"torch": torch.__version__}
    for name, dist in (
        ("torchvision", "torchvision"),
        ("pytorch_ood", "pytorch-ood"),
        ("backpack", "backpack-for-pytorch"),
    ):
        out[name] = _version(dist)
    return out


# ------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradnorm-bench",
        description="Time and peak memory of per-sample gradient-norm scoring: the fast "
        "backend against vmap, loop, pytorch-ood, BackPACK and plain forward/backward.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--models", nargs="+", help=f"of {', '.join(MODELS)} (default: all; resnet50 on cuda)"
    )
    p.add_argument("--methods", nargs="+", help="confounding, kl (default: both)")
    p.add_argument("--impls", nargs="+", help=f"of {', '.join(IMPLS)} (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 5; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--with-loop", action="store_true", help="also time loop on the big models")
    p.add_argument(
        "--ood-micro-batch",
        type=int,
        default=None,
        help="micro_batch_size for pytorch-ood's GradNorm (default: the library's, 32)",
    )
    p.add_argument("--no-check", action="store_true", help="skip comparing scores with fast")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (for tests)")
    p.add_argument(
        "--isolation",
        choices=("auto", "subprocess", "in-process"),
        default="auto",
        help="auto: one subprocess per case on CPU (clean RSS), in-process on CUDA and "
        "with --quick",
    )
    p.add_argument(
        "--retry-contended",
        type=int,
        default=None,
        metavar="N",
        help="CPU: rerun a case up to N times while other processes competed for the CPU "
        "during its timed runs, keeping the least contended run (default 2; quick 0)",
    )
    p.add_argument(
        "--keep-from",
        type=Path,
        metavar="JSON",
        help="reuse the uncontended ok cases of an earlier run's JSON (same model, batch, "
        "method, impl, device, threads, repeats); run only the others",
    )
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument(
        "--profile",
        type=int,
        metavar="ROWS",
        default=0,
        help="instead of the timing table, torch.profiler every case and print its top ROWS ops",
    )
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/latest-<dev>.json)")
    p.add_argument("--single-case", help=argparse.SUPPRESS)
    return p


def profile_case(case: dict, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(case["threads"])
    spec = MODELS[case["model"]]
    device = torch.device(case["device"])
    method = case["method"] if case["method"] != "-" else "confounding"
    model = build_model(spec, case["quick"], device)
    x = spec.make_input(case["batch"], case["quick"], device)
    opts = {"backpack_converter": spec.backpack_converter, "ood_micro_batch": None}
    run, _ = SETUPS[case["impl"]](model, x, method, opts)
    for _ in range(max(case["warmup"], 1)):
        run()
    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(case["repeats"]):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.single_case:
        result = run_case_guarded(json.loads(args.single_case))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0
    threads = torch.get_num_threads()
    try:
        return _bench(args, argv)
    finally:  # called in-process (tests): leave the caller's thread count as it was
        torch.set_num_threads(threads)


def _bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gradnorm-bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr
        )
        return 2
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.retry_contended is None:
        args.retry_contended = 0 if args.quick else 2
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        print("gradnorm-bench: --repeats and --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    isolation = args.isolation
    if isolation == "auto":
        isolation = "in-process" if args.device == "cuda" or args.quick else "subprocess"

    cases = plan_cases(args)
    load_start = _loadavg()
    for c in cases:
        if c.get("status") == "skipped" and c["impl"] != "loop":
            print(f"skip {c['model']} {c['method']} {c['impl']}: {c['reason']}", flush=True)

    if args.profile:
        for c in cases:
            if c.get("status") == "skipped":
                continue
            print(f"\n=== profile {c['model']} {c['method']} {c['impl']} batch {c['batch']} ===")
            try:
                print(profile_case(c, args.profile), flush=True)
            except Skip as e:
                print(f"skipped: {e}")
        return 0

    kept = _reusable_results(args.keep_from) if args.keep_from else {}
    results = []
    for c in cases:
        if c.get("status") == "skipped":
            results.append(c)
            continue
        previous = kept.get(_reuse_key(c))
        if previous is not None:
            print(f"keep {c['model']} {c['method']} {c['impl']} from {args.keep_from}")
            results.append(previous)
            continue
        label = f"{c['model']} {c['method']} {c['impl']}"
        print(f"run  {label} ...", end=" ", flush=True)
        r = run_one(c, isolation, args.case_timeout)
        for attempt in range(2, args.retry_contended + 2):
            if r.get("status") != "ok" or not _contended(r):
                break
            print(f"CPU contended {r['cpu_stall']:.0%}, again ...", end=" ", flush=True)
            _wait_for_quiet_cpu(60)
            again = run_one(c, isolation, args.case_timeout)
            if again.get("status") == "ok" and again.get("cpu_stall", 1) < r["cpu_stall"]:
                r = again
            r["attempts"] = attempt
        results.append(r)
        if r["status"] == "ok":
            stall = f" (CPU contended {r['cpu_stall']:.0%})" if _contended(r) else ""
            print(
                f"{r['median_ms']:.2f} ms, {r['peak_mb']:.1f} MB {_check_text(r)}{stall}",
                flush=True,
            )
        else:
            print(f"{r['status']}: {r.get('reason', '')}", flush=True)

    ratios = compute_ratios(results)
    targets = evaluate_targets(ratios, args.quick)
    memory_methods = {r["memory_method"] for r in results if r.get("memory_method")}
    name = device_name(args.device)
    meta = {
        "device": args.device,
        "device_name": name,
        **_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        "isolation": isolation,
        "memory_method": "; ".join(sorted(memory_methods)) or "-",
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "check_rtol": CHECK_RTOL,
        "implementations": {k: v.description for k, v in IMPLS.items()},
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
        print("targets (ResNet-18):")
        print("\n".join(format_target_lines(targets)))
    contended = [r for r in results if r.get("status") == "ok" and _contended(r)]
    if contended:
        print(
            f"WARNING: {len(contended)} case(s) ran while other processes wanted the CPU "
            f"(PSI cpu 'some' > {CONTENDED:.0%} of their timed runs; see the note column): "
            "rerun them on a quiet machine"
        )
    mismatches = [r for r in results if r.get("check") and not r["check"]["ok"]]
    for r in mismatches:
        print(
            f"WARNING: {r['model']} {r['method']} {r['impl']} scores differ from fast by "
            f"{r['check']['max_rel_err']:.2e} (rtol {CHECK_RTOL})"
        )

    out = args.out or Path("bench/results") / f"latest-{_slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(format_markdown(result))
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
