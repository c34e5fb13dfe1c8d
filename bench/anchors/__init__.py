"""Benchmark anchors measured outside the project's interpreter.

pyln-proto, Core Lightning's pure-Python BOLT #8 implementation, is the anchor for the
transport benchmarks.  It ships a fork of ``coincurve`` that would overwrite the one
trustmesh depends on, so it lives in its own venv (``<repo>/.venv-pyln``, created on first
use) and is driven through a long-lived worker process, :mod:`bench.anchors.pyln_bolt8`.

    with PylnAnchor() as anchor:
        anchor.rate("handshakes", 0.2)    # full in-memory BOLT #8 handshakes per second
        anchor.rate("messages_1k", 0.2)   # 1 KiB messages per second over loopback TCP
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

__all__ = ["PYLN_VENV", "PylnAnchor", "PylnMetric", "pyln_python"]

REPO = Path(__file__).resolve().parent.parent.parent
PYLN_VENV = REPO / ".venv-pyln"
WORKER = Path(__file__).resolve().parent / "pyln_bolt8.py"

PylnMetric = Literal["handshakes", "messages_1k"]


def _venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _base_python() -> str:
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    return str(base)


def pyln_python() -> Path:
    """The python of ``<repo>/.venv-pyln``, creating the venv and installing pyln-proto
    into it first if needed (a ``.installed`` marker skips that on later calls)."""
    python = _venv_python(PYLN_VENV)
    marker = PYLN_VENV / ".installed"
    if marker.exists() and python.exists():
        return python
    print(f"bench.anchors: creating {PYLN_VENV} with pyln-proto", file=sys.stderr)
    subprocess.run(
        [_base_python(), "-m", "venv", str(PYLN_VENV)],
        check=True,
        stdout=sys.stderr,
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "pyln-proto"],
        check=True,
        stdout=sys.stderr,
    )
    marker.write_text("pyln-proto\n")
    print("bench.anchors: pyln-proto installed", file=sys.stderr)
    return python


class PylnAnchor:
    """A pyln-proto worker process, started on ``__enter__`` (or on the first ``rate``)
    and stopped on ``__exit__`` (or ``close``)."""

    def __init__(self, *, quit_timeout: float = 10.0) -> None:
        self.quit_timeout = quit_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        if self._proc is not None:
            return
        python = pyln_python()
        # lives as long as the worker; closed in close()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            [str(python), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            cwd=WORKER.parent,
        )

    def rate(self, metric: PylnMetric | str, min_time: float) -> float:
        """Measure ``metric`` for at least ``min_time`` seconds; return its rate per second."""
        self.start()
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("pyln anchor worker is not running")
        try:
            proc.stdin.write(f"{metric} {min_time}\n")
            proc.stdin.flush()
        except OSError as exc:
            raise RuntimeError(self._failure(f"cannot write to worker: {exc}")) from exc
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(self._failure("worker closed its output"))
        try:
            return float(line)
        except ValueError:
            raise RuntimeError(self._failure(f"worker answered {line.strip()!r}")) from None

    def _failure(self, what: str) -> str:
        stderr = ""
        if self._stderr is not None:
            # pread leaves the file offset, which the worker shares, alone
            fd = self._stderr.fileno()
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            stderr = data[-20_000:].decode("utf-8", "replace")
        return f"pyln anchor ({WORKER.name}): {what}" + (
            f"\n--- worker stderr ---\n{stderr.rstrip()}" if stderr.strip() else ""
        )

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                except OSError:
                    pass  # the worker is gone already
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            try:
                proc.wait(timeout=self.quit_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
