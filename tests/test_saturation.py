"""The README's saturated-logits figures, from the libraries: pytorch-ood's clamped backward
against the closed form -|C p - 1|^2, and our engine on the closed form (tests/saturation.py)."""

from pathlib import Path

import pytest
from saturation import CASES, scores

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_below_saturation_the_reference_ours_and_the_closed_form_agree():
    s = scores(CASES["(4, 2, 0, ..., 0)"])
    assert s["pytorch-ood"] == pytest.approx(s["exact"], rel=1e-9)
    assert s["ours"] == pytest.approx(s["exact"], rel=1e-12)


@pytest.mark.parametrize("case", ["(40, 20, 0, ..., 0)", "(40, 0, ..., 0)", "(1e4, 0, ..., 0)"])
def test_saturated_logits_make_the_reference_look_unsure_and_ours_stays_exact(case):
    s = scores(CASES[case])
    assert s["ours"] == pytest.approx(s["exact"], rel=1e-12)
    assert abs(s["pytorch-ood"]) < abs(s["exact"]) / 10  # a confident sample, scored near 0


def test_the_readme_quotes_what_the_libraries_return():
    forty = scores(CASES["(40, 20, 0, ..., 0)"])
    huge = scores(CASES["(1e4, 0, ..., 0)"])
    quoted = " ".join(README.split())  # the paragraph is wrapped
    assert (
        f"logits (40, 20, 0, ..., 0) over 10 classes `GradUncertainty` returns "
        f"{forty['pytorch-ood']:.1f} where the exact value is {forty['exact']:.0f}" in quoted
    )
    assert huge["pytorch-ood"] == 0.0 and "`GradUncertainty` returns -0.0" in quoted
