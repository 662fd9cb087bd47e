"""A real TorchServe (Java frontend + Python workers) in a temporary folder, for tests.

Ports are picked free on 127.0.0.1; the server runs in its own process group, so stopping
it takes every worker down with it, and ``stop()`` checks that nothing is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
import torch
import yaml
from prerequisites import require

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "samples/digits"


def demo_config() -> dict:
    """The demo archive's whole model-config.yaml, as a mapping."""
    return yaml.safe_load((DIGITS / "model-config.yaml").read_text())


def load_demo_model() -> torch.nn.Module:
    """The demo digits CNN, loaded as TorchServe loads it (one class, weights_only)."""
    spec = importlib.util.spec_from_file_location("digits_model", DIGITS / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.DigitsCNN()
    model.load_state_dict(torch.load(DIGITS / "digits_cnn.pt", weights_only=True))
    return model.eval()


# The demo pictures that the raw gradient-norm sum (no calibration) scores highest of all the
# sample pictures, above every ID digit: a threshold between them flags exactly these.
SUM_FLAGGED = [REPO / "samples/images/ood/letter_W.png", REPO / "samples/images/ood/letter_A.png"]


def demo_sum_threshold() -> float:
    """A raw-sum threshold (``handler.threshold`` without calibration) halfway between the
    sample ID digits and ``SUM_FLAGGED``, from the committed demo weights, so that tests know
    which answers a served threshold flags whatever the weights' exact scores."""
    from torchserve_gradnorm.codecs import RequestDecoder
    from torchserve_gradnorm.config import handler_section, parse_handler_config
    from torchserve_gradnorm.scorer import GradNormScorer

    config = parse_handler_config(handler_section(demo_config()))
    decoder = RequestDecoder(config.input, config.limits)
    scorer = GradNormScorer(load_demo_model())

    def score(picture: Path) -> float:
        return float(scorer(decoder.decode(picture.read_bytes()).samples).ood_score[0])

    highest_id = max(score(p) for p in sorted((REPO / "samples/images/id").glob("*.png")))
    lowest_flagged = min(score(p) for p in SUM_FLAGGED)
    assert highest_id < lowest_flagged, "the demo's raw sum no longer ranks SUM_FLAGGED first"
    return (highest_id + lowest_flagged) / 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_archive(work: Path, name: str = "digits", handler: dict | None = None, **top) -> Path:
    """The demo model packed into ``work/model_store``; ``top`` overrides TorchServe's keys of
    its model-config.yaml (batchSize, maxBatchDelay, ...), ``handler`` merges into ours."""
    config = demo_config()
    config.update(top)
    config["handler"].update(handler or {})
    store = work / "model_store"
    store.mkdir(exist_ok=True)
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return build_archive(
        store, name, DIGITS / "digits_cnn.pt", work / f"{name}.yaml", DIGITS / "model.py"
    )


@contextmanager
def serving(server: TorchServe, **start) -> Iterator[TorchServe]:
    """Start ``server``, hand it out, and stop it (workers included) whatever happens."""
    try:
        server.start(**start)
        yield server
    finally:
        server.stop()


def build_archive(
    export_path: Path,
    name: str,
    serialized_file: Path,
    config_file: Path,
    model_file: Path | None = None,
    labels: Path | None = REPO / "samples/digits/index_to_name.json",
) -> Path:
    command = [
        str(Path(sys.executable).parent / "gradnorm-archive"),
        "--model-name", name,
        "--serialized-file", str(serialized_file),
        "--config-file", str(config_file),
        "--export-path", str(export_path),
        "--force",
    ]  # fmt: skip
    if model_file is not None:
        command += ["--model-file", str(model_file)]
    if labels is not None:
        command += ["--labels", str(labels)]
    subprocess.run(command, check=True, capture_output=True)
    return export_path / f"{name}.mar"


def with_config(archive: Path, target: Path, config: Path) -> None:
    """A copy of ``archive`` with another model-config.yaml: gradnorm-archive refuses to pack
    a config that cannot load, so broken archives for tests are made this way."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(target, "w") as dst:
        manifest = json.loads(src.read("MAR-INF/MANIFEST.json"))
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == manifest["model"]["configFile"]:
                data = config.read_bytes()
            dst.writestr(item, data)


class TorchServe:
    def __init__(self, workdir: Path, model_store: Path, models: list[str]) -> None:
        self.workdir = workdir
        self.model_store = model_store
        self.models = models
        self.inference_port = free_port()
        self.management_port = free_port()
        self.metrics_port = free_port()
        self.grpc_ports = (free_port(), free_port())  # gRPC is always on: 7070/7071 clash
        self.worker_port = random.randrange(20000, 60000, 100)
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "torchserve.out"
        self.extra_config: list[str] = []  # more config.properties lines; the last wins

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_ports[0]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 120.0, ready_models: list[str] | None = None) -> None:
        require("java")  # the frontend is Java: fail, never skip, without it
        config = self.workdir / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.inference_port}",
                    f"management_address=http://127.0.0.1:{self.management_port}",
                    f"metrics_address=http://127.0.0.1:{self.metrics_port}",
                    "grpc_inference_address=127.0.0.1",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_inference_port={self.grpc_ports[0]}",
                    f"grpc_management_port={self.grpc_ports[1]}",
                    "enable_model_api=false",
                    "metrics_mode=prometheus",
                    f"metrics_config={REPO / 'metrics.yaml'}",
                    "default_workers_per_model=1",
                    "install_py_dep_per_model=false",
                    # workers talk over /tmp/.ts.sock.<port>: keep concurrent servers apart
                    f"initial_worker_port={self.worker_port}",
                    *self.extra_config,
                ]
            )
            + "\n"
        )
        torchserve = Path(sys.executable).parent / "torchserve"
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        # `torchserve --start` refuses to run while $TMPDIR/.model_server.pid names a live
        # server: a private TMPDIR lets several test servers run at once
        env["TMPDIR"] = str(self.workdir)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [
                    str(torchserve),
                    "--start",
                    "--foreground",
                    "--ncs",
                    "--ts-config",
                    str(config),
                    "--model-store",
                    str(self.model_store),
                    "--models",
                    *[f"{m}={m}.mar" for m in self.models],
                ],  # fmt: skip
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._wait_ready(ready_models if ready_models is not None else self.models, timeout)

    def key(self, api: str = "inference") -> str:
        return json.loads((self.workdir / "key_file.json").read_text())[api]["key"]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key()}"}

    def model_log(self) -> str:
        path = self.workdir / "logs" / "model_log.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_ready(self, models: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(models)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited: {self.log_path.read_text()[-3000:]}")
            try:
                for model in list(pending):
                    r = requests.get(
                        f"http://127.0.0.1:{self.management_port}/models/{model}",
                        headers={"Authorization": f"Bearer {self.key('management')}"},
                        timeout=5,
                    )
                    workers = r.json()[0]["workers"] if r.ok else []
                    if any(w["status"] == "READY" for w in workers):
                        pending.discard(model)
                if not pending:
                    return
            except (requests.RequestException, FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"models {sorted(pending)} not ready; model log:\n{self.model_log()[-4000:]}"
        )

    def stop(self) -> None:
        if self.process is None:
            return
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=10)
        # workers share the process group; make sure none outlives the frontend
        deadline = time.monotonic() + 15
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.5)
        self.process = None
        assert not _group_alive(pgid), "TorchServe processes left behind"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies still count for killpg; only report live processes
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class FakeContext:
    """The parts of ts.context.Context that the handler uses, for tests without a server."""

    def __init__(self, model_dir, serialized_file: str, model_yaml: dict) -> None:
        self.model_yaml_config = model_yaml
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"serializedFile": serialized_file}}
        self.model_name = "mymodel"
        self.statuses: dict[int, int] = {}
        self.content_types: dict[int, str] = {}
        self.request_headers: list[dict] = []
        """What the frontend hands the worker per request; none is like a test's call."""
        self.response_headers: dict[int, dict[str, str]] = {}

    def get_all_request_header(self, idx: int) -> dict:
        return self.request_headers[idx] if idx < len(self.request_headers) else {"Host": "x"}

    def set_response_header(self, idx: int, name: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[name] = value

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.statuses[idx] = code

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value
