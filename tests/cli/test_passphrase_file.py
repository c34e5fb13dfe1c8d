"""``--passphrase-file`` on every command, and systemd's ``$CREDENTIALS_DIRECTORY``.

Passphrases come from --passphrase-file, then $TRUSTMESH_PASSPHRASE, then
$CREDENTIALS_DIRECTORY/passphrase, then the terminal. The file is read once, loses one
trailing newline, and is refused when group or others may read it (a systemd credential
only when others may: systemd hands it to the service's user with an ACL, which shows as
group bits). Each passphrase user is run with the flag before and after its subcommand.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from clitools import TRUSTMESH, clean_env
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import trustmesh.cli.main as cli_main
from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.errors import PassphraseError, PassphraseFileError
from trustmesh.keystore.filestore import (
    CREDENTIALS_ENV,
    PASSPHRASE_ENV,
    configured_passphrase,
    read_passphrase_file,
    save_key_file,
    use_passphrase_file,
)
from trustmesh.node.config import NodeConfig, write_config
from trustmesh.pki.ca import CertificateAuthority

SECRET = "correct horse battery staple"
OTHER = "a wrong passphrase"
CA_PASS = "the CA's passphrase"


class _NoTTY:
    """A stdin that is not a terminal, so nothing ever prompts."""

    def isatty(self) -> bool:
        return False

    def read(self, *args: object) -> str:
        raise AssertionError("the CLI tried to read stdin")

    readline = read


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    monkeypatch.delenv("TRUSTMESH_DEBUG", raising=False)
    monkeypatch.setattr("sys.stdin", _NoTTY())
    use_passphrase_file(None)
    yield
    use_passphrase_file(None)  # no passphrase file leaks into the next test


def run(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli_main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return (0 if info.value.code is None else int(info.value.code)), out, err


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 1, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trustmesh: error: "), err
    return lines[0]


@pytest.fixture
def encrypted_key(tmp_path: Path) -> Path:
    path = tmp_path / "node.key"
    save_key_file(PrivateKey.generate(KeyKind.ED25519), path, SECRET.encode())
    return path


@pytest.fixture
def passphrase(tmp_path: Path) -> Path:
    return secret_file(tmp_path / "passphrase", SECRET + "\n")  # as `echo` leaves it


def placed(where: str, command: list[str | Path], flag: list[str | Path]) -> list[str | Path]:
    """``command`` with ``flag`` first, after the first word (a group), or last."""
    if where == "before":
        return [*flag, *command]
    if where == "after-group":
        return [command[0], *flag, *command[1:]]
    return [*command, *flag]


WHERE = ["before", "after-group", "last"]


# --- keys show: a key file's passphrase -------------------------------------------------


@pytest.mark.parametrize("where", WHERE)
def test_keys_show_reads_the_passphrase_file_before_or_after_the_subcommand(
    encrypted_key: Path, passphrase: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    argv = placed(
        where, ["keys", "show", encrypted_key, "--json"], ["--passphrase-file", passphrase]
    )
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads(out)["type"] == "ed25519"


def test_without_any_source_the_error_names_the_flag(
    encrypted_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_line_error(*run(["keys", "show", encrypted_key], capsys))
    assert "--passphrase-file" in line and PASSPHRASE_ENV in line


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_file_that_group_or_others_may_read_is_refused(
    encrypted_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    loose = secret_file(tmp_path / "loose", SECRET, mode)
    line = one_line_error(*run(["keys", "show", encrypted_key, "--passphrase-file", loose], capsys))
    assert str(loose) in line
    assert f"{mode:04o}" in line
    assert f"chmod 600 {loose}" in line


def test_a_missing_or_empty_file_is_an_error_naming_it(
    encrypted_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    line = one_line_error(
        *run(["keys", "show", encrypted_key, "--passphrase-file", missing], capsys)
    )
    assert f"{missing}: no such passphrase file" in line
    empty = secret_file(tmp_path / "empty", "\n")
    line = one_line_error(*run(["keys", "show", encrypted_key, "--passphrase-file", empty], capsys))
    assert str(empty) in line and "empty" in line
    with pytest.raises(PassphraseFileError) as info:
        read_passphrase_file(tmp_path)  # a directory
    assert info.value.path == tmp_path


def test_the_file_is_not_read_when_no_passphrase_is_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.key"
    save_key_file(PrivateKey.generate(KeyKind.ED25519), plain, None)
    missing = tmp_path / "nowhere"
    code, out, err = run(["--passphrase-file", missing, "keys", "show", plain, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["type"] == "ed25519"


def test_one_trailing_newline_is_dropped_and_no_more(
    encrypted_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, text in (("bare", SECRET), ("lf", SECRET + "\n"), ("crlf", SECRET + "\r\n")):
        path = secret_file(tmp_path / name, text)
        code, _, err = run(["keys", "show", encrypted_key, "--passphrase-file", path], capsys)
        assert code == 0, (name, err)
    two = secret_file(tmp_path / "two", SECRET + "\n\n")  # the second is the passphrase's
    one_line_error(*run(["keys", "show", encrypted_key, "--passphrase-file", two], capsys))


def test_the_file_is_read_once(tmp_path: Path) -> None:
    path = secret_file(tmp_path / "passphrase", SECRET)
    use_passphrase_file(path)
    first = configured_passphrase()
    assert first is not None and first.value == SECRET.encode()
    assert first.source == f"--passphrase-file {path}"
    path.write_text(OTHER)  # changed behind our back: the passphrase read stays
    again = configured_passphrase()
    assert again is not None and again.value == SECRET.encode()
    use_passphrase_file(path)  # a new run reads it again
    changed = configured_passphrase()
    assert changed is not None and changed.value == OTHER.encode()


# --- $CREDENTIALS_DIRECTORY and the order ----------------------------------------------


def credentials(tmp_path: Path, text: str, mode: int = 0o400) -> Path:
    """A credentials directory as systemd makes it (the file 0400, or 0440 with an ACL)."""
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret_file(directory / "passphrase", text + "\n", mode)
    return directory


@pytest.mark.parametrize("mode", [0o400, 0o440])
def test_credentials_directory_passphrase_is_used(
    encrypted_key: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    mode: int,
) -> None:
    monkeypatch.setenv(CREDENTIALS_ENV, str(credentials(tmp_path, SECRET, mode)))
    code, out, err = run(["keys", "show", encrypted_key, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["type"] == "ed25519"
    found = configured_passphrase()
    assert found is not None and found.source == "$CREDENTIALS_DIRECTORY/passphrase"


def test_a_credential_others_may_read_is_refused(
    encrypted_key: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = credentials(tmp_path, SECRET, 0o444)
    monkeypatch.setenv(CREDENTIALS_ENV, str(directory))
    line = one_line_error(*run(["keys", "show", encrypted_key], capsys))
    assert str(directory / "passphrase") in line and "0444" in line


def test_a_credentials_directory_without_a_passphrase_falls_through(
    encrypted_key: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = tmp_path / "other-credentials"
    other.mkdir()
    monkeypatch.setenv(CREDENTIALS_ENV, str(other))
    line = one_line_error(*run(["keys", "show", encrypted_key], capsys))
    assert "a passphrase is needed" in line  # then the terminal, which there is not


def test_precedence_file_then_environment_then_credentials(
    encrypted_key: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    right = secret_file(tmp_path / "right", SECRET)
    wrong = secret_file(tmp_path / "wrong", OTHER)
    show: list[str | Path] = ["keys", "show", encrypted_key, "--json"]

    # --passphrase-file wins over $TRUSTMESH_PASSPHRASE and the credential ...
    monkeypatch.setenv(PASSPHRASE_ENV, OTHER)
    monkeypatch.setenv(CREDENTIALS_ENV, str(credentials(tmp_path, OTHER)))
    assert run([*show, "--passphrase-file", right], capsys)[0] == 0
    one_line_error(*run([*show, "--passphrase-file", wrong], capsys))

    # ... $TRUSTMESH_PASSPHRASE over the credential ...
    monkeypatch.setenv(PASSPHRASE_ENV, SECRET)
    assert run(show, capsys)[0] == 0
    monkeypatch.setenv(PASSPHRASE_ENV, OTHER)
    monkeypatch.setenv(CREDENTIALS_ENV, str(credentials(tmp_path / "c2", SECRET)))
    one_line_error(*run(show, capsys))

    # ... and the credential alone serves.
    monkeypatch.delenv(PASSPHRASE_ENV)
    assert run(show, capsys)[0] == 0
    # An empty $TRUSTMESH_PASSPHRASE is an error, not a fall-through.
    monkeypatch.setenv(PASSPHRASE_ENV, "")
    with pytest.raises(PassphraseError, match="set but empty"):
        configured_passphrase()


def test_the_last_passphrase_file_given_wins(
    encrypted_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    right = secret_file(tmp_path / "right", SECRET)
    wrong = secret_file(tmp_path / "wrong", OTHER)
    argv: list[str | Path] = ["--passphrase-file", wrong, "keys", "show", encrypted_key]
    assert run([*argv, "--passphrase-file", right], capsys)[0] == 0
    # Each run starts afresh: the file of the run before does not linger.
    one_line_error(*run(["keys", "show", encrypted_key], capsys))


# --- the CA's passphrase: ca token create -----------------------------------------------


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, CA_PASS.encode()).close()
    return directory


@pytest.mark.parametrize("where", [*WHERE, "after-subgroup"])
def test_ca_token_create_reads_the_passphrase_file(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    ca_pass = secret_file(tmp_path / "ca.passphrase", CA_PASS + "\n")
    command: list[str | Path] = ["ca", "token", "create", "--dir", ca_dir, "--node-id", "n1"]
    flag: list[str | Path] = ["--passphrase-file", ca_pass]
    if where == "after-subgroup":
        argv = [*command[:2], *flag, *command[2:]]
    else:
        argv = placed(where, command, flag)
    code, out, err = run([*argv, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["node_id"] == "n1"


def test_ca_commands_refuse_a_readable_passphrase_file(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loose = secret_file(tmp_path / "ca.passphrase", CA_PASS, 0o644)
    line = one_line_error(*run(["ca", "list", "--dir", ca_dir, "--passphrase-file", loose], capsys))
    assert str(loose) in line and "0644" in line


# --- the node's passphrase: node bundle send on a stopped node --------------------------


@pytest.fixture
def node_dir(ca_dir: Path, tmp_path: Path) -> Path:
    """A stopped node's directory, its node.key encrypted with SECRET."""
    directory = tmp_path / "node-1"
    directory.mkdir(mode=0o700)
    key = PrivateKey.generate(KeyKind.P256)
    save_key_file(key, directory / "node.key", SECRET.encode())
    csr = x509.load_pem_x509_csr(make_csr(key, "node-1").encode())
    with CertificateAuthority(ca_dir, CA_PASS.encode()) as ca:
        leaf = ca.issue(csr, "node-1")
        chain = leaf.public_bytes(Encoding.PEM) + ca.issuing_cert.public_bytes(Encoding.PEM)
        (directory / "node.crt").write_bytes(chain)
        (directory / "ca.crt").write_bytes(ca.root_cert.public_bytes(Encoding.PEM))
    config = NodeConfig("node-1", "https://127.0.0.1:8443", "127.0.0.1:0", "127.0.0.1:0")
    write_config(directory, config)
    return directory


@pytest.mark.parametrize("where", [*WHERE, "after-subgroup"])
def test_node_bundle_send_reads_the_node_key_passphrase_file(
    node_dir: Path, passphrase: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    command: list[str | Path] = ["node", "bundle", "send", "--dir", node_dir]
    command += ["--to", "node-2", "--ttl", "10m", "--data", "hello", "--json"]
    flag: list[str | Path] = ["--passphrase-file", passphrase]
    if where == "after-subgroup":
        argv = [*command[:2], *flag, *command[2:]]
    else:
        argv = placed(where, command, flag)
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads(out)["bundle_id"].startswith("node-1:")


def test_node_bundle_send_without_the_passphrase_fails(
    node_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv: list[str | Path] = ["node", "bundle", "send", "--dir", node_dir]
    argv += ["--to", "node-2", "--ttl", "10m"]
    line = one_line_error(*run([*argv, "--data", "x"], capsys))
    assert "a passphrase is needed" in line


# --- every command takes it -------------------------------------------------------------


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        context = click.Context(command)
        for name in command.list_commands(context):
            sub = command.get_command(context, name)
            assert sub is not None
            yield from _commands(sub, (*path, name))


def test_every_command_takes_the_flag_and_its_help_says_the_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for path in _commands(cli_main.cli):
        command: click.Command = cli_main.cli
        context = click.Context(command)
        for name in path:
            assert isinstance(command, click.Group)
            found = command.get_command(context, name)
            assert found is not None
            command = found
        flags = [p for p in command.params if "--passphrase-file" in getattr(p, "opts", ())]
        assert len(flags) == 1, path
    for words in (["keys", "show"], ["ca", "token", "create"], ["node", "run"], ["demo"]):
        code, out, _ = run([*words, "--help"], capsys)
        assert code == 0
        text = " ".join(out.split())
        assert "--passphrase-file FILE" in text, words
        assert (
            "Passphrases come from --passphrase-file, then $TRUSTMESH_PASSPHRASE, then"
            " $CREDENTIALS_DIRECTORY/passphrase" in text
        ), words


# --- as a real process --------------------------------------------------------------------


def test_subprocess_reads_the_file_and_the_credential(
    encrypted_key: Path, passphrase: Path, tmp_path: Path
) -> None:
    def show(*extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TRUSTMESH, "keys", "show", str(encrypted_key), "--json", *extra],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(**env),
            check=False,
        )

    by_file = show("--passphrase-file", str(passphrase))
    assert by_file.returncode == 0, by_file.stderr
    by_credential = show(CREDENTIALS_DIRECTORY=str(credentials(tmp_path, SECRET)))
    assert by_credential.returncode == 0, by_credential.stderr
    assert json.loads(by_file.stdout) == json.loads(by_credential.stdout)
