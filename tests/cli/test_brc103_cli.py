"""``trustmesh brc103`` as a user runs it: help, ``serve`` as a process, ``fetch`` against
it and against plain HTTP servers (each flag as its help describes), and the certificate
round trip issue → reveal → verify with PEM and hex key files, tampering, revocation and
certifier pinning.

``serve`` runs as a subprocess (stopped by SIGTERM in teardown); ``fetch`` runs as one
for the plain success and failure paths and in-process for each flag, to keep the file
fast (a process costs about half a second of imports).
"""

from __future__ import annotations

import io
import json
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import pytest
from clitools import TRUSTMESH, clean_env

import trustmesh.cli.main as cli_main
from trustmesh.brc103.wallet import Wallet
from trustmesh.keystore import PASSPHRASE_ENV

WAIT = 15.0  # upper bound on any one process or line; each takes far less
SERVER_HEX = "5e" * 32
CLIENT_HEX = "c1" * 32
SERVER_KEY = Wallet.from_hex(SERVER_HEX).identity_key
CLIENT_KEY = Wallet.from_hex(CLIENT_HEX).identity_key
OUTPOINT = "ab" * 32 + ".1"
SUBCOMMANDS = [
    ["brc103"],
    ["brc103", "serve"],
    ["brc103", "fetch"],
    ["brc103", "cert"],
    ["brc103", "cert", "issue"],
    ["brc103", "cert", "reveal"],
    ["brc103", "cert", "verify"],
    ["brc103", "cert", "revoke"],
]


# --- running the CLI in-process -------------------------------------------------------------


class _Stdin:
    """A stdin that is not a terminal; ``data`` is what ``-d @-`` may read."""

    def __init__(self, data: bytes | None = None) -> None:
        self._data = data

    @property
    def buffer(self) -> io.BytesIO:
        if self._data is None:
            raise AssertionError("the CLI tried to read stdin")
        return io.BytesIO(self._data)

    def isatty(self) -> bool:
        return False

    def read(self, *args: object) -> str:
        raise AssertionError("the CLI tried to read stdin as text")

    readline = read


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.delenv("TRUSTMESH_DEBUG", raising=False)
    monkeypatch.setattr("sys.stdin", _Stdin())


def run(argv: list[str], capsysbinary: pytest.CaptureFixture[bytes]) -> tuple[int, bytes, str]:
    """(exit code, stdout bytes, stderr text) of ``trustmesh ARGV`` run in-process."""
    capsysbinary.readouterr()
    with pytest.raises(SystemExit) as info:
        cli_main.main(argv)
    code = info.value.code
    out, err = capsysbinary.readouterr()
    return (0 if code is None else int(code)), out, err.decode()


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trustmesh: error: "), lines
    assert "Traceback" not in err
    return lines[0]


def succeeds(argv: list[str], capsysbinary: pytest.CaptureFixture[bytes]) -> bytes:
    code, out, err = run(argv, capsysbinary)
    assert (code, err) == (0, ""), err
    return out


def fails(argv: list[str], capsysbinary: pytest.CaptureFixture[bytes]) -> str:
    """The one error line of a command that exits 1 and prints nothing on stdout."""
    code, out, err = run(argv, capsysbinary)
    assert (code, out) == (1, b""), (code, out, err)
    return one_error_line(err)


def run_process(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``trustmesh ARGS`` as a process."""
    return subprocess.run(
        [TRUSTMESH, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=WAIT,
        env=clean_env(),
        check=False,
    )


# --- processes ------------------------------------------------------------------------------


class Lines:
    """A process's output stream read line by line in a thread, so every wait is bounded."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for line in stream:
                self._lines.put(line)
        self._lines.put(b"")  # the end of the stream

    def next(self, timeout: float = WAIT) -> bytes:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line in {timeout:g} s") from None

    def rest(self) -> bytes:
        """Everything after the lines taken so far, once the stream has ended."""
        self._reader.join(WAIT)
        assert not self._reader.is_alive(), "the stream is still open"
        out = b""
        while not self._lines.empty():
            out += self._lines.get_nowait()
        return out


@dataclass
class Served:
    """A running ``trustmesh brc103 serve``."""

    proc: subprocess.Popen[bytes]
    first_line: bytes
    stdout: Lines
    stderr: Lines

    @property
    def info(self) -> dict[str, Any]:
        data = json.loads(self.first_line)
        assert isinstance(data, dict)
        return data

    @property
    def url(self) -> str:
        return str(self.info["listening"])

    def started(self) -> Served:
        """Wait for the first stdout line (kill the process if it does not come)."""
        try:
            self.first_line = self.stdout.next()
            assert self.first_line, f"serve ended: {self.stderr.rest().decode()}"
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int:
        """SIGTERM, then the exit code (a process that will not stop is killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)


def spawn_serve(*args: str) -> Served:
    """``trustmesh brc103 serve --port 0 ARGS``; :meth:`Served.started` waits for it."""
    proc = subprocess.Popen(
        [TRUSTMESH, "brc103", "serve", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    return Served(proc, b"", Lines(proc.stdout), Lines(proc.stderr))


def start_serve(*args: str) -> Served:
    """A started ``serve``. The caller stops it; a start that fails is killed here."""
    served = spawn_serve(*args)
    served.started()
    return served


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("brc103-keys")
    (directory / "server.hex").write_text(SERVER_HEX + "\n")
    (directory / "client.hex").write_text(CLIENT_HEX.upper())  # either case, no newline
    for key in directory.iterdir():
        key.chmod(0o600)  # a hex key is refused unless private, like a PEM one
    return directory


@pytest.fixture(scope="module")
def server(key_dir: Path) -> Iterator[Served]:
    served = start_serve("--key", str(key_dir / "server.hex"))
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def client_key(key_dir: Path) -> str:
    return str(key_dir / "client.hex")


class _PlainHandler(BaseHTTPRequestHandler):
    """Answers every request with 200 and a JSON body, no BRC-104 at all."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b'{"hello": "anyone"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def plain_200() -> Iterator[str]:
    """A plain HTTP server in a thread that says 200 to everything."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _PlainHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(WAIT)


@pytest.fixture(scope="module")
def plain_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m http.server`` (GET only: a POST is 501) on 127.0.0.1."""
    directory = tmp_path_factory.mktemp("www")
    (directory / "hello").write_text("hello from a file server\n")
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = Lines(proc.stdout).next().decode()
        found = re.search(r"port (\d+)", line)
        assert found, line
        yield f"http://127.0.0.1:{found.group(1)}"
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)


# --- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=" ".join)
def test_help(capsysbinary: pytest.CaptureFixture[bytes], path: list[str]) -> None:
    out = succeeds([*path, "--help"], capsysbinary).decode()
    assert out.startswith(f"Usage: trustmesh {' '.join(path)} ")
    if path == ["brc103"]:
        for name in ("serve", "fetch", "cert"):
            assert re.search(rf"^  {name}\s", out, re.MULTILINE), out
    if path == ["brc103", "cert"]:
        for name in ("issue", "reveal", "verify", "revoke"):
            assert re.search(rf"^  {name}\s", out, re.MULTILINE), out
    if path == ["brc103", "fetch"]:
        for flag in ("-X", "-H", "-d", "-i", "-f", "--key"):
            assert f"{flag}," in out or f"{flag} " in out, flag


def test_brc103_is_listed_by_trustmesh(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    out = succeeds(["--help"], capsysbinary).decode()
    assert re.search(r"^  brc103\s", out, re.MULTILINE), out


# --- serve ----------------------------------------------------------------------------------


def test_serve_first_line_names_the_url_and_identity(server: Served) -> None:
    assert server.first_line.endswith(b"\n")
    assert server.first_line.count(b"\n") == 1
    info = server.info
    assert set(info) == {"listening", "identityKey"}
    assert re.fullmatch(r"http://127\.0\.0\.1:[1-9][0-9]*", info["listening"]), info
    assert re.fullmatch(r"0[23][0-9a-f]{64}", info["identityKey"]), info
    assert info["identityKey"] == SERVER_KEY


def test_serve_with_a_pem_key_or_none_and_a_clean_stop_on_sigterm(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    key = tmp_path / "server.pem"
    generated = succeeds(
        ["keys", "generate", "--type", "secp256k1", "--no-encrypt", "--out", str(key), "--json"],
        capsysbinary,
    )
    public_key = json.loads(generated)["public_key"]
    with_pem = spawn_serve("--key", str(key), "--host", "127.0.0.1")
    random_ids = [spawn_serve()]  # no --key: a new random identity
    try:
        with_pem.started()
        for served in random_ids:
            served.started()
        assert with_pem.info["identityKey"] == public_key
        out = succeeds(["brc103", "fetch", with_pem.url + "/hello"], capsysbinary)
        assert re.fullmatch(r"0[23][0-9a-f]{64}", json.loads(out)["hello"])
        keys = {public_key, SERVER_KEY, *(served.info["identityKey"] for served in random_ids)}
        assert len(keys) == 3
        assert all(re.fullmatch(r"0[23][0-9a-f]{64}", k) for k in keys)
    finally:
        codes = [served.stop() for served in [with_pem, *random_ids]]
    assert codes == [0, 0]
    assert with_pem.stdout.rest() == b""  # nothing after the first line
    assert with_pem.stderr.rest() == b""


def test_serve_on_a_busy_port_fails_with_one_line(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    port = server.url.rsplit(":", 1)[1]
    line = fails(["brc103", "serve", "--host", "127.0.0.1", "--port", port], capsysbinary)
    assert port in line


def test_serve_with_a_bad_key_file_is_a_usage_error(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    missing = tmp_path / "missing.key"
    code, out, err = run(["brc103", "serve", "--key", str(missing)], capsysbinary)
    assert (code, out) == (2, b"")
    assert "cannot read" in err


# --- fetch ----------------------------------------------------------------------------------


def test_fetch_prints_the_body_and_exits_0(server: Served, client_key: str) -> None:
    result = run_process("brc103", "fetch", server.url + "/hello", "--key", client_key)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert json.loads(result.stdout) == {"hello": CLIENT_KEY}


def test_fetch_from_a_plain_file_server_exits_1_with_one_line(plain_files: str) -> None:
    result = run_process("brc103", "fetch", plain_files + "/hello")
    assert result.returncode == 1
    assert result.stdout == b""  # nothing unauthenticated is shown
    line = one_error_line(result.stderr.decode())
    assert "501" in line  # http.server has no POST /.well-known/auth


def test_fetch_from_a_server_saying_200_to_all_exits_1_with_one_line(
    plain_200: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    line = fails(["brc103", "fetch", plain_200 + "/hello"], capsysbinary)
    assert "anyone" not in line


def test_fetch_from_a_closed_port_exits_1(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), _PlainHandler) as httpd:
        port = httpd.server_address[1]  # bound, then closed: nothing listens
    line = fails(["brc103", "fetch", f"http://127.0.0.1:{port}/hello"], capsysbinary)
    assert "cannot reach" in line


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/hello", "127.0.0.1/hello", "http:///hello"])
def test_fetch_refuses_a_url_that_is_not_http(
    url: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert "not an http(s) URL" in fails(["brc103", "fetch", url], capsysbinary)


def test_fetch_data_is_posted_as_json(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    body = '{"a": 1, "text": "héllo"}'
    out = succeeds(["brc103", "fetch", server.url + "/echo", "-d", body], capsysbinary)
    assert out == body.encode()


def test_fetch_data_that_is_not_json_goes_as_text(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    out = succeeds(
        ["brc103", "fetch", server.url + "/echo-text", "-d", "just words", "-i"], capsysbinary
    )
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b"just words"
    assert re.search(rb"(?im)^content-type: text/plain", head), head


def test_fetch_data_from_a_file(
    server: Served, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    blob = bytes(range(256)) * 4
    (tmp_path / "blob.bin").write_bytes(blob)
    out = succeeds(
        [
            "brc103",
            "fetch",
            server.url + "/echo-bin",
            "-H",
            "Content-Type: application/octet-stream",
            "-d",
            f"@{tmp_path / 'blob.bin'}",
        ],
        capsysbinary,
    )
    assert out == blob
    (tmp_path / "doc.json").write_text('{"from": "a file"}\n')
    out = succeeds(
        ["brc103", "fetch", server.url + "/echo", "-d", f"@{tmp_path / 'doc.json'}"],
        capsysbinary,
    )
    assert out == b'{"from": "a file"}\n'


def test_fetch_data_from_a_missing_file_is_a_usage_error(
    server: Served, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, out, err = run(
        ["brc103", "fetch", server.url + "/echo", "-d", f"@{tmp_path / 'none.json'}"],
        capsysbinary,
    )
    assert (code, out) == (2, b"")
    assert "cannot read" in err


def test_fetch_data_from_stdin(
    server: Served, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setattr("sys.stdin", _Stdin(b'{"from": "stdin"}'))
    out = succeeds(["brc103", "fetch", server.url + "/echo", "-d", "@-"], capsysbinary)
    assert out == b'{"from": "stdin"}'


def test_fetch_header_sets_the_content_type(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    out = succeeds(
        [
            "brc103",
            "fetch",
            server.url + "/echo-text",
            "-H",
            "content-type: text/csv",
            "-H",
            "x-bsv-note: any x-bsv header is signed",
            "-d",
            '{"csv": false}',
            "--include",
        ],
        capsysbinary,
    )
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b'{"csv": false}'
    assert re.search(rb"(?im)^content-type: text/csv\r$", head), head


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("Accept: */*", "header 'Accept' cannot be signed"),
        ("x-bsv-auth-nonce: forged", "No BSV auth headers allowed here!"),
    ],
    ids=["unsignable", "auth-header"],
)
def test_fetch_refuses_headers_it_cannot_sign(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes], header: str, says: str
) -> None:
    line = fails(["brc103", "fetch", server.url + "/hello", "-H", header], capsysbinary)
    assert says in line, line


def test_fetch_header_without_a_colon_is_a_usage_error(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, out, err = run(["brc103", "fetch", server.url + "/hello", "-H", "nocolon"], capsysbinary)
    assert (code, out) == (2, b"")
    assert "NAME:VALUE" in err


def test_fetch_method(server: Served, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    hello = succeeds(["brc103", "fetch", server.url + "/hello", "-X", "get"], capsysbinary)
    assert "hello" in json.loads(hello)
    # Another method on a GET route: the server's (authenticated) 405, exit 0 without -f.
    code, out, err = run(
        ["brc103", "fetch", server.url + "/hello", "-X", "DELETE", "-i"], capsysbinary
    )
    assert (code, err) == (0, "")
    assert out.startswith(b"HTTP 405\r\n")
    # -X overrides the POST that -d implies.
    code, out, _ = run(
        ["brc103", "fetch", server.url + "/echo", "-X", "PUT", "-d", "{}", "-i"], capsysbinary
    )
    assert code == 0
    assert out.startswith(b"HTTP 405\r\n")


def test_fetch_post_without_data(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    out = succeeds(["brc103", "fetch", server.url + "/echo-text", "-X", "POST"], capsysbinary)
    assert out == b""


def test_fetch_include_prints_the_status_and_headers_first(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    out = succeeds(["brc103", "fetch", server.url + "/echo", "-d", "[1]", "-i"], capsysbinary)
    head, sep, body = out.partition(b"\r\n\r\n")
    assert sep and body == b"[1]"
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP 200"
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    assert headers["x-bsv-auth-identity-key"] == SERVER_KEY
    assert headers["x-bsv-echo"] == "yes"
    assert headers["content-type"].startswith("application/json")


def test_fetch_empty_response(server: Served, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert succeeds(["brc103", "fetch", server.url + "/empty"], capsysbinary) == b""
    out = succeeds(["brc103", "fetch", server.url + "/empty", "-i"], capsysbinary)
    assert out.startswith(b"HTTP 204\r\n")
    assert out.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("status", [404, 418, 500])
def test_fetch_fail_exits_1_on_an_error_status(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes], status: int
) -> None:
    url = f"{server.url}/status/{status}"
    out = succeeds(["brc103", "fetch", url], capsysbinary)  # without -f: 0
    assert json.loads(out) == {"status": status}
    code, _, _ = run(["brc103", "fetch", url, "-f"], capsysbinary)
    assert code == 1
    assert succeeds(["brc103", "fetch", f"{server.url}/status/200", "-f"], capsysbinary)


def test_fetch_verbose_names_the_server_on_stderr(
    server: Served, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, out, err = run(["brc103", "fetch", server.url + "/empty", "-v"], capsysbinary)
    assert (code, out) == (0, b"")
    assert err == f"authenticated: HTTP 204 from {SERVER_KEY}\n"


def test_fetch_with_a_pem_key_presents_that_identity(
    server: Served, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    key = tmp_path / "client.pem"
    generated = succeeds(
        ["keys", "generate", "--type", "secp256k1", "--no-encrypt", "--out", str(key), "--json"],
        capsysbinary,
    )
    out = succeeds(["brc103", "fetch", server.url + "/hello", "--key", str(key)], capsysbinary)
    assert json.loads(out) == {"hello": json.loads(generated)["public_key"]}


def test_fetch_with_a_key_of_another_type_is_a_usage_error(
    server: Served, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    key = tmp_path / "ed.pem"
    succeeds(
        ["keys", "generate", "--type", "ed25519", "--no-encrypt", "--out", str(key)], capsysbinary
    )
    code, out, err = run(
        ["brc103", "fetch", server.url + "/hello", "--key", str(key)], capsysbinary
    )
    assert (code, out) == (2, b"")
    assert "secp256k1" in err


# --- certificates ---------------------------------------------------------------------------


@dataclass
class Identity:
    key_file: Path
    public_key: str


@pytest.fixture
def identities(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], request: pytest.FixtureRequest
) -> dict[str, Identity]:
    """Certifier, subject, verifier and a stranger: PEM files made by ``keys generate``,
    or files of 64 hex digits (``request.param``, default PEM)."""
    kind = getattr(request, "param", "pem")
    out: dict[str, Identity] = {}
    for index, name in enumerate(["certifier", "subject", "verifier", "stranger"]):
        if kind == "pem":
            path = tmp_path / f"{name}.pem"
            info = succeeds(
                [
                    "keys",
                    "generate",
                    "--type",
                    "secp256k1",
                    "--no-encrypt",
                    "--out",
                    str(path),
                    "--json",
                ],
                capsysbinary,
            )
            out[name] = Identity(path, json.loads(info)["public_key"])
        else:
            secret = f"{index + 1:02x}" * 32
            path = tmp_path / f"{name}.hex"
            path.write_text(secret + "\n")
            path.chmod(0o600)
            out[name] = Identity(path, Wallet.from_hex(secret).identity_key)
    return out


def issue(
    ids: dict[str, Identity],
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    *extra: str,
) -> Path:
    master = tmp_path / "master.json"
    succeeds(
        [
            "brc103",
            "cert",
            "issue",
            "--key",
            str(ids["certifier"].key_file),
            "--subject",
            ids["subject"].public_key,
            "--type",
            "employee",
            "--field",
            "name=Alice",
            "--field",
            "role=admin",
            "--field",
            "note=a=b, c",
            "--out",
            str(master),
            *extra,
        ],
        capsysbinary,
    )
    return master


def reveal(
    ids: dict[str, Identity],
    master: Path,
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    *fields: str,
) -> Path:
    shown = tmp_path / "shown.json"
    args = [arg for name in fields for arg in ("--field", name)]
    succeeds(
        [
            "brc103",
            "cert",
            "reveal",
            str(master),
            "--key",
            str(ids["subject"].key_file),
            "--verifier",
            ids["verifier"].public_key,
            *args,
            "--out",
            str(shown),
        ],
        capsysbinary,
    )
    return shown


def verify(shown: Path, *args: str) -> list[str]:
    return ["brc103", "cert", "verify", str(shown), *args]


@pytest.mark.parametrize("identities", ["pem", "hex"], indirect=True)
def test_issue_reveal_verify_round_trip(
    identities: dict[str, Identity], tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    ids = identities
    master = issue(ids, tmp_path, capsysbinary)
    master_json = json.loads(master.read_text())
    assert master_json["subject"] == ids["subject"].public_key
    assert master_json["certifier"] == ids["certifier"].public_key
    assert (
        set(master_json["fields"])
        == set(master_json["masterKeyring"])
        == {
            "name",
            "role",
            "note",
        }
    )
    assert "Alice" not in master.read_text()  # fields are encrypted
    shown = reveal(ids, master, tmp_path, capsysbinary, "role", "note")
    assert set(json.loads(shown.read_text())["keyring"]) == {"role", "note"}
    out = succeeds(verify(shown, "--key", str(ids["verifier"].key_file)), capsysbinary)
    assert out.count(b"\n") == 1
    result = json.loads(out)
    assert result["valid"] is True
    assert result["fields"] == {"role": "admin", "note": "a=b, c"}
    assert result["subject"] == ids["subject"].public_key
    assert result["certifier"] == ids["certifier"].public_key
    assert result["serialNumber"] == master_json["serialNumber"]
    assert result["type"] == master_json["type"]
    # Without --key only the signature is checked; nothing is decrypted.
    plain = json.loads(succeeds(verify(shown), capsysbinary))
    assert plain["valid"] is True and "fields" not in plain
    # The certifier pinned: the right one passes.
    pinned = verify(shown, "--certifier", ids["certifier"].public_key.upper())
    assert json.loads(succeeds(pinned, capsysbinary))["valid"] is True


def test_issue_and_reveal_to_stdout(
    identities: dict[str, Identity], tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    ids = identities
    out = succeeds(
        [
            "brc103",
            "cert",
            "issue",
            "--key",
            str(ids["certifier"].key_file),
            "--subject",
            ids["subject"].public_key,
            "--type",
            "employee",
            "--field",
            "name=Alice",
        ],
        capsysbinary,
    )
    master = json.loads(out)
    assert master["subject"] == ids["subject"].public_key


def test_the_verifier_key_must_match(
    identities: dict[str, Identity], tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    ids = identities
    shown = reveal(ids, issue(ids, tmp_path, capsysbinary), tmp_path, capsysbinary, "role")
    line = fails(verify(shown, "--key", str(ids["stranger"].key_file)), capsysbinary)
    assert "decrypt" in line


SIGNATURE_FAILS = "the certifier's signature does not verify"


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        ("field ciphertext", SIGNATURE_FAILS),  # the signature covers the fields
        ("serial number", SIGNATURE_FAILS),
        ("subject", SIGNATURE_FAILS),
        ("certifier", SIGNATURE_FAILS),  # checked under the stranger's key
        ("signature", SIGNATURE_FAILS),
        # The keyring is not signed: its forged entry fails to decrypt.
        ("keyring", "cannot decrypt the key of field 'role'"),
    ],
)
def test_verify_of_a_tampered_certificate_exits_1(
    identities: dict[str, Identity],
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    tamper: str,
    says: str,
) -> None:
    ids = identities
    shown = reveal(ids, issue(ids, tmp_path, capsysbinary), tmp_path, capsysbinary, "role")
    data = json.loads(shown.read_text())
    if tamper == "field ciphertext":
        data["fields"]["role"] = data["fields"]["name"]
    elif tamper == "serial number":
        data["serialNumber"] = "A" * 43 + "="
    elif tamper == "subject":
        data["subject"] = ids["stranger"].public_key
    elif tamper == "certifier":
        data["certifier"] = ids["stranger"].public_key
    elif tamper == "signature":
        signature = bytearray.fromhex(data["signature"])
        signature[-1] ^= 1
        data["signature"] = signature.hex()
    else:
        data["keyring"]["role"] = data["fields"]["role"]
    shown.write_text(json.dumps(data))
    line = fails(verify(shown, "--key", str(ids["verifier"].key_file)), capsysbinary)
    assert line == f"trustmesh: error: {says}"


@pytest.mark.parametrize(
    ("content", "code", "says"),
    [
        ("not json", 1, "not JSON"),
        ("[]", 1, "not a JSON object"),
        ('{"type": "x"}', 1, "serialNumber"),
    ],
)
def test_verify_of_a_file_that_is_no_certificate_fails(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], content: str, code: int, says: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    exit_code, out, err = run(verify(bad), capsysbinary)
    assert (exit_code, out) == (code, b"")
    assert says in err
    one_error_line(err)


def test_revoked_certificates_fail_verify(
    identities: dict[str, Identity], tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    ids = identities
    master = issue(ids, tmp_path, capsysbinary, "--revocation-outpoint", OUTPOINT)
    assert json.loads(master.read_text())["revocationOutpoint"] == OUTPOINT
    shown = reveal(ids, master, tmp_path, capsysbinary, "name")
    db = tmp_path / "revoked.sqlite"
    # A registry that does not exist is a usage error, never an empty (all-clear) one.
    code, _, err = run(verify(shown, "--revocations", str(db)), capsysbinary)
    assert code == 2
    assert "does not exist" in err
    other = "11" * 32 + ".0"
    succeeds(["brc103", "cert", "revoke", other, "--revocations", str(db)], capsysbinary)
    before = json.loads(succeeds(verify(shown, "--revocations", str(db)), capsysbinary))
    assert before["valid"] is True and before["revocationOutpoint"] == OUTPOINT
    out = succeeds(
        ["brc103", "cert", "revoke", OUTPOINT, "--revocations", str(db), "--reason", "left"],
        capsysbinary,
    )
    assert json.loads(out) == {"revoked": OUTPOINT}
    line = fails(verify(shown, "--revocations", str(db)), capsysbinary)
    assert "revoked" in line
    assert OUTPOINT in line
    # Without the registry a revocable certificate is refused (issue 16, item 18) ...
    line = fails(verify(shown), capsysbinary)
    assert "no revocation source" in line and OUTPOINT in line
    # ... unless the operator says not to check, which is logged.
    code, out, err = run(verify(shown, "--no-revocation-check"), capsysbinary)
    assert code == 0, err
    assert json.loads(out)["revocation"] == "unchecked"
    assert err.startswith("trustmesh: warning: --no-revocation-check: ")
    assert len(err.splitlines()) == 1


def test_revoke_refuses_a_malformed_outpoint(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    db = tmp_path / "r.db"
    line = fails(["brc103", "cert", "revoke", "nope", "--revocations", str(db)], capsysbinary)
    assert "<txid>.<index>" in line


def test_a_certifier_mismatch_fails_verify(
    identities: dict[str, Identity], tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    ids = identities
    shown = reveal(ids, issue(ids, tmp_path, capsysbinary), tmp_path, capsysbinary, "name")
    line = fails(verify(shown, "--certifier", ids["stranger"].public_key), capsysbinary)
    assert ids["certifier"].public_key in line
    both = verify(
        shown, "--certifier", ids["stranger"].public_key, "--certifier", ids["certifier"].public_key
    )
    assert json.loads(succeeds(both, capsysbinary))["valid"] is True


def test_only_the_subject_can_reveal(
    identities: dict[str, Identity], tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    ids = identities
    master = issue(ids, tmp_path, capsysbinary)
    base = ["brc103", "cert", "reveal", str(master), "--verifier", ids["verifier"].public_key]
    line = fails([*base, "--key", str(ids["stranger"].key_file), "--field", "name"], capsysbinary)
    assert "subject" in line
    line = fails([*base, "--key", str(ids["subject"].key_file), "--field", "age"], capsysbinary)
    assert "age" in line


@pytest.mark.parametrize(
    "subject", ["", "02" + "zz" * 32, "04" + "11" * 32, "02" + "11" * 31, "ff" * 33]
)
def test_issue_refuses_a_bad_subject_key(
    identities: dict[str, Identity],
    capsysbinary: pytest.CaptureFixture[bytes],
    subject: str,
) -> None:
    code, out, err = run(
        [
            "brc103",
            "cert",
            "issue",
            "--key",
            str(identities["certifier"].key_file),
            "--subject",
            subject,
            "--type",
            "employee",
            "--field",
            "name=Alice",
        ],
        capsysbinary,
    )
    assert (code, out) == (2, b"")
    assert "--subject" in err


def test_a_hex_key_that_others_can_read_is_refused(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    key = tmp_path / "open.hex"
    key.write_text(SERVER_HEX)
    key.chmod(0o644)
    exit_code, out, err = run(
        [
            "brc103",
            "cert",
            "issue",
            "--key",
            str(key),
            "--subject",
            "02" + "11" * 32,
            "--type",
            "t",
            "--field",
            "a=b",
        ],
        capsysbinary,
    )
    assert (exit_code, out) == (1, b"")
    assert "chmod 600" in err
