"""Our OOD metrics equal pytorch-ood's OODMetrics."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_ood.metrics import OODMetrics

from torchserve_gradnorm.evaluation import ood_metrics


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
