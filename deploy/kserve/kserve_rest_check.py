"""What KServe 0.13's own REST layer does to v2 requests on their way to this handler.

Run it in a throwaway virtual environment (kserve 0.13 pins numpy 1.x and protobuf 3.x, so
it does not go into the project's), against a TorchServe serving the demo archive without
token authorization (as deploy/kserve/config.properties does):

    python3 -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install kserve==0.13.0
    /tmp/kserve-venv/bin/python deploy/kserve/kserve_rest_check.py --torchserve 127.0.0.1:8085

It starts KServe's model server (``kserve.ModelServer`` with a ``kserve.Model`` forwarding
to TorchServe over REST v2, as the ``pytorch/torchserve-kfs`` image's wrapper does) on
--port, sends v2 requests through it and prints what comes back. Measured with
kserve 0.13.0 (docs/clients.md): ``outputs`` is dropped (every output comes back),
``binary_data_output`` still gets JSON, a handler's 400 comes back as a 500 whose error
text carries the handler's message, an unreadable body is KServe's own 422.
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import time
from pathlib import Path

import requests

PICTURE = Path(__file__).resolve().parents[2] / "samples/images/ood/blank_black.png"


def serve(port: int, torchserve: str) -> None:
    import kserve
    from kserve.model import PredictorConfig

    model = kserve.Model("digits", PredictorConfig(torchserve, predictor_protocol="v2"))
    model.ready = True
    kserve.ModelServer(http_port=port, enable_grpc=False).start([model])


def check(port: int) -> None:
    url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
    picture = base64.b64encode(PICTURE.read_bytes()).decode()
    body = {"id": "k1", "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                    "data": [picture]}]}  # fmt: skip
    r = requests.post(url, json={**body, "outputs": [{"name": "ood_score"}]}, timeout=60)
    print("outputs [ood_score] ->", r.status_code, [o["name"] for o in r.json()["outputs"]])
    r = requests.post(url, json={**body, "parameters": {"binary_data_output": True}}, timeout=60)
    print("binary_data_output ->", r.status_code, r.headers.get("content-type"))
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0, 1, 2]}]}
    r = requests.post(url, json=bad, timeout=60)
    print("wrong shape ->", r.status_code, r.text[:300])
    r = requests.post(url, data=b'{"inputs": [', timeout=60,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    print("unreadable body ->", r.status_code, r.text[:200])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchserve", required=True, help="host:port of TorchServe's HTTP")
    parser.add_argument("--port", type=int, default=18090, help="KServe's port (%(default)s)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.torchserve)
        return 0
    command = [sys.executable, __file__, "--serve", "--torchserve", args.torchserve,
               "--port", str(args.port)]  # fmt: skip
    server = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{args.port}/v2/health/live", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        check(args.port)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
