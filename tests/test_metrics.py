"""The handler's OOD metrics: what ``record_batch`` emits through TorchServe's metrics API,
parsed the way TorchServe's frontend parses it, and the metrics.yaml that declares them."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from torchserve_gradnorm import metrics
from torchserve_gradnorm.metrics import record_batch, reference_pair, score_ratio
from torchserve_gradnorm.service import Reply

REPO = Path(__file__).resolve().parent.parent
METRICS_YAML = REPO / "metrics.yaml"
# the frontend's patterns (WorkerLifeCycle.ReaderThread and Metric.parse in TorchServe 0.12)
LINE = re.compile(r"^(INFO > )?(\[METRICS])(.*)")
METRIC = re.compile(
    r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?"
    r"\|#hostname:([^,]+),([^,]+)(,(.*))?"
)


@dataclass
class Emitted:
    name: str
    unit: str
    value: float
    dimensions: dict[str, str]
    type: str


def cache():
    c = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    c.initialize_cache()
    c.model_name = "digits"
    c.set_request_ids({0: "req-a", 1: "req-b", 2: "req-c"})
    return c


def emitted(caplog) -> list[Emitted]:
    out = []
    for record in caplog.records:
        line = LINE.match(record.getMessage())
        if not line:
            continue
        m = METRIC.fullmatch(line.group(3))
        assert m, f"the frontend would not parse {line.group(3)!r}"
        dims = dict(d.split(":", 1) for d in m.group(4).split(","))
        out.append(Emitted(m.group(1), m.group(2), float(m.group(3)), dims, m.group(6)))
    return out


def ok(*scores, flags=None) -> Reply:
    return Reply(200, {}, list(scores), list(flags or [None] * len(scores)))


def record(caplog, replies, scoring_ms=12.5, reference=None) -> list[Emitted]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        record_batch(cache(), "digits", replies, scoring_ms, reference)
    return emitted(caplog)


def by_name(events: list[Emitted]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for e in events:
        out.setdefault(e.name, []).append(e.value)
    return out


def test_counts_flags_and_time_per_batch(caplog):
    replies = [
        ok(-5.0, flags=[False]),
        ok(3.0, flags=[True]),
        Reply(400, {"error": {"code": 400, "message": "bad"}}),
        ok(-1.0, 4.0, flags=[False, True]),  # an instances request: counted once
    ]
    values = by_name(record(caplog, replies, scoring_ms=12.5))
    assert values == {
        "OODRequests": [3],
        "OODFlagged": [2],
        "OODScoringTime": [12.5],
        "OODBatches": [1],
        "OODScoringSeconds": [0.0125],
    }


def test_every_line_carries_the_model_name_and_the_declared_type_and_unit(caplog):
    declared = yaml.safe_load(METRICS_YAML.read_text())["model_metrics"]
    kinds = {m["name"]: (kind, m) for kind, ms in declared.items() for m in ms}
    events = record(caplog, [ok(1.0, flags=[True])], reference=(0.0, 2.0))
    assert {e.name for e in events} == set(metrics._UNITS)
    for e in events:
        kind, spec = kinds[e.name]
        assert e.type == kind.upper()
        assert e.unit == spec["unit"]
        # the frontend maps values to the declared names by position, then adds Hostname
        assert list(e.dimensions) == spec["dimensions"] == ["ModelName", "Level"]
        assert e.dimensions == {"ModelName": "digits", "Level": "Model"}


def test_no_threshold_means_zero_flagged_and_no_reference_means_no_score(caplog):
    values = by_name(record(caplog, [ok(1.0), ok(2.0)]))
    assert values["OODRequests"] == [2]
    assert values["OODFlagged"] == [0]  # emitted anyway: the series exists from the start
    assert "OODScore" not in values


def test_score_histogram_observes_the_ratio_to_the_threshold_per_sample(caplog):
    # center -10 (ID median), threshold 0: ratio = (score + 10) / 10
    replies = [ok(-10.0, -5.0, flags=[False, False]), ok(0.0, flags=[False]), ok(1e9)]
    values = by_name(record(caplog, replies, reference=(-10.0, 0.0)))
    assert values["OODScore"] == [0.0, 0.5, 1.0, 10.0]


def test_a_batch_without_scored_requests_records_nothing(caplog):
    assert record(caplog, [Reply(413, {"error": {"code": 413, "message": "too big"}})]) == []
    assert record(caplog, []) == []


def test_metric_failures_never_reach_the_request(caplog):
    class Broken:
        def add_metric(self, *args, **kwargs):
            raise RuntimeError("metrics backend down")

    with caplog.at_level(logging.INFO):
        assert record_batch(Broken(), "digits", [ok(1.0)], 1.0) is None  # no exception
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "gradnorm: could not record metrics: RuntimeError: metrics backend down")
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert record_batch(None, "digits", [ok(1.0)], 1.0) is None  # no metrics object at all
    assert caplog.records == []


@pytest.mark.parametrize(
    "score, expected",
    [(-3.0, 0.0), (-1.0, 0.0), (0.0, 0.5), (1.0, 1.0), (2.0, 1.5), (100.0, 10.0)],
)
def test_score_ratio(score, expected):
    assert score_ratio(score, center=-1.0, threshold=1.0) == pytest.approx(expected)


def test_score_ratio_edge_cases():
    assert score_ratio(float("nan"), 0.0, 1.0) == 0.0
    assert score_ratio(float("inf"), 0.0, 1.0) == 10.0
    assert score_ratio(float("-inf"), 0.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        score_ratio(0.0, 1.0, 1.0)


def test_reference_pair_accepts_pairs_and_objects_and_refuses_unusable_ones():
    @dataclass
    class Ref:
        center: float
        threshold: float

    assert reference_pair((-2, 3)) == (-2.0, 3.0)
    assert reference_pair(Ref(-2.0, 3.0)) == (-2.0, 3.0)
    for bad in (None, (3.0, 3.0), (5.0, 1.0), (float("nan"), 1.0), "xy", (1.0,)):
        assert reference_pair(bad) is None


def test_values_are_written_so_the_frontend_parses_them(caplog):
    # tiny and huge numbers: Python would write 1e-07 (fine) or 1e+16 (no "+" allowed)
    events = record(caplog, [ok(1.0)], scoring_ms=1e-4)
    assert by_name(events)["OODScoringSeconds"] == [0.0]
    events = record(caplog, [ok(1.0)], scoring_ms=123456789.123456789)
    assert by_name(events)["OODScoringTime"] == [pytest.approx(123456789.123457)]


# --- metrics.yaml and config.properties ---


def test_metrics_yaml_keeps_every_default_torchserve_metric():
    import ts

    default = yaml.safe_load((Path(ts.__file__).parent / "configs/metrics.yaml").read_text())
    ours = yaml.safe_load(METRICS_YAML.read_text())
    for section in ("ts_metrics", "model_metrics"):
        for kind, specs in default[section].items():
            mine = {m["name"]: m for m in ours[section].get(kind, [])}
            for spec in specs:
                assert mine.get(spec["name"]) == spec, f"{section}.{kind}.{spec['name']}"


def test_metrics_yaml_is_what_the_python_side_of_torchserve_loads():
    c = cache()
    for name in metrics._UNITS:
        assert any(name in keys for keys in c.cache_keys() if keys.endswith(f":{name}"))


def test_config_properties_points_at_the_metrics_yaml():
    lines = (REPO / "config.properties").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if "=" in line and line[0] != "#")
    assert settings["metrics_mode"] == "prometheus"
    assert (REPO / settings["metrics_config"]).resolve() == METRICS_YAML
