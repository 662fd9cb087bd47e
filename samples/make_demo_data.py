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
Everything is written as 8x8 grayscale PNGs (ink = bright), the model's own resolution.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
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
    print(
        f"wrote {out}: id_val {len(split['val'])}, id_test {len(split['test'])}, "
        f"{args.per_set} per OOD set and half"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
