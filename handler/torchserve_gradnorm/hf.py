"""Hugging Face models: a ``save_pretrained`` folder loaded with transformers' Auto classes.

``gradnorm-archive --hf-model DIR`` ships the folder's files at the archive root and sets
``handler.hf_task``; the handler (and ``mar.open_archive``) then load the model here,
``local_files_only``: nothing is ever downloaded. Text models get the folder's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .config import ConfigError, HandlerConfig
from .text import TextEncoder, model_input_names

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
PROCESSOR_FILE = "preprocessor_config.json"
# PIL resample codes in image processor configs -> handler.input.resample
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise RuntimeError(
            "this archive holds a Hugging Face model: install transformers on the TorchServe "
            "host (pip install 'torchserve-gradnorm[hf]')"
        ) from None
    return transformers


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_model(folder: str | Path, task: str) -> nn.Module:
    """The classifier of a save_pretrained folder, in eval mode, with its saved dtype."""
    transformers = _transformers()
    auto = (
        transformers.AutoModelForSequenceClassification
        if task == "text-classification"
        else transformers.AutoModelForImageClassification
    )
    model = auto.from_pretrained(str(folder), local_files_only=True, dtype="auto")
    return model.eval()


def labels(model: nn.Module) -> dict[str, str] | None:
    """``config.id2label`` as an index_to_name mapping."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label:
        return None
    return {str(int(i)): str(name) for i, name in id2label.items()}


def model_max_length(model: nn.Module | None, tokenizer: Any) -> int | None:
    """The longest token sequence the model takes: the tokenizer's limit when it states one,
    else the model's position table (RoBERTa-like models use two positions for padding)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        positions = getattr(config, name, None)
        if isinstance(positions, int) and positions > 0:
            if "roberta" in str(getattr(config, "model_type", "")):
                positions -= (getattr(config, "pad_token_id", None) or 0) + 1
            return positions
    return None


def load_text_encoder(folder: str | Path, model: nn.Module, config: HandlerConfig) -> TextEncoder:
    """The folder's tokenizer, set up for this model's inputs and the handler's settings."""
    if not has_tokenizer(folder):
        raise ConfigError(
            "handler.input.kind",
            "text needs the tokenizer's files in the archive (tokenizer.json, "
            "tokenizer_config.json; --extra-files)",
        )
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return TextEncoder(
        tokenizer,
        config.input,
        config.limits,
        model_inputs=model_input_names(model),
        model_max_length=model_max_length(model, tokenizer),
    )


def text_encoder_for(
    folder: str | Path, model: nn.Module, config: HandlerConfig
) -> TextEncoder | None:
    """The text encoder an archive's settings call for: None unless ``input.kind`` is text."""
    return load_text_encoder(folder, model, config) if config.input.kind == "text" else None


def image_input(folder: str | Path) -> dict[str, Any]:
    """``handler.input`` settings read from an image processor's preprocessor_config.json:
    size, mean, std and resample (empty when the folder has none).

    The handler scales pixels to [0, 1] and then normalizes; a processor that rescales by
    another factor (or not at all) is matched exactly by scaling its mean and std.
    """
    import json

    path = Path(folder) / PROCESSOR_FILE
    if not path.is_file():
        return {}
    processor = json.loads(path.read_text())
    found: dict[str, Any] = {"kind": "image", "mode": "RGB"}
    size = processor.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        found["size"] = [int(size["height"]), int(size["width"])]
    elif isinstance(size, int):
        found["size"] = [size, size]
    rescale = processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1
    factor = 255.0 * float(rescale)  # model input = (pixel / 255 * factor - mean) / std
    mean, std = [0.0], [1.0]
    if processor.get("do_normalize", True) and processor.get("image_mean") is not None:
        mean = [float(v) for v in processor["image_mean"]]
        std = [float(v) for v in processor.get("image_std") or [1.0]]
    if mean != [0.0] or std != [1.0] or abs(factor - 1.0) > 1e-12:
        found["mean"] = [m / factor for m in mean]
        found["std"] = [s / factor for s in std]
    if processor.get("resample") in PIL_RESAMPLE:
        found["resample"] = PIL_RESAMPLE[processor["resample"]]
    return found
