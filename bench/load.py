"""Load test over loopback: the gradnorm handler against a plain forward-only handler.

Usage: python bench/load.py [--requests 2000] [--concurrency 16] [--timeout-s 300]
       (or `make load`)

Builds three archives of the demo digits CNN into a temporary model store -- ``plain``
(samples/plain_handler.py: same decoding, forward pass only), ``gradnorm_head``
(param_filter: head) and ``gradnorm_all`` (every parameter) -- with the same batching
(batchSize 8, maxBatchDelay 5 ms, one worker with one torch thread), starts one TorchServe
on 127.0.0.1 and puts the models under load one at a time, so they never compete for the
CPU: in --rounds rounds, each model in turn, so that a change in background load touches
all of them alike. Each request is a PNG: one of the ID/OOD sample pictures or a held-out
digit from scikit-learn's load_digits test split, the same seeded sequence for every model.
Every answer is checked by content against values computed offline for its own input
(top-k indices and probabilities, and grad_norm for the gradnorm models), so a lost,
swapped or wrong answer is a mismatch.

Prints, per model: requests, errors, mismatches, throughput, p50/p99 latency and
throughput relative to the plain handler (overall and round by round). Exits 1 on any
error or mismatch, or if the run did not finish within --timeout-s; the server is stopped
in every case.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from torchserve_harness import DIGITS, TorchServe, build_archive, load_demo_model  # noqa: E402

import torchserve_gradnorm  # noqa: E402
from torchserve_gradnorm.codecs import RequestDecoder  # noqa: E402
from torchserve_gradnorm.config import handler_section, parse_handler_config  # noqa: E402
from torchserve_gradnorm.scorer import GradNormScorer  # noqa: E402

PLAIN_HANDLER = REPO / "samples/plain_handler.py"
PACKAGE_DIR = Path(torchserve_gradnorm.__file__).resolve().parent
# model name -> param_filter (None: the plain forward-only handler)
MODELS = {"plain": None, "gradnorm_head": "head", "gradnorm_all": "all"}
REL = 1e-4  # served vs offline: same float32 model, another batch composition


# --- inputs and their offline answers ----------------------------------------------------------


def picture_inputs() -> list[tuple[str, bytes]]:
    """The sample pictures, then held-out digits (test split) drawn like make_images.py."""
    inputs = [(p.name, p.read_bytes()) for p in sorted((REPO / "samples/images").glob("*/*.png"))]
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("scikit-learn not installed: using the sample pictures only", file=sys.stderr)
        return inputs
    images = load_digits().images
    for index in json.loads((DIGITS / "split.json").read_text())["test"]:
        values = np.rint(images[index] / 16.0 * 255.0).astype(np.uint8)
        picture = Image.fromarray(values, mode="L").resize((64, 64), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        inputs.append((f"test_idx{index}", buffer.getvalue()))
    return inputs


@dataclass
class Expected:
    indices: list[int]
    probabilities: list[float]
    grad_norm: float | None


def offline_answers(config: dict, bodies: list[bytes], param_filter: str | None) -> list[Expected]:
    handler = parse_handler_config(handler_section(config))
    decoder = RequestDecoder(handler.input, handler.limits)
    x = torch.cat([decoder.decode(body).samples for body in bodies])
    model = load_demo_model()
    if param_filter is None:
        with torch.inference_mode():
            logits, norms = model(x), [None] * len(x)
    else:
        assert handler.param_filter == (None if param_filter == "all" else param_filter)
        result = GradNormScorer(model, **handler.scorer_kwargs())(x)
        logits, norms = result.logits, result.grad_norm.tolist()
    probs = torch.softmax(logits.detach().float(), dim=1)
    top_p, top_i = probs.topk(min(handler.top_k, probs.shape[1]), dim=1)
    return [
        Expected(i, p, n) for i, p, n in zip(top_i.tolist(), top_p.tolist(), norms, strict=True)
    ]


def matches(answer: object, expected: Expected) -> bool:
    try:
        return _matches(answer, expected)
    except (AttributeError, KeyError, TypeError):  # not the answer's shape at all
        return False


def _matches(answer: object, expected: Expected) -> bool:
    if not isinstance(answer, dict) or not isinstance(answer.get("predictions"), list):
        return False
    predictions = answer["predictions"]
    if [p.get("index") for p in predictions] != expected.indices:
        return False
    for p, q in zip(predictions, expected.probabilities):
        if not math.isclose(p.get("probability", math.nan), q, rel_tol=REL, abs_tol=1e-9):
            return False
    if expected.grad_norm is None:
        return "ood" not in answer
    served = answer.get("ood", {}).get("grad_norm")
    return isinstance(served, float) and math.isclose(served, expected.grad_norm, rel_tol=REL)


# --- archives ------------------------------------------------------------------------------------


def model_config(param_filter: str | None, batch_size: int, max_batch_delay: int) -> dict:
    config = yaml.safe_load((DIGITS / "model-config.yaml").read_text())
    config.update(batchSize=batch_size, maxBatchDelay=max_batch_delay, minWorkers=1, maxWorkers=1)
    config["handler"]["param_filter"] = param_filter or "all"
    return config


def build_plain_archive(store: Path, config_file: Path, stage: Path) -> None:
    """The plain handler with the same model files, labels and torchserve_gradnorm package."""
    library = stage / "library"
    shutil.copytree(
        PACKAGE_DIR,
        library / "torchserve_gradnorm",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "cli"),
    )
    shutil.copy(DIGITS / "index_to_name.json", stage / "index_to_name.json")
    command = [
        str(Path(sys.executable).parent / "torch-model-archiver"),
        "--model-name", "plain",
        "--version", "1.0",
        "--handler", str(PLAIN_HANDLER),
        "--model-file", str(DIGITS / "model.py"),
        "--serialized-file", str(DIGITS / "digits_cnn.pt"),
        "--config-file", str(config_file),
        "--extra-files", f"{library},{stage / 'index_to_name.json'}",
        "--export-path", str(store),
        "--force",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Run:
    model: str
    sent: int = 0
    errors: int = 0
    mismatches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    finished: bool = True
    first_failure: str = ""
    rounds: list[float] = field(default_factory=list)
    """Throughput of each round, req/s."""

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def drive(
    url: str,
    headers: dict[str, str],
    sequence: list[int],
    bodies: list[bytes],
    expected: list[Expected],
    concurrency: int,
    deadline: float,
    run: Run,
) -> None:
    """Send every request of ``sequence`` from ``concurrency`` threads; record into ``run``."""
    lock = threading.Lock()
    position = iter(range(len(sequence)))
    local = threading.local()

    def worker() -> None:
        local.session = requests.Session()
        while True:
            with lock:
                k = next(position, None)
            if k is None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with lock:
                    run.finished = False
                return
            i = sequence[k]
            start = time.perf_counter()
            failure = ""
            try:
                r = local.session.post(
                    url, data=bodies[i], headers=headers, timeout=min(60.0, remaining)
                )
                elapsed = (time.perf_counter() - start) * 1000.0
                if r.status_code != 200:
                    failure = f"error: HTTP {r.status_code} {r.text[:200]!r}"
                elif not matches(r.json(), expected[i]):
                    failure = f"mismatch: input {i} got {r.text[:300]!r}"
            except (requests.RequestException, ValueError) as e:
                elapsed = (time.perf_counter() - start) * 1000.0
                failure = f"error: {type(e).__name__}: {e}"
            with lock:
                run.sent += 1
                if failure.startswith("error"):
                    run.errors += 1
                elif failure:
                    run.mismatches += 1
                else:
                    run.latencies_ms.append(elapsed)
                    size = r.headers.get("X-GradNorm-Batch-Size")
                    if size is not None:
                        run.batch_sizes.append(int(size))
                if failure and not run.first_failure:
                    run.first_failure = failure

    answered = len(run.latencies_ms)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall_s = time.perf_counter() - start
    run.wall_s += wall_s
    run.rounds.append((len(run.latencies_ms) - answered) / wall_s)


def report(runs: list[Run], requests_per_model: int, concurrency: int) -> list[str]:
    """The result table and verdicts, as printed (and written by ``--out``)."""
    lines: list[str] = []
    plain = next((r for r in runs if r.model == "plain"), None)
    lines.append(f"{requests_per_model} requests per model at concurrency {concurrency}, loopback")
    header = (
        f"{'model':<15}{'requests':>9}{'errors':>8}{'mismatch':>9}{'req/s':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>11}{'vs plain':>10}"
    )
    lines += [header, "-" * len(header)]
    for run in runs:
        ratio = run.throughput / plain.throughput if plain and plain.throughput else math.nan
        batch = f"{statistics.fmean(run.batch_sizes):.2f}" if run.batch_sizes else "-"
        lines.append(
            f"{run.model:<15}{run.sent:>9}{run.errors:>8}{run.mismatches:>9}"
            f"{run.throughput:>9.1f}{run.percentile(0.50):>9.1f}{run.percentile(0.99):>9.1f}"
            f"{batch:>11}{ratio:>10.3f}"
        )
    for run in runs:
        if not run.finished:
            lines.append(f"{run.model}: stopped at the time limit after {run.sent} requests")
        if run.first_failure:
            lines.append(f"{run.model}: first failure: {run.first_failure}")
    for run in runs:
        if plain and run is not plain and len(run.rounds) == len(plain.rounds):
            ratios = [a / b for a, b in zip(run.rounds, plain.rounds) if b]
            lines.append(
                f"{run.model}/plain throughput round by round: "
                + " ".join(f"{r:.2f}" for r in ratios)
                + f" (median {statistics.median(ratios):.3f})"
            )
    by_name = {r.model: r for r in runs}
    if plain and plain.throughput and "gradnorm_head" in by_name:
        ratio = by_name["gradnorm_head"].throughput / plain.throughput
        verdict = "met" if ratio >= 0.9 else "NOT met"
        lines.append(f"goal: gradnorm_head >= 0.90 x plain throughput: {verdict} ({ratio:.3f})")
    print("\n" + "\n".join(lines))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per model (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="(%(default)s)")
    parser.add_argument(
        "--timeout-s", type=float, default=300.0, help="whole run, start-up included"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="batchSize (%(default)s)")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="ms (%(default)s)")
    parser.add_argument("--warm-up", type=int, default=64, help="untimed requests per model")
    parser.add_argument("--rounds", type=int, default=4, help="models alternate (%(default)s)")
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="torch threads per worker (OMP_NUM_THREADS; %(default)s; 0 leaves torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the result table here (markdown)")
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of %(default)s"
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if (
        not models
        or set(models) - set(MODELS)
        or min(args.requests, args.concurrency, args.rounds) < 1
    ):
        parser.error(f"--models from {', '.join(MODELS)}; --requests, --concurrency, --rounds >= 1")
    deadline = time.monotonic() + args.timeout_s
    # SIGTERM (make's, timeout's) unwinds like Ctrl-C, so the server is always stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.worker_threads > 0:
        # the workers inherit it: with more intra-op threads than free cores (the load
        # generator and the Java frontend share them) a worker can stall for hundreds of ms
        os.environ["OMP_NUM_THREADS"] = str(args.worker_threads)
    load_before = os.getloadavg()[0]
    inputs = picture_inputs()
    bodies = [body for _, body in inputs]
    rng = random.Random(args.seed)
    warm = [rng.randrange(len(bodies)) for _ in range(args.warm_up)]
    sequence = [rng.randrange(len(bodies)) for _ in range(args.requests)]
    print(
        f"{len(bodies)} distinct inputs; torch {torch.__version__}; {os.cpu_count()} CPUs; "
        f"worker threads {os.environ.get('OMP_NUM_THREADS', 'default')}; "
        f"batchSize {args.batch_size}, maxBatchDelay {args.max_batch_delay} ms, 1 worker each"
    )

    runs = {name: Run(name) for name in models}
    warm_runs = {name: Run(name) for name in models}
    with tempfile.TemporaryDirectory(prefix="gradnorm-load-") as tmp:
        work = Path(tmp)
        store = work / "model_store"
        store.mkdir()
        expected = {}
        for name in models:
            config = model_config(MODELS[name], args.batch_size, args.max_batch_delay)
            config_file = work / f"{name}.yaml"
            config_file.write_text(yaml.safe_dump(config))
            if MODELS[name] is None:
                stage = work / "plain_stage"
                stage.mkdir()
                build_plain_archive(store, config_file, stage)
            else:
                build_archive(
                    store, name, DIGITS / "digits_cnn.pt", config_file, DIGITS / "model.py"
                )
            expected[name] = offline_answers(config, bodies, MODELS[name])
        server = TorchServe(work, store, models)
        try:
            try:
                server.start(timeout=max(1.0, min(180.0, deadline - time.monotonic())))
            except (TimeoutError, RuntimeError) as e:
                print(f"TorchServe did not come up: {e}", file=sys.stderr)
                return 1
            headers = server.headers()
            urls = {name: f"{server.url}/predictions/{name}" for name in models}
            for name in models:
                drive(urls[name], headers, warm, bodies, expected[name], args.concurrency,
                      deadline, warm_runs[name])  # fmt: skip
            # rounds, each model in turn with a rotating order: drifts in background load
            # (a shared machine) then touch every model alike
            size = math.ceil(len(sequence) / args.rounds)
            parts = [sequence[i : i + size] for i in range(0, len(sequence), size)]
            for r, part in enumerate(parts):
                order = models[r % len(models) :] + models[: r % len(models)]
                for name in order:
                    drive(urls[name], headers, part, bodies, expected[name], args.concurrency,
                          deadline, runs[name])  # fmt: skip
                done = ", ".join(
                    f"{n} {runs[n].sent} ({runs[n].errors} errors, {runs[n].mismatches} mismatches)"
                    for n in models
                )
                print(f"round {r + 1}/{len(parts)}: {done}", flush=True)
        finally:
            server.stop()
    for name, warm_run in warm_runs.items():
        run = runs[name]
        run.errors += warm_run.errors
        run.mismatches += warm_run.mismatches
        run.finished = run.finished and warm_run.finished
        run.first_failure = warm_run.first_failure or run.first_failure
    load = f"load average (1 min): {os.getloadavg()[0]:.2f} at the end, {load_before:.2f} before"
    print(load)
    lines = report(list(runs.values()), args.requests, args.concurrency)
    if args.out:
        command = "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:])
        context = f"torch {torch.__version__}, {os.cpu_count()} CPUs, {load}"
        text = "\n".join(
            [f"`{command}` ({time.strftime('%Y-%m-%d')}; {context})", "", "```", *lines, "```", ""]
        )
        Path(args.out).write_text(text)
    bad = [
        r
        for r in runs.values()
        if r.errors or r.mismatches or not r.finished or r.sent < args.requests
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
