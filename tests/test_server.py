"""End to end: a real TorchServe serves the demo archive, a TorchScript archive, and the
same model with the vmap and loop backends; answers are checked with ``requests``."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
import torch
import yaml
from torchserve_harness import (
    DIGITS,
    REPO,
    TorchServe,
    build_archive,
    demo_config,
    load_demo_model,
    with_config,
)

from torchserve_gradnorm.calibration import Calibration
from torchserve_gradnorm.codecs import RequestDecoder
from torchserve_gradnorm.config import handler_section, parse_handler_config
from torchserve_gradnorm.detectors import Features
from torchserve_gradnorm.scorer import GradNormScorer

pytestmark = [pytest.mark.server, pytest.mark.slow]


ID_PICTURE = REPO / "samples/images/id/digit_3_idx45.png"
OOD_PICTURE = REPO / "samples/images/ood/letter_W.png"
BATCH_HEADER = "X-GradNorm-Batch-Size"


def write_config(path: Path, **handler_overrides) -> Path:
    config = demo_config()
    # a long batch delay makes concurrent test requests land in one server-side batch
    config.update(batchSize=8, maxBatchDelay=400)
    config["handler"].update(handler_overrides)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchserve")
    store = work / "model_store"
    store.mkdir()
    serialized = DIGITS / "digits_cnn.pt"
    build_archive(
        store, "digits", serialized, write_config(work / "auto.yaml"), DIGITS / "model.py"
    )
    for backend in ("vmap", "loop"):
        build_archive(
            store,
            f"digits_{backend}",
            serialized,
            write_config(work / f"{backend}.yaml", backend=backend),
            DIGITS / "model.py",
        )
    scripted = work / "digits_scripted.pt"
    torch.jit.save(torch.jit.script(load_demo_model()), scripted)
    build_archive(store, "digits_ts", scripted, write_config(work / "ts.yaml"))
    head = write_config(work / "ts_head.yaml", param_filter="head")
    build_archive(store, "digits_ts_head", scripted, head)
    calibrated = build_archive(
        store, "digits_cal", serialized, write_config(work / "cal.yaml"), DIGITS / "model.py"
    )
    calibrate_demo(calibrated, work)
    # gradnorm-archive refuses a bad config, so the broken archive is edited after packing
    good = build_archive(
        store, "good", serialized, write_config(work / "good.yaml"), DIGITS / "model.py"
    )
    with_config(good, store / "broken.mar", write_config(work / "broken.yaml", top_k=0))
    good.unlink()
    ready = ["digits", "digits_vmap", "digits_loop", "digits_ts", "digits_ts_head", "digits_cal"]
    ts = TorchServe(work, store, [*ready, "broken"])
    try:
        ts.start(ready_models=ready)
        yield ts
    finally:
        ts.stop()


def calibrate_demo(archive: Path, work: Path) -> None:
    bin_dir = Path(sys.executable).parent
    data = work / "demo-data"
    subprocess.run(
        [sys.executable, str(REPO / "samples/make_demo_data.py"), "--out", str(data),
         "--per-set", "10"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [str(bin_dir / "gradnorm-calibrate"), str(archive), "--id", str(data / "id_val"),
         "--augment", "8", "--detector", "predicted_mahalanobis", "--into", str(archive),
         "--out", str(work / "cal.json")],
        check=True, capture_output=True,
    )  # fmt: skip


SCHEMA = json.loads((REPO / "docs/response.schema.json").read_text())


def post(server, model: str, **kwargs) -> requests.Response:
    r = requests.post(
        f"{server.url}/predictions/{model}", headers=server.headers(), timeout=60, **kwargs
    )
    if r.headers.get(BATCH_HEADER) is not None:  # answered by our handler: check its shape
        jsonschema.validate(r.json(), SCHEMA)
    return r


def offline_grad_norm(picture: Path) -> float:
    config = parse_handler_config(handler_section(demo_config()))
    x = RequestDecoder(config.input, config.limits).decode(picture.read_bytes()).samples
    return GradNormScorer(load_demo_model(), **config.scorer_kwargs())(x).grad_norm.item()


def offline_features(picture: Path) -> Features:
    config = parse_handler_config(handler_section(demo_config()))
    x = RequestDecoder(config.input, config.limits).decode(picture.read_bytes()).samples
    kwargs = {**config.scorer_kwargs(), "per_layer": True}
    return Features.from_result(GradNormScorer(load_demo_model(), **kwargs)(x))


def test_a_picture_gets_predictions_and_an_ood_score(server):
    r = post(server, "digits", data=ID_PICTURE.read_bytes())
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    answer = r.json()
    assert [p["label"] for p in answer["predictions"]][0] == "three"
    assert len(answer["predictions"]) == 3  # top_k in the demo config
    assert answer["ood"]["method"] == "confounding"
    assert answer["ood"]["is_ood"] is None and answer["ood"]["threshold"] is None
    assert answer["ood"]["score"] == pytest.approx(-answer["ood"]["grad_norm"])


def test_served_grad_norm_equals_the_offline_engine_score(server):
    for picture in (ID_PICTURE, OOD_PICTURE):
        served = post(server, "digits", data=picture.read_bytes()).json()["ood"]["grad_norm"]
        assert served == pytest.approx(offline_grad_norm(picture), rel=1e-5)


def test_json_tensor_and_multipart_inputs_score_like_the_picture(server):
    config = parse_handler_config(handler_section(demo_config()))
    x = RequestDecoder(config.input, config.limits).decode(ID_PICTURE.read_bytes()).samples[0]
    from_picture = post(server, "digits", data=ID_PICTURE.read_bytes()).json()
    from_json = post(server, "digits", json={"data": x.tolist()}).json()
    buffer = io.BytesIO()
    np.save(buffer, x.numpy())
    from_npy = post(server, "digits", data=buffer.getvalue()).json()
    from_form = post(server, "digits", files={"data": ID_PICTURE.read_bytes()}).json()
    for other in (from_json, from_npy, from_form):
        assert other["predictions"][0]["index"] == from_picture["predictions"][0]["index"]
        assert other["ood"]["grad_norm"] == pytest.approx(
            from_picture["ood"]["grad_norm"], rel=1e-5
        )


def test_instances_get_one_answer_each(server):
    config = parse_handler_config(handler_section(demo_config()))
    decoder = RequestDecoder(config.input, config.limits)
    a = decoder.decode(ID_PICTURE.read_bytes()).samples[0].tolist()
    b = decoder.decode(OOD_PICTURE.read_bytes()).samples[0].tolist()
    answers = post(server, "digits", json={"instances": [a, b]}).json()
    assert isinstance(answers, list) and len(answers) == 2
    assert answers[0]["ood"]["grad_norm"] == pytest.approx(offline_grad_norm(ID_PICTURE), rel=1e-5)
    assert answers[1]["ood"]["grad_norm"] == pytest.approx(offline_grad_norm(OOD_PICTURE), rel=1e-5)


def send_together(server, model: str, bodies: list[bytes]) -> list[requests.Response]:
    barrier = threading.Barrier(len(bodies))

    def send(body: bytes) -> requests.Response:
        barrier.wait()
        return post(server, model, data=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_concurrent_requests_are_scored_as_one_batch_with_unchanged_scores(server):
    pictures = sorted((REPO / "samples/images/id").glob("*.png"))[:6]
    alone = {p: post(server, "digits", data=p.read_bytes()).json() for p in pictures}
    responses = send_together(server, "digits", [p.read_bytes() for p in pictures])
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers[BATCH_HEADER]) for r in responses) > 1
    for picture, r in zip(pictures, responses):
        got, expected = r.json(), alone[picture]
        assert got["predictions"][0]["index"] == expected["predictions"][0]["index"]
        assert got["ood"]["grad_norm"] == pytest.approx(expected["ood"]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize(
    "bad_body",
    [b"\x89PNG\r\n\x1a\n truncated", b'{"data": [[1, 2], [3]]}', b'{"data": NaN}', b"   "],
    ids=["truncated-png", "ragged-json", "nan", "blank"],
)
def test_a_malformed_request_fails_alone_inside_a_batch(server, bad_body):
    good = [p.read_bytes() for p in sorted((REPO / "samples/images/id").glob("*.png"))[:4]]
    responses = send_together(server, "digits", [*good, bad_body])
    *good_responses, bad = responses
    assert [r.status_code for r in good_responses] == [200] * 4
    assert 400 <= bad.status_code < 500
    assert bad.json()["error"]["message"]
    assert max(int(r.headers[BATCH_HEADER]) for r in good_responses) > 1
    # the worker survived: the next request is answered
    assert post(server, "digits", data=good[0]).status_code == 200


def test_torchscript_archive_scores_like_the_eager_one(server):
    eager = post(server, "digits", data=OOD_PICTURE.read_bytes()).json()
    scripted = post(server, "digits_ts", data=OOD_PICTURE.read_bytes()).json()
    assert [p["index"] for p in scripted["predictions"]] == [
        p["index"] for p in eager["predictions"]
    ]
    assert [p["probability"] for p in scripted["predictions"]] == pytest.approx(
        [p["probability"] for p in eager["predictions"]], rel=1e-5
    )
    assert scripted["ood"]["grad_norm"] == pytest.approx(eager["ood"]["grad_norm"], rel=1e-5)


def test_vmap_and_loop_archives_give_the_same_scores(server):
    for picture in (ID_PICTURE, OOD_PICTURE):
        body = picture.read_bytes()
        scores = [
            post(server, m, data=body).json()["ood"]["grad_norm"]
            for m in ("digits", "digits_vmap", "digits_loop")
        ]
        assert scores[1] == pytest.approx(scores[0], rel=1e-5)
        assert scores[2] == pytest.approx(scores[0], rel=1e-5)


def test_requests_without_the_token_are_refused(server):
    r = requests.post(f"{server.url}/predictions/digits", data=ID_PICTURE.read_bytes(), timeout=30)
    # TorchServe 0.12 answers a missing or wrong token with 400, not 401
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "InvalidKeyException"
    assert "token" in r.json()["message"].lower()


# --- gradnorm-client against this server: a non-default --url, the key file ---

CLIENT = Path(sys.executable).parent / "gradnorm-client"


def client(server, *argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLIENT), "--url", server.url, *argv],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_gradnorm_client_reads_the_key_file_and_prints_the_served_answers(server, tmp_path):
    key_file = server.workdir / "key_file.json"
    pictures = [ID_PICTURE, OOD_PICTURE]
    out = client(server, "--model", "digits_cal", "--key-file", key_file, *pictures, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    direct = [post(server, "digits_cal", data=p.read_bytes()).json() for p in pictures]
    assert [row[0] for row in rows] == [str(p) for p in pictures]
    assert [row[1] for row in rows] == [a["predictions"][0]["label"] for a in direct]
    assert [float(row[3]) for row in rows] == [
        pytest.approx(a["ood"]["score"], rel=1e-5) for a in direct
    ]
    assert [row[4] for row in rows] == ["no", "yes"]  # the calibrated demo flags the W


def test_gradnorm_client_json_lines_are_the_served_answers(server, tmp_path):
    out = client(
        server, "--json", "--key-file", server.workdir / "key_file.json", ID_PICTURE, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    (record,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert record["status"] == 200
    jsonschema.validate(record["answer"], SCHEMA)
    expected = post(server, "digits", data=ID_PICTURE.read_bytes()).json()
    assert record["answer"]["predictions"][0] == expected["predictions"][0]
    assert record["answer"]["ood"]["grad_norm"] == pytest.approx(
        offline_grad_norm(ID_PICTURE), rel=1e-5
    )


def test_gradnorm_client_finds_key_file_json_where_torchserve_wrote_it(server):
    # TorchServe writes key_file.json in its working directory: run the client from there
    out = client(server, "--model", "digits", ID_PICTURE, cwd=server.workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[1].split()[1] == "three"


def test_gradnorm_client_shows_the_servers_refusal_of_a_wrong_key(server, tmp_path):
    out = client(server, "--token", "not-the-key", ID_PICTURE, cwd=tmp_path)
    assert out.returncode == 1
    assert "HTTP 400: Token Authorization failed" in out.stdout


def test_a_bad_handler_config_fails_the_model_load_with_the_key_in_the_log(server):
    expected = "invalid model-config.yaml: handler.top_k: expected an integer >= 1, got 0"
    deadline = time.monotonic() + 90
    while expected not in server.model_log() and time.monotonic() < deadline:
        time.sleep(1)
    assert expected in server.model_log()
    # the other models keep serving while this one's worker fails
    assert post(server, "digits", data=ID_PICTURE.read_bytes()).status_code == 200


def test_a_calibrated_archive_flags_ood_out_of_the_box(server):
    calibration = Calibration.load(server.workdir / "cal.json")
    noise = REPO / "samples/images/ood/noise_blocks.png"
    for picture, expected in ((ID_PICTURE, False), (noise, True)):
        ood = post(server, "digits_cal", data=picture.read_bytes()).json()["ood"]
        assert ood["detector"] == "predicted_mahalanobis"
        assert ood["threshold"] == pytest.approx(calibration.threshold)
        assert ood["is_ood"] is expected, (picture.name, ood)
        offline = calibration.build_detector().score(offline_features(picture))[0]
        assert ood["score"] == pytest.approx(offline, rel=1e-5)
        assert ood["grad_norm"] == pytest.approx(offline_grad_norm(picture), rel=1e-5)


def close_to_quoted(value: float, text: str) -> bool:
    """``value`` printed at the precision of ``text`` (and a float32 ulp or so) is ``text``."""
    decimals = len(text.partition(".")[2])
    return abs(value - float(text)) <= 0.5 * 10**-decimals + 1e-5 * abs(value)


def test_the_readme_example_answers_are_the_calibrated_demos(server):
    # digits_cal is calibrated like `make archive` (predicted_mahalanobis on the same 270 digits
    # and the same 8 seeded augmented copies of each)
    readme = " ".join((REPO / "README.md").read_text().split())
    top = re.findall(r'\{"index": (\d+), "label": "(\w+)", "probability": ([0-9.]+)\}', readme)
    ood = re.search(
        r'"score": ([0-9.]+), "grad_norm": ([0-9.]+), "is_ood": true, "threshold": ([0-9.]+), '
        r'"method": "(\w+)", "detector": "(\w+)"',
        readme,
    )
    digit = re.search(r'a real "3" gets `"score": ([0-9.]+), "is_ood": false`', readme)
    assert len(top) >= 2 and ood and digit, "the README's example answer moved"
    answer = post(server, "digits_cal", data=OOD_PICTURE.read_bytes()).json()
    for (index, label, probability), served in zip(top[:2], answer["predictions"]):
        assert (served["index"], served["label"]) == (int(index), label)
        assert close_to_quoted(served["probability"], probability)
    score, grad_norm, threshold, method, detector = ood.groups()
    assert answer["ood"]["is_ood"] is True
    assert close_to_quoted(answer["ood"]["score"], score)
    assert close_to_quoted(answer["ood"]["grad_norm"], grad_norm)
    assert close_to_quoted(answer["ood"]["threshold"], threshold)
    assert (answer["ood"]["method"], answer["ood"]["detector"]) == (method, detector)
    three = post(server, "digits_cal", data=ID_PICTURE.read_bytes()).json()
    assert three["predictions"][0]["label"] == "three" and three["ood"]["is_ood"] is False
    assert close_to_quoted(three["ood"]["score"], digit.group(1))


def test_a_torchscript_archive_with_the_head_filter_scores_the_head(server):
    r = post(server, "digits_ts_head", data=OOD_PICTURE.read_bytes())
    assert r.status_code == 200, r.text
    config = parse_handler_config(handler_section(demo_config()))
    x = RequestDecoder(config.input, config.limits).decode(OOD_PICTURE.read_bytes()).samples
    offline = GradNormScorer(load_demo_model(), param_filter="head")(x).grad_norm.item()
    assert r.json()["ood"]["grad_norm"] == pytest.approx(offline, rel=1e-5)


def test_a_request_to_a_model_that_failed_to_load_gets_the_load_error_not_a_hang(server):
    # the timeout bounds the wait: before, such requests hung while the worker restarted
    r = requests.post(
        f"{server.url}/predictions/broken",
        headers=server.headers(),
        data=ID_PICTURE.read_bytes(),
        timeout=30,
    )
    assert r.status_code == 503
    assert r.json()["error"]["message"] == (
        "model 'broken' failed to load: invalid model-config.yaml: "
        "handler.top_k: expected an integer >= 1, got 0"
    )


MALFORMED_JSON = b'{"data": [[1,2,'


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "application/octet-stream"]
)
def test_malformed_json_is_reported_as_json_however_it_is_labelled(server, content_type):
    r = requests.post(
        f"{server.url}/predictions/digits",
        headers={**server.headers(), "Content-Type": content_type},
        data=MALFORMED_JSON,
        timeout=60,
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "the body is not valid JSON: Expecting value at line 1, column 16"
    )


@pytest.mark.parametrize(
    "how",
    [
        {"data": b""},
        {"data": b"", "headers": {"Content-Type": "application/json"}},
        {"data": b"", "headers": {"Content-Type": "text/plain"}},
        {"files": {"data": ("empty.png", b"", "image/png")}},
    ],
    ids=["raw", "json", "text", "form"],
)
def test_an_empty_body_gets_one_message_however_it_is_sent(server, how):
    how = dict(how)
    headers = {**server.headers(), **how.pop("headers", {})}
    r = requests.post(f"{server.url}/predictions/digits", headers=headers, timeout=60, **how)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the body is empty: send a picture, .npy or JSON"
