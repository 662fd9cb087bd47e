"""Hugging Face classifiers end to end: tiny BERT, DistilBERT, RoBERTa, GPT-2 and ViT
save_pretrained folders packed with ``gradnorm-archive --hf-model``, read back offline
(calibration on text folders), and served by ONE real TorchServe; served scores equal the
per-sample autograd reference of each text alone, unpadded (float64, rtol 1e-6)."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image
from torchserve_harness import REPO, TorchServe, serving

from torchserve_gradnorm.cli import archive as archive_cli
from torchserve_gradnorm.cli import calibrate as calibrate_cli
from torchserve_gradnorm.cli import evaluate as evaluate_cli
from torchserve_gradnorm.hf import load_model
from torchserve_gradnorm.mar import open_archive

from hf_models import LABELS, TEXT_MODELS, autograd_reference, text_model_dir, vit_model_dir

SCHEMA = json.loads((REPO / "docs/response.schema.json").read_text())
MODELS = (*TEXT_MODELS, "vit")
TEXTS = ["the cat sat on the mat", "a dog", "i liked the film but not the cat", "bad"]
MAX_CHARS = 60


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    found = {kind: text_model_dir(kind, root / kind) for kind in TEXT_MODELS}
    found["vit"] = vit_model_dir(root / "vit")
    return found


@pytest.fixture(scope="module")
def store(folders, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("hf-store")
    config = work / "model-config.yaml"
    # a long batch delay makes concurrent test requests land in one server-side batch
    config.write_text(
        yaml.safe_dump(
            {
                "batchSize": 8,
                "maxBatchDelay": 500,
                "handler": {"limits": {"max_chars": MAX_CHARS}, "top_k": 3},
            }
        )
    )
    for name, folder in folders.items():
        archive_cli.main(
            [
                "--model-name", name, "--hf-model", str(folder), "--config-file", str(config),
                "--export-path", str(work / "model_store"), "--force",
            ]
        )  # fmt: skip
    return work / "model_store"


# --- packing and reading back, no server ---


def test_the_archive_names_the_task_the_input_and_the_labels(store):
    with open_archive(store / "bert.mar") as bert:
        assert bert.config.hf_task == "text-classification"
        assert bert.config.input.kind == "text"
        assert bert.config.limits.max_chars == MAX_CHARS  # the user's section is kept
        assert bert.labels == {str(i): name for i, name in LABELS.items()}
        assert next(bert.model.parameters()).dtype == torch.float64
    with open_archive(store / "vit.mar") as vit:
        assert vit.config.hf_task == "image-classification"
        assert vit.config.input.kind == "image" and vit.config.input.size == (16, 16)
        assert vit.config.input.mean == (0.5, 0.4, 0.3)
        assert vit.config.input.std == (0.2, 0.25, 0.3)


def test_labels_flag_overrides_id2label(folders, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "no", "1": "maybe", "2": "yes"}))
    argv = ["--model-name", "b", "--hf-model", str(folders["bert"]), "--labels", str(labels)]
    archive_cli.main([*argv, "--export-path", str(tmp_path)])
    with open_archive(tmp_path / "b.mar") as b:
        assert b.labels == {"0": "no", "1": "maybe", "2": "yes"}


def test_folders_that_cannot_be_packed_are_refused_with_the_reason(folders, tmp_path):
    def pack(folder: Path, *more: str) -> str:
        argv = ["--model-name", "x", "--hf-model", str(folder), "--export-path", str(tmp_path)]
        with pytest.raises(SystemExit) as info:
            archive_cli.main([*argv, *more])
        return str(info.value)

    assert "no config.json" in pack(tmp_path)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(folders["bert"], no_weights)
    (no_weights / "model.safetensors").unlink()
    assert "no model.safetensors" in pack(no_weights)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folders["bert"], no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    assert "needs its tokenizer" in pack(no_tokenizer)


def test_a_text_model_of_ones_own_needs_its_tokenizer_in_the_archive(tmp_path):
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump({"handler": {"input": {"kind": "text"}}}))
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    argv = ["--model-name", "t", "--serialized-file", str(weights), "--config-file", str(config)]
    with pytest.raises(SystemExit, match="needs the tokenizer's files"):
        archive_cli.main([*argv, "--export-path", str(tmp_path)])


def test_calibration_and_evaluation_read_txt_and_jsonl_text_folders(store, tmp_path):
    texts = tmp_path / "id"
    texts.mkdir()
    for i, text in enumerate(TEXTS):
        (texts / f"{i}.txt").write_text(text)
    lines = [{"text": t} for t in TEXTS] + [{"text": "a dog", "text_pair": "the mat"}]
    (texts / "more.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "calibration.json"
    calibrate_cli.main([str(store / "distilbert.mar"), "--id", str(texts), "--out", str(out)])
    assert json.loads(out.read_text())["n_id"] == 2 * len(TEXTS) + 1
    # --augment on text: perturbed copies of every text join the fit (augment_text.py)
    mar = str(store / "distilbert.mar")
    calibrate_cli.main([mar, "--id", str(texts), "--augment", "3", "--out", str(out)])
    calibration = json.loads(out.read_text())
    assert (calibration["n_id"], calibration["n_augmented"]) == (9, 27)
    ood = tmp_path / "ood"
    ood.mkdir()
    (ood / "noise.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["%%", "$ #"]))
    report = tmp_path / "eval.json"
    evaluate_cli.main([mar, "--id", str(texts), "--ood", str(ood), "--json", str(report)])
    assert "AUROC" in report.read_text()
    (texts / "bad.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: empty text"):
        calibrate_cli.main([str(store / "distilbert.mar"), "--id", str(texts), "--out", str(out)])


# --- served ---


def reference_text_scores(folder: Path, texts: list[str]) -> list[float]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = load_model(folder, "text-classification")
    return [autograd_reference(model, dict(tokenizer(t, return_tensors="pt")))[1] for t in texts]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.server
@pytest.mark.slow
def test_one_torchserve_serves_every_hugging_face_model(store, folders, tmp_path):
    if shutil.which("java") is None:  # pragma: no cover - the frontend is Java
        pytest.skip("TorchServe needs Java (java not found on PATH)")
    with serving(TorchServe(tmp_path, store, list(MODELS)), timeout=300) as server:
        headers = server.headers()

        def post(model: str, **kwargs) -> requests.Response:
            extra = kwargs.pop("headers", {})
            url = f"{server.url}/predictions/{model}"
            return requests.post(url, headers={**headers, **extra}, timeout=120, **kwargs)

        plain = {"Content-Type": "text/plain; charset=utf-8"}
        for kind in TEXT_MODELS:
            # good and bad texts of different lengths at once: one padded server-side batch
            sends = [{"data": t.encode(), "headers": plain} for t in TEXTS]
            sends += [
                {"data": b"\xff\xfe", "headers": plain},  # not UTF-8
                {"json": {"text": "   "}},  # empty
                {"json": {"text": "x" * (MAX_CHARS + 1)}},  # over limits.max_chars
                {"files": {"text": (None, TEXTS[1])}},  # form field
                {"json": {"instances": [TEXTS[0], {"text": TEXTS[3]}]}},
            ]
            with ThreadPoolExecutor(len(sends)) as pool:
                answers = list(pool.map(lambda s, kind=kind: post(kind, **s), sends))
            statuses = [a.status_code for a in answers]
            assert statuses == [200] * 4 + [400, 400, 413, 200, 200], (kind, statuses)
            assert "not valid UTF-8" in answers[4].json()["error"]["message"]
            assert "empty text" in answers[5].json()["error"]["message"]
            assert f"limit of {MAX_CHARS}" in answers[6].json()["error"]["message"]
            bodies = [a.json() for a in answers[:4]] + [answers[7].json(), *answers[8].json()]
            expected = reference_text_scores(folders[kind], TEXTS)
            expected += [expected[1], expected[0], expected[3]]
            for body, score in zip(bodies, expected):
                jsonschema.validate(body, SCHEMA)
                assert body["ood"]["score"] == pytest.approx(score, rel=1e-6), kind
                assert body["predictions"][0]["label"] in LABELS.values()
            batch_sizes = [int(a.headers["X-GradNorm-Batch-Size"]) for a in answers]
            assert max(batch_sizes) > 1, f"{kind}: no request was batched with another"

        rng = np.random.default_rng(0)
        pictures = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda p: post("vit", data=png(p)), pictures))
        model = load_model(folders["vit"], "image-classification")
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(folders["vit"]), local_files_only=True)
        for picture, answer in zip(pictures, answers):
            assert answer.status_code == 200, answer.text
            x = processor(Image.fromarray(picture), return_tensors="pt")["pixel_values"]
            _, score = autograd_reference(model, {"pixel_values": x.double()})
            assert answer.json()["ood"]["score"] == pytest.approx(score, rel=1e-6)
            assert answer.json()["predictions"][0]["label"] in LABELS.values()


def test_the_sample_sentiment_model_reads_reviews_it_was_not_trained_on():
    from torchserve_gradnorm.config import parse_handler_config
    from torchserve_gradnorm.hf import load_text_encoder
    from torchserve_gradnorm.service import GradNormService

    folder = REPO / "samples/text/sentiment"
    config = parse_handler_config({"hf_task": "text-classification", "top_k": 1})
    model = load_model(folder, config.hf_task)
    text = load_text_encoder(folder, model, config)
    service = GradNormService(model, config, {"0": "negative", "1": "positive"}, text=text)
    reviews = sorted((REPO / "samples/text/id").glob("*.txt"))[:6]
    replies = service.handle([{"body": p.read_bytes()} for p in reviews])
    labels = [r.body["predictions"][0]["label"] for r in replies]
    assert set(labels) == {"negative", "positive"}
    (good, bad) = service.handle([{"body": "what a superb film !"}, {"body": "a tedious plot"}])
    assert good.body["predictions"][0]["label"] == "positive"
    assert bad.body["predictions"][0]["label"] == "negative"
