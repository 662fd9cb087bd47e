"""Reading and amending .mar archives outside TorchServe (for calibration and evaluation).

The model is loaded the way TorchServe's BaseHandler loads it — an eager model from the
model file (its one nn.Module class) and a state_dict read with ``weights_only=True``, or a
TorchScript file — so offline scores equal served ones.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .calibration import file_sha256
from .config import HandlerConfig, handler_section, parse_handler_config


@dataclass
class Archive:
    path: Path
    root: Path
    manifest: dict[str, Any]
    config: HandlerConfig
    model: nn.Module
    labels: dict[str, Any] | None
    weights_path: Path

    def weights_sha256(self) -> str:
        return file_sha256(self.weights_path)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _extract(path: Path, root: Path) -> None:
    with zipfile.ZipFile(path) as mar:
        for name in mar.namelist():
            target = (root / name).resolve()
            if not str(target).startswith(str(root.resolve()) + os.sep):
                raise ValueError(f"{path}: unsafe member name {name!r}")
        mar.extractall(root)


def _eager_model(root: Path, model_file: str, weights: Path) -> nn.Module:
    module_name = Path(model_file).stem
    spec = importlib.util.spec_from_file_location(module_name, root / model_file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root))  # the model file may import other files of the archive
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    classes = [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if c.__module__ == module.__name__ and issubclass(c, nn.Module)
    ]
    if len(classes) != 1:
        raise ValueError(
            f"{model_file}: expected exactly one nn.Module class, found {len(classes)}"
        )
    model = classes[0]()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def open_archive(path: str | Path) -> Archive:
    path = Path(path)
    root = Path(tempfile.mkdtemp(prefix="gradnorm-mar-"))
    try:
        _extract(path, root)
        manifest = json.loads((root / "MAR-INF" / "MANIFEST.json").read_text())
        model_info = manifest["model"]
        document = None
        if model_info.get("configFile"):
            document = yaml.safe_load((root / model_info["configFile"]).read_text())
        config = parse_handler_config(handler_section(document))
        weights = root / model_info["serializedFile"]
        if model_info.get("modelFile"):
            model = _eager_model(root, model_info["modelFile"], weights)
        else:
            with warnings.catch_warnings():
                # TorchServe serves TorchScript; its deprecation is not the user's to act on
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(weights), map_location="cpu").eval()
        labels_path = root / "index_to_name.json"
        labels = json.loads(labels_path.read_text()) if labels_path.is_file() else None
        return Archive(path, root, manifest, config, model, labels, weights)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def write_member(path: str | Path, name: str, data: bytes) -> None:
    """Add or replace one file of an archive, atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename != name:
                dst.writestr(item, src.read(item.filename))
        dst.writestr(name, data)
    os.replace(tmp, path)
