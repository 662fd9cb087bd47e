"""Our OOD metrics equal pytorch-ood's OODMetrics; their bootstrap intervals cover the truth as
often as they claim."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_ood.metrics import OODMetrics

from torchserve_gradnorm.cli.evaluate import add_auroc_intervals, markdown, row
from torchserve_gradnorm.evaluation import (
    _wins,
    bootstrap_aurocs,
    ood_metrics,
    percentile_interval,
)


def reference(scores, is_ood):
    m = OODMetrics()
    m.update(torch.tensor(scores), torch.tensor(np.where(is_ood, -1, 0)))
    return m.compute()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=2, max_size=40).filter(
        lambda rows: 0 < sum(o for _, o in rows) < len(rows)
    )
)
def test_metrics_match_pytorch_ood_including_ties(rows):
    scores = np.array([s for s, _ in rows], dtype=np.float64) / 2  # small ints: many ties
    is_ood = np.array([o for _, o in rows])
    ours, theirs = ood_metrics(scores, is_ood), reference(scores, is_ood)
    for key in ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key


def test_perfect_separation_and_the_need_for_both_classes():
    result = ood_metrics(np.array([0.0, 1.0, 5.0, 6.0]), np.array([False, False, True, True]))
    assert result == {"AUROC": 1.0, "AUPR-IN": 1.0, "AUPR-OUT": 1.0, "FPR95TPR": 0.0}
    with pytest.raises(ValueError, match="both ID and OOD"):
        ood_metrics(np.array([1.0, 2.0]), np.array([True, True]))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=2, max_size=40).filter(
        lambda rows: 0 < sum(o for _, o in rows) < len(rows)
    )
)
def test_the_bootstrapped_statistic_is_the_auroc_ood_metrics_reports_ties_included(rows):
    scores = np.array([s for s, _ in rows], dtype=np.float64)
    is_ood = np.array([o for _, o in rows])
    wins = _wins(scores[~is_ood], scores[is_ood])
    assert wins.mean() == pytest.approx(ood_metrics(scores, is_ood)["AUROC"], abs=1e-12)


def gaussian_sets(rng, n, separation):
    return rng.normal(0, 1, n), rng.normal(separation, 1, n)


def test_intervals_cover_the_true_auroc_about_as_often_as_their_level_says():
    # two unit Gaussians `separation` apart: the true AUROC is Phi(separation / sqrt 2)
    rng, separation, level = np.random.default_rng(1), 1.0, 0.9
    truth = 0.5 * (1 + math.erf(separation / 2))
    covered = []
    for trial in range(200):
        id_scores, ood_scores = gaussian_sets(rng, 60, separation)
        aurocs = bootstrap_aurocs([(id_scores, ood_scores)], resamples=400, seed=trial)
        low, high = percentile_interval(aurocs[:, 0], level)
        covered.append(low <= truth <= high)
    assert 0.82 <= np.mean(covered) <= 0.97


def test_intervals_narrow_as_the_sets_grow():
    rng = np.random.default_rng(2)
    widths = []
    for n in (50, 800):
        aurocs = bootstrap_aurocs([gaussian_sets(rng, n, 1.0)], resamples=500)
        low, high = percentile_interval(aurocs[:, 0])
        widths.append(high - low)
    assert widths[1] < 0.4 * widths[0]  # 16x the samples: about a quarter of the width


def test_detectors_are_read_on_the_same_resamples_so_a_rescaled_copy_differs_by_zero():
    id_scores, ood_scores = gaussian_sets(np.random.default_rng(3), 80, 0.5)
    aurocs = bootstrap_aurocs([(id_scores, ood_scores), (np.exp(id_scores), np.exp(ood_scores))])
    assert np.array_equal(aurocs[:, 0], aurocs[:, 1])
    assert aurocs[:, 0].std() > 0.01  # while each AUROC alone moves


def test_a_seed_gives_the_same_resamples_and_other_seeds_others():
    pair = gaussian_sets(np.random.default_rng(4), 30, 1.0)
    assert np.array_equal(
        bootstrap_aurocs([pair], 50, seed=7), bootstrap_aurocs([pair], 50, seed=7)
    )
    assert not np.array_equal(bootstrap_aurocs([pair], 50, 7), bootstrap_aurocs([pair], 50, 8))


def test_scores_of_different_samples_cannot_be_paired():
    with pytest.raises(ValueError, match="same ID and OOD samples"):
        bootstrap_aurocs([(np.zeros(5), np.ones(4)), (np.zeros(5), np.ones(3))])


def test_eval_rows_carry_intervals_and_differences_from_the_logit_baselines():
    rng = np.random.default_rng(5)
    id_base, ood_base = gaussian_sets(rng, 150, 1.0)
    # "better" sees the same samples, with its OOD scores moved further out
    detectors = {
        "msp": (id_base, ood_base),
        "energy": (id_base + rng.normal(0, 0.3, 150), ood_base + rng.normal(0, 0.3, 150)),
        "better": (id_base, ood_base + 1.5),
    }
    rows, pairs = [], {}
    for name, (i, o) in detectors.items():
        rows.append(row(name, "id", "ID", i, i, None))
        rows.append(row(name, "moved", "shift", i + 0.1, i, None))
        rows.append(row(name, "far", "far OOD", o, i, None))
        pairs[name, "id"], pairs[name, "moved"], pairs[name, "far"] = (i, i), (i, i + 0.1), (i, o)
    add_auroc_intervals(rows, pairs)
    by = {(r["detector"], r["set"]): r for r in rows}
    assert "AUROC_interval" not in by["better", "moved"] and "AUROC_interval" not in by["msp", "id"]
    for name in detectors:
        low, high = by[name, "far"]["AUROC_interval"]
        assert low < by[name, "far"]["AUROC"] < high
    better = by["better", "far"]["AUROC_minus"]
    assert set(better) == {"msp", "energy"} and set(by["energy", "far"]["AUROC_minus"]) == {"msp"}
    assert better["msp"]["interval"][0] > 0 and better["energy"]["interval"][0] > 0
    text = markdown(rows, 150)
    assert "AUROC minus energy's" in text and "AUROC with its 95 % interval" in text
