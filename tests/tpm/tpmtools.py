"""tpm2-tools on an swtpm, for the TPM tests (not a test module: ``tests/tpm`` is on
the import path, as ``tests/cli`` is for clitools)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from trustmesh.tpm import swtpm


class Tools:
    """tpm2-tools on one swtpm, with its files in one directory."""

    def __init__(self, tpm: swtpm.Swtpm, directory: Path) -> None:
        self.tpm = tpm
        self.dir = directory
        self.env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti, "TSS2_LOG": "all+none"}

    def __call__(self, *argv: str, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            argv, cwd=self.dir, env=self.env, capture_output=True, timeout=30, check=False
        )
        # swtpm has no resource manager: a tool leaves what it loaded in the TPM's three
        # transient slots, so empty them after every command.
        subprocess.run(
            ["tpm2_flushcontext", "-t"], cwd=self.dir, env=self.env, capture_output=True,
            timeout=30, check=True,
        )  # fmt: skip
        if ok and result.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {result.stderr.decode(errors='replace')}")
        return result

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def write(self, name: str, data: bytes) -> Path:
        (self.dir / name).write_bytes(data)
        return self.dir / name
