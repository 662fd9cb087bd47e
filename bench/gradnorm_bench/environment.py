"""What the results were measured on: device, library versions, machine load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess

import torch

LIBRARIES = {
    "torchvision": "torchvision",
    "timm": "timm",
    "transformers": "transformers",
    "pytorch_ood": "pytorch-ood",
    "backpack": "backpack-for-pytorch",
}


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


def versions() -> dict[str, str | None]:
    return {"torch": torch.__version__, **{k: _version(d) for k, d in LIBRARIES.items()}}


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the machine distort CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def commit() -> str | None:
    """The code measured: $GRADNORM_BENCH_COMMIT (a copy without .git), else git's HEAD."""
    if os.environ.get("GRADNORM_BENCH_COMMIT"):
        return os.environ["GRADNORM_BENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"
