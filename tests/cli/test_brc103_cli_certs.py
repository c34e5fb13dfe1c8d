"""``trustmesh brc103 serve`` and ``fetch`` with certificates: ``--request-certificates``,
``--certificate`` and (serve) ``--revocations``.

One ``serve`` process for the module (stopped by SIGTERM in teardown) asks every client
for the certifier's "employee" certificate, shows its own when asked, and checks client
certificates against a registry made by ``cert revoke``. A client with a matching
certificate gets ``/hello`` listing the fields it revealed; a revoked one is refused.

``serve`` holds a request for the client's certificates for 30 s (plus a margin) before
its 401: too slow here. The 401 paths of ``fetch`` (no certificate, a revoked one) run
in-process against the same demo app served by the library with a 300 ms certificate
timeout, in a thread of its own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
import pytest
from aiohttp import web
from clitools import TRUSTMESH, clean_env

import trustmesh.cli.main as cli_main
from trustmesh.api.authfetch import AuthFetch
from trustmesh.api.brc104 import Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.messages import RequestedCertificates
from trustmesh.brc103.peer import PeerConfig
from trustmesh.brc103.revocation import LocalRevocationRegistry
from trustmesh.brc103.wallet import Wallet
from trustmesh.keystore import PASSPHRASE_ENV

WAIT = 15.0  # upper bound on any one process, line or request; each takes far less
HEX = {"server": "5a" * 32, "client": "c5" * 32, "revoked": "7e" * 32, "certifier": "ce" * 32}
KEY = {name: Wallet.from_hex(secret).identity_key for name, secret in HEX.items()}
EMPLOYEE = base64.b64encode(hashlib.sha256(b"employee").digest()).decode()  # --type employee
GOOD_OUTPOINT = "01" * 32 + ".0"
REVOKED_OUTPOINT = "02" * 32 + ".1"
ASK_NAME = json.dumps({"certifiers": [KEY["certifier"]], "types": {EMPLOYEE: ["name"]}})
# The same request with the type by name, as `cert issue --type employee` names it.
ASK_BY_NAME = json.dumps({"certifiers": [KEY["certifier"]], "types": {"employee": ["name"]}})


# --- files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    directory: Path

    def key(self, name: str) -> str:
        return str(self.directory / f"{name}.hex")

    def master(self, name: str) -> str:
        return str(self.directory / f"{name}-master.json")

    @property
    def revocations(self) -> str:
        return str(self.directory / "revoked.sqlite")


def cli(argv: list[str]) -> int:
    """``trustmesh ARGV`` in-process; its exit code (output goes to pytest's capture)."""
    with pytest.raises(SystemExit) as info:
        cli_main.main(argv)
    code = info.value.code
    return 0 if code is None else int(code)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """Key files (64 hex digits, mode 0600), an employee certificate for the server, the
    client and the "revoked" client, and a registry in which the last one is revoked."""
    out = Files(tmp_path_factory.mktemp("brc103-certs"))
    for name, secret in HEX.items():
        path = Path(out.key(name))
        path.write_text(secret + "\n")
        path.chmod(0o600)
    certifier = Wallet.from_hex(HEX["certifier"])
    for name, person, outpoint in [
        ("server", "Server Co", GOOD_OUTPOINT),
        ("client", "Alice", GOOD_OUTPOINT),
        ("revoked", "Mallory", REVOKED_OUTPOINT),
    ]:
        master = MasterCertificate.issue(
            certifier, KEY[name], EMPLOYEE, {"name": person, "role": "staff"},
            revocation_outpoint=outpoint,
        )  # fmt: skip
        Path(out.master(name)).write_text(json.dumps(master.to_json()))
    assert (
        cli(["brc103", "cert", "revoke", REVOKED_OUTPOINT, "--revocations", out.revocations]) == 0
    )
    return out


# --- a serve process --------------------------------------------------------------------------


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
        self._lines.put(b"")

    def next(self, timeout: float = WAIT) -> bytes:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line in {timeout:g} s") from None


@pytest.fixture(scope="module")
def served(files: Files) -> Iterator[str]:
    """The URL of ``trustmesh brc103 serve`` asking for certificates."""
    proc = subprocess.Popen(
        [
            TRUSTMESH, "brc103", "serve", "--port", "0",
            "--key", files.key("server"),
            "--request-certificates", ASK_NAME,
            "--certificate", files.master("server"),
            "--revocations", files.revocations,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = Lines(proc.stdout), Lines(proc.stderr)
        first = stdout.next()
        assert first, f"serve ended: {stderr.next(1.0).decode()}"
        info = json.loads(first)
        assert info["identityKey"] == KEY["server"]
        yield str(info["listening"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT)


# --- the same demo app in-process, with a short certificate timeout -----------------------


class ThreadServer:
    """``demo_app`` behind a Brc104Server asking for the employee name, with a 300 ms
    certificate timeout and the revocation registry, on its own loop in a thread."""

    def __init__(self, revocations: str) -> None:
        self._revocations = revocations
        self._urls: queue.Queue[str | BaseException] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        registry = LocalRevocationRegistry(Path(self._revocations))  # made in this thread
        config = PeerConfig(
            requested_certificates=RequestedCertificates.from_json(json.loads(ASK_NAME)),
            certificate_timeout_ms=300,
        )
        server = Brc104Server(Wallet.from_hex(HEX["server"]), config, revocation=registry)
        runner = web.AppRunner(demo_app(server), access_log=None, shutdown_timeout=0.5)
        try:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._urls.put(f"http://127.0.0.1:{runner.addresses[0][1]}")
            await self._stop.wait()
        except BaseException as exc:
            self._urls.put(exc)
            raise
        finally:
            await runner.cleanup()
            registry.close()

    def start(self) -> str:
        self._thread.start()
        url = self._urls.get(timeout=WAIT)
        if isinstance(url, BaseException):
            raise AssertionError(f"the server did not start: {url!r}")
        return url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


@pytest.fixture(scope="module")
def quick(files: Files) -> Iterator[str]:
    server = ThreadServer(files.revocations)
    try:
        yield server.start()
    finally:
        server.stop()


# --- running the CLI in-process -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.delenv("TRUSTMESH_DEBUG", raising=False)


def run(argv: list[str], capsysbinary: pytest.CaptureFixture[bytes]) -> tuple[int, bytes, str]:
    """(exit code, stdout bytes, stderr text) of ``trustmesh ARGV`` run in-process."""
    capsysbinary.readouterr()
    code = cli(argv)
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trustmesh: error: "), lines
    assert "Traceback" not in err
    return lines[0]


def load_master(files: Files, who: str) -> MasterCertificate:
    return MasterCertificate.from_json(json.loads(Path(files.master(who)).read_text()))


def fetch(url: str, files: Files, who: str, *extra: str) -> list[str]:
    return ["brc103", "fetch", url + "/hello", "--key", files.key(who), *extra]


# --- serve with --request-certificates, --certificate, --revocations -------------------------


def test_a_client_with_a_matching_certificate_gets_hello_with_the_revealed_field(
    served: str, files: Files
) -> None:
    result = subprocess.run(
        [TRUSTMESH, *fetch(served, files, "client", "--certificate", files.master("client"))],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=WAIT,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert json.loads(result.stdout) == {
        "hello": KEY["client"],
        "certificates": [
            {"type": EMPLOYEE, "certifier": KEY["certifier"], "fields": {"name": "Alice"}}
        ],
    }


def test_verbose_prints_the_servers_certificate_fields_on_stderr(
    served: str, files: Files, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, out, err = run(
        fetch(
            served, files, "client",
            "--certificate", files.master("client"),
            "--request-certificates", ASK_BY_NAME,
            "--revocations", files.revocations,
            "-v",
        ),
        capsysbinary,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["hello"] == KEY["client"]
    assert err.startswith(f"authenticated: HTTP 200 from {KEY['server']}\n")
    assert "Server Co" in err, f"the server's certificate fields are not on stderr: {err!r}"
    assert "staff" not in err  # only the requested field was revealed to us


async def test_serve_refuses_a_revoked_client_certificate(served: str, files: Files) -> None:
    """Shown by hand (the fetch command would wait out the 30 s hold): serve answers the
    revoked certificate with 401 ERR_CERTIFICATE_REVOKED and the good one with 204."""
    masters = {who: load_master(files, who) for who in ("revoked", "client")}
    for who, status, code in [("revoked", 401, "ERR_CERTIFICATE_REVOKED"), ("client", 204, "")]:
        master = masters[who]
        wallet = Wallet.from_hex(HEX[who])
        config = PeerConfig(certificates=[master], answer_certificate_requests=False)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http,
            AuthFetch(wallet, config, session=http, request_timeout=WAIT) as client,
        ):
            server_key = await client.server_identity(served)
            shown = master.reveal(wallet, server_key, ["name"])
            answer = client.peer.create_certificate_response([shown], identity_key=server_key)
            async with http.post(served + brc104.AUTH_PATH, data=answer.to_bytes()) as response:
                body = await response.read()
                assert response.status == status, body
            if code:
                assert json.loads(body)["code"] == code
            else:
                assert (await client.fetch(served + "/hello")).status == 200


# --- fetch without (valid) certificates, against the quick server ---------------------------


def test_the_quick_server_serves_a_client_with_a_certificate(
    quick: str, files: Files, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, out, err = run(
        fetch(quick, files, "client", "--certificate", files.master("client")), capsysbinary
    )
    assert (code, err) == (0, "")
    assert json.loads(out)["certificates"][0]["fields"] == {"name": "Alice"}


@pytest.mark.parametrize(
    ("who", "why"),
    # Without a certificate the client says so at once (an empty certificateResponse) and
    # is refused at once; a revoked one is refused, and the request waits out the hold.
    [("client", "ERR_CERTIFICATES_MISSING"), ("revoked", "ERR_CERTIFICATE_TIMEOUT")],
    ids=["no certificate", "revoked"],
)
def test_fetch_without_an_acceptable_certificate_exits_1_with_the_401(
    quick: str, files: Files, capsysbinary: pytest.CaptureFixture[bytes], who: str, why: str
) -> None:
    extra = ["--certificate", files.master(who)] if who == "revoked" else []
    code, out, err = run(fetch(quick, files, who, *extra), capsysbinary)
    assert (code, out) == (1, b"")
    line = one_error_line(err)
    assert "401" in line
    assert why in line


# --- usage errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[]",
        '{"certifiers": "02"}',
        '{"certifiers": ["zz"]}',
        '{"certifiers": [], "types": {"t": "name"}}',
        '{"certifiers": [], "extra": 1}',
        '{"certifiers": [], "certifiers": []}',
    ],
)
@pytest.mark.parametrize("command", ["serve", "fetch"])
def test_bad_request_certificates_json_is_a_usage_error(
    files: Files, capsysbinary: pytest.CaptureFixture[bytes], command: str, bad: str
) -> None:
    target = ["serve", "--port", "0"] if command == "serve" else ["fetch", "http://127.0.0.1:9/"]
    argv = ["brc103", *target, "--key", files.key("client"), "--request-certificates", bad]
    code, out, err = run(argv, capsysbinary)
    assert (code, out) == (2, b"")
    assert "--request-certificates" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["serve", "fetch"])
def test_a_certificate_of_someone_else_is_refused_in_one_line(
    files: Files, capsysbinary: pytest.CaptureFixture[bytes], command: str
) -> None:
    target = ["serve", "--port", "0"] if command == "serve" else ["fetch", "http://127.0.0.1:9/"]
    argv = [
        "brc103",
        *target,
        "--key",
        files.key("client"),
        "--certificate",
        files.master("server"),
    ]
    code, out, err = run(argv, capsysbinary)
    assert code in (1, 2) and out == b""
    assert "certificate" in err.lower()
    assert "Traceback" not in err


def test_fetch_gives_up_at_its_timeout(
    files: Files, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A server that takes the connection and never answers: --timeout ends the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code, _, err = run(fetch(url, files, "client", "--timeout", "0.5"), capsysbinary)
        assert time.monotonic() - started < WAIT
    assert code == 1
    assert "did not answer in time" in one_error_line(err)
