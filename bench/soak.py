"""Soak test: one TorchServe, every way in, checked answer by answer, for a long time.

Usage: python bench/soak.py [--requests 50000] [--concurrency 16] [--out bench/results/soak.json]
       (or `make soak`)

Serves the demo digits CNN scored over every parameter (batchSize 8, maxBatchDelay 5 ms,
one worker) with token authorization and the Open Inference Protocol on, then sends a
seeded mix of request kinds from --concurrency threads:

  picture      PNG bytes to /predictions                       (HTTP)
  json_tensor  {"data": [[...]]} to /predictions               (HTTP)
  v2_json      v2 JSON, BYTES base64 picture, /v2/.../infer    (HTTP)
  v2_binary    v2 binary tensor extension (tritonclient's encoder), FP32 tensor in,
               binary outputs back                             (HTTP)
  native_grpc  Predictions, inference.proto                    (gRPC)
  oip_grpc     ModelInfer, TorchServe's OIP proto              (gRPC)
  malformed    --malformed of the requests (default 10 %): broken bodies of every kind
               above, each of which must be refused (HTTP 4xx with an error body; over
               gRPC, TorchServe's frontend drops the status, so the error body or the OIP
               ``error`` output)

Every good answer is compared with values computed offline for its own input (top-1 index
and gradient norm, rel 1e-4): a lost, swapped or wrong answer is a mismatch. The worker's
resident memory is sampled through the run. Pass criteria: no error beyond the malformed
requests' refusals, no mismatch, worker RSS growth after the warm-up below 5 %, and p99
latency of the last tenth of the requests within 1.2x that of the first tenth. Prints and
writes (--out: JSON, and a markdown copy beside it) the figures; exits 1 on a failed
criterion.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import requests
import torch
import tritonclient.http as triton_http
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from load import Expected, model_config, offline_answers, picture_inputs  # noqa: E402
from torchserve_grpc import generate_stubs  # noqa: E402
from torchserve_harness import DIGITS, TorchServe, build_archive  # noqa: E402

from torchserve_gradnorm.codecs import RequestDecoder  # noqa: E402
from torchserve_gradnorm.config import handler_section, parse_handler_config  # noqa: E402

MODEL = "digits_all"
KINDS = ("picture", "json_tensor", "v2_json", "v2_binary", "native_grpc", "oip_grpc")
REL = 1e-4
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class Request:
    kind: str
    input: int  # index into the inputs; -1 for malformed
    malformed: bool = False


@dataclass
class Outcome:
    ok: bool
    refused: bool = False  # a malformed request refused as it should be
    detail: str = ""


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    errors: int = 0
    mismatches: int = 0
    refused: int = 0
    first_failures: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # in completion order


# --- what each kind sends and how its answer is checked ---------------------------------------


class Kinds:
    """Pre-built request bodies per input and kind, and the answer checks."""

    def __init__(self, server: TorchServe, bodies: list[bytes], config: dict, stubs) -> None:
        self.server = server
        self.headers = server.headers()
        self.predictions = f"{server.url}/predictions/{MODEL}"
        self.v2 = f"{server.url}/v2/models/{MODEL}/infer"
        self.pb_inf, self.pb_inf_grpc = stubs["inference_pb2"], stubs["inference_pb2_grpc"]
        self.pb_oip = stubs["open_inference_grpc_pb2"]
        self.pb_oip_grpc = stubs["open_inference_grpc_pb2_grpc"]
        self.metadata = [("authorization", f"Bearer {server.key()}")]
        handler = parse_handler_config(handler_section(config))
        decoder = RequestDecoder(handler.input, handler.limits)
        tensors = [decoder.decode(b).samples[0].numpy() for b in bodies]
        self.pictures = bodies
        self.json_tensors = [json.dumps({"data": t.tolist()}).encode() for t in tensors]
        self.v2_json = [
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1],
                            "datatype": "BYTES",
                            "data": [base64.b64encode(b).decode()],
                        }
                    ]
                }  # fmt: skip
            ).encode()
            for b in bodies
        ]
        self.v2_binary = [self._binary_body(t) for t in tensors]
        self.local = threading.local()

    @staticmethod
    def _binary_body(tensor: np.ndarray) -> tuple[bytes, int]:
        x = triton_http.InferInput("x", [1, *tensor.shape], "FP32")
        x.set_data_from_numpy(tensor[None].astype(np.float32), binary_data=True)
        body, json_size = triton_http.InferenceServerClient.generate_request_body([x])
        return body, json_size

    def _session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            channel = grpc.insecure_channel(self.server.grpc_target)
            self.local.native = self.pb_inf_grpc.InferenceAPIsServiceStub(channel)
            self.local.oip = self.pb_oip_grpc.GRPCInferenceServiceStub(channel)
        return self.local.session

    def send(self, request: Request, expected: Expected | None) -> Outcome:
        session = self._session()
        method = getattr(self, f"_{request.kind}")
        return method(session, request.input, expected, request.malformed)

    # HTTP

    def _http(self, session, url, body, expected, malformed, read, headers=None) -> Outcome:
        r = session.post(url, data=body, headers={**self.headers, **(headers or {})}, timeout=60)
        if malformed:
            return _refusal(400 <= r.status_code < 500 and _has_error(r), f"HTTP {r.status_code}")
        if r.status_code != 200:
            return Outcome(False, detail=f"error: HTTP {r.status_code} {r.text[:200]!r}")
        return _compare(read(r), expected)

    def _picture(self, session, i, expected, malformed) -> Outcome:
        body = b"\x89PNG\r\n\x1a\n truncated" if malformed else self.pictures[i]
        return self._http(session, self.predictions, body, expected, malformed, _v1)

    def _json_tensor(self, session, i, expected, malformed) -> Outcome:
        body = b'{"data": [[1, 2], [3]]}' if malformed else self.json_tensors[i]
        headers = {"Content-Type": "application/json"}
        return self._http(session, self.predictions, body, expected, malformed, _v1, headers)

    def _v2_json(self, session, i, expected, malformed) -> Outcome:
        body = b'{"inputs": [{"name": "x", "shape": [' if malformed else self.v2_json[i]
        headers = {"Content-Type": "application/json"}
        return self._http(session, self.v2, body, expected, malformed, _v2, headers)

    def _v2_binary(self, session, i, expected, malformed) -> Outcome:
        body, length = self.v2_binary[max(i, 0)]
        if malformed:
            body = body[:-3]  # binary_data_size no longer matches
        headers = {HEADER_LENGTH: str(length), "Content-Type": "application/octet-stream"}

        def read(r):
            n = r.headers.get(HEADER_LENGTH)
            result = triton_http.InferenceServerClient.parse_response_body(
                r.content, header_length=None if n is None else int(n)
            )
            return (
                int(result.as_numpy("predicted_index")[0]),
                float(result.as_numpy("grad_norm")[0]),
            )

        return self._http(session, self.v2, body, expected, malformed, read, headers)

    # gRPC

    def _native_grpc(self, session, i, expected, malformed) -> Outcome:
        data = b"\x00 not a picture" if malformed else self.pictures[i]
        request = self.pb_inf.PredictionsRequest(model_name=MODEL, input={"data": data})
        answer = json.loads(
            self.local.native.Predictions(request, metadata=self.metadata, timeout=60).prediction
        )
        if malformed:  # TorchServe's gRPC frontend drops the handler's status
            return _refusal(isinstance(answer.get("error"), dict), str(answer)[:200])
        return _compare(_v1_answer(answer), expected)

    def _oip_grpc(self, session, i, expected, malformed) -> Outcome:
        pb = self.pb_oip
        if malformed:
            tensor = pb.ModelInferRequest.InferInputTensor(
                name="x",
                datatype="FP32",
                shape=[1, 3],
                contents=pb.InferTensorContents(fp32_contents=[0.0, 1.0, 2.0]),
            )
        else:
            tensor = pb.ModelInferRequest.InferInputTensor(
                name="x",
                datatype="BYTES",
                shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[self.pictures[i]]),
            )
        request = pb.ModelInferRequest(model_name=MODEL, id=str(i), inputs=[tensor])
        answer = self.local.oip.ModelInfer(request, metadata=self.metadata, timeout=60)
        out = {o.name: o for o in answer.outputs}
        if malformed:
            return _refusal(set(out) == {"error"}, str(answer)[:200])
        if answer.id != str(i):
            return Outcome(False, detail=f"mismatch: id {answer.id!r} for {i}")
        got = (out["predicted_index"].contents.int64_contents[0],)
        return _compare((*got, out["grad_norm"].contents.fp64_contents[0]), expected)


def _has_error(r: requests.Response) -> bool:
    try:
        return "error" in r.json()
    except ValueError:
        return False


def _refusal(ok: bool, detail: str) -> Outcome:
    return Outcome(True, refused=True) if ok else Outcome(False, detail=f"error: {detail}")


def _v1(r: requests.Response) -> tuple[int, float]:
    return _v1_answer(r.json())


def _v1_answer(answer: dict) -> tuple[int, float]:
    return answer["predictions"][0]["index"], answer["ood"]["grad_norm"]


def _v2(r: requests.Response) -> tuple[int, float]:
    out = {o["name"]: o for o in r.json()["outputs"]}
    return out["predicted_index"]["data"][0], out["grad_norm"]["data"][0]


def _compare(got: tuple[int, float], expected: Expected) -> Outcome:
    index, norm = got
    if index == expected.indices[0] and math.isclose(norm, expected.grad_norm, rel_tol=REL):
        return Outcome(True)
    return Outcome(False, detail=f"mismatch: got {got}, expected {expected.indices[0]}, "
                   f"{expected.grad_norm}")  # fmt: skip


# --- the run -------------------------------------------------------------------------------------


def plan(n: int, inputs: int, malformed: float, rng: random.Random) -> list[Request]:
    requests_ = []
    for _ in range(n):
        kind = rng.choice(KINDS)
        if rng.random() < malformed:
            requests_.append(Request(kind, -1, malformed=True))
        else:
            requests_.append(Request(kind, rng.randrange(inputs)))
    return requests_


def drive(
    kinds: Kinds,
    sequence: list[Request],
    expected: list[Expected],
    concurrency: int,
    tally: Tally,
    on_progress=None,
) -> None:
    lock = threading.Lock()
    position = iter(range(len(sequence)))

    def worker() -> None:
        while True:
            with lock:
                k = next(position, None)
            if k is None:
                return
            request = sequence[k]
            start = time.perf_counter()
            try:
                outcome = kinds.send(
                    request, None if request.malformed else expected[request.input]
                )
            except (requests.RequestException, grpc.RpcError, ValueError, KeyError) as e:
                outcome = Outcome(False, detail=f"error: {request.kind}: {type(e).__name__}: {e}")
            elapsed = (time.perf_counter() - start) * 1000.0
            with lock:
                tally.sent[("malformed " if request.malformed else "") + request.kind] += 1
                tally.latencies_ms.append(elapsed)
                if outcome.refused:
                    tally.refused += 1
                elif not outcome.ok:
                    if outcome.detail.startswith("mismatch"):
                        tally.mismatches += 1
                    else:
                        tally.errors += 1
                    if len(tally.first_failures) < 5:
                        tally.first_failures.append(f"{request.kind}: {outcome.detail}")
                done = sum(tally.sent.values())
            if on_progress is not None:
                on_progress(done)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def worker_rss(server: TorchServe) -> int:
    r = requests.get(
        f"http://127.0.0.1:{server.management_port}/models/{MODEL}",
        headers={"Authorization": f"Bearer {server.key('management')}"},
        timeout=10,
    )
    pids = [w["pid"] for w in r.json()[0]["workers"]]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="measured (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="(%(default)s)")
    parser.add_argument("--warm-up", type=int, default=2000, help="unmeasured requests first")
    parser.add_argument("--malformed", type=float, default=0.10, help="share (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay", type=int, default=5, help="ms")
    parser.add_argument("--worker-threads", type=int, default=1, help="OMP_NUM_THREADS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results JSON (and .md beside it)")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency) < 1 or not 0 <= args.malformed < 1:
        parser.error("--requests, --concurrency >= 1; 0 <= --malformed < 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.worker_threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.worker_threads)

    inputs = picture_inputs()
    bodies = [body for _, body in inputs]
    rng = random.Random(args.seed)
    warm = plan(args.warm_up, len(bodies), args.malformed, rng)
    sequence = plan(args.requests, len(bodies), args.malformed, rng)
    load_before = os.getloadavg()[0]
    rss: list[tuple[int, int]] = []  # (requests done, bytes)
    tally, warm_tally = Tally(), Tally()
    with tempfile.TemporaryDirectory(prefix="gradnorm-soak-") as tmp:
        work = Path(tmp)
        store = work / "model_store"
        store.mkdir()
        config = model_config("all", args.batch_size, args.max_batch_delay)
        (work / f"{MODEL}.yaml").write_text(yaml.safe_dump(config))
        build_archive(store, MODEL, DIGITS / "digits_cnn.pt", work / f"{MODEL}.yaml",
                      DIGITS / "model.py")  # fmt: skip
        expected = offline_answers(config, bodies, "all")
        stubs = generate_stubs(work / "stubs")
        server = TorchServe(work, store, [MODEL])
        server.extra_config = ["ts_open_inference_protocol=true"]
        try:
            server.start(timeout=180)
            kinds = Kinds(server, bodies, config, stubs)
            drive(kinds, warm, expected, args.concurrency, warm_tally)
            rss.append((0, worker_rss(server)))
            every = max(1, args.requests // 20)
            marks = set(range(every, args.requests + 1, every))

            def progress(done: int) -> None:
                if done in marks:
                    rss.append((done, worker_rss(server)))
                    print(f"{done}/{args.requests}: {tally.errors} errors, "
                          f"{tally.mismatches} mismatches, RSS {rss[-1][1] / 2**20:.1f} MiB",
                          flush=True)  # fmt: skip

            start = time.perf_counter()
            drive(kinds, sequence, expected, args.concurrency, tally, progress)
            wall_s = time.perf_counter() - start
            rss.append((args.requests, worker_rss(server)))
            worker_alive = True
        finally:
            server.stop()

    tenth = max(1, len(tally.latencies_ms) // 10)
    first, last = tally.latencies_ms[:tenth], tally.latencies_ms[-tenth:]
    p99_first, p99_last = percentile(first, 0.99), percentile(last, 0.99)
    growth = (max(b for _, b in rss) - rss[0][1]) / rss[0][1]
    malformed_sent = sum(v for k, v in tally.sent.items() if k.startswith("malformed"))
    criteria = {
        "no errors beyond the malformed requests' refusals": tally.errors + warm_tally.errors == 0,
        "every malformed request refused": tally.refused == malformed_sent,
        "no mismatches": tally.mismatches + warm_tally.mismatches == 0,
        "worker RSS growth after warm-up < 5 %": growth < 0.05,
        "p99 of the last tenth <= 1.2 x the first tenth": p99_last <= 1.2 * p99_first,
        f"at least {args.requests} requests": sum(tally.sent.values()) >= args.requests,
    }
    results = {
        "requests": sum(tally.sent.values()),
        "warm_up": args.warm_up,
        "concurrency": args.concurrency,
        "by_kind": dict(sorted(tally.sent.items())),
        "errors": tally.errors,
        "warm_up_errors": warm_tally.errors,
        "mismatches": tally.mismatches + warm_tally.mismatches,
        "malformed_refused": tally.refused,
        "malformed_sent": malformed_sent,
        "wall_s": wall_s,
        "throughput_rps": len(tally.latencies_ms) / wall_s,
        "p50_ms": percentile(tally.latencies_ms, 0.5),
        "p99_ms": percentile(tally.latencies_ms, 0.99),
        "p99_first_tenth_ms": p99_first,
        "p99_last_tenth_ms": p99_last,
        "worker_rss_mib": [(n, round(b / 2**20, 1)) for n, b in rss],
        "worker_rss_growth": growth,
        "worker_alive": worker_alive,
        "first_failures": tally.first_failures + warm_tally.first_failures,
        "criteria": criteria,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "worker_threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "batch_size": args.batch_size,
            "max_batch_delay_ms": args.max_batch_delay,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
    }
    markdown = render(results)
    print(markdown)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown)
    return 0 if all(criteria.values()) else 1


def render(r: dict) -> str:
    env = r["environment"]
    lines = [
        f"# Soak: {r['requests']} requests at concurrency {r['concurrency']} "
        f"(after {r['warm_up']} warm-up requests)",
        "",
        f"Demo digits CNN, every parameter scored; 1 worker, {env['worker_threads']} torch "
        f"thread(s), batchSize {env['batch_size']}, maxBatchDelay {env['max_batch_delay_ms']} "
        f"ms; {env['cpus']} CPUs; load average {env['load_average_before']:.2f} before, "
        f"{env['load_average_after']:.2f} after; torch {env['torch']}.",
        "",
        "| kind | requests |",
        "| --- | ---: |",
        *[f"| {k} | {v} |" for k, v in r["by_kind"].items()],
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| errors (beyond malformed refusals) | {r['errors']} |",
        f"| mismatches | {r['mismatches']} |",
        f"| malformed refused / sent | {r['malformed_refused']} / {r['malformed_sent']} |",
        f"| throughput | {r['throughput_rps']:.1f} req/s |",
        f"| p50 / p99 latency | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms |",
        f"| p99 first / last tenth | {r['p99_first_tenth_ms']:.1f} / "
        f"{r['p99_last_tenth_ms']:.1f} ms |",
        f"| worker RSS after warm-up -> max | {r['worker_rss_mib'][0][1]} -> "
        f"{max(m for _, m in r['worker_rss_mib'])} MiB ({100 * r['worker_rss_growth']:+.2f} %) |",
        "",
        *[f"- [{'x' if ok else ' '}] {name}" for name, ok in r["criteria"].items()],
        "",
    ]
    if r["first_failures"]:
        lines += ["First failures:", "", *[f"- `{f}`" for f in r["first_failures"]], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
