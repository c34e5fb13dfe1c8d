"""What the CA process tests share: ``trustmesh ca serve`` as a subprocess, curl, openssl.

Not a test module (no ``test_`` prefix); test_enroll_cli.py and test_ca_serve_cli.py
import it as ``catools`` (``tests/cli`` is on the import path, as for ``clitools``).
Every wait is bounded by ``WAIT``: a server's first line, a process, a request.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clitools import LEAF_EXTENSIONS, OPENSSL_CONFIG, P256, TRUSTMESH, clean_env

from trustmesh.pki.ca import CertificateAuthority

PASS = "ca passphrase for the process tests"
NODE_PASS = "node key passphrase"
WAIT = 15.0  # upper bound on any one process, line or request; each takes well under that

JSON = "content-type: application/json"


# --- the trustmesh command line ---------------------------------------------------------


def trustmesh(*args: str | Path, passphrase: str | None = PASS) -> subprocess.CompletedProcess[str]:
    """``trustmesh ARGS`` with $TRUSTMESH_PASSPHRASE set to ``passphrase`` (unset: None)."""
    env = clean_env() if passphrase is None else clean_env(TRUSTMESH_PASSPHRASE=passphrase)
    return subprocess.run(
        [TRUSTMESH, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env,
        check=False,
    )


def succeeds(*args: str | Path, passphrase: str | None = PASS) -> str:
    """The stdout of a ``trustmesh`` command that must exit 0."""
    result = trustmesh(*args, passphrase=passphrase)
    assert result.returncode == 0, f"trustmesh {' '.join(map(str, args))}: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


Call = tuple[tuple[str | Path, ...], str | None]  # arguments, passphrase


def concurrently(*calls: Call) -> list[subprocess.CompletedProcess[str]]:
    """Several independent ``trustmesh`` commands at once, results in order: each spends
    most of its time importing, so this saves most of the waiting."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(trustmesh, *args, passphrase=pw) for args, pw in calls]
        return [f.result(timeout=WAIT * 2) for f in futures]


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a command that failed with exit code 1 (as
    ``trustmesh: error: ...``), with nothing on stdout."""
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trustmesh: error: "), lines
    return lines[0]


# --- a running `trustmesh ca serve` -----------------------------------------------------


class CaServe:
    """``trustmesh ca serve --dir D --port 0 --json``; its first stdout line names the URL."""

    def __init__(self, directory: Path, *extra: str, stderr: Path) -> None:
        self.stderr = stderr
        with stderr.open("w") as errors:
            self.proc = subprocess.Popen(
                [
                    TRUSTMESH,
                    "ca",
                    "serve",
                    "--dir",
                    str(directory),
                    "--port",
                    "0",
                    "--json",
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env=clean_env(TRUSTMESH_PASSPHRASE=PASS),
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        first = self.next_line()
        self.url: str = first["listening"]
        self.metrics_url: str | None = first.get("metrics")  # with --metrics HOST:PORT
        self.ca_cert = Path(first["ca_cert"])
        assert first["warnings"] == []
        self.port = int(self.url.rsplit(":", 1)[1])
        assert self.port > 0

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next_line(self, timeout: float = WAIT) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line in {timeout} s; stderr: {self.errors()}") from None
        assert line is not None, f"exited ({self.proc.poll()}); stderr: {self.errors()}"
        data: dict[str, Any] = json.loads(line)
        return data

    def terminate(self) -> int:
        """SIGTERM; the exit code, after checking the last line is ``stopped``."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=WAIT)
        assert self.next_line() == {"stopped": self.url}
        assert self._lines.get(timeout=WAIT) is None  # nothing after it
        return code

    def kill(self) -> int:
        """SIGKILL: no chance to clean up."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=WAIT)

    def close(self) -> None:
        """Kill it if still running (a test that failed half-way); release the pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        self._reader.join(WAIT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def errors(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""


_served = itertools.count(1)  # a stderr file name per server


@contextmanager
def serving(directory: Path, *extra: str) -> Iterator[CaServe]:
    """A server for the ``with`` block; the caller stops it (terminate or kill) to check
    how it ends, else it is killed on the way out."""
    stderr = directory.parent / f"serve{next(_served)}.err"
    server = CaServe(directory, *extra, stderr=stderr)
    try:
        yield server
    finally:
        server.close()


# --- curl ---------------------------------------------------------------------------------


def require_curl() -> str:
    """The curl command line: fail, never skip, without it (as require_openssl)."""
    path = shutil.which("curl")
    if path is None:
        pytest.fail("the curl command line is missing; scripts/dev test needs it installed")
    return path


@dataclass(frozen=True)
class SharedCa:
    """A CA made in-process (no `trustmesh ca init` process; tokens in a millisecond)
    and served by a `trustmesh ca serve` subprocess, for a whole test module."""

    directory: Path
    server: CaServe
    authority: CertificateAuthority

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"


@contextmanager
def shared_ca(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[SharedCa]:
    """A generous rate limit: only test_ca_serve_cli.py's own server tests the limit."""
    require_curl()
    directory = tmp_path_factory.mktemp(name) / "ca"
    authority = CertificateAuthority.init(directory, PASS.encode())
    try:
        with serving(directory, "--rate", "1000", "--burst", "1000") as server:
            assert server.url.startswith("https://127.0.0.1:")
            assert server.ca_cert == directory / "ca.crt"
            yield SharedCa(directory, server, authority)
            assert server.terminate() == 0, server.errors()
    finally:
        authority.close()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lowercase
    body: bytes

    def json(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/json"), self
        data: dict[str, Any] = json.loads(self.body)
        return data

    def error(self, status: int, code: str) -> str:
        """The message of a JSON error reply with this status and code."""
        assert self.status == status, self
        body = self.json()
        assert set(body) == {"error", "message"}, body
        assert body["error"] == code, body
        message: str = body["message"]
        assert message
        return message


def curl(url: str, *options: str | Path) -> Reply:
    """One request as a curl user makes it (``-q``: no ~/.curlrc; no proxy); the reply
    with its headers (``-i``)."""
    result = subprocess.run(
        [require_curl(), "-q", "-sS", "-i", "--noproxy", "*", "--max-time", str(WAIT)]
        + [str(o) for o in options]
        + [url],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=WAIT + 5,
        check=False,
    )
    assert result.returncode == 0, f"curl {url}: {result.stderr.decode()}"
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


# --- openssl ------------------------------------------------------------------------------


class OpenSsl:
    """The openssl command line, with a minimal config of our own (none from the system)."""

    def __init__(self, executable: str, folder: Path) -> None:
        self.executable = executable
        self.folder = folder
        self.config = folder / "openssl.cnf"
        self.config.write_text(OPENSSL_CONFIG)
        self.env = {**os.environ, "OPENSSL_CONF": str(self.config)}

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.executable, *map(str, args)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
            env=self.env,
            cwd=self.folder,
        )

    def __call__(self, *args: str | Path) -> str:
        result = self.run(*args)
        assert result.returncode == 0, f"openssl {' '.join(map(str, args))}: {result.stderr}"
        return result.stdout

    def csr(self, name: str, node_id: str) -> tuple[Path, Path]:
        """The README's CSR: a P-256 key and a CSR naming node_id in CN and DNS SAN."""
        key, csr = self.folder / f"{name}.key", self.folder / f"{name}.csr"
        self(
            *("req", "-new", *P256, "-nodes", "-keyout", key, "-subj", f"/CN={node_id}"),
            *("-addext", f"subjectAltName=DNS:{node_id}", "-out", csr),
        )
        return key, csr

    def serial(self, cert: Path) -> int:
        """The serial of a certificate, as ``openssl x509 -serial`` prints it."""
        line = self("x509", "-in", cert, "-noout", "-serial").strip()
        assert line.startswith("serial="), line
        return int(line.removeprefix("serial="), 16)

    def public_key(self, *, cert: Path | None = None, key: Path | None = None) -> str:
        """The PEM public key of a certificate or of a private key."""
        if cert is not None:
            return self("x509", "-in", cert, "-noout", "-pubkey")
        assert key is not None
        return self("pkey", "-in", key, "-pubout")

    def foreign_leaf(
        self, name: str, node_id: str, csr: Path, *, issuer_cn: str, serial: int
    ) -> Path:
        """A certificate for ``csr`` from a CA of our own making, named ``issuer_cn``,
        with the given serial: what an impostor of the mesh CA would hand out."""
        ca_cert, ca_key = self.folder / f"{name}-ca.crt", self.folder / f"{name}-ca.key"
        self(
            *("req", "-x509", "-new", *P256, "-nodes", "-keyout", ca_key, "-out", ca_cert),
            *("-days", "2", "-subj", f"/CN={issuer_cn}", "-extensions", "ca"),
        )
        extensions = self.folder / f"{name}.ext"
        extensions.write_text(LEAF_EXTENSIONS.format(name=node_id))
        cert = self.folder / f"{name}.crt"
        self(
            *("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-sha256"),
            *("-set_serial", f"0x{serial:x}", "-days", "1"),
            *("-extfile", extensions, "-out", cert),
        )
        return cert


def split_pem(text: str) -> list[str]:
    """The PEM certificates in ``text``, each with its END line and a newline."""
    end = "-----END CERTIFICATE-----"
    return [block.strip() + "\n" + end + "\n" for block in text.split(end) if block.strip()]
