"""gradnorm-calibrate: fit a detector and its threshold on in-distribution data.

    gradnorm-calibrate ARCHIVE --id DIR [--augment [COPIES]] [--ood DIR ...] [--tpr 0.95]
        [--detector NAME (default predicted_mahalanobis)] [--out FILE] [--into ARCHIVE] [--plot PNG]

Scores go through the archive's own preprocessing and scoring settings. ``--augment`` adds
COPIES (default 4) augmented renderings of every ID picture (enlarged with another filter,
turned, moved, strokes, brightness, contrast, JPEG: ``augment.py``), or perturbed copies of
every ID text (casing, final punctuation, typos, a word dropped or two swapped:
``augment_text.py``), to the data the detector is fitted on, so that benign variation in how
clients render a picture or type a text is not flagged; the threshold stays at ``--tpr`` of
the ID samples as given. ``--into`` writes
the calibration into an archive (as calibration.json), so the served model flags OOD with
no further step; the archive must hold the same weights and scoring settings. Without
``--into`` the calibration goes to ``--out`` (default calibration.json); with it, to a
file only when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ..calibration import FILENAME, Calibration, calibrate, fingerprint
from ..detectors import DETECTORS, Features, get_detector
from ..evaluation import ood_metrics
from ..mar import open_archive, write_member
from ._common import feature_scorer, score_augmented, score_folders

# The strongest detector that needs only ID data: the scalar sum's sign is a bet that fails
# on many OOD kinds (README, "Why the sign"), mlp needs labelled OOD samples, one Gaussian
# for all classes (mahalanobis) lets through OOD that resembles an average class, and the
# closest class (class_mahalanobis) measures an answer against a class other than the one
# the model gave (README, "Calibrated OOD flags").
DEFAULT_DETECTOR = "predicted_mahalanobis"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradnorm-calibrate", description=__doc__.split("\n")[0])
    p.add_argument("archive", help="the .mar to calibrate")
    p.add_argument("--id", required=True, dest="id_dir", help="folder of in-distribution samples")
    p.add_argument(
        "--augment",
        type=int,
        nargs="?",
        const=4,
        default=0,
        metavar="COPIES",
        help="also fit on COPIES (default 4) augmented copies of every ID picture or text",
    )
    p.add_argument("--ood", action="append", default=[], help="folder of OOD samples (repeatable)")
    p.add_argument("--tpr", type=float, default=0.95, help="share of ID samples not flagged")
    p.add_argument(
        "--detector",
        choices=list(DETECTORS),
        default=DEFAULT_DETECTOR,
        help=f"default {DEFAULT_DETECTOR}: the strongest one fitted on ID data only",
    )
    p.add_argument(
        "--out",
        help=f"write the calibration JSON to this file (default {FILENAME} without --into; "
        "with --into, no file unless --out is given)",
    )
    p.add_argument("--into", help=f"write the calibration into this .mar (as {FILENAME})")
    p.add_argument("--plot", help="write a PNG of the ID and OOD score histograms")
    p.add_argument("--batch-size", type=int, default=64)
    return p


def plot_histograms(path: str, id_scores: np.ndarray, ood: dict[str, np.ndarray], cal) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    everything = np.concatenate([id_scores, *ood.values()])
    bins = np.linspace(everything.min(), everything.max(), 60)
    ax.hist(id_scores, bins=bins, alpha=0.6, label=f"ID ({len(id_scores)})", density=True)
    for name, scores in ood.items():
        ax.hist(scores, bins=bins, alpha=0.45, label=f"OOD {name} ({len(scores)})", density=True)
    ax.axvline(cal.threshold, color="black", linestyle="--", label=f"threshold (TPR {cal.tpr:g})")
    ax.set_xlabel(f"{cal.detector} score (higher = more OOD)")
    ax.set_ylabel("density")
    ax.set_title(f"gradnorm-calibrate: {cal.method} / {cal.detector}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    detector = get_detector(args.detector)()
    if detector.needs_ood and not args.ood:
        raise SystemExit("gradnorm-calibrate: the mlp detector is trained on labelled OOD: --ood")
    with open_archive(args.archive) as archive:
        try:
            scorer, decoder = feature_scorer(archive, penultimate=detector.needs_penultimate)
        except ValueError as e:
            raise SystemExit(f"gradnorm-calibrate: {e}") from None
        scored_id = score_folders(scorer, decoder, [args.id_dir], args.batch_size)
        id_features = next(iter(scored_id.values())).features
        n_augmented = 0
        if args.augment:
            augmented = score_augmented(
                scorer, decoder, args.id_dir, args.augment, args.batch_size
            ).features
            n_augmented = len(augmented)
            id_features = Features.concat([id_features, augmented])
        scored_ood = score_folders(scorer, decoder, args.ood, args.batch_size)
        ood_features = (
            Features.concat([s.features for s in scored_ood.values()]) if scored_ood else None
        )
        cal = calibrate(
            detector,
            id_features,
            ood_features,
            tpr=args.tpr,
            config=archive.config,
            parameters=scorer.selected,
            weights_sha256=archive.weights_sha256(),
            n_augmented=n_augmented,
        )
    print(
        f"{cal.detector}: threshold {cal.threshold:.6g} flags {1 - cal.achieved_tpr:.1%} "
        f"of {cal.n_id} ID samples (target TPR {cal.tpr:g}, reached {cal.achieved_tpr:.3f})"
        + (f"; fitted with {cal.n_augmented} augmented copies too" if cal.n_augmented else "")
    )
    ood_scores = {name: detector.score(s.features) for name, s in scored_ood.items()}
    id_scores = detector.score(id_features)[: cal.n_id]
    for name, scores in ood_scores.items():
        labels = np.r_[np.zeros(len(id_scores)), np.ones(len(scores))]
        auroc = ood_metrics(np.r_[id_scores, scores], labels)["AUROC"]
        flagged = float((scores > cal.threshold).mean())
        print(f"  OOD {name}: {flagged:.1%} flagged, AUROC {auroc:.3f} (on calibration data)")
    if args.plot:
        plot_histograms(args.plot, id_scores, ood_scores, cal)
        print(f"wrote {args.plot}")
    if args.into:
        with open_archive(args.into) as target:
            expected = fingerprint(target.weights_sha256(), target.config)
        if expected != cal.fingerprint:
            raise SystemExit(
                f"gradnorm-calibrate: {args.into} holds other weights or scoring settings "
                f"than {args.archive}; calibrate that archive instead"
            )
        write_member(args.into, FILENAME, cal.to_json().encode())
        print(f"wrote {FILENAME} into {args.into}")
    if args.out or not args.into:
        out = args.out or FILENAME
        Calibration.save(cal, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
