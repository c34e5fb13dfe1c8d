"""The ``trustmesh`` command line: exit codes, output, key files, errors."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from clitools import TRUSTMESH, clean_env
from cryptography import x509

import trustmesh
import trustmesh.cli.main as cli_main
from trustmesh.crypto.keys import KeyKind, PublicKey
from trustmesh.keystore import PASSPHRASE_ENV, load_key_file, use_passphrase_file
from trustmesh.pki.extensions import attested_platform_of
from trustmesh.tpm import swtpm

ALL_KINDS = [k.value for k in KeyKind]
HEX_LENGTH = {"secp256k1": 66, "p256": 66, "ed25519": 64}
PEER_ID_PREFIX = {"secp256k1": "16Uiu2", "ed25519": "12D3KooW", "p256": "Qm"}


class _NoTTY:
    """A stdin that is not a terminal, so nothing ever prompts."""

    def isatty(self) -> bool:
        return False

    def read(self, *args: object) -> str:
        raise AssertionError("the CLI tried to read stdin")

    readline = read


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.delenv("TRUSTMESH_DEBUG", raising=False)
    monkeypatch.setattr("sys.stdin", _NoTTY())


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop anything earlier
    with pytest.raises(SystemExit) as info:
        cli_main.main(argv)
    code = info.value.code
    out, err = capsys.readouterr()
    return (0 if code is None else int(code)), out, err


def assert_one_line_failure(code: int, out: str, err: str) -> None:
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trustmesh: error: ")
    assert "Traceback" not in err


def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[list[str]]:
    yield list(path)
    if isinstance(command, click.Group):  # through get_command: the root group loads lazily
        context = click.Context(command)
        for name in sorted(command.list_commands(context)):
            sub = command.get_command(context, name)
            assert sub is not None
            yield from _command_paths(sub, (*path, name))


COMMAND_PATHS = list(_command_paths(cli_main.cli))


def _generate(
    capsys: pytest.CaptureFixture[str], kind: str, out: Path, *extra: str
) -> dict[str, object]:
    code, stdout, err = run(
        ["keys", "generate", "--type", kind, "--out", str(out), "--json", *extra], capsys
    )
    assert (code, err) == (0, ""), err
    assert stdout.count("\n") == 1  # one JSON object on one line
    info = json.loads(stdout)
    assert isinstance(info, dict)
    return info


# --- version and help ------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--version", "-V"):
        code, out, err = run([flag], capsys)
        assert code == 0
        assert trustmesh.__version__ in out
        assert out.startswith("trustmesh")
        assert err == ""


def test_command_tree_is_complete() -> None:
    assert ["keys", "generate"] in COMMAND_PATHS
    assert ["keys", "show"] in COMMAND_PATHS
    assert ["demo"] in COMMAND_PATHS
    for path in (["ca", "serve"], ["ca", "token", "create"], ["enroll"], ["rotate"]):
        assert path in COMMAND_PATHS


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "trustmesh")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_everywhere(capsys: pytest.CaptureFixture[str], path: list[str], flag: str) -> None:
    code, out, err = run([*path, flag], capsys)
    assert code == 0, (out, err)
    assert "Usage" in out
    assert f"trustmesh {' '.join(path)}".strip() in out
    assert err == ""


def test_group_without_command_shows_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["keys"], capsys)
    assert code in (0, 2)
    assert "Usage" in out + err
    assert "generate" in out + err


# --- keys generate / show ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_generate_plaintext_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = tmp_path / "node.key"
    info = _generate(capsys, kind, out, "--no-encrypt")
    assert info["type"] == kind
    assert info["encrypted"] is False
    assert info["path"] == str(out)
    public_hex = info["public_key"]
    assert isinstance(public_hex, str)
    assert len(public_hex) == HEX_LENGTH[kind]
    assert public_hex == public_hex.lower()
    public = PublicKey.from_bytes(KeyKind(kind), bytes.fromhex(public_hex))
    assert info["peer_id"] == str(public.peer_id())
    assert str(info["peer_id"]).startswith(PEER_ID_PREFIX[kind])
    # the file holds that very key, unencrypted, mode 0600
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_key_file(out).public_key() == public


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_show_matches_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = tmp_path / "node.key"
    generated = _generate(capsys, kind, out, "--no-encrypt")
    code, stdout, err = run(["keys", "show", str(out), "--json"], capsys)
    assert (code, err) == (0, "")
    shown = json.loads(stdout)
    for field in ("type", "public_key", "peer_id"):
        assert shown[field] == generated[field]
    assert shown["path"] == str(out)


def test_human_readable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "node.key"
    code, stdout, _ = run(
        ["keys", "generate", "--type", "ed25519", "--out", str(out), "--no-encrypt"], capsys
    )
    assert code == 0
    fields = dict(line.split(None, 1) for line in stdout.splitlines())
    assert fields["type"] == "ed25519"
    assert fields["encrypted"] == "no"  # not Python's False
    assert len(fields["public_key"]) == 64
    code, shown, _ = run(["keys", "show", str(out)], capsys)
    assert code == 0
    assert dict(line.split(None, 1) for line in shown.splitlines())["peer_id"] == fields["peer_id"]


def test_generate_and_show_encrypted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "cli passphrase")
    out = tmp_path / "enc.key"
    generated = _generate(capsys, "secp256k1", out)
    assert generated["encrypted"] is True
    assert out.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    code, stdout, err = run(["keys", "show", str(out), "--json"], capsys)
    assert (code, err) == (0, "")
    shown = json.loads(stdout)
    assert (shown["type"], shown["public_key"], shown["peer_id"]) == (
        generated["type"],
        generated["public_key"],
        generated["peer_id"],
    )
    assert load_key_file(out, b"cli passphrase").public_key().hex() == generated["public_key"]


@pytest.fixture
def encrypted_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Path:
    out = tmp_path / "enc.key"
    monkeypatch.setenv(PASSPHRASE_ENV, "right")
    _generate(capsys, "ed25519", out)
    monkeypatch.delenv(PASSPHRASE_ENV)
    return out


def test_wrong_passphrase(
    encrypted_key: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    code, out, err = run(["keys", "show", str(encrypted_key)], capsys)
    assert_one_line_failure(code, out, err)
    assert "passphrase" in err


def test_missing_passphrase_without_terminal(
    encrypted_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["keys", "show", str(encrypted_key), "--json"], capsys)
    assert_one_line_failure(code, out, err)
    assert PASSPHRASE_ENV in err


def test_generate_encrypted_without_passphrase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k.key"
    code, stdout, err = run(["keys", "generate", "--type", "p256", "--out", str(out)], capsys)
    assert_one_line_failure(code, stdout, err)
    assert PASSPHRASE_ENV in err
    assert not out.exists()


def test_debug_prints_traceback(
    encrypted_key: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    code, out, err = run(["--debug", "keys", "show", str(encrypted_key)], capsys)
    assert code == 1
    assert out == ""
    assert "Traceback" in err
    assert "PassphraseError" in err
    assert err.rstrip().splitlines()[-1].startswith("trustmesh: error: ")


def test_debug_from_environment(
    encrypted_key: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    monkeypatch.setenv("TRUSTMESH_DEBUG", "1")
    code, _, err = run(["keys", "show", str(encrypted_key)], capsys)
    assert code == 1
    assert "Traceback" in err


@pytest.fixture
def _root_log_level() -> Iterator[None]:
    """--debug lowers the root logger's level for the run: put it back for later tests."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


@pytest.mark.usefixtures("_root_log_level")
@pytest.mark.parametrize(
    "where",
    [
        ["--debug", "keys", "show", "FILE"],
        ["keys", "--debug", "show", "FILE"],
        ["keys", "show", "--debug", "FILE"],
        ["keys", "show", "FILE", "--debug"],
    ],
    ids=["before", "after-group", "after-command", "last"],
)
def test_debug_is_accepted_anywhere(
    encrypted_key: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: list[str],
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    argv = [str(encrypted_key) if arg == "FILE" else arg for arg in where]
    code, out, err = run(argv, capsys)
    assert code == 1, err
    assert out == ""
    assert "Traceback" in err
    assert "PassphraseError" in err


def test_debug_is_in_every_command_s_help(capsys: pytest.CaptureFixture[str]) -> None:
    for path in (["keys", "show"], ["node", "run"], ["ca", "token", "create"], ["demo"]):
        code, out, _ = run([*path, "--help"], capsys)
        assert code == 0
        assert "--debug" in out, path


def test_ctrl_c_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    # Wherever Ctrl-C lands in a command (here: making the key), click turns it into
    # Abort; the exit code is still the shell's 130, not a failure's 1.
    monkeypatch.setattr("trustmesh.cli.keys.generate_signer", interrupted)
    out = tmp_path / "k.key"
    code, stdout, err = run(
        ["keys", "generate", "--type", "ed25519", "--out", str(out), "--no-encrypt"], capsys
    )
    assert code == 130  # 128 + SIGINT; it was 1, a failure
    assert stdout == ""
    assert err.strip().splitlines()[-1] == "trustmesh: interrupted"


def test_node_init_refuses_one_address_for_links_and_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before any enrollment: the CA URL goes nowhere, and the token stays unspent.
    ca_cert = tmp_path / "ca.crt"
    ca_cert.write_text("unused")
    directory = tmp_path / "n1"
    code, out, err = run(
        [
            *("node", "init", "--dir", str(directory), "--node-id", "node-1"),
            *("--ca-url", "https://127.0.0.1:1", "--ca-cert", str(ca_cert), "--token", "t"),
            *("--listen", "127.0.0.1:7400", "--api", "127.0.0.1:7400", "--no-encrypt"),
        ],
        capsys,
    )
    assert_one_line_failure(code, out, err)
    assert "listen (127.0.0.1:7400) and api (127.0.0.1:7400) need different ports" in err
    assert not directory.exists()


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_world_readable_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    out = tmp_path / "k.key"
    _generate(capsys, "ed25519", out, "--no-encrypt")
    out.chmod(mode)
    code, stdout, err = run(["keys", "show", str(out)], capsys)
    assert_one_line_failure(code, stdout, err)
    assert "chmod 600" in err


@pytest.mark.parametrize(
    ("content", "name"),
    [(b"garbage\n", "garbage.key"), (b"", "empty.key"), (b"x" * 70_000, "huge.key")],
)
def test_bad_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, name: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(0o600)
    code, out, err = run(["keys", "show", str(path)], capsys)
    assert_one_line_failure(code, out, err)
    assert str(path) in err


def test_missing_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["keys", "show", str(tmp_path / "absent.key")], capsys)
    assert_one_line_failure(code, out, err)


def test_unknown_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.key"
    code, stdout, err = run(
        ["keys", "generate", "--type", "rsa", "--out", str(out), "--no-encrypt"], capsys
    )
    assert code == 2
    assert stdout == ""
    assert "rsa" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["keys", "generate", "--type", "ed25519"], "Missing option '--out'"),
        (["keys", "generate", "--out", "k.key"], "Missing option '--type'"),
        (["keys", "show"], "Missing argument 'FILE'"),
        (["keys", "generate", "--type"], "requires an argument"),
    ],
)
def test_missing_required_option(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    complaint: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert complaint in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_command_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["frobnicate"], capsys)[0] == 2
    assert run(["keys", "show", "--frobnicate"], capsys)[0] == 2


def test_generate_refuses_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.key"
    first = _generate(capsys, "secp256k1", out, "--no-encrypt")
    before = out.read_bytes()
    code, stdout, err = run(
        ["keys", "generate", "--type", "secp256k1", "--out", str(out), "--no-encrypt"], capsys
    )
    assert_one_line_failure(code, stdout, err)
    assert "exists" in err
    assert out.read_bytes() == before
    assert load_key_file(out).public_key().hex() == first["public_key"]


def test_generate_refuses_existing_file_encrypted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("not a key, but still not to be clobbered")
    monkeypatch.setenv(PASSPHRASE_ENV, "pw")
    code, stdout, err = run(["keys", "generate", "--type", "p256", "--out", str(out)], capsys)
    assert_one_line_failure(code, stdout, err)
    assert out.read_text() == "not a key, but still not to be clobbered"


# --- demo ------------------------------------------------------------------------------------


MESH_STEPS = [
    "ca and enrollment",
    "tpm identity",
    "mesh forms",
    "anomaly gossip",
    "store and forward",
    "revocation",
    "clean shutdown",
]


def _assert_mesh_demo(result: dict[str, Any], *, tpm: bool = True) -> list[dict[str, Any]]:
    """A passing mesh demo's JSON: ok, the steps in order, each fully reported; with
    ``tpm``, node-3 on a TPM (swtpm), attested (swtpm is installed where tests run:
    scripts/dev test installs it)."""
    assert result["ok"] is True, result
    steps: list[dict[str, Any]] = result["steps"]
    assert [step["name"] for step in steps] == MESH_STEPS
    for step in steps:
        assert step["ok"] is True, step
        seconds = step["seconds"]
        assert isinstance(seconds, int | float) and not isinstance(seconds, bool), step
        assert seconds >= 0
        assert isinstance(step["detail"], str) and step["detail"], step
    device = steps[1]
    if not tpm:
        assert device["tpm"] is False, device
        assert device["detail"] == "no swtpm: every node keeps its key in a file"
        assert "tpm_message_id" not in steps[3]
        return steps
    assert swtpm.available(), "swtpm is not installed; scripts/dev test installs it"
    assert device["tpm"] is True, device
    assert device["node"] == "node-3"
    assert device["identity_key"].startswith("tpm:swtpm:host=127.0.0.1,port="), device
    assert device["identity_key"].endswith(";handle=0x81000100"), device
    assert (device["device_class"], device["pcrs"]) == ("swtpm", list(range(8)))
    assert device["detail"].startswith("node-3: identity key in a TPM (swtpm"), device
    assert "attested: PCRs 0-7, AK tied to EK" in device["detail"], device
    # The TPM-signed anomaly reached every node, as node-1's did.
    gossip = steps[3]
    assert gossip["tpm_message_id"] != gossip["message_id"]
    assert "node-3's anomaly, signed in its TPM, reached every node too" in gossip["detail"]
    return steps


def _processes_under(directory: Path) -> list[str]:
    """The command lines of running processes that name ``directory`` (a swtpm's state)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # it exited meanwhile
        text = " ".join(a.decode(errors="replace") for a in args)
        if str(directory) in text:
            found.append(text)
    return found


def test_demo_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["demo", "--json"], capsys)
    assert code == 0, err
    steps = _assert_mesh_demo(json.loads(out))
    assert len(steps[0]["serials"]) == 5  # five nodes by default


def test_demo_keep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keep = tmp_path / "demo"
    code, out, _ = run(["demo", "--keep", str(keep)], capsys)
    assert code == 0
    assert "7/7 steps passed" in out
    said = [" ".join(line.split()) for line in out.splitlines() if "tpm identity" in line]
    assert len(said) == 1, out
    assert said[0].startswith("ok tpm identity node-3: identity key in a TPM (swtpm"), said
    nodes = [f"node-{i}" for i in range(1, 6)]
    assert sorted(f.name for f in keep.iterdir()) == ["ca", *nodes, "swtpm"]
    assert _processes_under(keep) == []  # the demo stopped its swtpm
    # node-3 enrolled with its identity in the TPM and a quote under the CA's policy.
    recorded = json.loads((keep / "node-3" / "enrollment.json").read_text())
    assert recorded["identity_key"].startswith("tpm:swtpm:"), recorded
    assert recorded["attest"].startswith("tpm:swtpm:"), recorded
    assert (keep / "ca" / "attestation.toml").is_file()
    for name in nodes:
        leaf = x509.load_pem_x509_certificates((keep / name / "node.crt").read_bytes())[0]
        assert (attested_platform_of(leaf) is not None) == (name == "node-3"), name
    ca = keep / "ca"
    assert (ca / "ca.crt").is_file()
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in ca.glob("*.key"))
    assert len(list(ca.glob("*.key"))) == 2  # the root and the issuing CA
    for name in nodes:
        node_dir = keep / name
        assert stat.S_IMODE((node_dir / "node.key").stat().st_mode) == 0o600, name
        assert (node_dir / "node.crt").is_file(), name
        assert (node_dir / "mesh.db").is_file(), name
        assert not (node_dir / "run.json").exists(), name  # every node stopped


@pytest.fixture
def _forget_passphrase_file() -> Iterator[None]:
    """A run's --passphrase-file stays set in the process until the next run: unset it."""
    yield
    use_passphrase_file(None)


@pytest.mark.usefixtures("_forget_passphrase_file")
def test_demo_keep_prints_the_ca_passphrase_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = tmp_path / "demo"
    code, out, _ = run(["demo", "--nodes", "3", "--keep", str(keep)], capsys)
    assert code == 0, out
    said = [line for line in out.splitlines() if line.startswith("The CA is in")]
    prefix = f"The CA is in {keep / 'ca'}; the passphrase of its keys is "
    assert len(said) == 1 and said[0].startswith(prefix), out
    secret = said[0].removeprefix(prefix)
    assert len(secret) >= 20 and out.count(secret) == 1  # printed once
    # It is the passphrase: it opens the CA's keys, and the CA commands take it.
    load_key_file(keep / "ca" / "issuing.key", secret.encode())
    (tmp_path / "pass").write_text(secret + "\n")
    (tmp_path / "pass").chmod(0o600)
    listed = run(
        ["ca", "list", "--dir", str(keep / "ca"), "--passphrase-file", str(tmp_path / "pass")],
        capsys,
    )
    assert listed[0] == 0, listed[2]
    assert "node-1" in listed[1]


@pytest.mark.usefixtures("_forget_passphrase_file")
def test_demo_keep_json_reports_the_passphrase_or_takes_a_passphrase_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = tmp_path / "made"
    code, out, _ = run(["demo", "--nodes", "3", "--json", "--keep", str(keep)], capsys)
    assert code == 0, out
    report = json.loads(out)
    assert report["ok"] is True
    assert report["ca_dir"] == str(keep / "ca")
    assert report["ca_passphrase_source"] == "generated"
    load_key_file(keep / "ca" / "root.key", report["ca_passphrase"].encode())

    given = tmp_path / "given"
    secret = tmp_path / "secret"
    secret.write_text("the operator's own passphrase\n")
    secret.chmod(0o600)
    argv = ["demo", "--nodes", "3", "--json", "--keep", str(given), "--passphrase-file"]
    code, out, _ = run([*argv, str(secret)], capsys)
    assert code == 0, out
    report = json.loads(out)
    assert report["ca_passphrase"] is None  # the operator's: never printed
    assert report["ca_passphrase_source"] == f"--passphrase-file {secret}"
    assert "operator" not in out
    load_key_file(given / "ca" / "issuing.key", b"the operator's own passphrase")


def test_demo_node_count_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    for count in ("2", "201", "x"):
        code, out, err = run(["demo", "--nodes", count, "--json"], capsys)
        assert code == 2, (count, err)
        assert out == ""
        assert "--nodes" in err
        assert "Traceback" not in err


# --- as a real process -----------------------------------------------------------------------


def _run_process(
    args: list[str], *, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``trustmesh`` with ``args``, no stdin, and only ``env`` set."""
    return subprocess.run(
        [TRUSTMESH, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=clean_env(**env),
        stdin=subprocess.DEVNULL,
    )


def test_subprocess_version() -> None:
    result = _run_process(["--version"])
    assert result.returncode == 0
    assert trustmesh.__version__ in result.stdout


def test_subprocess_generate_show_and_failure(tmp_path: Path) -> None:
    out = tmp_path / "proc.key"
    generated = _run_process(
        ["keys", "generate", "--type", "ed25519", "--out", str(out), "--json"],
        TRUSTMESH_PASSPHRASE="proc pass",
    )
    assert generated.returncode == 0, generated.stderr
    info = json.loads(generated.stdout)
    shown = _run_process(["keys", "show", str(out), "--json"], TRUSTMESH_PASSPHRASE="proc pass")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["peer_id"] == info["peer_id"]
    wrong = _run_process(["keys", "show", str(out)], TRUSTMESH_PASSPHRASE="nope")
    assert wrong.returncode == 1
    assert wrong.stdout == ""
    assert len(wrong.stderr.splitlines()) == 1
    assert "Traceback" not in wrong.stderr
    debug = _run_process(
        ["keys", "show", str(out)], TRUSTMESH_PASSPHRASE="nope", TRUSTMESH_DEBUG="1"
    )
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr


def test_subprocess_usage_error() -> None:
    result = _run_process(["keys", "generate", "--type", "dsa", "--out", "x"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_subprocess_demo_three_nodes() -> None:
    started = time.monotonic()
    result = _run_process(["demo", "--nodes", "3", "--json"], timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 60
    steps = _assert_mesh_demo(json.loads(result.stdout))
    assert sorted(steps[0]["serials"]) == ["node-1", "node-2", "node-3"]
    assert "Traceback" not in result.stderr


def test_subprocess_demo_without_swtpm_keeps_every_key_in_a_file(tmp_path: Path) -> None:
    # A PATH without swtpm (only the venv's scripts): the demo says so in one line and
    # runs as before.
    keep = tmp_path / "demo"
    path = str(Path(TRUSTMESH).parent)
    result = _run_process(["demo", "--nodes", "3", "--keep", str(keep)], timeout=60, PATH=path)
    assert result.returncode == 0, result.stderr
    said = [" ".join(line.split()) for line in result.stdout.splitlines() if "swtpm" in line]
    assert said == ["ok tpm identity no swtpm: every node keeps its key in a file"]
    assert "7/7 steps passed" in result.stdout
    assert sorted(f.name for f in keep.iterdir()) == ["ca", "node-1", "node-2", "node-3"]
    for node in ("node-1", "node-2", "node-3"):
        assert "identity_key" not in json.loads((keep / node / "enrollment.json").read_text())
    result = _run_process(["demo", "--nodes", "3", "--json"], timeout=60, PATH=path)
    assert result.returncode == 0, result.stderr
    _assert_mesh_demo(json.loads(result.stdout), tpm=False)


def test_demo_fails_when_a_step_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keep = tmp_path / "demo"
    assert run(["demo", "--tour", "--keep", str(keep)], capsys)[0] == 0
    # The key files exist now, and a key is never overwritten: the first step fails,
    # the steps that need its keys fail too, and the exit code says so.
    code, out, _ = run(["demo", "--tour", "--json", "--keep", str(keep)], capsys)
    assert code == 1
    result = json.loads(out)
    assert result["ok"] is False
    status = {step["name"]: step["ok"] for step in result["steps"]}
    assert status == {
        "key files": False,
        "peer ids": False,
        "signatures": False,
        "ecdh": True,
        "botd channel": True,
        "psec channel": True,
        "psec quic channel": True,
    }
    assert "already exists" in result["steps"][0]["detail"]
    code, out, _ = run(["demo", "--tour", "--keep", str(keep)], capsys)
    assert code == 1
    assert "FAIL key files" in out
    assert "4/7 steps passed" in out
