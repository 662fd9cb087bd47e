"""Standard picture augmentations for calibration (``gradnorm-calibrate --augment``).

A detector fitted on one rendering of the in-distribution pictures learns that rendering:
the same digits enlarged with another filter, saved as JPEG or turned a few degrees then
score as OOD (covariate shift, which full-spectrum OOD detection, Yang et al. 2023, counts
as in-distribution). Fitting on augmented copies as well teaches the detector which changes
are benign. Each copy draws, per picture: an enlargement (2 to 8 times, with a random
filter), a small rotation and translation, thicker or thinner strokes, a brightness and
contrast change, and JPEG compression, each with some probability. Everything is seeded, so
a calibration is reproducible.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

FILTERS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
    Image.Resampling.HAMMING,
)


def augment_picture(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One randomly re-rendered copy of ``picture`` (same mode, possibly larger)."""
    mode = picture.mode
    work = picture.convert("L" if mode in ("L", "1", "P", "I", "F") else "RGB")
    scale = int(rng.integers(2, 9))
    work = work.resize(
        (work.width * scale, work.height * scale), FILTERS[int(rng.integers(len(FILTERS)))]
    )
    if rng.random() < 0.7:
        shift = 0.125 * np.array(work.size) * rng.uniform(-1, 1, 2)
        work = work.rotate(
            rng.uniform(-10, 10), Image.Resampling.BILINEAR, translate=tuple(shift.round())
        )
    if scale >= 4 and rng.random() < 0.4:
        # strokes a quarter of an original pixel or less thicker or thinner
        grow = ImageFilter.MaxFilter if rng.random() < 0.5 else ImageFilter.MinFilter
        work = work.filter(grow(3))
    if rng.random() < 0.6:
        work = ImageEnhance.Brightness(work).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.6:
        work = ImageEnhance.Contrast(work).enhance(rng.uniform(0.6, 1.2))
    if rng.random() < 0.4:
        buffer = io.BytesIO()
        work.save(buffer, "JPEG", quality=int(rng.integers(40, 96)))
        work = Image.open(io.BytesIO(buffer.getvalue()))
    return work.convert(mode) if work.mode != mode and mode in ("L", "RGB", "RGBA") else work


def augmented_bytes(data: bytes, copies: int, seed: int | tuple[int, ...]) -> list[bytes]:
    """``copies`` augmented PNG encodings of one encoded picture."""
    rng = np.random.default_rng(seed)
    picture = Image.open(io.BytesIO(data))
    picture.load()
    out = []
    for _ in range(copies):
        buffer = io.BytesIO()
        augment_picture(picture, rng).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out
