"""gradnorm-client: post pictures to a served model and print predictions with OOD scores.

    gradnorm-client [--url URL] [--model NAME] [--token KEY | --key-file FILE] PATH [PATH ...]

Each PATH is a picture or a folder of them (not recursive). The inference key is --token,
else ``["inference"]["key"]`` of --key-file (by default ./key_file.json, which TorchServe
0.12 writes where it starts, when that file exists), else no Authorization header is sent.
The exit status is 1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")
DEFAULT_KEY_FILE = Path("key_file.json")
HEADER = ("file", "prediction", "probability", "ood score", "is_ood")
RIGHT_ALIGNED = {2, 3}  # the numeric columns


@dataclass
class Result:
    file: Path
    status: int | None  # None: no HTTP answer at all
    answer: Any  # the parsed JSON answer, or the text of a non-JSON one, or the error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradnorm-client",
        description="Send pictures to a TorchServe model served with the gradient-norm handler.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="inference API address")
    p.add_argument("--model", default="digits", help="model name (default: digits)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="inference key")
    auth.add_argument(
        "--key-file",
        type=Path,
        help=f"TorchServe key file to read the inference key from (default: ./{DEFAULT_KEY_FILE}"
        " if it exists)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print the raw answers as JSON lines")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="picture or folder")
    return p


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """The pictures to send: files as given, folders' pictures sorted by name."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def read_key(key_file: Path) -> str:
    """The inference key of a TorchServe key_file.json."""
    try:
        document = json.loads(key_file.read_text())
        key = document["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the inference key from {key_file}: {e!r}") from None
    if not isinstance(key, str) or not key:
        raise ValueError(f"cannot read the inference key from {key_file}: not a string")
    return key


def find_token(token: str | None, key_file: Path | None) -> str | None:
    if token:
        return token
    if key_file is None and DEFAULT_KEY_FILE.is_file():
        key_file = DEFAULT_KEY_FILE
    return None if key_file is None else read_key(key_file)


def error_message(answer: Any) -> str:
    """The message of the handler's ``{"error": {...}}`` or of TorchServe's own errors."""
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in answer:
            return str(answer["message"])
    return answer if isinstance(answer, str) else json.dumps(answer)


def table_row(result: Result) -> list[str]:
    answer = result.answer
    if isinstance(answer, list) and answer:  # an "instances" answer: show the first
        answer = answer[0]
    if not isinstance(answer, dict):
        answer = {}
    top = (answer.get("predictions") or [{}])[0]
    ood = answer.get("ood") or {}
    probability, score, flag = top.get("probability"), ood.get("score"), ood.get("is_ood")
    return [
        str(result.file),
        str(top.get("label", top.get("index", "-"))),
        "-" if probability is None else f"{probability:.3f}",
        "-" if score is None else f"{score:.6g}",
        "-" if flag is None else ("yes" if flag else "no"),
    ]


def format_table(results: Sequence[Result]) -> list[str]:
    """Aligned lines; a failed request's row carries its status and message after the file."""
    rows = [(r, table_row(r) if r.status == 200 else None) for r in results]
    cells = [list(HEADER)] + [row for _, row in rows if row is not None]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    widths[0] = max([widths[0]] + [len(str(r.file)) for r in results])

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i in RIGHT_ALIGNED else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()

    lines = [line(HEADER)]
    for result, row in rows:
        if row is not None:
            lines.append(line(row))
        else:
            what = "error" if result.status is None else f"HTTP {result.status}"
            message = error_message(result.answer)
            lines.append(f"{str(result.file).ljust(widths[0])}  {what}: {message}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    import requests  # here, so that importing the package stays light

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        files = collect_files(args.paths)
        token = find_token(args.token, args.key_file)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if not files:
        parser.error("no pictures found (" + ", ".join(IMAGE_SUFFIXES) + ")")

    url = f"{args.url.rstrip('/')}/predictions/{args.model}"
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    results: list[Result] = []
    with requests.Session() as session:
        for file in files:
            try:
                response = session.post(
                    url, data=file.read_bytes(), headers=headers, timeout=args.timeout
                )
            except (OSError, requests.RequestException) as e:
                result = Result(file, None, f"{type(e).__name__}: {e}")
            else:
                try:
                    answer = response.json()
                except ValueError:
                    answer = response.text
                result = Result(file, response.status_code, answer)
            results.append(result)
            if args.json:
                record = {"file": str(file), "status": result.status, "answer": result.answer}
                print(json.dumps(record), flush=True)
    if not args.json:
        print("\n".join(format_table(results)))
    return 0 if all(r.status == 200 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
