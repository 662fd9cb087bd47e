"""gradnorm-archive writes only archives the server can load: what it accepts loads in the
handler and scores; what cannot load (a backend that cannot score a TorchScript model, a
filter that selects nothing, weights TorchServe cannot read) is refused with one line, and
nothing is written."""

from __future__ import annotations

import json
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from gradnorm_handler import GradNormHandler
from torchserve_harness import DIGITS, REPO, FakeContext, demo_config, load_demo_model

from torchserve_gradnorm.cli import archive

ID_PICTURE = REPO / "samples/images/id/digit_3_idx45.png"
FILTERS = {"all": "all", "head": "head", "globs": {"include": ["*.weight"], "exclude": ["stem*"]}}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripted") / "digits_scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(load_demo_model()), path)
    return path


def pack(tmp_path: Path, serialized: Path, eager: bool, name: str = "m", **handler) -> list[str]:
    config = demo_config()
    config["handler"].update(handler)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    argv = [
        "--model-name", name, "--serialized-file", str(serialized),
        "--config-file", str(tmp_path / f"{name}.yaml"),
        "--labels", str(DIGITS / "index_to_name.json"), "--export-path", str(tmp_path / "store"),
    ]  # fmt: skip
    return argv + (["--model-file", str(DIGITS / "model.py")] if eager else [])


def refusal(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        archive.main(argv)
    return str(info.value.code)


def load_in_handler(mar: Path, work: Path, monkeypatch) -> GradNormHandler:
    """Extract the archive and load it through the handler, as a TorchServe worker does."""
    model_dir = work / "extracted"
    with zipfile.ZipFile(mar) as z:
        z.extractall(model_dir)
    model = json.loads((model_dir / "MAR-INF/MANIFEST.json").read_text())["model"]
    context = FakeContext(
        model_dir,
        model["serializedFile"],
        yaml.safe_load((model_dir / model["configFile"]).read_text()),
    )
    if model.get("modelFile"):
        context.manifest["model"]["modelFile"] = model["modelFile"]
        monkeypatch.syspath_prepend(str(model_dir))
        monkeypatch.delitem(sys.modules, Path(model["modelFile"]).stem, raising=False)
    handler = GradNormHandler()
    handler.initialize(context)
    return handler


@pytest.mark.parametrize("param_filter", FILTERS.values(), ids=FILTERS.keys())
@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_an_accepted_archive_loads_in_the_handler_and_scores(
    tmp_path, monkeypatch, scripted, kind, param_filter
):
    serialized = DIGITS / "digits_cnn.pt" if kind == "eager" else scripted
    assert archive.main(pack(tmp_path, serialized, kind == "eager", param_filter=param_filter)) == 0
    handler = load_in_handler(tmp_path / "store/m.mar", tmp_path, monkeypatch)
    assert handler.load_error is None
    (reply,) = handler.service.handle([{"body": ID_PICTURE.read_bytes()}])
    assert reply.status == 200, reply.body
    assert reply.body["predictions"][0]["label"] == "three"


@pytest.mark.parametrize("backend", ["fast", "vmap"])
def test_a_backend_that_cannot_score_torchscript_is_refused_naming_the_key(
    tmp_path, scripted, backend
):
    message = refusal(pack(tmp_path, scripted, eager=False, backend=backend))
    assert message.startswith(f"gradnorm-archive: {tmp_path / 'm.yaml'}: handler.backend: ")
    assert "TorchScript" in message and "\n" not in message
    assert not (tmp_path / "store/m.mar").exists()


def test_a_filter_that_selects_nothing_is_refused_naming_the_key(tmp_path, scripted):
    argv = pack(tmp_path, scripted, eager=False, param_filter={"include": ["conv*"]})
    message = refusal(argv)
    assert "handler.param_filter: param_filter selects no parameter" in message
    assert not (tmp_path / "store/m.mar").exists()


def test_a_state_dict_without_its_model_file_is_refused(tmp_path):
    message = refusal(pack(tmp_path, DIGITS / "digits_cnn.pt", eager=False))
    assert message.startswith(
        "gradnorm-archive: the model does not load as TorchServe would load it: RuntimeError: "
    )
    assert not (tmp_path / "store/m.mar").exists()


def test_a_torchscript_file_not_named_pt_is_refused(tmp_path, scripted):
    renamed = tmp_path / "digits.pth"
    renamed.write_bytes(scripted.read_bytes())
    message = refusal(pack(tmp_path, renamed, eager=False))
    assert "must be a TorchScript file ending in .pt" in message


def test_an_existing_archive_is_kept_unless_forced(tmp_path, scripted):
    argv = pack(tmp_path, scripted, eager=False)
    assert archive.main(argv) == 0
    before = (tmp_path / "store/m.mar").read_bytes()
    assert "exists; --force overwrites it" in refusal(argv)
    assert (tmp_path / "store/m.mar").read_bytes() == before
    assert archive.main([*argv, "--force"]) == 0
