"""Make the demo pictures under samples/images/ (reproducible, seeded, no download).

Usage: python samples/make_images.py [--out DIR]

id/   one held-out TEST-split digit per class from sklearn's load_digits (test indices come from
      samples/digits/split.json, written by samples/digits/train.py): the 8x8 image as grayscale
      'L' with pixel = round(v / 16 * 255) (white ink on black, like the data set), upscaled to
      64x64 with NEAREST. Named digit_<label>_idx<index>.png.
ood/  64x64 'L' pictures that are not digits: noise, a checkerboard, blank white and black,
      letters drawn with PIL's default font (white on black), a crop of sklearn's china.jpg.

Resizing an ID picture back to 8x8 with Image.Resampling.BOX gives the original 8x8 exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.datasets import load_digits, load_sample_image

HERE = Path(__file__).resolve().parent
SEED = 0
SIZE = 64


def digit_to_image(pixels16: np.ndarray) -> Image.Image:
    """(8, 8) values 0..16 -> 64x64 'L' picture, each pixel an 8x8 block."""
    values = np.rint(pixels16.astype(np.float64) / 16.0 * 255.0).astype(np.uint8)
    return Image.fromarray(values, mode="L").resize((SIZE, SIZE), Image.Resampling.NEAREST)


def glyph(text: str) -> Image.Image:
    """A character drawn white on black with PIL's default font, centered, about 45 px high."""
    try:
        font = ImageFont.load_default(size=64)
        canvas = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(canvas).text((SIZE / 2, SIZE / 2), text, fill=255, font=font, anchor="mm")
        return canvas
    except (ImportError, TypeError, ValueError):  # no FreeType: scale up the bitmap font
        font = ImageFont.load_default()
        left, top, right, bottom = font.getbbox(text)
        small = Image.new("L", (right - left + 2, bottom - top + 2), 0)
        ImageDraw.Draw(small).text((1 - left, 1 - top), text, fill=255, font=font)
        return small.resize((SIZE * 3 // 4, SIZE * 3 // 4), Image.Resampling.NEAREST).crop(
            (-SIZE // 8, -SIZE // 8, SIZE - SIZE // 8, SIZE - SIZE // 8)
        )


def ood_images(rng: np.random.Generator) -> dict[str, Image.Image]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    checker = (((yy // 8) + (xx // 8)) % 2 * 255).astype(np.uint8)
    china = Image.fromarray(load_sample_image("china.jpg")).convert("L")
    # A 256x256 crop of the temple roof, scaled down to 64x64.
    china = china.crop((192, 64, 448, 320)).resize((SIZE, SIZE), Image.Resampling.BOX)
    blocks = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    return {
        "noise_uniform": Image.fromarray(
            rng.integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8), mode="L"
        ),
        # Noise that survives the server's resize to 8x8 (per-pixel noise averages to gray).
        "noise_blocks": Image.fromarray(blocks, mode="L").resize(
            (SIZE, SIZE), Image.Resampling.NEAREST
        ),
        "checkerboard": Image.fromarray(checker, mode="L"),
        "blank_white": Image.new("L", (SIZE, SIZE), 255),
        "blank_black": Image.new("L", (SIZE, SIZE), 0),
        "letter_A": glyph("A"),
        "letter_W": glyph("W"),
        "hash": glyph("#"),
        "photo_china_crop": china,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "images", help="default: %(default)s")
    parser.add_argument("--split", type=Path, default=HERE / "digits" / "split.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(SEED)

    id_dir, ood_dir = args.out / "id", args.out / "ood"
    for folder in (id_dir, ood_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()

    digits = load_digits()
    test_idx = sorted(json.loads(args.split.read_text())["test"])
    for label in range(10):
        idx = next(i for i in test_idx if digits.target[i] == label)  # first test image per class
        path = id_dir / f"digit_{label}_idx{idx}.png"
        digit_to_image(digits.images[idx]).save(path, optimize=True)
        print(path)

    for name, image in ood_images(rng).items():
        assert image.mode == "L" and image.size == (SIZE, SIZE), name
        path = ood_dir / f"{name}.png"
        image.save(path, optimize=True)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
