"""Faults: a CUDA out-of-memory inside scoring, and a worker killed during load.

The out-of-memory errors are simulated inside the model's forward pass of a served batch
(``GradNormService.handle``, what TorchServe's worker runs). The kill is real: ``kill -9``
of the TorchServe worker process while a bounded stream of requests is in flight; every
answer is checked by content against the score computed offline for its own picture.

(A bad handler config failing the model load is tested in test_server.py, and the
scorer's own halving of chunks in test_engine_behaviour.py.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
from torchserve_harness import (
    DIGITS,
    TorchServe,
    demo_archive,
    demo_config,
    load_demo_model,
    serving,
)

from torchserve_gradnorm.codecs import RequestDecoder
from torchserve_gradnorm.config import handler_section, parse_handler_config
from torchserve_gradnorm.scorer import GradNormScorer
from torchserve_gradnorm.service import GradNormService

REPO = Path(__file__).resolve().parent.parent
PICTURES = sorted((REPO / "samples/images").glob("*/*.png"))


@dataclass(frozen=True)
class Expected:
    index: int
    grad_norm: float


def offline_answers() -> dict[Path, Expected]:
    """Top class and grad_norm of every sample picture, scored alone, outside any server."""
    config = parse_handler_config(handler_section(demo_config()))
    decoder = RequestDecoder(config.input, config.limits)
    scorer = GradNormScorer(load_demo_model(), **config.scorer_kwargs())
    answers = {}
    for picture in PICTURES:
        result = scorer(decoder.decode(picture.read_bytes()).samples)
        answers[picture] = Expected(int(result.logits.argmax()), result.grad_norm.item())
    return answers


EXPECTED = offline_answers()


def test_the_pictures_are_told_apart_by_their_scores():
    """Otherwise a swapped answer could pass the content checks below."""
    norms = sorted(e.grad_norm for e in EXPECTED.values())
    assert all(b > a * (1 + 1e-3) for a, b in zip(norms, norms[1:]))


def correct(answer: dict, picture: Path) -> bool:
    expected = EXPECTED[picture]
    served = answer["ood"]["grad_norm"]
    same_class = answer["predictions"][0]["index"] == expected.index
    return same_class and math.isclose(served, expected.grad_norm, rel_tol=1e-5)


# --- out of memory inside scoring ------------------------------------------------------------


class _Restore:
    def __init__(self, backend, cls) -> None:
        self.backend, self.cls = backend, cls

    def remove(self) -> None:
        self.backend.__class__ = self.cls


def out_of_memory_above(scorer, rows: int):
    """Make the scorer's backend fail like a full CUDA device on more than ``rows`` samples.

    (The backend, not a forward hook: the fast backend's forward sees one sample at a time
    under vmap.)"""
    seen: list[int] = []
    backend = scorer._candidates[0]
    cls = type(backend)

    class OutOfMemory(cls):
        def __call__(self, x):
            seen.append(len(x))
            if len(x) > rows:
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"
                )
            return cls.__call__(self, x)

    backend.__class__ = OutOfMemory
    return _Restore(backend, cls), seen


def make_service() -> GradNormService:
    config = parse_handler_config(handler_section(demo_config()))
    labels = json.loads((DIGITS / "index_to_name.json").read_text())
    service = GradNormService(load_demo_model(), config, labels)
    service.warm_up()
    return service


def test_out_of_memory_in_a_served_batch_is_retried_in_smaller_chunks(caplog):
    service = make_service()
    pictures = PICTURES[:8]
    handle, seen = out_of_memory_above(service.scorer, rows=2)
    with caplog.at_level(logging.WARNING, logger="torchserve_gradnorm"):
        replies = service.handle([{"body": p.read_bytes()} for p in pictures])
    handle.remove()
    assert [r.status for r in replies] == [200] * 8
    assert all(correct(r.body, p) for r, p in zip(replies, pictures))
    assert seen[:3] == [8, 4, 2]  # halved until it fits, not scored one by one
    assert service.scorer.micro_batch_size == 2  # and remembered
    assert service.scorer.backend == "fast"  # an out-of-memory is no reason to change backend
    assert "out of memory; retrying with micro_batch_size=2" in caplog.text
    # later batches are scored in chunks of 2 straight away
    handle, seen = out_of_memory_above(service.scorer, rows=2)
    replies = service.handle([{"body": p.read_bytes()} for p in pictures[:5]])
    handle.remove()
    assert [r.status for r in replies] == [200] * 5 and seen == [2, 2, 1]


def test_out_of_memory_even_for_one_sample_fails_the_requests_not_the_worker():
    service = make_service()
    pictures = PICTURES[:3]
    handle, _ = out_of_memory_above(service.scorer, rows=0)
    replies = service.handle([{"body": p.read_bytes()} for p in pictures])  # must not raise
    handle.remove()
    for reply in replies:
        assert reply.status != 200
        assert "OutOfMemoryError" in reply.body["error"]["message"]
    # once memory is back, the same service answers
    replies = service.handle([{"body": p.read_bytes()} for p in pictures])
    assert [r.status for r in replies] == [200] * 3
    assert all(correct(r.body, p) for r, p in zip(replies, pictures))


def test_out_of_memory_even_for_one_sample_is_a_server_error():
    service = make_service()
    handle, _ = out_of_memory_above(service.scorer, rows=0)
    replies = service.handle([{"body": PICTURES[0].read_bytes()}])
    handle.remove()
    assert replies[0].status == 503


# --- a worker killed during load -------------------------------------------------------------

REQUESTS = 400
CONCURRENCY = 8
KILL_AFTER = 80  # answers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchserve-faults")
    demo_archive(work, batchSize=8, maxBatchDelay=20)
    with serving(TorchServe(work, work / "model_store", ["digits"])) as ts:
        yield ts


def workers(server) -> list[dict]:
    r = requests.get(
        f"http://127.0.0.1:{server.management_port}/models/digits",
        headers={"Authorization": f"Bearer {server.key('management')}"},
        timeout=10,
    )
    return r.json()[0]["workers"]


def worker_pid(server) -> int:
    """The one READY worker: a model_service_worker process in the server's process group."""
    (worker,) = workers(server)
    assert worker["status"] == "READY", worker
    pid = int(worker["pid"])
    assert b"model_service_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert os.getpgid(pid) == server.process.pid
    return pid


def wait_for_new_worker(server, old_pid: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            (worker,) = workers(server)
            if worker["status"] == "READY" and int(worker["pid"]) not in (old_pid, -1):
                return worker_pid(server)
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no new worker after {timeout} s; model log:\n{server.model_log()[-3000:]}")


@dataclass
class Outcome:
    picture: Path
    started: float
    status: int | None
    body: str


@pytest.mark.server
@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_no_answer_is_wrong(server):
    old_pid = worker_pid(server)
    url = f"{server.url}/predictions/digits"
    headers = server.headers()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    enough_answers = threading.Event()
    killed_at: list[float] = []

    def send(k: int) -> None:
        picture = PICTURES[(k * 7) % len(PICTURES)]
        started = time.monotonic()
        try:
            r = requests.post(url, data=picture.read_bytes(), headers=headers, timeout=90)
            outcome = Outcome(picture, started, r.status_code, r.text)
        except requests.RequestException as e:
            outcome = Outcome(picture, started, None, repr(e))
        with lock:
            outcomes.append(outcome)
            if len(outcomes) >= KILL_AFTER:
                enough_answers.set()

    def kill() -> None:
        assert enough_answers.wait(120)
        os.kill(old_pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill)
    killer.start()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(send, range(REQUESTS)))
    killer.join()
    assert killed_at, "the worker was not killed"

    new_pid = wait_for_new_worker(server, old_pid)
    assert new_pid != old_pid

    assert all(o.status is not None for o in outcomes), [o.body for o in outcomes if not o.status]
    answered = [o for o in outcomes if o.status == 200]
    failed = [o for o in outcomes if o.status != 200]
    wrong = [o for o in answered if not correct(json.loads(o.body), o.picture)]
    print(
        f"worker {old_pid} killed, {new_pid} serving; {len(answered)} answered, "
        f"{len(failed)} failed: {sorted({(o.status, o.body[:80]) for o in failed})}"
    )
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[0]}"
    # requests caught by the kill fail with a server error, never a wrong or client answer
    assert all(o.status >= 500 for o in failed), {o.status: o.body for o in failed}
    assert len(failed) < REQUESTS // 4
    # the restarted worker serves: requests sent after the kill succeed
    after = [o for o in outcomes if o.started > killed_at[0] + 1.0]
    assert after and sum(o.status == 200 for o in after) >= len(after) - CONCURRENCY
    assert outcomes[-1].status == 200
    picture = PICTURES[3]
    r = requests.post(url, data=picture.read_bytes(), headers=headers, timeout=60)
    assert r.status_code == 200 and correct(r.json(), picture)
