"""``gradnorm-archive --hf-model DIR``: a save_pretrained folder -> the archiver's inputs.

The folder's files go to the archive root, where the handler loads them with transformers'
Auto classes (``handler.hf_task``, set here from ``config.json``'s architecture). Read here
once, at packing time, so that the archive is self-describing and validated like any other:
labels from ``config.id2label`` (unless ``--labels``), ``input.kind: text`` when the folder
has a tokenizer, and for vision models the image processor's size, mean, std and resample
(keys the user's ``--config-file`` sets win).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ..hf import has_tokenizer, image_input

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}  # training leftovers, never loaded here


def _fail(message: str) -> SystemExit:
    return SystemExit(f"gradnorm-archive: --hf-model {message}")


def hf_task(model_config: dict, folder: Path) -> str:
    architectures = model_config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "text-classification"
    if any(a.endswith("ForImageClassification") for a in architectures):
        return "image-classification"
    if has_tokenizer(folder):
        return "text-classification"
    if image_input(folder):
        return "image-classification"
    raise _fail(
        f"{folder}: config.json names no sequence or image classification architecture "
        f"({', '.join(architectures) or 'none'})"
    )


def stage_hf_model(args: argparse.Namespace, stage: Path) -> None:
    """Point ``args`` at the folder's weights, a completed model-config.yaml, the labels
    and the folder's other files (as extra files)."""
    folder = Path(args.hf_model)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise _fail(f"{folder}: no config.json (expected a save_pretrained folder)")
    model_config = json.loads(config_path.read_text())
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise _fail(
            f"{folder}: no {' or '.join(WEIGHTS)} (save with safe_serialization, the default; "
            "pickled .bin weights are not packed)"
        )
    task = hf_task(model_config, folder)

    document = {}
    if args.config_file:
        try:
            document = yaml.safe_load(Path(args.config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"gradnorm-archive: cannot read {args.config_file}: {e}") from None
        if not isinstance(document, dict):
            raise SystemExit(f"gradnorm-archive: {args.config_file}: expected a mapping")
    handler = dict(document.get("handler") or {})
    handler.setdefault("hf_task", task)
    user_input = dict(handler.get("input") or {})
    if task == "image-classification":
        handler["input"] = {**image_input(folder), **user_input}
        if "size" not in handler["input"]:
            print(
                "gradnorm-archive: the image processor's size is not a height and width "
                "(shortest_edge, crop_size?): set handler.input.size, or pictures are scored "
                "at their own size",
                file=sys.stderr,
            )
    elif user_input.get("kind", "text") == "text" and not has_tokenizer(folder):
        raise _fail(f"{folder}: a text classifier needs its tokenizer files (tokenizer.json)")
    document["handler"] = handler
    args.config_file = str(stage / "model-config.yaml")
    Path(args.config_file).write_text(yaml.safe_dump(document, sort_keys=False))

    if not args.labels and model_config.get("id2label"):
        labels = {str(int(i)): name for i, name in model_config["id2label"].items()}
        args.labels = str(stage / "id2label.json")  # copied to index_to_name.json
        Path(args.labels).write_text(json.dumps(labels, indent=1))
    args.serialized_file = str(weights)
    others = [
        str(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p != weights and p.suffix not in PICKLES
    ]
    args.extra_files = ",".join([*others, *[f for f in args.extra_files.split(",") if f]])
