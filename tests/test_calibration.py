"""Calibration: detectors, thresholds at a target TPR, the calibration file and its
fingerprint, and the gradnorm-calibrate / gradnorm-eval commands on a real archive."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pytorch_ood.metrics import OODMetrics
from sklearn.metrics import roc_auc_score
from torch import nn
from torchserve_harness import build_archive, demo_config, load_demo_model

from torchserve_gradnorm.calibration import (
    Calibration,
    CalibrationError,
    calibrate,
    fingerprint,
    shipped_calibration,
    threshold_at_tpr,
)
from torchserve_gradnorm.codecs import RequestDecoder
from torchserve_gradnorm.config import ConfigError, handler_section, parse_handler_config
from torchserve_gradnorm.detectors import (
    DETECTORS,
    ClassMahalanobisDetector,
    EnergyDetector,
    Features,
    MahalanobisDetector,
    MLPDetector,
    MSPDetector,
    PenultimateMahalanobisDetector,
    PredictedMahalanobisDetector,
    SumDetector,
)
from torchserve_gradnorm.mar import open_archive
from torchserve_gradnorm.scorer import GradNormScorer
from torchserve_gradnorm.service import GradNormService

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def gaussian_features(n: int, shift: float, seed: int, layers: int = 6) -> Features:
    rng = np.random.default_rng(seed)
    log_norms = rng.normal(size=(n, layers)) + shift
    logits = rng.normal(size=(n, 3)) * 2 + shift
    penultimate = rng.normal(size=(n, 5)) + shift
    return Features(np.exp(log_norms), -np.exp(log_norms).sum(1), logits, penultimate)


def two_class_features(centers: list[float], n: int, seed: int) -> Features:
    """Log norms around a per-class center (layers move together), logits naming the class."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % len(centers)
    log_norms = np.asarray(centers)[classes, None] + rng.normal(scale=0.2, size=(n, 4))
    logits = np.eye(len(centers))[classes] * 5 + rng.normal(scale=0.1, size=(n, len(centers)))
    return Features(np.exp(log_norms), -np.exp(log_norms).sum(1), logits, log_norms.copy())


class TestDetectors:
    def test_sum_is_the_engines_oriented_score(self):
        f = gaussian_features(10, 0, 0)
        assert np.array_equal(SumDetector().score(f), f.ood_score)

    def test_mahalanobis_scores_shifted_data_higher(self):
        detector = MahalanobisDetector()
        detector.fit(gaussian_features(300, 0.0, 0))
        near = detector.score(gaussian_features(200, 0.0, 1))
        far = detector.score(gaussian_features(200, 3.0, 2))
        assert np.median(far) > np.percentile(near, 99)

    def test_mahalanobis_copes_with_constant_layers_and_few_samples(self):
        features = gaussian_features(4, 0.0, 0, layers=10)
        features.per_layer[:, 3] = 0.0  # a layer with no gradient at all
        detector = MahalanobisDetector()
        detector.fit(features)
        assert np.isfinite(detector.score(gaussian_features(5, 1.0, 1, layers=10))).all()

    def test_mlp_learns_a_direction_the_sum_gets_wrong(self):
        # OOD here has *larger* norms, so the negated sum ranks it as more in-distribution
        id_fit, ood_fit = gaussian_features(200, 0.0, 0), gaussian_features(200, 2.0, 1)
        id_test, ood_test = gaussian_features(100, 0.0, 2), gaussian_features(100, 2.0, 3)
        mlp = MLPDetector()
        mlp.fit(id_fit, ood_fit)
        assert (mlp.score(ood_test).mean() > mlp.score(id_test).mean()) and (
            SumDetector().score(ood_test).mean() < SumDetector().score(id_test).mean()
        )

    def test_mlp_needs_labelled_ood(self):
        with pytest.raises(ValueError, match="--ood"):
            MLPDetector().fit(gaussian_features(10, 0, 0), None)

    def test_msp_and_energy_are_the_published_logit_scores(self):
        features = gaussian_features(20, 0.0, 0)
        logits = torch.from_numpy(features.logits)
        np.testing.assert_allclose(
            MSPDetector().score(features), -torch.softmax(logits, 1).max(1).values.numpy()
        )
        np.testing.assert_allclose(
            EnergyDetector().score(features), -torch.logsumexp(logits, 1).numpy()
        )

    def test_logit_detectors_need_logits(self):
        features = gaussian_features(5, 0.0, 0)
        features.logits = None
        for detector in (
            MSPDetector(),
            EnergyDetector(),
            ClassMahalanobisDetector(),
            PredictedMahalanobisDetector(),
        ):
            with pytest.raises(ValueError, match="reads the logits"):
                detector.fit(features)
                detector.score(features)

    def test_class_mahalanobis_flags_what_lies_between_classes(self):
        # two classes far apart: one Gaussian for both is wide enough to take in a sample
        # halfway between them, one Gaussian per class is not
        id_fit = two_class_features([0.0, 4.0], 400, 0)
        id_test = two_class_features([0.0, 4.0], 200, 1)
        between = two_class_features([2.0, 2.0], 50, 2)
        pooled, per_class = MahalanobisDetector(), ClassMahalanobisDetector()
        pooled.fit(id_fit)
        per_class.fit(id_fit)
        assert np.median(per_class.score(between)) > np.percentile(per_class.score(id_test), 99)
        assert np.median(pooled.score(between)) < np.percentile(pooled.score(id_test), 99)

    def test_class_mahalanobis_keeps_classes_never_predicted_out_of_the_minimum(self):
        fit = two_class_features([0.0, 4.0, 8.0], 300, 0)
        fit.logits[:, 2] = -10.0  # the third class is never predicted
        detector = ClassMahalanobisDetector()
        detector.fit(fit)
        restored = ClassMahalanobisDetector.from_params(json.loads(json.dumps(detector.params())))
        assert restored.params()["means"][2] is None
        probe = two_class_features([8.0, 8.0, 8.0], 10, 1)
        np.testing.assert_allclose(restored.score(probe), detector.score(probe))
        assert np.isfinite(detector.score(probe)).all()

    def test_penultimate_mahalanobis_fits_one_gaussian_per_class_on_the_penultimate_activations(
        self,
    ):
        # the same two classes seen through the penultimate activations alone: a sample
        # halfway between them is flagged whatever its gradient norms say
        id_fit = two_class_features([0.0, 4.0], 400, 0)
        id_test = two_class_features([0.0, 4.0], 200, 1)
        between = two_class_features([2.0, 2.0], 50, 2)
        between.per_layer = id_test.per_layer[:50]  # typical ID gradients
        detector = PenultimateMahalanobisDetector()
        detector.fit(id_fit)
        assert np.median(detector.score(between)) > np.percentile(detector.score(id_test), 99)
        z = id_test.penultimate[:1] - detector.means[0]
        np.testing.assert_allclose(
            detector.score(id_test)[:1], np.sqrt(z @ detector.precision @ z.T)[0]
        )

    def test_penultimate_mahalanobis_needs_the_penultimate_activations(self):
        features = gaussian_features(20, 0.0, 0)
        features.penultimate = None
        with pytest.raises(ValueError, match="reads the penultimate activations"):
            PenultimateMahalanobisDetector().fit(features)
        assert PenultimateMahalanobisDetector.needs_penultimate
        assert not PenultimateMahalanobisDetector.needs_per_layer
        assert not any(
            d.needs_penultimate for d in DETECTORS.values() if d.name != "penultimate_mahalanobis"
        )

    def test_predicted_mahalanobis_flags_an_answer_whose_gradients_belong_to_another_class(self):
        # answered "class 0" with the gradients of a typical class-1 sample: the closest class
        # (class_mahalanobis) takes it in, the answered class's Gaussian does not
        id_fit = two_class_features([0.0, 4.0], 400, 0)
        id_test = two_class_features([0.0, 4.0], 200, 1)
        mixed = two_class_features([4.0, 4.0], 100, 2)
        answered_0 = mixed.logits.argmax(1) == 0
        mixed = Features(mixed.per_layer[answered_0], mixed.ood_score[answered_0],
                         mixed.logits[answered_0])  # fmt: skip
        closest, predicted = ClassMahalanobisDetector(), PredictedMahalanobisDetector()
        closest.fit(id_fit)
        predicted.fit(id_fit)
        assert np.median(predicted.score(mixed)) > np.percentile(predicted.score(id_test), 99)
        assert np.median(closest.score(mixed)) < np.percentile(closest.score(id_test), 99)

    def test_predicted_mahalanobis_reads_confidence_on_one_scale_for_every_class(self):
        # class 1 is answered less surely than class 0: the confidence statistics still get
        # one mean (the ID average), the gradient norms one per class
        fit = two_class_features([0.0, 0.0], 400, 0)
        fit.logits[np.arange(400) % 2 == 1] *= 0.5
        detector = PredictedMahalanobisDetector()
        detector.fit(fit)
        confidence = np.c_[fit.logits.max(1), np.log(np.exp(fit.logits).sum(1))]
        np.testing.assert_allclose(detector.means[:, -2:], [confidence.mean(0)] * 2)
        np.testing.assert_allclose(detector.means[:, :-2].mean(1), [0.0, 0.0], atol=0.05)

    def test_predicted_mahalanobis_uses_the_closest_class_for_one_never_predicted(self):
        fit = two_class_features([0.0, 4.0, 8.0], 300, 0)
        fit.logits[:, 2] = -10.0  # the third class is never predicted at fit time
        detector = PredictedMahalanobisDetector()
        detector.fit(fit)
        restored = PredictedMahalanobisDetector.from_params(
            json.loads(json.dumps(detector.params()))
        )
        probe = two_class_features([4.0, 4.0, 4.0], 30, 1)
        probe.logits[:, 2] = 20.0  # now everything is answered "class 2"
        z = np.c_[np.log(probe.per_layer), probe.logits.max(1),
                  np.log(np.exp(probe.logits).sum(1))]  # fmt: skip
        to_class_1 = z - detector.means[1]
        expected = np.sqrt(np.einsum("ni,ij,nj->n", to_class_1, detector.precision, to_class_1))
        np.testing.assert_allclose(restored.score(probe), expected)

    @pytest.mark.parametrize("detector", list(DETECTORS.values()))
    def test_fitted_parameters_round_trip_through_json(self, detector):
        fitted = detector()
        fitted.fit(gaussian_features(50, 0, 0), gaussian_features(50, 1, 1))
        restored = detector.from_params(json.loads(json.dumps(fitted.params())))
        probe = gaussian_features(20, 0.5, 2)
        np.testing.assert_allclose(restored.score(probe), fitted.score(probe))


CONFIG = parse_handler_config({"input": {"kind": "tensor", "shape": [4]}})


def make_calibration(
    tpr=0.95, detector=None, weights="a" * 64, config=CONFIG, n=400
) -> Calibration:
    return calibrate(
        detector or MahalanobisDetector(),
        gaussian_features(n, 0.0, 0),
        None,
        tpr=tpr,
        config=config,
        parameters=[f"p{i}" for i in range(6)],
        weights_sha256=weights,
    )


class TestCalibrationFile:
    @pytest.mark.parametrize("tpr", [0.8, 0.9, 0.95, 0.99])
    def test_the_threshold_keeps_the_target_tpr_on_held_out_id_data(self, tpr):
        cal = make_calibration(tpr, n=4000)
        fitted = cal.build_detector().score(gaussian_features(4000, 0.0, 0))
        assert cal.achieved_tpr == pytest.approx((fitted <= cal.threshold).mean())
        # new draws of the same distribution: the rate differs from the target only by the
        # sampling error of a quantile fitted on 4,000 and measured on 20,000 (3 sigma)
        held_out = cal.build_detector().score(gaussian_features(20_000, 0.0, 1))
        sigma = np.sqrt(tpr * (1 - tpr) * (1 / 4000 + 1 / 20_000))
        assert abs((held_out <= cal.threshold).mean() - tpr) <= 3 * sigma

    def test_augmented_copies_shape_the_fit_but_not_the_threshold(self):
        plain, copies = gaussian_features(200, 0.0, 0), gaussian_features(600, 1.0, 1)
        cal = calibrate(
            MahalanobisDetector(), Features.concat([plain, copies]), None, tpr=0.9,
            config=CONFIG, parameters=[f"p{i}" for i in range(6)], weights_sha256="a" * 64,
            n_augmented=600,
        )  # fmt: skip
        detector = cal.build_detector()
        assert (cal.n_id, cal.n_augmented) == (200, 600)
        assert cal.threshold == threshold_at_tpr(detector.score(plain), 0.9)
        plain_only = MahalanobisDetector()
        plain_only.fit(plain)
        assert not np.allclose(detector.mean, plain_only.mean)  # the copies moved the fit

    def test_calibration_files_from_before_augmentation_still_load(self):
        data = json.loads(make_calibration().to_json())
        del data["n_augmented"]
        assert Calibration.from_json(json.dumps(data)).n_augmented == 0

    def test_threshold_at_tpr_rejects_a_rate_outside_zero_one(self):
        with pytest.raises(ValueError, match="tpr"):
            threshold_at_tpr(np.arange(10.0), 1.5)

    def test_round_trip(self, tmp_path):
        cal = make_calibration()
        cal.save(tmp_path / "c.json")
        again = Calibration.load(tmp_path / "c.json")
        assert again == cal
        assert again.id_quantiles["0.5"] == cal.center

    @pytest.mark.parametrize(
        "text, message",
        [
            ("{", "not JSON"),
            ('{"format": "other"}', "not a calibration file"),
            ('{"format": "torchserve-gradnorm-calibration/1"}', "malformed"),
        ],
    )
    def test_malformed_files_are_refused(self, text, message):
        with pytest.raises(CalibrationError, match=message):
            Calibration.from_json(text)

    def test_fingerprint_changes_with_weights_and_scoring_settings_only(self):
        base = fingerprint("a" * 64, CONFIG)
        other_weights = fingerprint("b" * 64, CONFIG)
        hotter = fingerprint(
            "a" * 64,
            parse_handler_config({"temperature": 2.0, "input": {"kind": "tensor", "shape": [4]}}),
        )
        more_answers = fingerprint(
            "a" * 64, parse_handler_config({"top_k": 1, "input": {"kind": "tensor", "shape": [4]}})
        )
        assert len({base, other_weights, hotter}) == 3
        assert more_answers == base


class SixParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def service_calibration(
    model: nn.Module, weights: str, config=CONFIG, detector=MahalanobisDetector
) -> Calibration:
    service = GradNormService(model, config)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    result = service.scorer.__class__(
        model, per_layer=True, penultimate=detector.needs_penultimate
    )(x)
    features = Features.from_result(result)
    return calibrate(
        detector(), features, None, tpr=0.9, config=config,
        parameters=service.scorer.selected, weights_sha256=weights,
    )  # fmt: skip


class TestServedCalibration:
    def test_the_service_scores_with_the_calibrated_detector_and_threshold(self):
        torch.manual_seed(0)
        model = SixParams()
        cal = service_calibration(model, "w" * 64)
        service = GradNormService(model, CONFIG, calibration=cal, weights_sha256="w" * 64)
        reply = service.handle([{"body": json.dumps({"data": [0.1, 0.2, 0.3, 0.4]}).encode()}])[0]
        ood = reply.body["ood"]
        assert ood["detector"] == "mahalanobis" and ood["threshold"] == cal.threshold
        assert ood["is_ood"] is (ood["score"] > cal.threshold)
        assert service.score_reference == (cal.center, cal.threshold)
        assert "per_layer" not in ood  # computed for the detector, shown only when asked

    @pytest.mark.parametrize(
        "detector",
        [MSPDetector, EnergyDetector, ClassMahalanobisDetector, PredictedMahalanobisDetector],
    )
    def test_detectors_that_read_logits_are_served(self, detector):
        torch.manual_seed(0)
        model = SixParams()
        cal = service_calibration(model, "w" * 64, detector=detector)
        service = GradNormService(model, CONFIG, calibration=cal, weights_sha256="w" * 64)
        x = [0.1, 0.2, 0.3, 0.4]
        reply = service.handle([{"body": json.dumps({"data": x}).encode()}])[0]
        features = Features.from_result(
            service.scorer.__class__(model, per_layer=True)(torch.tensor([x]))
        )
        expected = cal.build_detector().score(features)[0]
        assert reply.body["ood"]["detector"] == detector.name
        assert reply.body["ood"]["score"] == pytest.approx(expected, rel=1e-5)

    def test_a_penultimate_detector_is_served_from_the_scoring_forward(self):
        torch.manual_seed(0)
        model = SixParams()
        cal = service_calibration(model, "w" * 64, detector=PenultimateMahalanobisDetector)
        service = GradNormService(model, CONFIG, calibration=cal, weights_sha256="w" * 64)
        assert service.scorer.penultimate and not service.scorer.per_layer
        x = [0.1, 0.2, 0.3, 0.4]
        reply = service.handle([{"body": json.dumps({"data": x}).encode()}])[0]
        with torch.no_grad():
            hidden = torch.tanh(model.b(torch.tanh(model.a(torch.tensor([x])))))
        features = Features(np.zeros((1, 0)), np.zeros(1), None, hidden.double().numpy())
        assert reply.body["ood"]["detector"] == "penultimate_mahalanobis"
        assert reply.body["ood"]["score"] == pytest.approx(
            cal.build_detector().score(features)[0], rel=1e-5
        )

    @pytest.mark.parametrize("detector", [None, MahalanobisDetector, EnergyDetector])
    def test_other_detectors_do_not_keep_the_penultimate_activations(self, detector):
        model = SixParams()
        cal = None if detector is None else service_calibration(model, "w" * 64, detector=detector)
        service = GradNormService(model, CONFIG, calibration=cal, weights_sha256="w" * 64)
        assert not service.scorer.penultimate
        assert not any(m._forward_pre_hooks for m in model.modules())

    def test_a_penultimate_detector_on_a_torchscript_model_is_refused_at_load(self):
        model = SixParams()
        cal = service_calibration(model, "w" * 64, detector=PenultimateMahalanobisDetector)
        scripted = torch.jit.script(model)
        with pytest.raises(ConfigError, match="^handler.calibration: .*TorchScript"):
            GradNormService(scripted, CONFIG, calibration=cal, weights_sha256="w" * 64)

    def test_a_fingerprint_mismatch_is_refused_at_load(self):
        model = SixParams()
        cal = service_calibration(model, "w" * 64)
        with pytest.raises(ConfigError, match="^handler.calibration: .*other weights"):
            GradNormService(model, CONFIG, calibration=cal, weights_sha256="x" * 64)

    def test_a_detector_key_that_contradicts_the_calibration_is_refused(self):
        model = SixParams()
        cal = service_calibration(model, "w" * 64)
        config = parse_handler_config(
            {"detector": "mlp", "input": {"kind": "tensor", "shape": [4]}}
        )
        with pytest.raises(ConfigError, match="^handler.detector: 'mlp' asked for"):
            GradNormService(model, config, calibration=cal, weights_sha256="w" * 64)

    def test_a_fitted_detector_without_calibration_is_refused(self):
        config = parse_handler_config({"detector": "mahalanobis"})
        with pytest.raises(ConfigError, match="^handler.detector: .*no calibration file"):
            GradNormService(SixParams(), config)

    def test_a_configured_threshold_overrides_the_calibrated_one(self):
        model = SixParams()
        cal = service_calibration(model, "w" * 64)
        config = parse_handler_config(
            {"threshold": 123.0, "input": {"kind": "tensor", "shape": [4]}}
        )
        service = GradNormService(model, config, calibration=cal, weights_sha256="w" * 64)
        assert service.threshold == 123.0

    def test_shipped_calibration_is_found_or_named_in_the_error(self, tmp_path):
        assert shipped_calibration(tmp_path, CONFIG) is None
        named = parse_handler_config({"calibration": "mine.json"})
        with pytest.raises(ConfigError, match="^handler.calibration: mine.json is not in"):
            shipped_calibration(tmp_path, named)
        (tmp_path / "calibration.json").write_text("{}")
        with pytest.raises(ConfigError, match="^handler.calibration: calibration.json: not a"):
            shipped_calibration(tmp_path, CONFIG)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo archive and small demo data folders."""
    work = tmp_path_factory.mktemp("calibrate")
    subprocess.run(
        [sys.executable, str(REPO / "samples/make_demo_data.py"), "--out", str(work / "data"),
         "--per-set", "40"],
        check=True, capture_output=True,
    )  # fmt: skip
    digits = REPO / "samples/digits"
    subprocess.run(
        [str(BIN / "gradnorm-archive"), "--model-name", "digits",
         "--model-file", str(digits / "model.py"),
         "--serialized-file", str(digits / "digits_cnn.pt"),
         "--config-file", str(digits / "model-config.yaml"),
         "--labels", str(digits / "index_to_name.json"), "--export-path", str(work)],
        check=True, capture_output=True,
    )  # fmt: skip
    return work


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_calibrate_into_the_archive_and_load_it_back(demo, tmp_path):
    archive = tmp_path / "digits.mar"
    archive.write_bytes((demo / "digits.mar").read_bytes())
    data = demo / "data"
    out = run(
        BIN / "gradnorm-calibrate", archive, "--id", data / "id_val", "--augment", "1",
        "--ood", data / "ood_fit/noise", "--detector", "class_mahalanobis",
        "--into", archive, "--out", tmp_path / "cal.json", "--plot", tmp_path / "hist.png",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "fitted with 270 augmented copies too" in out.stdout and "OOD noise" in out.stdout
    assert (tmp_path / "hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with zipfile.ZipFile(archive) as mar:
        shipped = Calibration.from_json(mar.read("calibration.json").decode())
    assert shipped == Calibration.load(tmp_path / "cal.json")
    with open_archive(archive) as opened:
        cal = shipped_calibration(opened.root, opened.config)
        assert cal.fingerprint == fingerprint(opened.weights_sha256(), opened.config)
        assert cal.detector == "class_mahalanobis"
        assert (cal.n_id, cal.n_augmented) == (270, 270) and abs(cal.achieved_tpr - 0.95) <= 0.01


@pytest.mark.slow
def test_calibrating_into_an_archive_of_other_weights_is_refused(demo, tmp_path):
    digits = REPO / "samples/digits"
    state = torch.load(digits / "digits_cnn.pt", weights_only=True)
    state["head.bias"] += 1.0
    torch.save(state, tmp_path / "other.pt")
    run(
        BIN / "gradnorm-archive", "--model-name", "other", "--model-file", digits / "model.py",
        "--serialized-file", tmp_path / "other.pt", "--config-file", digits / "model-config.yaml",
        "--export-path", tmp_path,
    )  # fmt: skip
    out = run(
        BIN / "gradnorm-calibrate", demo / "digits.mar", "--id", demo / "data/id_val",
        "--into", tmp_path / "other.mar", "--out", tmp_path / "c.json",
    )  # fmt: skip
    assert out.returncode != 0 and "other weights" in out.stderr


def reference_scores(folder: Path, batch_size: int = 64) -> tuple[np.ndarray, Features]:
    """MSP scores from a plain forward pass and gradient features from the scorer, for the
    demo model's pictures in ``folder``, computed here rather than by gradnorm-eval."""
    config = parse_handler_config(handler_section(demo_config()))
    decoder = RequestDecoder(config.input, config.limits)
    model = load_demo_model()
    x = torch.cat([decoder.decode(f.read_bytes()).samples for f in sorted(folder.glob("*.png"))])
    scorer = GradNormScorer(model, **{**config.scorer_kwargs(), "per_layer": True})
    msp, features = [], []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        with torch.no_grad():
            msp.append(-torch.softmax(model(chunk).double(), 1).max(1).values.numpy())
        features.append(Features.from_result(scorer(chunk)))
    return np.concatenate(msp), Features.concat(features)


@pytest.mark.slow
def test_eval_reports_flagged_shares_and_metrics_per_detector_and_set(demo, tmp_path):
    data = demo / "data"
    out = run(
        BIN / "gradnorm-eval", demo / "digits.mar", "--id", data / "id_test",
        "--shift", data / "shift_test/jpeg", "--ood", data / "ood_test/noise",
        "--ood", data / "ood_test/letters", "--near-ood", data / "ood_test/inverted",
        "--fit-id", data / "id_val", "--fit-augment", "1",
        "--fit-ood", data / "ood_fit/noise", "--fit-ood", data / "ood_fit/letters",
        "--json", tmp_path / "eval.json", "--markdown", tmp_path / "eval.md",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    kinds = {r["set"]: r["kind"] for r in rows}
    assert kinds == {
        "id_test": "ID", "jpeg": "shift", "noise": "far OOD", "letters": "far OOD",
        "inverted": "near OOD",
    }  # fmt: skip
    seen = {(r["detector"], r["set"]) for r in rows}
    for detector in ("msp", "energy", "sum", "mahalanobis", "mahalanobis, ID only",
                     "class_mahalanobis", "predicted_mahalanobis", "penultimate_mahalanobis",
                     "mlp"):  # fmt: skip
        assert {(detector, s) for s in kinds} <= seen
    assert {("mlp (kind unseen)", "noise"), ("mlp (kind unseen)", "letters")} <= seen
    for r in rows:
        assert 0.0 <= r["flagged"] <= 1.0
        assert ("AUROC" in r) == (r["kind"] != "ID")
        assert ("AUROC_interval" in r) == r["kind"].endswith("OOD")
    id_flagged = [r["flagged"] for r in rows if r["kind"] == "ID" and r["detector"] == "energy"]
    assert 0.0 < id_flagged[0] < 0.2  # thresholds sit at 95 % TPR on the fit data
    assert "| detector | id_test (ID) | jpeg (shift) |" in (tmp_path / "eval.md").read_text()


@pytest.mark.slow
def test_eval_reports_the_reference_metrics_of_every_detector_and_the_softmax_baseline(
    demo, tmp_path
):
    data = demo / "data"
    out = run(
        BIN / "gradnorm-eval", demo / "digits.mar", "--id", data / "id_test",
        "--ood", data / "ood_test/noise", "--ood", data / "ood_test/letters",
        "--fit-id", data / "id_val",
        "--fit-ood", data / "ood_fit/noise", "--fit-ood", data / "ood_fit/letters",
        "--json", tmp_path / "eval.json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {
        (r["detector"], r["set"]): r
        for r in json.loads((tmp_path / "eval.json").read_text())["rows"]
    }
    for detector in ("msp", "sum", "mahalanobis", "mlp", "mlp (kind unseen)"):
        assert {(detector, "noise"), (detector, "letters")} <= set(rows)
    # the same scores computed here, and the metrics of pytorch-ood and scikit-learn on them
    id_msp, id_features = reference_scores(data / "id_test")
    mahalanobis = MahalanobisDetector()
    mahalanobis.fit(reference_scores(data / "id_val")[1])
    for kind in ("noise", "letters"):
        ood_msp, ood_features = reference_scores(data / "ood_test" / kind)
        for detector, id_scores, ood_scores in (
            ("msp", id_msp, ood_msp),
            ("sum", id_features.ood_score, ood_features.ood_score),
            ("mahalanobis", mahalanobis.score(id_features), mahalanobis.score(ood_features)),
        ):
            scores = np.r_[id_scores, ood_scores]
            is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
            metrics = OODMetrics()
            metrics.update(torch.tensor(scores), torch.tensor(np.where(is_ood, -1, 0)))
            expected = metrics.compute()
            row = rows[(detector, kind)]
            assert row["n"] == len(ood_scores) == 40
            assert row["AUROC"] == pytest.approx(roc_auc_score(is_ood, scores), abs=1e-9)
            for key in ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR"):
                assert row[key] == pytest.approx(expected[key], abs=1e-9), (detector, kind, key)


@pytest.mark.slow
def test_archive_ships_a_matching_calibration_and_refuses_a_foreign_one(demo, tmp_path):
    digits = REPO / "samples/digits"
    cal_file = tmp_path / "cal.json"
    made = run(
        BIN / "gradnorm-calibrate", demo / "digits.mar", "--id", demo / "data/id_val",
        "--out", cal_file,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    common = [
        "--model-file", digits / "model.py", "--serialized-file", digits / "digits_cnn.pt",
        "--export-path", tmp_path, "--calibration", cal_file,
    ]  # fmt: skip
    packed = run(
        BIN / "gradnorm-archive", "--model-name", "withcal",
        "--config-file", digits / "model-config.yaml", *common,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr
    with zipfile.ZipFile(tmp_path / "withcal.mar") as mar:
        assert Calibration.from_json(mar.read("calibration.json").decode()) == Calibration.load(
            cal_file
        )
    hotter = tmp_path / "hot.yaml"
    hotter.write_text((digits / "model-config.yaml").read_text() + "  temperature: 3.0\n")
    refused = run(BIN / "gradnorm-archive", "--model-name", "x", "--config-file", hotter, *common)
    assert refused.returncode != 0 and "other weights or scoring settings" in refused.stderr


@pytest.mark.slow
def test_the_readme_quotes_the_demo_calibration(demo, tmp_path):
    # `make archive` calibrates the demo archive the same way, on the same 270 digits and the
    # same seeded augmented copies
    out = run(
        BIN / "gradnorm-calibrate", demo / "digits.mar", "--id", demo / "data/id_val",
        "--augment", "8", "--detector", "predicted_mahalanobis", "--out", tmp_path / "cal.json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cal = Calibration.load(tmp_path / "cal.json")
    readme = " ".join((REPO / "README.md").read_text().split())
    assert (
        f"(threshold {cal.threshold:.2f}, {100 * cal.achieved_tpr:.1f} % of the calibration "
        "digits below it)" in readme
    )


def test_calibrate_defaults_to_the_id_only_predicted_mahalanobis_detector_in_calibration_json(
    demo, tmp_path
):
    command = [BIN / "gradnorm-calibrate", demo / "digits.mar", "--id", demo / "data/id_val"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    calibration = Calibration.load(tmp_path / "calibration.json")
    assert calibration.detector == "predicted_mahalanobis"
    assert not PredictedMahalanobisDetector.needs_ood


@pytest.mark.slow
def test_calibrate_into_an_archive_writes_a_file_only_when_out_is_given(demo, tmp_path):
    archive = tmp_path / "digits.mar"
    archive.write_bytes((demo / "digits.mar").read_bytes())
    here = tmp_path / "here"
    here.mkdir()
    command = [str(BIN / "gradnorm-calibrate"), str(archive), "--id", str(demo / "data/id_val")]
    into = subprocess.run(
        [*command, "--into", str(archive)], cwd=here, capture_output=True, text=True, check=False
    )
    assert into.returncode == 0, into.stderr
    assert list(here.iterdir()) == []
    both = subprocess.run(
        [*command, "--into", str(archive), "--out", "cal.json"],
        cwd=here, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert both.returncode == 0, both.stderr
    assert [p.name for p in here.iterdir()] == ["cal.json"]
    help_text = run(BIN / "gradnorm-calibrate", "--help").stdout
    assert "with --into, no file unless --out is given" in " ".join(help_text.split())


@pytest.mark.slow
def test_a_torchscript_archive_calibrates_with_the_head_filter_but_not_on_activations(
    demo, tmp_path
):
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(load_demo_model()), scripted)
    config = demo_config()
    config["handler"]["param_filter"] = "head"
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(config))
    archive = build_archive(tmp_path, "ts_head", scripted, tmp_path / "head.yaml")
    out = run(
        BIN / "gradnorm-calibrate", archive, "--id", demo / "data/id_val",
        "--into", archive, "--out", tmp_path / "cal.json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Calibration.load(tmp_path / "cal.json").n_id == 270
    # the penultimate activations need module hooks, which TorchScript lacks: the detector
    # that reads them is refused by name, and gradnorm-eval leaves its row out
    refused = run(
        BIN / "gradnorm-calibrate", archive, "--id", demo / "data/id_val",
        "--detector", "penultimate_mahalanobis", "--out", tmp_path / "refused.json",
    )  # fmt: skip
    assert refused.returncode != 0 and "TorchScript" in refused.stderr
    evaluated = run(
        BIN / "gradnorm-eval", archive, "--id", demo / "data/id_test",
        "--ood", demo / "data/ood_test/noise", "--fit-id", demo / "data/id_val",
        "--json", tmp_path / "eval.json",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    detectors = {r["detector"] for r in json.loads((tmp_path / "eval.json").read_text())["rows"]}
    assert "predicted_mahalanobis" in detectors and "penultimate_mahalanobis" not in detectors
