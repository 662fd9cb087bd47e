"""gradnorm-eval: AUROC, AUPR-IN, AUPR-OUT and FPR@95TPR per detector and OOD set.

    gradnorm-eval ARCHIVE --id DIR --ood DIR [--ood DIR ...]
        [--fit-id DIR] [--fit-ood DIR ...] [--json FILE] [--markdown FILE]

Detectors: ``msp`` (the maximum-softmax-probability baseline, Hendrycks & Gimpel 2017),
``sum`` (the engine's score), ``mahalanobis`` (fitted on --fit-id), ``mlp`` (trained on
--fit-id and --fit-ood), ``mlp (kind unseen)`` (when a --fit-ood folder has the name of the
evaluated OOD set: an mlp trained on the other kinds only, the honest number for OOD
nobody labelled), and ``shipped`` (the archive's own calibration, if it has one).
Metrics follow pytorch-ood's OODMetrics (OOD positive, higher score = more OOD).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..calibration import CalibrationError, shipped_calibration
from ..config import ConfigError
from ..detectors import Features, MahalanobisDetector, MLPDetector, SumDetector
from ..evaluation import ood_metrics
from ..mar import open_archive
from ._common import feature_scorer, score_folders

METRICS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradnorm-eval", description=__doc__.split("\n")[0])
    p.add_argument("archive")
    p.add_argument("--id", required=True, dest="id_dir", help="held-out ID samples")
    p.add_argument("--ood", action="append", required=True, help="OOD folder (repeatable)")
    p.add_argument("--fit-id", help="ID samples to fit mahalanobis and mlp on")
    p.add_argument("--fit-ood", action="append", default=[], help="OOD samples to train mlp on")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--markdown", help="write the results as a markdown table")
    p.add_argument("--batch-size", type=int, default=64)
    return p


def msp_scores(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return -p.max(1)


def markdown_table(rows: list[dict]) -> str:
    head = "| detector | OOD set | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for r in rows:
        values = " | ".join(f"{r[m]:.3f}" for m in METRICS)
        lines.append(f"| {r['detector']} | {r['ood']} | {values} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with open_archive(args.archive) as archive:
        scorer, decoder = feature_scorer(archive)
        test_id = score_folders(scorer, decoder, [args.id_dir], args.batch_size)
        test_id = next(iter(test_id.values()))
        test_ood = score_folders(scorer, decoder, args.ood, args.batch_size)
        detectors = {"sum": SumDetector()}
        unseen: dict[str, MLPDetector] = {}  # per OOD set: an mlp trained without that kind
        if args.fit_id:
            fit_id = next(
                iter(score_folders(scorer, decoder, [args.fit_id], args.batch_size).values())
            )
            detectors["mahalanobis"] = MahalanobisDetector()
            detectors["mahalanobis"].fit(fit_id.features)
            if args.fit_ood:
                fit_ood = score_folders(scorer, decoder, args.fit_ood, args.batch_size)
                detectors["mlp"] = MLPDetector()
                detectors["mlp"].fit(
                    fit_id.features, Features.concat([s.features for s in fit_ood.values()])
                )
                for name in test_ood:
                    others = [s.features for n, s in fit_ood.items() if n != name]
                    if name in fit_ood and others:
                        unseen[name] = MLPDetector()
                        unseen[name].fit(fit_id.features, Features.concat(others))
        try:
            shipped = shipped_calibration(archive.root, archive.config)
        except (ConfigError, CalibrationError) as e:
            print(f"ignoring the archive's calibration: {e}", file=sys.stderr)
            shipped = None
        if shipped is not None:
            detectors[f"shipped ({shipped.detector})"] = shipped.build_detector()
    rows = []
    for ood_name, ood in test_ood.items():
        labels = np.r_[np.zeros(len(test_id.logits)), np.ones(len(ood.logits))]
        candidates = {"msp": (msp_scores(test_id.logits), msp_scores(ood.logits))}
        for name, detector in detectors.items():
            candidates[name] = (detector.score(test_id.features), detector.score(ood.features))
        if ood_name in unseen:
            held_out = unseen[ood_name]
            candidates["mlp (kind unseen)"] = (
                held_out.score(test_id.features),
                held_out.score(ood.features),
            )
        for name, (id_scores, ood_scores) in candidates.items():
            result = ood_metrics(np.r_[id_scores, ood_scores], labels)
            rows.append({"detector": name, "ood": ood_name, **result, "n_ood": len(ood_scores)})
    table = markdown_table(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"n_id": len(test_id.logits), "rows": rows}, indent=1)
        )
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
