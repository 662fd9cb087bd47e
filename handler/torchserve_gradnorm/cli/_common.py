"""Pieces the calibrate and eval commands share."""

from __future__ import annotations

from pathlib import Path

from ..codecs import RequestDecoder
from ..datasets import Scored, augmented_samples, score_folder, score_samples
from ..hf import text_encoder_for
from ..mar import Archive
from ..scorer import GradNormScorer
from ..service import float_dtype


def feature_scorer(
    archive: Archive, penultimate: bool = False
) -> tuple[GradNormScorer, RequestDecoder]:
    """The served scorer and decoder of an archive, with per-layer norms switched on (and
    the penultimate activations kept, with ``penultimate``)."""
    kwargs = archive.config.scorer_kwargs()
    kwargs["per_layer"] = True
    kwargs["penultimate"] = penultimate
    scorer = GradNormScorer(archive.model, **kwargs)
    text = text_encoder_for(archive.root, archive.model, archive.config)
    decoder = RequestDecoder(
        archive.config.input, archive.config.limits, text, float_dtype(archive.model)
    )
    return scorer, decoder


def score_folders(
    scorer: GradNormScorer, decoder: RequestDecoder, folders: list[str], batch_size: int
) -> dict[str, Scored]:
    return {
        Path(f).name: score_folder(scorer, decoder, f, batch_size, label=Path(f).name)
        for f in folders
    }


def score_augmented(
    scorer: GradNormScorer, decoder: RequestDecoder, folder: str, copies: int, batch_size: int
) -> Scored:
    """``copies`` augmented copies of every picture or text in ``folder``, scored."""
    samples = augmented_samples(folder, decoder, copies)
    return score_samples(
        scorer, decoder, samples, batch_size, label=f"{Path(folder).name} (augmented)"
    )
