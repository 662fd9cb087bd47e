"""gradnorm-client against a small local HTTP server that answers like the handler does.

The server checks the bearer token like TorchServe's token authorization, and answers
canned bodies in the handler's shape (see ``torchserve_gradnorm.response``) chosen by the
bytes posted, so the "pictures" here are short byte strings in files named like pictures.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from torchserve_gradnorm.cli.client import main
from torchserve_gradnorm.response import error_answer

TOKEN = "s3cret-inference-key"
MODEL = "digits"


def answer(label: str, probability: float, score: float, is_ood: bool | None) -> dict[str, Any]:
    threshold = None if is_ood is None else -20.0
    return {
        "predictions": [
            {"index": int(label), "label": label, "probability": probability},
            {"index": 0, "label": "0", "probability": 1.0 - probability},
        ],
        "ood": {
            "score": score,
            "grad_norm": -score,
            "is_ood": is_ood,
            "threshold": threshold,
            "method": "confounding",
        },
    }


# posted bytes -> (status, JSON body)
CANNED: dict[bytes, tuple[int, Any]] = {
    b"three": (200, answer("3", 0.97123, -31.41592653, False)),
    b"seven": (200, answer("7", 0.5, -12.5, True)),
    b"plain": (200, answer("1", 0.8886, -25.0, None)),
    b"broken": (400, error_answer(400, "cannot decode the picture: image file is truncated")),
}


class FakeTorchServe(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]  # set per server, below

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        if self.path != f"/predictions/{MODEL}":
            status, reply = (
                404,
                {
                    "code": 404,
                    "type": "ModelNotFoundException",
                    "message": f"Model not found: {self.path}",
                },
            )
        elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
            # TorchServe 0.12's own answer (tests/test_server.py checks it), not the handler's
            status, reply = (
                400,
                {
                    "code": 400,
                    "type": "InvalidKeyException",
                    "message": "Token Authorization failed. Token either incorrect, expired, or "
                    "not provided correctly",
                },
            )
        else:
            status, reply = CANNED[body]
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass


class Server:
    def __init__(self) -> None:
        handler = type("Handler", (FakeTorchServe,), {"received": []})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.received: list[dict[str, Any]] = handler.received
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
        s.thread.join(timeout=5)


@pytest.fixture
def pictures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of "pictures", and a working directory with no key_file.json in it."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "b_seven.jpg").write_bytes(b"seven")
    (folder / "a_three.png").write_bytes(b"three")
    (folder / "c_plain.WEBP").write_bytes(b"plain")
    (folder / "notes.txt").write_bytes(b"not a picture")
    (folder / "nested").mkdir()
    (folder / "nested" / "deep.png").write_bytes(b"three")
    (tmp_path / "broken.png").write_bytes(b"broken")
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return tmp_path


def run(server: Server, *argv: str) -> list[str]:
    return ["--url", server.url, "--model", MODEL, *argv]


def table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


# --- the table -------------------------------------------------------------------------------


def test_a_folder_gives_one_aligned_row_per_picture(server, pictures, capsys):
    code = main(run(server, "--token", TOKEN, str(pictures / "pictures")))
    out = capsys.readouterr().out
    folder = pictures / "pictures"
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["file", "prediction", "probability", "ood", "score", "is_ood"]
    assert table(out)[1:] == [
        [str(folder / "a_three.png"), "3", "0.971", "-31.4159", "no"],
        [str(folder / "b_seven.jpg"), "7", "0.500", "-12.5", "yes"],
        [str(folder / "c_plain.WEBP"), "1", "0.889", "-25", "-"],
    ]
    # aligned: text columns start, number columns end, where their header does
    header = lines[0]
    for row in lines[1:]:
        for column in ("probability", "ood score"):
            end = header.index(column) + len(column)
            assert row[end - 1] != " " and row[end] == " "
        assert row[header.index("prediction")] != " "
        assert row[header.index("is_ood")] in "yn-"
    # the folder's pictures, sorted, and nothing else (no .txt, no subfolder)
    assert [r["body"] for r in server.received] == [b"three", b"seven", b"plain"]
    assert {r["path"] for r in server.received} == {f"/predictions/{MODEL}"}
    assert {r["auth"] for r in server.received} == {f"Bearer {TOKEN}"}


def test_a_failed_request_shows_its_status_and_message_and_fails_the_run(server, pictures, capsys):
    broken = pictures / "broken.png"
    code = main(
        run(server, "--token", TOKEN, str(pictures / "pictures" / "a_three.png"), str(broken))
    )
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[1].split()[1:] == ["3", "0.971", "-31.4159", "no"]
    assert lines[2].startswith(str(broken))
    assert lines[2].split()[1:] == [
        "HTTP",
        "400:",
        *"cannot decode the picture: image file is truncated".split(),
    ]
    # the good request was still sent and printed in order
    assert [r["body"] for r in server.received] == [b"three", b"broken"]


def test_files_are_sent_in_the_order_given(server, pictures, capsys):
    folder = pictures / "pictures"
    code = main(run(server, "--token", TOKEN, str(folder / "b_seven.jpg"), str(folder)))
    assert code == 0
    assert [r["body"] for r in server.received] == [b"seven", b"three", b"seven", b"plain"]
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_json_lines(server, pictures, capsys):
    folder = pictures / "pictures"
    code = main(run(server, "--token", TOKEN, "--json", str(folder), str(pictures / "broken.png")))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert [(Path(r["file"]).name, r["status"]) for r in records] == [
        ("a_three.png", 200),
        ("b_seven.jpg", 200),
        ("c_plain.WEBP", 200),
        ("broken.png", 400),
    ]
    assert records[0]["answer"] == CANNED[b"three"][1]
    assert records[3]["answer"] == CANNED[b"broken"][1]


def test_a_wrong_model_name_is_a_failed_row(server, pictures, capsys):
    argv = ["--url", server.url + "/", "--model", "nope", "--token", TOKEN]
    code = main([*argv, str(pictures / "pictures" / "a_three.png")])
    out = capsys.readouterr().out
    assert code == 1
    assert "HTTP 404: Model not found: /predictions/nope" in out


def test_an_unreachable_server_is_a_failed_row(pictures, capsys):
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["--url", f"http://127.0.0.1:{port}", "--timeout", "5"]
    code = main([*argv, str(pictures / "pictures" / "a_three.png")])
    out = capsys.readouterr().out
    assert code == 1
    assert "error: ConnectionError" in out.splitlines()[1]


# --- the token -------------------------------------------------------------------------------


def write_key_file(path: Path, key: str) -> Path:
    # the layout TorchServe 0.12 writes when token authorization is on
    document = {
        "management": {"key": "management-key", "expiration time": "2030-01-01T00:00:00Z"},
        "inference": {"key": key, "expiration time": "2030-01-01T00:00:00Z"},
        "API": {"key": "api-key"},
    }
    path.write_text(json.dumps(document))
    return path


def test_the_key_file_gives_the_token(server, pictures, capsys):
    key_file = write_key_file(pictures / "keys.json", TOKEN)
    code = main(run(server, "--key-file", str(key_file), str(pictures / "pictures")))
    assert code == 0
    assert {r["auth"] for r in server.received} == {f"Bearer {TOKEN}"}


def test_key_file_json_in_the_working_directory_is_read_by_default(server, pictures, capsys):
    write_key_file(Path("key_file.json"), TOKEN)  # the cwd is pictures / "work"
    code = main(run(server, str(pictures / "pictures" / "a_three.png")))
    assert code == 0
    assert server.received[0]["auth"] == f"Bearer {TOKEN}"


def test_token_wins_over_the_default_key_file(server, pictures, capsys):
    write_key_file(Path("key_file.json"), "stale-key")
    code = main(run(server, "--token", TOKEN, str(pictures / "pictures" / "a_three.png")))
    assert code == 0
    assert server.received[0]["auth"] == f"Bearer {TOKEN}"


def test_no_token_sends_no_authorization_header(server, pictures, capsys):
    code = main(run(server, str(pictures / "pictures" / "a_three.png")))
    out = capsys.readouterr().out
    assert code == 1
    assert server.received[0]["auth"] is None
    assert "HTTP 400: Token Authorization failed." in out


def test_a_wrong_key_is_refused_by_the_server(server, pictures, capsys):
    key_file = write_key_file(pictures / "keys.json", "wrong")
    code = main(run(server, "--key-file", str(key_file), str(pictures / "pictures")))
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert len(lines) == 4
    assert all(" HTTP 400: Token Authorization failed." in line for line in lines[1:])


@pytest.mark.parametrize(
    "content", ["not json", "{}", '{"inference": {}}', '{"inference": {"key": 3}}', "[]"]
)
def test_an_unreadable_key_file_is_a_usage_error(server, pictures, capsys, content):
    key_file = pictures / "keys.json"
    key_file.write_text(content)
    with pytest.raises(SystemExit) as info:
        main(run(server, "--key-file", str(key_file), str(pictures / "pictures")))
    assert info.value.code == 2
    assert "inference key" in capsys.readouterr().err
    assert server.received == []


def test_token_and_key_file_exclude_each_other(server, pictures, capsys):
    key_file = write_key_file(pictures / "keys.json", TOKEN)
    with pytest.raises(SystemExit) as info:
        main(run(server, "--token", TOKEN, "--key-file", str(key_file), str(pictures)))
    assert info.value.code == 2


# --- paths -----------------------------------------------------------------------------------


def test_a_missing_path_is_a_usage_error(server, pictures, capsys):
    with pytest.raises(SystemExit) as info:
        main(run(server, str(pictures / "missing.png")))
    assert info.value.code == 2
    assert "missing.png" in capsys.readouterr().err
    assert server.received == []


def test_a_folder_without_pictures_is_a_usage_error(server, pictures, capsys):
    with pytest.raises(SystemExit) as info:
        main(run(server, str(pictures / "work")))
    assert info.value.code == 2
