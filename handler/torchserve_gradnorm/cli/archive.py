"""gradnorm-archive: pack a classifier into a self-contained TorchServe .mar.

Same flags as torch-model-archiver where they overlap, plus ``--labels``. The handler
config is validated with the code the server runs at load, before anything is packed; the
archive carries the ``torchserve_gradnorm`` package, so the TorchServe host does not need
this project installed. ``--calibration`` ships a calibration file after checking that it
was made for these weights and settings. Packing itself is torch-model-archiver's job.

The packed archive is then opened and loaded as the handler loads it (model, filter,
calibration, backend, one warm-up sample when the input shape is known) before it is moved
to ``--export-path``: an archive the server could not load is refused here, with the same
one-line message, rather than written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import torchserve_gradnorm
from torchserve_gradnorm.calibration import (
    FILENAME,
    Calibration,
    CalibrationError,
    file_sha256,
    fingerprint,
    shipped_calibration,
)
from torchserve_gradnorm.config import (
    ConfigError,
    HandlerConfig,
    handler_section,
    parse_handler_config,
)
from torchserve_gradnorm.mar import open_archive
from torchserve_gradnorm.service import GradNormService

PACKAGE_DIR = Path(torchserve_gradnorm.__file__).resolve().parent


def entry_module_path() -> Path:
    spec = importlib.util.find_spec("gradnorm_handler")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "gradnorm-archive: cannot find gradnorm_handler.py (is the project installed?)"
        )
    return Path(spec.origin)


_RUN_ARCHIVER = (
    "import sys; from model_archiver.model_packaging import generate_model_archive; "
    "sys.argv[0] = 'torch-model-archiver'; sys.exit(generate_model_archive())"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradnorm-archive",
        description="Pack a classifier with the gradient-norm OOD handler into a .mar.",
    )
    p.add_argument("--model-name", required=True)
    p.add_argument("--version", default="1.0")
    p.add_argument("--model-file", help="Python file with the model class (eager models)")
    p.add_argument(
        "--serialized-file",
        required=True,
        help="state_dict (with --model-file) or TorchScript .pt file",
    )
    p.add_argument("--config-file", help="model-config.yaml with a handler: section")
    p.add_argument("--extra-files", default="", help="comma-separated files to ship too")
    p.add_argument("--labels", help='index_to_name.json: {"0": "cat", ...}')
    p.add_argument(
        "--calibration", help="calibration JSON from gradnorm-calibrate, shipped in the archive"
    )
    p.add_argument("--export-path", default="model_store")
    p.add_argument("--force", action="store_true", help="overwrite an existing archive")
    return p


def validate_config(path: str | None) -> HandlerConfig:
    if path is None:
        return parse_handler_config(None)
    try:
        with open(path) as f:
            document = yaml.safe_load(f)
        return parse_handler_config(handler_section(document))
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"gradnorm-archive: cannot read {path}: {e}") from None
    except ConfigError as e:
        raise SystemExit(f"gradnorm-archive: {path}: {e}") from None


def validate_calibration(path: str, weights: str, config: HandlerConfig) -> None:
    try:
        calibration = Calibration.load(path)
    except (OSError, CalibrationError) as e:
        raise SystemExit(f"gradnorm-archive: {path}: {e}") from None
    if calibration.fingerprint != fingerprint(file_sha256(weights), config):
        raise SystemExit(
            f"gradnorm-archive: {path} was made for other weights or scoring settings; "
            "run gradnorm-calibrate on this archive"
        )


def validate_labels(path: str) -> None:
    try:
        with open(path) as f:
            labels = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"gradnorm-archive: cannot read labels {path}: {e}") from None
    if not isinstance(labels, dict) or not all(k.isdigit() for k in labels):
        raise SystemExit(f'gradnorm-archive: {path}: expected {{"0": "label", ...}}')


def check_loads(mar: Path, args: argparse.Namespace) -> None:
    """Load the packed archive the way the handler does; exit with its error if it fails."""
    where = args.config_file or "handler"
    try:
        with open_archive(mar) as archive:
            calibration = shipped_calibration(archive.root, archive.config)
            weights_sha256 = archive.weights_sha256() if calibration else None
            GradNormService(
                archive.model,
                archive.config,
                archive.labels,
                calibration,
                weights_sha256,
                args.model_name,
            ).warm_up()
    except ConfigError as e:
        raise SystemExit(f"gradnorm-archive: {where}: {e}") from None
    except Exception as e:
        raise SystemExit(
            "gradnorm-archive: the model does not load as TorchServe would load it: "
            f"{type(e).__name__}: {e}"
        ) from None


def archiver_command(args: argparse.Namespace, stage: Path, export_path: Path) -> list[str]:
    # --extra-files copies a directory's *contents* to the archive root, so the package is
    # staged one level down and the archive root gets torchserve_gradnorm/.
    library = stage / "library"
    shutil.copytree(
        PACKAGE_DIR,
        library / "torchserve_gradnorm",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "cli"),
    )
    extra = [str(library)]
    if args.labels:
        validate_labels(args.labels)
        shutil.copy(args.labels, stage / "index_to_name.json")
        extra.append(str(stage / "index_to_name.json"))
    if args.calibration:
        shutil.copy(args.calibration, stage / FILENAME)
        extra.append(str(stage / FILENAME))
    extra += [f for f in args.extra_files.split(",") if f]
    command = [
        # the archiver of this interpreter's environment, whether or not its bin/ is on PATH
        sys.executable, "-c", _RUN_ARCHIVER,
        "--model-name", args.model_name,
        "--version", args.version,
        "--handler", str(entry_module_path()),
        "--serialized-file", args.serialized_file,
        "--extra-files", ",".join(extra),
        "--export-path", str(export_path),
    ]  # fmt: skip
    if args.model_file:
        command += ["--model-file", args.model_file]
    if args.config_file:
        command += ["--config-file", args.config_file]
    return command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = validate_config(args.config_file)
    if not args.model_file and not args.serialized_file.endswith(".pt"):
        # TorchServe's BaseHandler loads a model without a model file only from a .pt name
        raise SystemExit(
            "gradnorm-archive: --serialized-file: without --model-file the model must be "
            f"a TorchScript file ending in .pt, got {args.serialized_file}"
        )
    if args.calibration:
        validate_calibration(args.calibration, args.serialized_file, config)
    target = Path(args.export_path) / f"{args.model_name}.mar"
    if target.exists() and not args.force:
        raise SystemExit(f"gradnorm-archive: {target} exists; --force overwrites it")
    with tempfile.TemporaryDirectory(prefix="gradnorm-archive-") as tmp:
        packed = Path(tmp) / "packed"
        packed.mkdir()
        result = subprocess.run(archiver_command(args, Path(tmp), packed), check=False)
        if result.returncode != 0:
            return result.returncode
        check_loads(packed / target.name, args)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(packed / target.name, target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
