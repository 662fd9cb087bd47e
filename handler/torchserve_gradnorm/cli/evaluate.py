"""gradnorm-eval: flagged shares, AUROC, AUPR and FPR@95TPR per detector and data set.

    gradnorm-eval ARCHIVE --id DIR [--shift DIR ...] --ood DIR [--ood DIR ...]
        [--near-ood DIR ...] [--fit-id DIR] [--fit-augment [COPIES]] [--fit-ood DIR ...]
        [--json FILE] [--markdown FILE]

Sets: ``--id`` (held-out in-distribution data), ``--shift`` (benign shifts: the ID data
rendered otherwise, to be answered as in-distribution, as in full-spectrum OOD detection),
``--ood`` (far OOD) and ``--near-ood``. For every detector and set it reports the share
flagged at the detector's threshold and, for shift and OOD sets against the ID set, the
metrics of pytorch-ood's OODMetrics (OOD positive, higher score = more OOD; for a shift
set an AUROC near 0.5 means the detector does not tell it from ID, which is the goal). For
every OOD set, a paired bootstrap of its and the ID set's samples gives each AUROC's 95 %
interval and the interval of its difference from each logit baseline's: whether a detector
beats msp or energy beyond the noise of sets this size.

Detectors: ``msp`` (Hendrycks & Gimpel 2017) and ``energy`` (Liu et al. 2020), the logit
baselines; ``sum`` (the engine's score); ``mahalanobis``, ``class_mahalanobis`` and
``predicted_mahalanobis`` (fitted on --fit-id, plus COPIES augmented copies of each picture
or text with --fit-augment, in which case ``mahalanobis, ID only`` is also fitted without
them);
``penultimate_mahalanobis`` (Lee et al. 2018 on the input of the model's last linear layer,
fitted the same way; not for TorchScript models, which take no module hooks);
``mlp`` (trained on --fit-id and --fit-ood); ``mlp (kind unseen)`` (when a --fit-ood folder
has the name of the evaluated OOD set: an mlp trained on the other kinds only, the honest
number for OOD nobody labelled); and ``shipped (...)``, the archive's own calibration with
its own threshold. The other detectors' thresholds sit at the shipped calibration's TPR (0.95
without one) on the --fit-id samples (as gradnorm-calibrate sets them: augmented copies shape
the fit, not the threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calibration import CalibrationError, shipped_calibration, threshold_at_tpr
from ..config import ConfigError
from ..datasets import Scored
from ..detectors import (
    ClassMahalanobisDetector,
    Detector,
    EnergyDetector,
    Features,
    MahalanobisDetector,
    MLPDetector,
    MSPDetector,
    PenultimateMahalanobisDetector,
    PredictedMahalanobisDetector,
    SumDetector,
)
from ..evaluation import bootstrap_aurocs, ood_metrics, percentile_interval
from ..mar import open_archive
from ._common import feature_scorer, score_augmented, score_folders

KINDS = ("ID", "shift", "far OOD", "near OOD")
BASELINES = ("msp", "energy")
"""The logit baselines every detector's AUROC is compared with."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradnorm-eval", description=__doc__.split("\n")[0])
    p.add_argument("archive")
    p.add_argument("--id", required=True, dest="id_dir", help="held-out ID samples")
    p.add_argument(
        "--shift", action="append", default=[], help="benign-shift folder, answered as ID"
    )
    p.add_argument("--ood", action="append", required=True, help="far-OOD folder (repeatable)")
    p.add_argument("--near-ood", action="append", default=[], help="near-OOD folder")
    p.add_argument("--fit-id", help="ID samples to fit detectors and thresholds on")
    p.add_argument(
        "--fit-augment",
        type=int,
        nargs="?",
        const=4,
        default=0,
        metavar="COPIES",
        help="also fit on COPIES (default 4) augmented copies of every --fit-id picture or text",
    )
    p.add_argument("--fit-ood", action="append", default=[], help="OOD samples to train mlp on")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--markdown", help="write the results as markdown tables")
    p.add_argument("--batch-size", type=int, default=64)
    return p


@dataclass
class Candidate:
    detector: Detector
    threshold: float | None


def fitted(detector: Detector, fit: Features, plain: Features, tpr: float) -> Candidate:
    """Fitted on ``fit``, threshold at ``tpr`` of the un-augmented ``plain`` samples."""
    detector.fit(fit)
    return Candidate(detector, threshold_at_tpr(detector.score(plain), tpr))


def evaluate(
    candidates: dict[str, Candidate],
    sets: dict[str, tuple[str, Scored]],
    id_name: str,
    unseen: dict[str, Candidate],
) -> list[dict]:
    """One row per detector and set; ``unseen``: per OOD set, an mlp trained without it."""
    jobs = [(name, c, set_name) for name, c in candidates.items() for set_name in sets]
    jobs += [("mlp (kind unseen)", c, set_name) for set_name, c in unseen.items()]
    rows, scored_pairs = [], {}
    for name, candidate, set_name in jobs:
        kind, scored = sets[set_name]
        id_scores = candidate.detector.score(sets[id_name][1].features)  # cheap: no fitting
        scores = candidate.detector.score(scored.features)
        rows.append(row(name, set_name, kind, scores, id_scores, candidate.threshold))
        scored_pairs[name, set_name] = (id_scores, scores)
    add_auroc_intervals(rows, scored_pairs)
    return rows


def add_auroc_intervals(rows: list[dict], pairs: dict[tuple[str, str], tuple]) -> None:
    """Per OOD set: every detector's AUROC interval and its difference from each logit
    baseline's, from one paired bootstrap of that set's and the ID set's samples."""
    for set_name in dict.fromkeys(r["set"] for r in rows if r["kind"].endswith("OOD")):
        on_set = [r for r in rows if r["set"] == set_name]
        aurocs = bootstrap_aurocs([pairs[r["detector"], set_name] for r in on_set])
        column = {r["detector"]: k for k, r in enumerate(on_set)}
        for k, r in enumerate(on_set):
            r["AUROC_interval"] = list(percentile_interval(aurocs[:, k]))
            r["AUROC_minus"] = {
                base: {
                    "difference": r["AUROC"] - on_set[column[base]]["AUROC"],
                    "interval": list(percentile_interval(aurocs[:, k] - aurocs[:, column[base]])),
                }
                for base in BASELINES
                if base in column and base != r["detector"]
            }


def row(
    detector: str,
    set_name: str,
    kind: str,
    scores: np.ndarray,
    id_scores: np.ndarray,
    threshold: float | None,
) -> dict:
    out = {
        "detector": detector,
        "set": set_name,
        "kind": kind,
        "n": len(scores),
        "flagged": None if threshold is None else float((scores > threshold).mean()),
    }
    if kind != "ID":
        labels = np.r_[np.zeros(len(id_scores)), np.ones(len(scores))]
        out.update(ood_metrics(np.r_[id_scores, scores], labels))
    return out


def _table(rows: list[dict], sets: list[str], cell, heads: list[str] | None = None) -> list[str]:
    """Detectors down, sets across; ``cell`` formats one row (None where a pair is missing)."""
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    index = {(r["detector"], r["set"]): r for r in rows}
    heads = heads or sets
    lines = ["| detector | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(sets)]
    for d in detectors:
        cells = [cell(index.get((d, s))) for s in sets]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines


def auroc_interval(r: dict | None) -> str:
    if r is None or "AUROC_interval" not in r:
        return ""
    low, high = r["AUROC_interval"]
    return f"{r['AUROC']:.3f} ({low:.3f}-{high:.3f})"


def difference_from(base: str):
    def cell(r: dict | None) -> str:
        if r is None or base not in r.get("AUROC_minus", {}):
            return ""
        d = r["AUROC_minus"][base]
        low, high = d["interval"]
        return f"{d['difference']:+.3f} ({low:+.3f} to {high:+.3f})"

    return cell


def markdown(rows: list[dict], n_id: int) -> str:
    kinds = {r["set"]: r["kind"] for r in rows}
    ordered = sorted(kinds, key=lambda s: KINDS.index(kinds[s]))
    heads = [f"{s} ({kinds[s]})" for s in ordered]

    def flagged(r):
        return "" if r is None or r["flagged"] is None else f"{r['flagged']:.1%}"

    def metric(name):
        return lambda r: "" if r is None or name not in r else f"{r[name]:.3f}"

    scored = [s for s in ordered if kinds[s] != "ID"]
    oods = [s for s in ordered if kinds[s] in ("far OOD", "near OOD")]
    lines = [
        f"Share flagged as OOD at each detector's threshold (ID set: {n_id} samples):",
        "",
        *_table(rows, ordered, flagged, heads),
        "",
        "AUROC against the ID set (shift sets: 0.5 means the detector cannot tell them from ID):",
        "",
        *_table(rows, scored, metric("AUROC")),
        "",
        "FPR at 95 % TPR against the ID set:",
        "",
        *_table(rows, oods, metric("FPR95TPR")),
        "",
        "AUPR-IN / AUPR-OUT against the ID set:",
        "",
        *_table(
            rows,
            oods,
            lambda r: "" if r is None else f"{r['AUPR-IN']:.3f} / {r['AUPR-OUT']:.3f}",
        ),
        "",
        "AUROC with its 95 % interval (stratified bootstrap of the ID and OOD samples, "
        "2000 resamples):",
        "",
        *_table(rows, oods, auroc_interval),
    ]
    for base in BASELINES:
        lines += [
            "",
            f"AUROC minus {base}'s, with the 95 % interval of the difference (paired "
            "bootstrap: the same resamples for both; an interval above 0 is better than "
            f"{base} beyond resampling noise):",
            "",
            *_table(rows, oods, difference_from(base)),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with open_archive(args.archive) as archive:
        try:
            scorer, decoder = feature_scorer(archive, penultimate=True)
            penultimate = True
        except ValueError as e:  # a TorchScript model: no penultimate_mahalanobis row
            print(f"no penultimate activations: {e}", file=sys.stderr)
            scorer, decoder = feature_scorer(archive)
            penultimate = False

        def score(folders: list[str], kind: str) -> dict[str, tuple[str, Scored]]:
            return {
                name: (kind, s)
                for name, s in score_folders(scorer, decoder, folders, args.batch_size).items()
            }

        id_name = Path(args.id_dir).name
        sets = {
            **score([args.id_dir], "ID"),
            **score(args.shift, "shift"),
            **score(args.ood, "far OOD"),
            **score(args.near_ood, "near OOD"),
        }
        if len(sets) != 1 + len(args.shift) + len(args.ood) + len(args.near_ood):
            raise SystemExit("gradnorm-eval: every set needs a folder name of its own")
        try:
            shipped = shipped_calibration(archive.root, archive.config)
        except (ConfigError, CalibrationError) as e:
            print(f"ignoring the archive's calibration: {e}", file=sys.stderr)
            shipped = None
        tpr = 0.95 if shipped is None else shipped.tpr
        candidates: dict[str, Candidate] = {}
        unseen: dict[str, Candidate] = {}
        if args.fit_id:
            fit_plain = score_folders(scorer, decoder, [args.fit_id], args.batch_size)
            plain = next(iter(fit_plain.values())).features
            fit = plain
            if args.fit_augment:
                augmented = score_augmented(
                    scorer, decoder, args.fit_id, args.fit_augment, args.batch_size
                )
                fit = Features.concat([plain, augmented.features])
            for detector in (MSPDetector(), EnergyDetector(), SumDetector()):
                candidates[detector.name] = fitted(detector, fit, plain, tpr)
            if args.fit_augment:
                candidates["mahalanobis, ID only"] = fitted(
                    MahalanobisDetector(), plain, plain, tpr
                )
            candidates["mahalanobis"] = fitted(MahalanobisDetector(), fit, plain, tpr)
            for detector in (ClassMahalanobisDetector(), PredictedMahalanobisDetector()):
                candidates[detector.name] = fitted(detector, fit, plain, tpr)
            if penultimate:
                detector = PenultimateMahalanobisDetector()
                candidates[detector.name] = fitted(detector, fit, plain, tpr)
            if args.fit_ood:
                fit_ood = score_folders(scorer, decoder, args.fit_ood, args.batch_size)
                mlp = MLPDetector()
                mlp.fit(plain, Features.concat([s.features for s in fit_ood.values()]))
                candidates["mlp"] = Candidate(mlp, threshold_at_tpr(mlp.score(plain), tpr))
                for name, (kind, _) in sets.items():
                    others = [s.features for n, s in fit_ood.items() if n != name]
                    if kind.endswith("OOD") and name in fit_ood and others:
                        held_out = MLPDetector()
                        held_out.fit(plain, Features.concat(others))
                        unseen[name] = Candidate(
                            held_out, threshold_at_tpr(held_out.score(plain), tpr)
                        )
        else:
            for detector in (MSPDetector(), EnergyDetector(), SumDetector()):
                candidates[detector.name] = Candidate(detector, None)
        if shipped is not None:
            candidates[f"shipped ({shipped.detector})"] = Candidate(
                shipped.build_detector(), shipped.threshold
            )
    rows = evaluate(candidates, sets, id_name, unseen)
    text = markdown(rows, len(sets[id_name][1].logits))
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"n_id": len(sets[id_name][1].logits), "rows": rows}, indent=1) + "\n"
        )
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
