"""What the test groups need beyond the test extra's Python packages, in one place.

A missing prerequisite fails the group that needs it with one line saying what to install;
it never skips it (only hardware CI cannot have, a CUDA device, may skip: see conftest.py).
``python tests/prerequisites.py`` checks them all, as ``make test`` does before pytest, and
exits 1 with one line per missing prerequisite.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

# name (a program or a module) -> who needs it and how to install it
PREREQUISITES: dict[str, str] = {
    "java": "TorchServe's frontend (the server tests) needs Java 11+: "
    "apt-get install default-jre-headless",
    "promtool": "the alert-rule tests need promtool: apt-get install prometheus",
    "prometheus": "the scrape tests need Prometheus: apt-get install prometheus",
    "pytorch_ood": "the parity and evaluation tests need the reference, pytorch-ood: "
    "pip install -e '.[test]'",
    "ts": "the metrics tests need TorchServe's Python package `ts`: pip install -e '.[test]'",
    "grafana_foundation_sdk": "the dashboard test needs grafana-foundation-sdk: "
    "pip install -e '.[test]'",
}
PROGRAMS = {"java", "promtool", "prometheus"}


def find_program(name: str) -> str | None:
    """``name`` on PATH, or where Debian's packages put it (PATH may lack /usr/sbin etc.)."""
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/local/bin") / name) if p.exists()),
        None,
    )


def is_missing(name: str) -> bool:
    if name in PROGRAMS:
        return find_program(name) is None
    return importlib.util.find_spec(name) is None


def require(name: str) -> None:
    """Fail the calling test (or fixture) with one line when ``name`` is missing."""
    if is_missing(name):
        pytest.fail(f"{name} not found: {PREREQUISITES[name]}", pytrace=False)


def main() -> int:
    missing = [name for name in PREREQUISITES if is_missing(name)]
    for name in missing:
        print(f"make test: {name} not found: {PREREQUISITES[name]}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
