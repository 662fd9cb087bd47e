"""`make serve` (samples/serve.sh) succeeds only when the served demo model answered a
prediction, and fails loudly, with the reason and the server stopped, otherwise.

The script runs on a copy of the shipped config.properties with free ports, in a temporary
folder with its own TMPDIR (TorchServe's pid file), as a user's second server would."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from torchserve_harness import REPO, _group_alive, demo_archive, demo_config, free_port, with_config

pytestmark = [pytest.mark.server, pytest.mark.slow]

if shutil.which("java") is None:  # pragma: no cover - the frontend is Java
    pytest.skip("TorchServe needs Java (java not found on PATH)", allow_module_level=True)

SERVE = REPO / "samples/serve.sh"


def serving_folder(work: Path, metrics: bool = True) -> Path:
    """config.properties (free ports), metrics.yaml and model_store/, as a user copies them."""
    text = (REPO / "config.properties").read_text()
    for key in ("inference_address", "management_address", "metrics_address"):
        text = re.sub(rf"(?m)^{key}=.*$", f"{key}=http://127.0.0.1:{free_port()}", text)
    text += (
        f"\ngrpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
        f"initial_worker_port={free_port() // 100 * 100}\n"
    )
    (work / "config.properties").write_text(text)
    if metrics:
        shutil.copy(REPO / "metrics.yaml", work / "metrics.yaml")
    return work


def start(work: Path, wait_s: int = 240) -> subprocess.Popen:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        TMPDIR=str(work),
        SERVE_WAIT_S=str(wait_s),
    )
    return subprocess.Popen(
        ["sh", str(SERVE)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stopped(process: subprocess.Popen) -> None:
    """Nothing the script started is left running."""
    deadline = time.monotonic() + 30
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _group_alive(process.pid):  # pragma: no cover - clean up, then fail
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("serve.sh left processes behind")


def test_serve_reports_the_answered_prediction_and_stops_on_ctrl_c(tmp_path):
    work = serving_folder(tmp_path)
    demo_archive(work)
    process = start(work)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Model logs:"):
                break
        text = "".join(lines)
        assert text.startswith("TorchServe answered at http://127.0.0.1:"), text
        assert "digit_3_idx45.png" in text and "three" in text
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert process.wait(timeout=60) != 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
        stopped(process)


def test_serve_fails_at_once_with_the_load_error_when_the_model_cannot_load(tmp_path):
    work = serving_folder(tmp_path)
    good = demo_archive(work, name="good")
    broken = demo_config()
    broken["handler"]["top_k"] = 0
    (work / "broken.yaml").write_text(yaml.safe_dump(broken))
    with_config(good, work / "model_store/digits.mar", work / "broken.yaml")
    process = start(work)
    try:
        _, err = process.communicate(timeout=300)  # a timeout, not a hang, is the failure
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    assert process.returncode == 1
    assert "serve: FAILED: the demo model did not load" in err
    assert "handler.top_k: expected an integer >= 1, got 0" in err
    stopped(process)


def test_serve_refuses_a_config_copied_without_metrics_yaml(tmp_path):
    work = serving_folder(tmp_path, metrics=False)
    process = start(work)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "metrics_config=metrics.yaml" in err and "copy metrics.yaml" in err
