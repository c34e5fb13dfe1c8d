"""Every README command block, run as written, in order, in one shell in a temp dir.

Only the ports change (to free ones), so that the run cannot collide with anything
else on the machine; and the TPM: the README's /dev/tpmrm0 becomes a software TPM
(swtpm), with the policy file attestation.md gives for one, named by its full path.
A block preceded by ``<!-- docs-test: not run: REASON -->`` is left out, and must say
why: only the quick start, whose demo command runs on its own below (its test command
is the one running this).

The shell is bash with ``set -eu`` (no pipefail: a README pipeline is judged by its
last command, as in a reader's terminal), on a PATH without the project's venv, so
that the README's own activation line must put `trustmesh` there.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustmesh.tpm.swtpm import Swtpm

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- docs-test: not run: (?P<reason>[^>]*\S)\s*-->\s*$")
FENCE = re.compile(r"^```sh\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
# A port: after "127.0.0.1:" or "--port ". A port followed by "$i" is a prefix of ports
# (127.0.0.1:740$i is 7401, 7402 ...).
PORT = re.compile(r"(?:(?<=127\.0\.0\.1:)|(?<=--port ))(?P<port>\d+)(?P<loop>\$i)?")
ATTESTATION_DOC = README.parent / "docs" / "protocols" / "attestation.md"
TPM_DEVICE = "device:/dev/tpmrm0"
POLICY = "attestation.toml"
POLICY_OPTION = f"--attestation-policy {POLICY}"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEADLINE = 240  # seconds for the whole README: it takes about 40


@dataclass(frozen=True)
class Block:
    line: int  # where its fence opens in README.md, for messages
    body: str
    skipped: str | None  # the reason it is not run


def blocks(text: str) -> list[Block]:
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.match(before)
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(line, match["body"], skip["reason"] if skip else None))
    return found


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _unassigned_range() -> range:
    """Ports below the kernel's ephemeral range: no client connection of the run (a node
    dialling, curl) can take one of them as its source port before its server binds."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low - 10)


def port_map(script: str, rng: random.Random) -> dict[str, str]:
    """A free port for each port of the script; a prefix (740 of 740$i) gets a free
    prefix whose ports 1..9 are all free, and a port under a prefix (7401) follows it."""
    prefixes = {m["port"] for m in PORT.finditer(script) if m["loop"]}
    ports = {m["port"] for m in PORT.finditer(script) if not m["loop"]}
    span = _unassigned_range()
    taken: set[int] = set()
    mapping: dict[str, str] = {}
    for prefix in sorted(prefixes):
        while True:
            new = rng.randrange(span.start // 10, span.stop // 10)
            group = {new * 10 + digit for digit in range(10)}
            if not group & taken and all(_free(port) for port in group):
                break
        taken |= group
        mapping[prefix] = str(new)
    for port in sorted(ports):
        if port[:-1] in mapping:
            mapping[port] = mapping[port[:-1]] + port[-1]
            continue
        while (new := rng.randrange(span.start, span.stop)) in taken or not _free(new):
            pass
        taken.add(new)
        mapping[port] = str(new)
    return mapping


def with_ports(script: str, mapping: dict[str, str]) -> str:
    return PORT.sub(lambda m: mapping[m["port"]] + (m["loop"] or ""), script)


def swtpm_policy(folder: Path, tpm: Swtpm) -> None:
    """attestation.md's policy for a fresh swtpm, and the EK CA file it names."""
    examples = re.findall(r"^```toml\n(.*?)^```$", ATTESTATION_DOC.read_text(), re.M | re.S)
    example = next((e for e in examples if "require_ek = true" in e), None)
    assert example is not None, "attestation.md lost its policy example"
    (folder / POLICY).write_text(example)
    (folder / "swtpm-ek-ca.pem").write_bytes(tpm.ek_ca + tpm.ek_root)


def test_the_readme_has_blocks_and_says_why_it_skips_any() -> None:
    found = blocks(README.read_text())
    assert len(found) >= 10
    skipped = [b for b in found if b.skipped]
    assert len(skipped) <= 1, [b.line for b in skipped]  # the quick start: CI runs it


def test_the_quick_start_demo_runs_and_says_how_to_get_trustmesh_on_path() -> None:
    quick = blocks(README.read_text())[0]
    assert quick.skipped is not None
    assert quick.body.splitlines() == ["scripts/dev demo", "scripts/dev test"]
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("\nscripts/dev test")
    # As a newcomer runs it: from the repository, trustmesh not on PATH. The package is
    # installed already (scripts/dev test did it), so this is the demo and its last line.
    result = subprocess.run(
        ["scripts/dev", "demo", "--nodes", "3"],
        cwd=ROOT,
        env={"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/"), "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "steps passed" in result.stdout
    assert "run `source .venv/bin/activate` to put it on PATH" in result.stderr


def test_ports_are_all_changed_and_kept_consistent() -> None:
    script = "curl https://127.0.0.1:8443/x\n--listen 127.0.0.1:740$i --bootstrap 127.0.0.1:7401\n"
    script += "serve --port 8443\n"
    mapping = port_map(script, random.Random(1))
    out = with_ports(script, mapping)
    assert "8443" not in out and "740$i" not in out and "7401" not in out
    prefix = mapping["740"]
    assert f"127.0.0.1:{prefix}$i" in out and f"127.0.0.1:{prefix}1" in out
    assert out.count(mapping["8443"]) == 2


@pytest.mark.timeout(DEADLINE + 30)
def test_every_readme_block_runs_in_order(tmp_path: Path) -> None:
    runnable = [b for b in blocks(README.read_text()) if b.skipped is None]
    script = "\n".join(f": README.md line {b.line}\n{b.body}" for b in runnable)
    script = with_ports(script, port_map(script, random.Random()))
    assert TPM_DEVICE in script and POLICY_OPTION in script
    tpm = Swtpm.start(tmp_path / "swtpm")
    try:
        swtpm_policy(tmp_path, tpm)
        script = script.replace(TPM_DEVICE, tpm.tcti)
        # The README works in a scratch directory of its own: the policy is where we made it.
        script = script.replace(POLICY_OPTION, f"--attestation-policy {tmp_path / POLICY}")
        _run(tmp_path, script)
    finally:
        tpm.stop()


def _run(tmp_path: Path, script: str) -> None:
    prologue = (
        "set -eu\n"
        "trap 'echo \"README command failed (exit $?): $BASH_COMMAND\" >&2' ERR\n"
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"  # servers of a failed block
        "PS4='+ ${EPOCHREALTIME} '\n"  # the trace says when each command started
        "set -x\n"
    )
    (tmp_path / "readme.sh").write_text(prologue + script + "\n")
    # The README's `source .venv/bin/activate` runs in the repository: here, the same venv.
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),
    }
    with subprocess.Popen(
        ["bash", "readme.sh"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its background servers too: stopped below, whatever happens
    ) as process:
        try:
            output, _ = process.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"the README did not finish in {DEADLINE} s:\n{output[-6000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # what a failed block left running
    assert process.returncode == 0, f"a README command failed:\n{output[-8000:]}"
