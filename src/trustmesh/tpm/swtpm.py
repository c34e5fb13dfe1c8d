"""A software TPM (swtpm) in a directory of its own, for tests and the demo.

    with Swtpm.start(tmp_dir) as tpm:
        tpm.tcti          # "swtpm:host=127.0.0.1,port=..." for tpm2-pytss and tpm2-tools
        tpm.ek_ca         # the PEM of the local CA that signed its EK certificates

``swtpm_setup`` manufactures the TPM first: an RSA 2048 and an ECC EK with certificates
from a CA made in the same directory (``swtpm_localca``), as a vendor would, so the
EK-to-AK binding is tested against a real certificate chain. The emulator listens on
loopback TCP and is stopped by its PID; it never outlives the ``with`` block.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from trustmesh.errors import ProtocolError

SETUP_TIMEOUT = 30.0
START_TIMEOUT = 10.0
PORT_ATTEMPTS = 5


class SwtpmError(ProtocolError):
    """swtpm is missing, or did not start."""


def available() -> bool:
    """Whether swtpm and swtpm_setup are installed."""
    return shutil.which("swtpm") is not None and shutil.which("swtpm_setup") is not None


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SwtpmError(f"{name} is not installed (Debian: swtpm swtpm-tools)")
    return path


@dataclass
class Swtpm:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def ek_ca(self) -> bytes:
        """The EK certificates' issuer (PEM); an attestation policy trusts it."""
        return (self.directory / "localca" / "issuercert.pem").read_bytes()

    @property
    def ek_root(self) -> bytes:
        """The local CA's root (PEM), which signed :attr:`ek_ca`."""
        return (self.directory / "localca" / "swtpm-localca-rootca-cert.pem").read_bytes()

    @classmethod
    def start(cls, directory: Path) -> Swtpm:
        """Manufacture a TPM in ``directory`` (once) and start it on a free loopback port."""
        binary = _tool("swtpm")
        directory.mkdir(parents=True, exist_ok=True)
        state = directory / "state"
        if not state.exists():
            _manufacture(directory)
        for _ in range(PORT_ATTEMPTS):
            # A free port can be taken between our probe and swtpm's bind; then try another.
            port = _free_port_pair()
            process = subprocess.Popen(  # noqa: S603 (our own argv, no shell)
                [
                    binary,
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={state}",
                    "--server",
                    f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            if _wait_listening(port, process):
                return cls(directory, port, process)
            _stop(process)
        raise SwtpmError(f"swtpm did not start after {PORT_ATTEMPTS} attempts")

    def stop(self) -> None:
        _stop(self.process)

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def _manufacture(directory: Path) -> None:
    localca = directory / "localca"
    localca.mkdir(exist_ok=True)
    (directory / "localca.conf").write_text(
        f"statedir = {localca}\n"
        f"signingkey = {localca / 'signkey.pem'}\n"
        f"issuercert = {localca / 'issuercert.pem'}\n"
        f"certserial = {localca / 'certserial'}\n"
    )
    (directory / "localca.options").write_text("")
    (directory / "setup.conf").write_text(
        f"create_certs_tool = {_tool('swtpm_localca')}\n"
        f"create_certs_tool_config = {directory / 'localca.conf'}\n"
        f"create_certs_tool_options = {directory / 'localca.options'}\n"
        "active_pcr_banks = sha256\n"
    )
    state = directory / "state.new"
    state.mkdir(exist_ok=True)
    result = subprocess.run(  # noqa: S603 (our own argv, no shell)
        [
            _tool("swtpm_setup"),
            "--tpm2",
            "--tpmstate",
            str(state),
            "--create-ek-cert",
            "--config",
            str(directory / "setup.conf"),
            "--overwrite",
        ],
        capture_output=True,
        timeout=SETUP_TIMEOUT,
        env={**os.environ, "XDG_CONFIG_HOME": str(directory)},
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()[-500:]
        raise SwtpmError(f"swtpm_setup failed: {detail}")
    state.rename(directory / "state")


def _free_port_pair() -> int:
    """An even port whose successor was also free a moment ago (server, then control)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1]) & ~1
        if port < 1024 or port + 1 > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 1):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        return port


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port + 1), timeout=0.5):
                return True
        except OSError:
            # No event to wait on: swtpm says nothing when it listens, so poll its port.
            time.sleep(0.02)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
    if process.stderr is not None:
        process.stderr.close()
