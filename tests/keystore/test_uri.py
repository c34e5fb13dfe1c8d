"""One ``--key`` for every store: files and SoftHSM2 keys opened and generated through
their spec, the fallback to a file when a device is absent (and only then), kinds
refused with what was needed and what was found, and TLS keys kept in files."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from conftest import SOFTHSM_TOKEN as TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.errors import PassphraseError, ProtocolError
from trustmesh.keystore.filestore import PASSPHRASE_ENV, load_key_file, save_key_file
from trustmesh.keystore.pkcs11 import Pkcs11Error
from trustmesh.keystore.signer import Signer
from trustmesh.keystore.uri import (
    DeviceAbsentError,
    KeyKindMismatchError,
    KeySpecError,
    SoftwareKeyRequiredError,
    close_signer,
    generate_signer,
    is_device_uri,
    open_signer,
    require_file_key,
    store_name,
)


def uri(base: str, label: str) -> str:
    path, _, query = base.partition("?")
    return f"{path};object={label}?{query}"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port where connecting is refused: bound, never listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


def keystore_log(caplog: pytest.LogCaptureFixture) -> AbstractContextManager[None]:
    """Capture the key store's log at every level, whatever level an earlier test left
    the ``trustmesh`` logger at (an in-process demo quiets it)."""
    return caplog.at_level(logging.DEBUG, logger="trustmesh.keystore")


def keystore_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("trustmesh.keystore")]


def test_specs_name_their_store() -> None:
    assert is_device_uri("pkcs11:token=a;object=b") and is_device_uri("tpm:device:/dev/tpm0")
    assert not is_device_uri("node.key") and not is_device_uri("./pkcs11:x")
    assert [store_name(s) for s in ("a.key", "pkcs11:x", "tpm:x")] == ["file", "pkcs11", "tpm"]


# --- files ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KeyKind))
def test_a_file_key_is_generated_and_opened_by_its_path(tmp_path: Path, kind: KeyKind) -> None:
    out = tmp_path / "k.key"
    signer, spec = generate_signer("file", kind, out=out, encrypt=False)
    assert spec == str(out)
    opened = open_signer(spec)
    assert isinstance(opened, Signer) and opened.public_key() == signer.public_key()
    opened.public_key().verify(opened.sign(b"x"), b"x")


def test_an_encrypted_file_opens_with_the_passphrase_given_or_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "from env")
    signer, spec = generate_signer("file", KeyKind.P256, out=tmp_path / "k.key")
    assert open_signer(spec).public_key() == signer.public_key()
    monkeypatch.delenv(PASSPHRASE_ENV)
    assert open_signer(spec, passphrase=b"from env").public_key() == signer.public_key()
    with pytest.raises(PassphraseError):
        open_signer(spec, passphrase=b"wrong")


def test_the_file_store_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(KeySpecError, match="path"):
        generate_signer("file", KeyKind.P256, out=None)
    with pytest.raises(KeySpecError, match="unknown key store"):
        generate_signer("hsm", KeyKind.P256, out=tmp_path / "k.key")
    assert list(tmp_path.iterdir()) == []


def test_a_key_of_another_kind_is_refused_saying_what_was_needed_and_found(
    tmp_path: Path,
) -> None:
    _, spec = generate_signer("file", KeyKind.ED25519, out=tmp_path / "k.key", encrypt=False)
    with pytest.raises(KeyKindMismatchError, match=r"a secp256k1 key is needed.*ed25519"):
        open_signer(spec, kinds={KeyKind.SECP256K1})
    assert open_signer(spec, kinds={KeyKind.ED25519, KeyKind.P256}).kind is KeyKind.ED25519


# --- PKCS#11 --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [KeyKind.P256, KeyKind.SECP256K1])
def test_a_token_key_is_generated_and_opened_by_its_uri(token: str, kind: KeyKind) -> None:
    store = uri(token, f"uri-{kind}")
    signer, spec = generate_signer(store, kind, out=None)
    assert spec == store
    opened = open_signer(spec, kinds={kind})
    try:
        assert opened.kind is kind and opened.public_key() == signer.public_key()
        opened.public_key().verify(opened.sign(b"on the token"), b"on the token")
    finally:
        close_signer(opened)
        close_signer(signer)


def test_a_token_key_of_another_kind_is_refused(token: str) -> None:
    store = uri(token, "uri-kind")
    close_signer(generate_signer(store, KeyKind.P256, out=None)[0])
    with pytest.raises(KeyKindMismatchError, match=r"secp256k1 key is needed.*holds a p256"):
        open_signer(store, kinds={KeyKind.SECP256K1})


def test_a_second_key_under_a_taken_label_is_refused(token: str, tmp_path: Path) -> None:
    store = uri(token, "uri-taken")
    first, _ = generate_signer(store, KeyKind.P256, out=None)
    with pytest.raises(KeySpecError, match="already holds a key 'uri-taken'"):
        generate_signer(store, KeyKind.P256, out=tmp_path / "k.key")
    assert open_signer(store).public_key() == first.public_key()  # still the one key
    assert not (tmp_path / "k.key").exists()


def test_a_token_holds_no_ed25519_key(token: str, tmp_path: Path) -> None:
    with pytest.raises(KeySpecError, match="p256 or secp256k1"):
        generate_signer(uri(token, "uri-ed"), KeyKind.ED25519, out=tmp_path / "k.key")
    assert not (tmp_path / "k.key").exists()


def test_an_absent_pkcs11_module_falls_back_to_an_encrypted_file_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "fallback")
    module = tmp_path / "no-such-pkcs11.so"
    store = f"pkcs11:token=mesh;object=node?module-path={module}"
    out = tmp_path / "fallback.key"
    with keystore_log(caplog):
        signer, spec = generate_signer(store, KeyKind.P256, out=out)
    assert spec == str(out) and not is_device_uri(spec)
    (record,) = keystore_records(caplog)
    assert record.levelno == logging.WARNING and record.name == "trustmesh.keystore"
    message = record.getMessage()
    assert str(module) in message and str(out) in message and "\n" not in message
    assert out.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_key_file(out, b"fallback").public_key() == signer.public_key()


def test_an_absent_device_without_a_fallback_path_is_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = f"pkcs11:token=mesh;object=node?module-path={tmp_path / 'none.so'}"
    with keystore_log(caplog), pytest.raises(DeviceAbsentError, match=r"none\.so"):
        generate_signer(store, KeyKind.P256, out=None)
    with pytest.raises(DeviceAbsentError, match=r"none\.so"):
        open_signer(store)
    assert keystore_records(caplog) == []


def test_a_wrong_pin_is_an_error_never_a_fallback(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "unused")
    wrong = tmp_path / "pin"
    wrong.write_text("0000")
    out = tmp_path / "k.key"
    store = f"pkcs11:token={TOKEN};object=uri-pin?pin-source=file:{wrong}"
    with keystore_log(caplog), pytest.raises(Pkcs11Error, match="PIN"):
        generate_signer(store, KeyKind.P256, out=out)
    assert not out.exists()
    assert keystore_records(caplog) == []


def test_an_unknown_token_is_an_error_never_a_fallback(token: str, tmp_path: Path) -> None:
    # The module is there: a label that matches no token may be a typo, not an absence.
    store = uri(token.replace(TOKEN, "no-such-token"), "x")
    with pytest.raises(Pkcs11Error, match="no single token"):
        generate_signer(store, KeyKind.P256, out=tmp_path / "k.key")
    assert not (tmp_path / "k.key").exists()


# --- TPM ------------------------------------------------------------------------------


def test_secp256k1_on_a_tpm_is_refused_and_is_no_fallback_reason(
    tmp_path: Path, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    store = f"tpm:swtpm:host=127.0.0.1,port={closed_port};handle=0x81000123"
    out = tmp_path / "k.key"
    with keystore_log(caplog), pytest.raises(KeySpecError, match="P-256 only"):
        generate_signer(store, KeyKind.SECP256K1, out=out)
    assert not out.exists()
    assert keystore_records(caplog) == []
    with pytest.raises(KeyKindMismatchError, match=r"secp256k1 key is needed.*P-256 keys only"):
        open_signer(store, kinds={KeyKind.SECP256K1})


def test_a_tpm_that_does_not_answer_falls_back_with_one_warning(
    tmp_path: Path,
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "fallback")
    store = f"tpm:swtpm:host=127.0.0.1,port={closed_port};handle=0x81000123"
    out = tmp_path / "k.key"
    with keystore_log(caplog):
        signer, spec = generate_signer(store, KeyKind.P256, out=out)
    assert spec == str(out)
    (record,) = keystore_records(caplog)
    assert record.levelno == logging.WARNING
    assert f"port={closed_port}" in record.getMessage() and str(out) in record.getMessage()
    assert load_key_file(out, b"fallback").public_key() == signer.public_key()
    with pytest.raises(DeviceAbsentError, match="no TPM answers"):
        open_signer(store)


# --- TLS keys -------------------------------------------------------------------------


def test_tls_keys_must_be_files() -> None:
    assert require_file_key("tls.key", "the TLS key") == Path("tls.key")
    for spec in ("pkcs11:token=a;object=b", "tpm:device:/dev/tpmrm0;handle=0x81000001"):
        with pytest.raises(SoftwareKeyRequiredError) as info:
            require_file_key(spec, "the Catalyst TLS key (--key)")
        message = str(info.value)
        assert message.startswith("the Catalyst TLS key (--key) must be a key file")
        assert "TLS keys stay in software" in message
        assert "trustmesh node init --key" in message and "docs/protocols/keys.md" in message


# --- any text -------------------------------------------------------------------------

# Device-URI-shaped text only: no "/" or "%" (which decodes to one), so no module,
# PIN file or TPM device outside the working directory is ever named.
SAFE = st.characters(blacklist_characters="/%\x00", blacklist_categories=["Cs"])
PARTS = st.sampled_from(["token=", "object=", "pin-source=file:", "module-path=", "handle="])
DEVICE_TEXT = st.one_of(
    st.tuples(st.sampled_from(["pkcs11:", "tpm:"]), st.text(SAFE, max_size=80)).map("".join),
    st.tuples(
        st.sampled_from(["pkcs11:", "tpm:swtpm:", "tpm:nosuchtcti:"]),
        st.lists(st.tuples(PARTS, st.text(SAFE, max_size=12)).map("".join), max_size=4),
        st.sampled_from([";", "?", "&"]),
    ).map(lambda t: t[0] + t[2].join(t[1])),
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=DEVICE_TEXT, kinds=st.sampled_from([None, {KeyKind.P256}, {KeyKind.SECP256K1}]))
def test_any_device_text_opens_a_signer_or_raises_a_typed_error(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, kinds: set[KeyKind]
) -> None:
    # `token`: SoftHSM2 reads its config once a process, so this must not come first.
    monkeypatch.chdir(tmp_path)  # relative names resolve in an empty directory
    try:
        signer = open_signer(text, kinds=kinds)
    except ProtocolError:
        return
    assert isinstance(signer, Signer)
    close_signer(signer)


def test_a_software_key_passes_through_every_check(tmp_path: Path) -> None:
    key = PrivateKey.generate(KeyKind.SECP256K1)
    path = save_key_file(key, tmp_path / "k.key", None)
    assert open_signer(str(path), kinds=[KeyKind.SECP256K1]).public_key() == key.public_key()
