"""Imported once by the fork server, so that each case's fresh process starts with torch and
the model libraries already loaded (importing them costs seconds per case)."""

import importlib

for _name in (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "pytorch_ood.detector",
    "backpack",
    "torchserve_gradnorm",
    "gradnorm_bench.measure",
):
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: S110 - a missing library is reported by the case that needs it
        pass
