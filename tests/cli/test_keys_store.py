"""``--store`` and device ``--key`` URIs on the command line, as real processes: keys made
and shown on a SoftHSM2 token, the fallback to a file, a BOTD handshake signed on the
token, and the commands that refuse a device key saying why."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clitools import TRUSTMESH, clean_env
from test_botd_cli import WAIT, Listener, json_lines

from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.errors import ProtocolError
from trustmesh.tpm.swtpm import Swtpm

PASSPHRASE = "store passphrase"
PEER = PrivateKey.generate(KeyKind.SECP256K1).public_key().hex()  # a valid --peer-key


def uri(base: str, label: str) -> str:
    path, _, query = base.partition("?")
    return f"{path};object={label}?{query}"


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRUSTMESH, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        env=clean_env(**env),  # keeps SOFTHSM2_CONF, which the `token` fixture set
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def assert_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    flat = " ".join(result.stderr.split())  # click wraps long messages
    for needle in needles:
        assert needle in flat, result.stderr


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    procs: list[subprocess.Popen[str]] = []

    def start(key: str, *extra: str) -> Listener:
        with (tmp_path / f"listen{len(procs)}.err").open("w") as stderr:
            proc = subprocess.Popen(
                [TRUSTMESH, "botd", "listen", "--key", key, "--port", "0", *extra],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=clean_env(),
            )
        procs.append(proc)
        return Listener(proc)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=WAIT)
            assert proc.stdout is not None
            proc.stdout.close()


# --- keys generate / show -------------------------------------------------------------


def test_a_key_generated_on_a_token_is_shown_by_its_uri(token: str) -> None:
    key = uri(token, "cli-show")
    made = ok_json(run("keys", "generate", "--type", "p256", "--store", key, "--json"))
    assert made["store"] == "pkcs11" and made["key"] == key and made["fallback"] is False
    assert made["type"] == "p256" and len(made["public_key"]) == 66
    assert "path" not in made and "encrypted" not in made  # nothing on disk
    for argv in (["keys", "show", key, "--json"], ["keys", "show", "--key", key, "--json"]):
        shown = ok_json(run(*argv))
        assert shown == {k: made[k] for k in ("type", "public_key", "peer_id", "store", "key")}
    human = run("keys", "show", key)
    assert human.returncode == 0, human.stderr
    assert dict(line.split(None, 1) for line in human.stdout.splitlines())["store"] == "pkcs11"


def test_a_file_key_reports_its_store_and_spec(tmp_path: Path) -> None:
    out = tmp_path / "k.key"
    made = ok_json(
        run("keys", "generate", "--type", "ed25519", "--out", str(out), "--no-encrypt", "--json")
    )
    assert (made["store"], made["key"], made["path"]) == ("file", str(out), str(out))
    assert made["encrypted"] is False and made["fallback"] is False


def test_an_absent_module_falls_back_to_a_file_with_one_warning(tmp_path: Path) -> None:
    module = tmp_path / "no-such-pkcs11.so"
    store = f"pkcs11:token=mesh;object=node?module-path={module}"
    out = tmp_path / "fallback.key"
    result = run(
        "keys", "generate", "--type", "secp256k1", "--store", store, "--out", str(out), "--json",
        TRUSTMESH_PASSPHRASE=PASSPHRASE,
    )  # fmt: skip
    made = ok_json(result)
    assert made["fallback"] is True and made["store"] == "file" and made["key"] == str(out)
    assert made["encrypted"] is True
    (warning,) = result.stderr.splitlines()
    assert "WARNING trustmesh.keystore" in warning and str(module) in warning
    assert str(out) in warning
    shown = ok_json(run("keys", "show", made["key"], "--json", TRUSTMESH_PASSPHRASE=PASSPHRASE))
    assert shown["public_key"] == made["public_key"]
    # Without --out there is nowhere to fall back to: a clear failure, nothing written.
    absent = run("keys", "generate", "--type", "p256", "--store", store)
    assert absent.returncode == 1 and "--out" in absent.stderr
    assert len(absent.stderr.splitlines()) == 1


def test_store_and_out_are_checked(tmp_path: Path) -> None:
    assert_usage_error(run("keys", "generate", "--type", "p256"), "Missing option '--out'")
    assert_usage_error(
        run("keys", "generate", "--type", "p256", "--store", "hsm", "--out", "k"), "--store"
    )
    assert_usage_error(run("keys", "show", "a.key", "--key", "b.key"), "one of")
    assert list(tmp_path.iterdir()) == []


# --- botd -----------------------------------------------------------------------------


def test_a_botd_identity_on_a_token_completes_the_handshake(
    token: str, tmp_path: Path, listen: Callable[..., Listener]
) -> None:
    listener_key = uri(token, "cli-botd-listener")
    made = ok_json(
        run("keys", "generate", "--type", "secp256k1", "--store", listener_key, "--json")
    )
    listener = listen(listener_key, "--echo")
    assert listener.public_key == made["public_key"]  # the token's key signs the Ack

    client_file = tmp_path / "a.key"
    client = ok_json(
        run("keys", "generate", "--type", "secp256k1", "--out", str(client_file),
            "--no-encrypt", "--json")
    )  # fmt: skip
    client_token = uri(token, "cli-botd-client")
    token_client = ok_json(
        run("keys", "generate", "--type", "secp256k1", "--store", client_token, "--json")
    )
    for key, public in ((str(client_file), client), (client_token, token_client)):
        result = run(
            "botd", "ping", listener.address, "--key", key,
            "--peer-key", made["public_key"], "--timeout", "5",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (pong,) = json_lines(result.stdout)
        assert pong["event"] == "pong" and pong["peer_key"] == made["public_key"]
        established = listener.wait_for(lambda e: e["event"] == "established")
        assert established["peer_key"] == public["public_key"]


def test_botd_refuses_a_tpm_or_a_key_of_another_kind(token: str) -> None:
    peer = PEER
    tpm = "tpm:swtpm:host=127.0.0.1,port=2321;handle=0x81000123"
    assert_usage_error(
        run("botd", "ping", "127.0.0.1:1", "--key", tpm, "--peer-key", peer),
        "secp256k1",
        "P-256 keys only",
    )
    p256 = uri(token, "cli-botd-p256")
    ok_json(run("keys", "generate", "--type", "p256", "--store", p256, "--json"))
    assert_usage_error(
        run("botd", "ping", "127.0.0.1:1", "--key", p256, "--peer-key", peer),
        "secp256k1 key is needed",
        "holds a p256 key",
    )


# --- commands whose keys stay in files ------------------------------------------------

DEVICE_KEYS = [
    "pkcs11:token=mesh;object=node?pin-source=file:/run/pin",
    "tpm:device:/dev/tpmrm0;handle=0x81000100",
]


@pytest.mark.parametrize("key", DEVICE_KEYS, ids=["pkcs11", "tpm"])
@pytest.mark.parametrize(
    "argv",
    [
        ["brc103", "fetch", "http://127.0.0.1:1/hello"],
        ["brc103", "serve", "--port", "0"],
        ["brc103", "cert", "issue", "--subject", PEER],
    ],
    ids=["fetch", "serve", "cert-issue"],
)
def test_brc103_refuses_a_device_key_explaining_brc42(key: str, argv: list[str]) -> None:
    assert_usage_error(run(*argv, "--key", key), "BRC-42", "private scalar")


@pytest.mark.parametrize("key", DEVICE_KEYS, ids=["pkcs11", "tpm"])
@pytest.mark.parametrize("command", ["catalyst", "psec"])
def test_tls_keys_stay_in_files(key: str, command: str) -> None:
    result = run(command, "connect", "127.0.0.1:1", "--key", key)
    assert_usage_error(
        result,
        f"the {'Catalyst' if command == 'catalyst' else 'PSEC'} TLS key (--key) must be a key file",
        "TLS keys stay in software",
        "trustmesh node init --key",
        "docs/protocols/keys.md",
    )


def test_catalyst_jws_keys_stay_in_files() -> None:
    result = run("catalyst", "connect", "127.0.0.1:1", "--jwks-key", DEVICE_KEYS[0])
    assert_usage_error(result, "--jwks-key", "must be a key file")


def test_a_key_generated_in_a_tpm_is_shown_by_its_uri(shared_swtpm: Swtpm) -> None:
    from trustmesh.keystore.tpm import TpmSigner

    key = f"tpm:{shared_swtpm.tcti};handle=0x81000123"
    try:
        made = ok_json(run("keys", "generate", "--type", "p256", "--store", key, "--json"))
        assert made["store"] == "tpm" and made["key"] == key and made["fallback"] is False
        assert made["type"] == "p256" and "path" not in made
        shown = ok_json(run("keys", "show", key, "--json"))
        assert shown["public_key"] == made["public_key"] and shown["peer_id"] == made["peer_id"]
        refused = run("keys", "generate", "--type", "secp256k1", "--store", key)
        assert refused.returncode == 1 and "P-256 only" in refused.stderr
    finally:
        with contextlib.suppress(ProtocolError):
            TpmSigner.delete(key)  # the swtpm is shared by the session: leave it as found
