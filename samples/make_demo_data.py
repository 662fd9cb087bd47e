"""Build the demo's calibration and evaluation folders, with no download.

    python samples/make_demo_data.py [--out build/demo]

In-distribution: scikit-learn's digits, split as in samples/digits/split.json —
``id_val`` (calibration and detector fitting) and ``id_test`` (evaluation). OOD sets, each
in two disjoint halves, ``ood_fit/<set>`` (to train the mlp detector) and
``ood_test/<set>`` (evaluation):
- ``letters``: letters and symbols rendered with Pillow's default font;
- ``noise``: uniform noise;
- ``photos``: crops of the two photographs that ship with scikit-learn;
- ``inverted``: digits with ink and paper swapped (near-OOD: the same shapes);
- ``rotated``: digits turned 90 degrees (near-OOD).
Benign shifts, ``shift_test/<set>``: the held-out test digits rendered through other paths,
to be answered as in-distribution (full-spectrum OOD, Yang et al. 2023):
- ``bilinear``, ``bicubic``, ``lanczos``: enlarged to 32, 48 and 64 pixels with that filter
  (the server shrinks them back to 8x8 with its own box filter);
- ``jpeg``: enlarged to 32 pixels and through JPEG at quality 50 to 80;
- ``rotate``: turned by 4 to 12 degrees either way; ``translate``: moved by a quarter to one
  digit pixel in x and y; ``thick`` and ``thin``: strokes grown or shrunk by an eighth or a
  quarter of a digit pixel (max or min filter) (these four drawn on a 64-pixel enlargement);
- ``contrast``: Pillow's contrast at 0.5 to 0.8; ``brightness``: Pillow's brightness at 0.6
  to 1.4.
Digits and OOD sets are written as 8x8 grayscale PNGs (ink = bright), the model's own
resolution; the shifted digits at the sizes above.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from sklearn.datasets import load_digits, load_sample_image

HERE = Path(__file__).resolve().parent
SIZE = 8


def digit_picture(pixels16: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(pixels16.reshape(SIZE, SIZE) / 16 * 255).astype(np.uint8), "L")


def glyph(char: str, rng: np.random.Generator) -> Image.Image:
    canvas = Image.new("L", (64, 64), 0)
    try:
        font = ImageFont.load_default(size=int(rng.integers(36, 60)))
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    ImageDraw.Draw(canvas).text(
        (int(rng.integers(0, 16)), int(rng.integers(-8, 8))), char, fill=255, font=font
    )
    return canvas.resize((SIZE, SIZE), Image.Resampling.BOX)


def photo_crops(n: int, rng: np.random.Generator) -> list[Image.Image]:
    photos = [
        Image.fromarray(load_sample_image(f)).convert("L") for f in ("china.jpg", "flower.jpg")
    ]
    crops = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(16, 160))
        x = int(rng.integers(0, photo.width - side))
        y = int(rng.integers(0, photo.height - side))
        crops.append(
            photo.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.Resampling.BOX)
        )
    return crops


def ood_sets(n: int, rng: np.random.Generator, digits: np.ndarray) -> dict[str, list[Image.Image]]:
    chars = string.ascii_letters + "#%&@?!+*"
    picks = digits[rng.choice(len(digits), size=n, replace=len(digits) < n)]
    return {
        "letters": [glyph(chars[int(rng.integers(len(chars)))], rng) for _ in range(n)],
        "noise": [
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), "L")
            for _ in range(n)
        ],
        "photos": photo_crops(n, rng),
        "inverted": [digit_picture(16 - d) for d in picks],
        "rotated": [digit_picture(np.rot90(d.reshape(SIZE, SIZE)).copy()) for d in picks],
    }


def enlarged(picture: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    return picture.resize((size, size), resample)


def jpeg(picture: Image.Image, quality: int) -> Image.Image:
    """Decoded from JPEG: the artefacts stay when written as PNG."""
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def shift_sets(rng: np.random.Generator, digits: np.ndarray) -> dict[str, list[Image.Image]]:
    """Every test digit through each benign rendering path; parameters drawn per picture."""
    pictures = [digit_picture(d) for d in digits]
    # geometry and strokes on a 64-pixel enlargement whose box reduction is the digit itself
    big = [enlarged(p, 64, Image.Resampling.NEAREST) for p in pictures]

    def sign() -> int:
        return int(rng.choice([-1, 1]))

    def translate(p: Image.Image) -> Image.Image:
        dx, dy = (sign() * int(rng.integers(2, 9)) for _ in range(2))
        return p.rotate(0, translate=(dx, dy))  # paper (black) comes in at the border

    return {
        "bilinear": [enlarged(p, 32, Image.Resampling.BILINEAR) for p in pictures],
        "bicubic": [enlarged(p, 48, Image.Resampling.BICUBIC) for p in pictures],
        "lanczos": [enlarged(p, 64, Image.Resampling.LANCZOS) for p in pictures],
        "jpeg": [
            jpeg(enlarged(p, 32, Image.Resampling.BILINEAR), int(rng.integers(50, 81)))
            for p in pictures
        ],
        "rotate": [p.rotate(sign() * rng.uniform(4, 12), Image.Resampling.BILINEAR) for p in big],
        "translate": [translate(p) for p in big],
        "thick": [p.filter(ImageFilter.MaxFilter(int(rng.choice([3, 5])))) for p in big],
        "thin": [p.filter(ImageFilter.MinFilter(int(rng.choice([3, 5])))) for p in big],
        "contrast": [ImageEnhance.Contrast(p).enhance(rng.uniform(0.5, 0.8)) for p in pictures],
        "brightness": [ImageEnhance.Brightness(p).enhance(rng.uniform(0.6, 1.4)) for p in pictures],
    }


def write(folder: Path, pictures: list[Image.Image], prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(pictures):
        picture.save(folder / f"{prefix}_{i:04d}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/demo")
    parser.add_argument("--per-set", type=int, default=200, help="OOD samples per set and half")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = load_digits().data
    split = json.loads((HERE / "digits" / "split.json").read_text())
    write(out / "id_val", [digit_picture(data[i]) for i in split["val"]], "val")
    write(out / "id_test", [digit_picture(data[i]) for i in split["test"]], "test")
    # the fit half transforms training digits, the test half held-out test digits
    halves = {
        "ood_fit": (np.random.default_rng(1), data[split["train"]]),
        "ood_test": (np.random.default_rng(2), data[split["test"]]),
    }
    for half, (rng, digits) in halves.items():
        for name, pictures in ood_sets(args.per_set, rng, digits).items():
            write(out / half / name, pictures, name)
    for name, pictures in shift_sets(np.random.default_rng(3), data[split["test"]]).items():
        write(out / "shift_test" / name, pictures, name)
    print(
        f"wrote {out}: id_val {len(split['val'])}, id_test {len(split['test'])}, "
        f"{args.per_set} per OOD set and half, shift_test: {len(split['test'])} per set"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
