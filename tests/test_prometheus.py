"""Monitoring end to end: a real TorchServe serves a calibrated archive, a real Prometheus
(Debian package ``prometheus``, installed by ``make test``) scrapes its metrics endpoint
every second, and after N requests, K of them OOD pictures, Prometheus's query API returns
those counts. Also: the alert rules load and evaluate, the Grafana dashboard's queries run,
and promtool checks and unit-tests the rules."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from prerequisites import find_program, require
from torchserve_harness import (
    REPO,
    SUM_FLAGGED,
    TorchServe,
    demo_archive,
    demo_sum_threshold,
    free_port,
    serving,
)

from torchserve_gradnorm.calibration import Calibration
from torchserve_gradnorm.metrics import score_ratio

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana/torchserve-gradnorm.json"
ID_PICTURES = sorted((REPO / "samples/images/id").glob("*.png"))
OOD_PICTURES = SUM_FLAGGED
THRESHOLD = demo_sum_threshold()  # flags exactly the OOD pictures
N = len(ID_PICTURES) + len(OOD_PICTURES)
K = len(OOD_PICTURES)


# --- static checks: the files under monitoring/ ---


def test_promtool_checks_the_config_and_unit_tests_the_alert_rules():
    require("promtool")
    for command in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", *sorted(p.name for p in MONITORING.glob("*test*.yml"))],
    ):
        r = subprocess.run(
            [find_program("promtool"), *command],
            cwd=MONITORING,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr


def dashboard_targets() -> list[tuple[str, dict]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target)
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


# Import/export fields outside the dashboard model: Grafana's export header and the id, null
# so that an import creates a new dashboard.
IMPORT_FIELDS = {"__requires", "id"}


def schema_differences(ours, theirs, path: str = "$") -> list[str]:
    """Where ``ours`` differs from ``theirs``, its round trip through the schema's models."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = [f"{path}.{k}: not in the schema" for k in ours.keys() - theirs.keys()]
        out += [f"{path}.{k}: required, missing" for k in theirs.keys() - ours.keys()]
        for k in ours.keys() & theirs.keys():
            out += schema_differences(ours[k], theirs[k], f"{path}.{k}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [
            d
            for i, pair in enumerate(zip(ours, theirs))
            for d in schema_differences(*pair, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [f"{path}: {ours!r} read back as {theirs!r}"]


def test_the_grafana_dashboard_matches_grafanas_dashboard_and_panel_schemas():
    """grafana-foundation-sdk's models are generated from Grafana's schemas (the dashboard,
    each panel plugin's options and field config, the Prometheus query): reading the file
    into them and writing it back drops what the schema does not know and writes out what it
    requires, so the file must come back unchanged."""
    require("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()  # the panel plugins' and the Prometheus query's models
    dashboard = json.loads(DASHBOARD.read_text())
    read_back = json.loads(json.dumps(Dashboard.from_json(dashboard), cls=JSONEncoder))
    model_part = {k: v for k, v in dashboard.items() if k not in IMPORT_FIELDS}
    differences = schema_differences(model_part, read_back)
    assert not differences, "\n".join(differences)
    assert dashboard["id"] is None


def test_the_dashboard_reads_the_declared_metrics_of_the_chosen_model_and_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    # no __inputs to fill in: the data source is a dashboard variable
    assert "__inputs" not in dashboard
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"] == "label_values(OODRequests, ModelName)"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    declared = {
        m["name"]
        for kinds in yaml.safe_load((REPO / "metrics.yaml").read_text()).values()
        if isinstance(kinds, dict)
        for specs in kinds.values()
        for m in specs
    }
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert 'ModelName=~"$model"' in target["expr"]
            used = set(re.findall(r"\b([A-Za-z]\w*)\{", target["expr"]))
            assert {re.sub(r"_(bucket|sum|count)$", "", m) for m in used} <= declared


def test_the_ood_panels_cover_rate_flagged_count_score_quantiles_and_latency():
    exprs = " ".join(t["expr"] for _, t in dashboard_targets())
    for needle in (
        "rate(OODFlagged",
        "increase(OODFlagged",
        "histogram_quantile(0.99, sum by (ModelName, le) (rate(OODScore_bucket",
        "OODScoringSeconds_bucket",
        "OODScoringTime",
    ):
        assert needle in exprs


# --- a TorchServe and a Prometheus ---


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchserve-metrics")
    archive = demo_archive(work, handler={"threshold": THRESHOLD}, batchSize=8, maxBatchDelay=300)
    # a calibration gives the score reference (ID median, threshold) that OODScore needs
    subprocess.run(
        [str(Path(sys.executable).parent / "gradnorm-calibrate"), str(archive),
         "--id", str(REPO / "samples/images/id"), "--detector", "sum",
         "--into", str(archive), "--out", str(work / "calibration.json")],
        check=True, capture_output=True,
    )  # fmt: skip
    with serving(TorchServe(work, work / "model_store", ["digits"])) as ts:
        yield ts


@pytest.fixture(scope="module")
def traffic(server):
    """N scored requests, K of them OOD pictures, some in concurrent batches; plus one bad
    request, which is answered 4xx and not counted."""

    def post(body: bytes) -> requests.Response:
        return requests.post(
            f"{server.url}/predictions/digits", data=body, headers=server.headers(), timeout=60
        )

    bodies = [p.read_bytes() for p in ID_PICTURES + OOD_PICTURES]
    together, alone = bodies[:6], bodies[6:]
    barrier = threading.Barrier(len(together))

    def send_together(body: bytes) -> requests.Response:
        barrier.wait()
        return post(body)

    with ThreadPoolExecutor(len(together)) as pool:
        responses = list(pool.map(send_together, together))
    responses += [post(b) for b in alone]
    assert [r.status_code for r in responses] == [200] * N
    assert sum(r.json()["ood"]["is_ood"] for r in responses) == K
    assert post(b"\x89PNG\r\n\x1a\n truncated").status_code == 400
    return responses


def scraped(server) -> dict[str, float]:
    """{series: value} of the OOD series on the metrics endpoint, labels as written."""
    text = requests.get(server.metrics_url, timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("OOD"):
            series, value = line.rsplit(" ", 1)
            out[series.replace(",}", "}")] = float(value)
    return out


def wait_for(check, timeout: float = 30.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


@pytest.mark.server
@pytest.mark.slow
def test_the_metrics_endpoint_exports_the_ood_metrics_with_the_model_name(server, traffic):
    labels = 'ModelName="digits",Level="Model",Hostname="'

    def value(name: str, extra: str = "") -> float | None:
        for series, v in scraped(server).items():
            if series.startswith(f"{name}{{{labels}") and extra in series:
                return v
        return None

    # the frontend reads the worker's metric lines asynchronously: wait for the last ones
    assert wait_for(lambda: value("OODRequests") == N, timeout=15), scraped(server)
    assert value("OODFlagged") == K
    assert value("OODScore_count") == N  # one observation per sample
    assert value("OODScore_bucket", 'le="1.0"') == N - K  # ratio <= 1 <=> not flagged
    assert value("OODScore_bucket", 'le="+Inf"') == N
    batches = value("OODBatches")
    assert batches is not None and 1 <= batches <= N
    assert value("OODScoringSeconds_count") == batches
    assert value("OODScoringTime") == pytest.approx(1000 * value("OODScoringSeconds_sum"), rel=1e-3)
    # the re-declared frontend metrics are still there
    text = requests.get(server.metrics_url, timeout=10).text
    assert 'ts_inference_requests_total{model_name="digits"' in text


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    require("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "torchserve",
                "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(work / "prometheus.log", "wb")
    process = subprocess.Popen(
        [
            find_program("prometheus"),
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError((work / "prometheus.log").read_text()[-3000:])
            try:
                return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        assert wait_for(ready, timeout=60), (work / "prometheus.log").read_text()[-3000:]
        yield Prometheus(url)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


@pytest.mark.server
@pytest.mark.slow
def test_prometheus_scrapes_torchserve_and_counts_the_ood_requests(prometheus, traffic):
    model = '{ModelName="digits"}'
    counted = wait_for(lambda: prometheus.value(f"sum(OODRequests{model})") == N, timeout=45)
    assert counted, prometheus.query("OODRequests")
    assert prometheus.value('up{job="torchserve"}') == 1
    assert prometheus.value(f"sum(OODFlagged{model})") == K
    assert prometheus.value(f"sum(OODScore_count{model})") == N
    assert prometheus.value('sum(OODScore_bucket{ModelName="digits",le="1.0"})') == N - K
    # labels: the model name, as a dimension, on every OOD series
    for series in prometheus.query('{__name__=~"OOD.*"}'):
        assert series["metric"]["ModelName"] == "digits"


@pytest.mark.server
@pytest.mark.slow
def test_the_alert_rules_load_and_evaluate_on_the_scraped_metrics(prometheus, traffic):
    def evaluated() -> list[dict] | None:
        body = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        return (
            rules
            if rules and all(r.get("lastEvaluation", "0001")[:4] != "0001" for r in rules)
            else None
        )

    rules = wait_for(evaluated, timeout=30)
    assert rules, "the rules were not evaluated"
    names = {r.get("name") for r in rules}
    assert {"GradNormOODFractionHigh", "GradNormScoringLatencyHigh"} <= names
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    assert prometheus.value("gradnorm:ood_fraction_alert_level") == 0.2


def endpoint_value(server, name: str, extra: str = "") -> float | None:
    """The digits model's value of one OOD series on TorchServe's metrics endpoint."""
    labels = 'ModelName="digits",Level="Model",Hostname="'
    for series, v in scraped(server).items():
        if series.startswith(f"{name}{{{labels}") and extra in series:
            return v
    return None


def dashboard_value(prometheus: Prometheus, title: str, ref: str, window: str) -> float:
    """The digits model's value of one dashboard query, as Grafana would ask Prometheus for it
    over ``window`` (the time range and the rate interval)."""
    (target,) = [
        t for panel_title, t in dashboard_targets() if (panel_title, t["refId"]) == (title, ref)
    ]
    expr = (
        target["expr"]
        .replace("$model", ".*")
        .replace("$__rate_interval", window)
        .replace("$__range", window)
    )
    result = prometheus.query(expr)
    assert [r["metric"].get("ModelName") for r in result] == ["digits"], (title, expr, result)
    return float(result[0]["value"][1])


@pytest.mark.server
@pytest.mark.slow
def test_every_dashboard_panel_shows_the_values_of_known_traffic(server, prometheus, traffic):
    model = '{ModelName="digits"}'
    # the fixture's traffic has landed in Prometheus and stays: the window below starts later
    totals = ("OODRequests", "OODFlagged", "OODBatches", "OODScoringTime", "OODScore_count")
    before = {name: endpoint_value(server, name) for name in totals}
    assert before["OODRequests"] == N
    for name in totals:
        assert wait_for(lambda n=name: prometheus.value(f"sum({n}{model})") == before[n], 45), name
    # a steady stretch inside the window: increase() extrapolates the counters over the
    # window by about one scrape interval (1 s), so the window must be long for round() to
    # give the exact count (over 14 s for 6 requests)
    steady = time.monotonic()
    time.sleep(15)
    # one request at a time (each its own batch): 4 ID pictures and the 2 OOD ones
    pictures = ID_PICTURES[:4] + OOD_PICTURES
    answers = [
        requests.post(
            f"{server.url}/predictions/digits", data=p.read_bytes(), headers=server.headers(),
            timeout=60,
        ).json()["ood"]
        for p in pictures
    ]  # fmt: skip
    n, flagged = len(answers), sum(a["is_ood"] for a in answers)
    assert flagged == K
    assert wait_for(lambda: endpoint_value(server, "OODBatches") == before["OODBatches"] + n, 30)
    after = {name: endpoint_value(server, name) for name in totals}
    for name in totals:
        assert wait_for(lambda n=name: prometheus.value(f"sum({n}{model})") == after[n], 45), name
    time.sleep(2)  # one more scrape at the new values
    # from 2 s into the steady stretch (Prometheus saw the old totals before it began)
    window = f"{math.floor(time.monotonic() - steady) - 2}s"

    def panel(title: str, ref: str = "A") -> float:
        return dashboard_value(prometheus, title, ref, window)

    assert panel("OOD rate (share of scored requests flagged)") == pytest.approx(flagged / n)
    per_second = "Scored and flagged requests / s"
    assert panel(per_second, "B") / panel(per_second, "A") == pytest.approx(flagged / n)
    assert panel("Flagged requests (time range)") == flagged
    assert panel("Scored requests (time range)") == n
    assert panel("Samples above the threshold (OODScore > 1)") == pytest.approx(flagged / n)
    # the histogram observes (score - ID median) / (threshold - ID median) per sample
    center = Calibration.load(server.workdir / "calibration.json").center
    ratios = [score_ratio(a["score"], center, THRESHOLD) for a in answers]
    assert panel("Mean OOD score ratio") == pytest.approx(np.mean(ratios), rel=1e-3)
    quantiles = "OOD score quantiles (score ratio: 0 = ID median, 1 = threshold)"
    p50, p90, p99 = (panel(quantiles, ref) for ref in "ABC")
    assert 0 <= p50 < 1 < p99 <= 10 and p50 <= p90 <= p99  # 4 of 6 below the threshold
    latency = "Scoring time per batch"
    mean_seconds = (after["OODScoringTime"] - before["OODScoringTime"]) / n / 1000
    assert panel(latency, "C") == pytest.approx(mean_seconds, rel=1e-6)
    assert 0 < panel(latency, "A") <= panel(latency, "B")
    assert panel("Requests per scored batch") == pytest.approx(1.0)
    assert panel("Handler time per batch") > 0
