"""Backends by name, and the order ``auto`` tries them in."""

from __future__ import annotations

from .base import Backend, BackendUnsupported, BatchDependent
from .fast import FastBackend
from .loop import LoopBackend
from .vmap import VmapBackend

BACKENDS: dict[str, type[Backend]] = {
    "fast": FastBackend,
    "vmap": VmapBackend,
    "loop": LoopBackend,
}
AUTO_ORDER = ("fast", "vmap", "loop")
BACKEND_CHOICES = ("auto", *BACKENDS)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BACKEND_CHOICES",
    "Backend",
    "BackendUnsupported",
    "BatchDependent",
]
