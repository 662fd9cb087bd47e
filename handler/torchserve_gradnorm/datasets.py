"""Folders of samples -> model inputs -> gradient features, for calibration and evaluation.

A folder holds pictures (decoded exactly as the server decodes a request), ``.npy`` files
(read with ``allow_pickle=False``) or ``.pt`` tensors (read with ``weights_only=True``): one
sample each, or a stack of samples along a first axis. For ``input.kind: text`` it holds
``.txt`` files (one text each) and ``.jsonl`` files (one ``{"text": ...}`` per line, with
``text_pair`` for sentence pairs), tokenized by the archive's own tokenizer.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augment import augmented_bytes
from .augment_text import augmented_texts
from .codecs import RequestDecoder, RequestError
from .detectors import Features
from .scorer import GradNormScorer
from .text import Text

PICTURES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
TENSORS = {".npy", ".pt"}
TEXTS = {".txt", ".jsonl"}


def sample_files(folder: str | Path, text: bool = False) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    kinds = TEXTS if text else PICTURES | TENSORS
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in kinds)
    if not files:
        what = ".txt or .jsonl files" if text else "pictures, .npy or .pt files"
        raise ValueError(f"{folder}: no {what}")
    return files


def _text_requests(path: Path) -> list[tuple[bytes | dict, str]]:
    """(request, where) of each text of one .txt (the whole file, as a raw body) or .jsonl
    file (``{"text": ..., "text_pair": ...}``, one per line)."""
    if path.suffix.lower() == ".txt":
        return [(path.read_bytes(), str(path))]
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f'{path}:{number}: expected {{"text": ...}}')
        request = {"text": record["text"], "text_pair": record.get("text_pair")}
        requests.append((request, f"{path}:{number}"))
    return requests


def _texts(path: Path, decoder: RequestDecoder) -> list:
    """Token ids of the texts of one .txt or .jsonl file."""
    return [
        s for request, where in _text_requests(path) for s in _decode_text(decoder, request, where)
    ]


def _decode_text(decoder: RequestDecoder, payload: object, where: str) -> list:
    try:
        return decoder.decode(payload).samples
    except RequestError as e:
        raise ValueError(f"{where}: {e.message}") from None


def _array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses arbitrary objects
        raise ValueError(f"{path}: not a plain tensor file ({e})") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, got {type(value).__name__}")
    return value.numpy()


def load_samples(path: Path, decoder: RequestDecoder) -> torch.Tensor | list:
    """(n, *input shape) from one file; for text, n token-id dicts."""
    if path.suffix.lower() in TEXTS:
        return _texts(path, decoder)
    if path.suffix.lower() in PICTURES:
        return decoder.decode(path.read_bytes()).samples
    array = _array(path)
    if decoder.shape is not None and array.shape[1:] == tuple(decoder.shape):
        return torch.stack([decoder.decode(_npy_bytes(a)).samples[0] for a in array])
    return decoder.decode(_npy_bytes(array)).samples


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def iter_folder(folder: str | Path, decoder: RequestDecoder) -> Iterator[torch.Tensor | list]:
    for path in sample_files(folder, text=decoder.text is not None):
        yield load_samples(path, decoder)


def augmented_samples(
    folder: str | Path, decoder: RequestDecoder, copies: int, seed: int = 0
) -> torch.Tensor | list:
    """``copies`` augmented renderings of every picture in a folder (``augment.py``), or
    perturbed copies of every text (``augment_text.py``), decoded as the server decodes
    them; seeded per file (and line), so reproducible."""
    if decoder.text is not None:
        return _augmented_texts(folder, decoder, copies, seed)
    samples = []
    for index, path in enumerate(sample_files(folder)):
        if path.suffix.lower() not in PICTURES:
            raise ValueError(f"{path}: augmentation works on pictures and texts only")
        for data in augmented_bytes(path.read_bytes(), copies, seed=(seed, index)):
            samples.append(decoder.decode(data).samples)
    return torch.cat(samples)


def _augmented_texts(folder: str | Path, decoder: RequestDecoder, copies: int, seed: int) -> list:
    samples = []
    for index, path in enumerate(sample_files(folder, text=True)):
        for line, (request, where) in enumerate(_text_requests(path)):
            original = _checked_text(decoder, request, where)
            pairs = augmented_texts(original.text, original.pair, copies, (seed, index, line))
            for text, text_pair in pairs:
                samples += _decode_text(decoder, {"text": text, "text_pair": text_pair}, where)
    return samples


def _checked_text(decoder: RequestDecoder, request: bytes | dict, where: str) -> Text:
    """The text (and pair) of a request, checked as the server checks it."""
    try:
        return decoder.text.instance(request if isinstance(request, dict) else request.decode())
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not valid UTF-8") from None
    except RequestError as e:
        raise ValueError(f"{where}: {e.message}") from None


@dataclass
class Scored:
    features: Features
    logits: np.ndarray


def score_folder(
    scorer: GradNormScorer,
    decoder: RequestDecoder,
    folder: str | Path,
    batch_size: int = 64,
    label: str = "",
    progress: bool | None = None,
) -> Scored:
    """Score every sample of a folder with the serving code path, in batches."""
    parts = list(iter_folder(folder, decoder))
    samples = [s for part in parts for s in part] if decoder.text is not None else torch.cat(parts)
    return score_samples(scorer, decoder, samples, batch_size, label or str(folder), progress)


def score_samples(
    scorer: GradNormScorer,
    decoder: RequestDecoder,
    samples: torch.Tensor | list,
    batch_size: int = 64,
    label: str = "",
    progress: bool | None = None,
) -> Scored:
    """Score decoded samples (a tensor, or a text decoder's token lists) in batches."""
    if progress is None:
        progress = sys.stderr.isatty()
    features, logits = [], []
    for start in range(0, len(samples), batch_size):
        result = scorer(decoder.batch([samples[start : start + batch_size]]))
        features.append(Features.from_result(result))
        logits.append(result.logits.double().cpu().numpy())
        if progress:
            done = min(start + batch_size, len(samples))
            print(f"\rscoring {label}: {done}/{len(samples)}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return Scored(Features.concat(features), np.concatenate(logits))
