"""The systemd units in deploy/systemd: ``systemd-analyze verify`` finds nothing to say
about them (nor about the TPM drop-in), ``systemd-analyze security`` rates them well
hardened, and their ExecStart lines, run with the environment systemd gives them (the
passphrase credential, the state directory), start the CA and a node that stop cleanly
on SIGTERM."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from catools import NODE_PASS, PASS, WAIT, succeeds
from clitools import TRUSTMESH, clean_env
from nodetools import JsonLines

from trustmesh.pki.ca import CertificateAuthority

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
CA_UNIT = "trustmesh-ca.service"
NODE_UNIT = "trustmesh-node@.service"
INSTALLED = "/opt/trustmesh/venv/bin/trustmesh"  # where the units expect trustmesh

Unit = dict[str, list[tuple[str, str]]]  # section -> (key, value), in order, repeats kept


def parse_unit(text: str) -> Unit:
    """A unit file's settings (no line continuations are used in ours)."""
    unit: Unit = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            unit.setdefault(section, [])
            continue
        key, _, value = line.partition("=")
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    (value,) = values(unit, section, key)
    return value


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """Fail, never skip, without it: scripts/dev test installs Debian's systemd package."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing; scripts/dev test installs Debian's systemd")
    return path


def installed(tmp_path: Path, name: str) -> Path:
    """The unit as it would be installed, with trustmesh where this test run has it."""
    text = (UNITS / name).read_text()
    assert INSTALLED in text
    target = tmp_path / name
    target.write_text(text.replace(INSTALLED, TRUSTMESH))
    return target


def analyze(tool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        env=clean_env(SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="cat"),
        check=False,
    )


@pytest.mark.parametrize("name", [CA_UNIT, NODE_UNIT])
def test_systemd_analyze_verify_has_nothing_to_say(
    systemd_analyze: str, tmp_path: Path, name: str
) -> None:
    unit = installed(tmp_path, name)
    # A template is verified as an instance, as systemd would run it.
    target = unit if "@." not in name else unit.with_name(name.replace("@.", "@n1."))
    if target != unit:
        shutil.copy(unit, target)
    result = analyze(systemd_analyze, "verify", target)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stderr  # no warning at all


def test_the_tpm_drop_in_verifies_with_the_node_unit(systemd_analyze: str, tmp_path: Path) -> None:
    unit = installed(tmp_path, NODE_UNIT)
    drop_ins = tmp_path / f"{NODE_UNIT}.d"
    drop_ins.mkdir()
    shutil.copy(UNITS / "trustmesh-node-tpm.conf", drop_ins / "tpm.conf")
    result = analyze(systemd_analyze, "verify", unit)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stderr
    # The drop-in is read (a key it does not know is reported) ...
    with (drop_ins / "tpm.conf").open("a") as extra:
        extra.write("NoSuchSetting=1\n")
    noticed = analyze(systemd_analyze, "verify", unit)
    assert "NoSuchSetting" in noticed.stderr, noticed.stderr
    # ... and it opens /dev/tpmrm0 alone, for the tss group.
    tpm = parse_unit((UNITS / "trustmesh-node-tpm.conf").read_text())
    assert one(tpm, "Service", "PrivateDevices") == "no"
    assert one(tpm, "Service", "DevicePolicy") == "closed"
    assert one(tpm, "Service", "DeviceAllow") == "/dev/tpmrm0 rw"
    assert one(tpm, "Service", "SupplementaryGroups") == "tss"


@pytest.mark.parametrize("name", [CA_UNIT, NODE_UNIT])
def test_systemd_analyze_security_rates_the_units_ok(
    systemd_analyze: str, tmp_path: Path, name: str
) -> None:
    unit = installed(tmp_path, name)
    target = unit if "@." not in name else unit.with_name(name.replace("@.", "@n1."))
    if target != unit:
        shutil.copy(unit, target)
    # Exposure 0.0 (locked down) to 10.0 (none): fail above 2.0 (systemd's "OK" is < 5).
    result = analyze(
        systemd_analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", target
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout


@pytest.mark.parametrize("name", [CA_UNIT, NODE_UNIT])
def test_the_units_harden_the_service(name: str) -> None:
    unit = parse_unit((UNITS / name).read_text())
    service = dict(unit["Service"])
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "User": "trustmesh",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "StateDirectoryMode": "0700",
        "UMask": "0077",
    }.items():
        assert service.get(key) == value, (key, service.get(key))
    assert "@system-service" in values(unit, "Service", "SystemCallFilter")
    assert service["StateDirectory"].startswith("trustmesh/")
    assert service["LoadCredential"].startswith("passphrase:/etc/trustmesh/")
    # No shell wrapper: trustmesh reads $CREDENTIALS_DIRECTORY/passphrase itself, and its
    # --dir is the StateDirectory (%S is /var/lib).
    command = shlex.split(service["ExecStart"])
    assert command[0] == INSTALLED, command
    assert command[command.index("--dir") + 1] == f"%S/{service['StateDirectory']}"
    assert "TRUSTMESH_PASSPHRASE" not in service["ExecStart"]
    assert service["RestartSec"] == "5s"
    assert one(unit, "Unit", "StartLimitBurst") == "5"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


# --- ExecStart, run as systemd runs it ---------------------------------------------------


def exec_start(unit: Unit, env: dict[str, str], state_root: Path, instance: str = "") -> list[str]:
    """ExecStart as systemd would exec it: split into words; the specifiers ours use
    (``%i``, ``%S`` the state root, ``%%``) expanded; a word that is ``$NAME`` alone
    replaced by NAME's value split at whitespace (no word at all when it is empty),
    ``${NAME}`` by its value; ``$$`` a literal ``$``."""
    words: list[str] = []
    for raw in shlex.split(one(unit, "Service", "ExecStart")):
        word = raw.replace("%i", instance).replace("%S", str(state_root)).replace("%%", "%")
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone is not None:
            words.extend(env.get(alone[1], "").split())
            continue
        word = re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m[1], ""), word)
        words.append(word.replace("$$", "$"))
    return words


def environment(unit: Unit) -> dict[str, str]:
    """The unit's Environment= assignments (each one a quoted word)."""
    found: dict[str, str] = {}
    for line in values(unit, "Service", "Environment"):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            found[key] = value
    return found


@contextmanager
def service(
    unit_file: Path, state: Path, passphrase: str, instance: str = "", **env: str
) -> Iterator[tuple[subprocess.Popen[str], JsonLines]]:
    """The unit's ExecStart in the environment systemd makes: the credential in
    $CREDENTIALS_DIRECTORY (mode 0400, as systemd writes it), $STATE_DIRECTORY, the
    unit's Environment=, then ``env`` (what an EnvironmentFile= would add)."""
    unit = parse_unit(unit_file.read_text().replace(INSTALLED, TRUSTMESH))
    # %S, the root of every StateDirectory=: state is StateDirectory= under it.
    state_directory = one(unit, "Service", "StateDirectory").replace("%i", instance)
    assert str(state).endswith(f"/{state_directory}"), (state, state_directory)
    state_root = Path(str(state).removesuffix(f"/{state_directory}"))
    credentials = state.parent / f"credentials-{state.name}"
    credentials.mkdir(mode=0o700)
    secret = credentials / one(unit, "Service", "LoadCredential").split(":", 1)[0]
    secret.write_text(passphrase + "\n")  # a trailing newline, as editors leave one
    secret.chmod(0o400)
    variables = clean_env(
        CREDENTIALS_DIRECTORY=str(credentials),
        STATE_DIRECTORY=str(state),
        **{**environment(unit), **env},
    )
    proc = subprocess.Popen(
        exec_start(unit, variables, state_root, instance),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=variables,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout = JsonLines(proc.stdout, f"{unit_file.name} stdout")
    stderr = JsonLines(proc.stderr, f"{unit_file.name} stderr")
    try:
        yield proc, stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        stdout.close()
        stderr.close()


def stop(proc: subprocess.Popen[str]) -> int:
    """What systemctl stop does first: the unit's KillSignal to the main process."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=WAIT)


def test_exec_start_runs_the_ca_and_a_node_with_their_credentials(tmp_path: Path) -> None:
    ca_unit = parse_unit((UNITS / CA_UNIT).read_text())
    # No flags by default: ca serve's settings are ca.toml's (ca init writes it).
    assert environment(ca_unit) == {"TRUSTMESH_CA_ARGS": ""}
    state = tmp_path / "lib"  # %S, as /var/lib
    ca_dir = state / "trustmesh" / "ca"
    CertificateAuthority.init(ca_dir, PASS.encode()).close()
    # /etc/trustmesh/ca.env would hold the flags; here: a free port, JSON lines.
    flags = "--host 127.0.0.1 --port 0 --json"
    with service(UNITS / CA_UNIT, ca_dir, PASS, TRUSTMESH_CA_ARGS=flags) as (ca, ca_out):
        listening = ca_out.wait_for(lambda line: "listening" in line, "the CA's first line")
        url = str(listening["listening"])
        context = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
        with urllib.request.urlopen(f"{url}/v1/health", context=context, timeout=WAIT) as r:
            assert json.loads(r.read())["status"] == "ok"

        # A node enrolled by its operator, then run by trustmesh-node@n1.
        token = succeeds("ca", "token", "create", "--dir", ca_dir, "--node-id", "node-1").strip()
        node_dir = state / "trustmesh" / "nodes" / "n1"
        node_dir.parent.mkdir()
        succeeds(
            *("node", "init", "--dir", node_dir, "--ca-url", url, "--ca-cert", ca_dir / "ca.crt"),
            *("--token", token, "--node-id", "node-1", "--listen", "127.0.0.1:0"),
            *("--api", "127.0.0.1:0", "--json"),
            passphrase=NODE_PASS,
        )
        node_unit = UNITS / NODE_UNIT
        with service(node_unit, node_dir, NODE_PASS, instance="n1") as (node, node_out):
            started = node_out.wait_for(lambda line: True, "the node's first line")
            assert started["event"] == "started" and started["node_id"] == "node-1", started
            assert stop(node) == 0
            node_out.wait_ended()
            assert node_out.lines[-1] == {"event": "stopped", "node_id": "node-1"}
        assert stop(ca) == 0
        ca_out.wait_ended()
        assert ca_out.lines[-1] == {"stopped": url}
