"""Train DigitsCNN on scikit-learn's 8x8 digits, reproducibly, in about 20 s of CPU time.

Usage: python samples/digits/train.py [--out DIR] [--seed N]

Writes into DIR (default: this script's folder):
  digits_cnn.pt        state_dict only (torch.load(path, weights_only=True) works)
  index_to_name.json   {"0": "zero", ..., "9": "nine"}
  split.json           indices into load_digits() of the train/val/test split
and prints the validation and test accuracy. The seed (default 0: the committed weights) draws
the initial weights, the rendered copies and the batches; the split does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model import MEAN, STD, DigitsCNN  # noqa: E402

from torchserve_gradnorm.augment import augment_picture  # noqa: E402

SEED = 0
SPLIT_RANDOM_STATE = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
COPIES = 8  # rendered copies per training digit, drawn once
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_split(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 70/15/15 train/val/test split of the load_digits indices."""
    idx = np.arange(len(targets))
    train, rest = train_test_split(
        idx, test_size=0.3, stratify=targets, random_state=SPLIT_RANDOM_STATE
    )
    val, test = train_test_split(
        rest, test_size=0.5, stratify=targets[rest], random_state=SPLIT_RANDOM_STATE
    )
    return train, val, test


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) pixel values 0..16 -> (N, 1, 8, 8) float, scaled to [0, 1] and normalized."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - MEAN) / STD


def rendered_copies(images: np.ndarray, copies: int, seed: int) -> torch.Tensor:
    """(copies, N, 1, 8, 8) in [0, 1]: each digit re-rendered as a client might send it
    (torchserve_gradnorm.augment: enlarged with some filter, turned, moved, strokes,
    brightness, contrast, JPEG), then shrunk back to 8x8 with the server's box filter."""
    rng = np.random.default_rng(seed)
    out = np.empty((copies, len(images), 1, 8, 8), dtype=np.float32)
    for i, image in enumerate(images):
        picture = Image.fromarray(np.round(image / 16 * 255).astype(np.uint8), "L")
        for c in range(copies):
            small = augment_picture(picture, rng).convert("L").resize((8, 8), Image.Resampling.BOX)
            out[c, i, 0] = np.asarray(small, dtype=np.float32) / 255
    return torch.from_numpy(out)


def augment(x01: torch.Tensor, copies: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: the original digit (a quarter of the time) or one of its rendered copies."""
    n = x01.shape[0]
    pick = torch.randint(0, len(copies), (n,), generator=gen)
    plain = torch.rand(n, generator=gen) < 0.25
    chosen = copies[pick, torch.arange(n)]
    return torch.where(plain[:, None, None, None], x01, chosen)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=HERE, help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="training seed (default %(default)s: the committed weights)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seed = args.seed

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    digits = load_digits()
    images, targets = digits.images, digits.target
    train_idx, val_idx, test_idx = make_split(targets)

    x_train01 = torch.as_tensor(images[train_idx], dtype=torch.float32).unsqueeze(1) / 16.0
    copies = rendered_copies(images[train_idx], COPIES, seed)
    y_train = torch.as_tensor(targets[train_idx], dtype=torch.long)
    x_val, y_val = to_input(images[val_idx]), torch.as_tensor(targets[val_idx])
    x_test, y_test = to_input(images[test_idx]), torch.as_tensor(targets[test_idx])

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(train_idx) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, epochs=EPOCHS, steps_per_epoch=steps_per_epoch
    )

    t0 = time.perf_counter()
    best_val, best_state, best_epoch = -1.0, None, -1
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(train_idx), generator=gen)
        total = 0.0
        for start in range(0, len(perm), BATCH_SIZE):
            b = perm[start : start + BATCH_SIZE]
            xb = (augment(x_train01[b], copies[:, b], gen) - MEAN) / STD
            loss = F.cross_entropy(model(xb), y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        val_acc = accuracy(model, x_val, y_val)
        if val_acc >= best_val:  # ties go to the later (lower learning rate) epoch
            best_val, best_epoch = val_acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(perm):.4f}  val {val_acc:.4f}")

    model.load_state_dict(best_state)
    val_acc = accuracy(model, x_val, y_val)
    test_acc = accuracy(model, x_test, y_test)
    n_params = sum(p.numel() for p in model.parameters())

    weights = args.out / "digits_cnn.pt"
    torch.save(model.state_dict(), weights)
    (args.out / "index_to_name.json").write_text(
        json.dumps({str(i): name for i, name in enumerate(NAMES)}, indent=2) + "\n"
    )
    split = {
        "dataset": "sklearn.datasets.load_digits",
        "method": "stratified train_test_split 70/15/15, random_state=0",
        "train": sorted(int(i) for i in train_idx),
        "val": sorted(int(i) for i in val_idx),
        "test": sorted(int(i) for i in test_idx),
    }
    (args.out / "split.json").write_text(json.dumps(split) + "\n")

    print(
        f"best epoch {best_epoch + 1}/{EPOCHS}, {n_params} parameters, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    print(f"val accuracy  {val_acc:.4f} ({len(val_idx)} images)")
    print(f"test accuracy {test_acc:.4f} ({len(test_idx)} images)")
    print(f"wrote {weights} ({weights.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
