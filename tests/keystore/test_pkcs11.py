"""Keys on a real PKCS#11 token (SoftHSM2): generated there, never extractable, signing
and ECDH on the token, agreeing with the software keys; and the key URI's parser."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from conftest import SOFTHSM_PIN as PIN
from conftest import SOFTHSM_TOKEN as TOKEN
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from pkcs11 import Attribute

from trustmesh.crypto.keys import P256_ORDER, SECP256K1_ORDER, KeyKind, PrivateKey
from trustmesh.keystore.pkcs11 import PIN_ENV, Pkcs11Error, Pkcs11Signer, Pkcs11Uri
from trustmesh.keystore.signer import Signer


def uri(base: str, label: str) -> str:
    path, _, query = base.partition("?")
    return f"{path};object={label}?{query}"


@pytest.mark.parametrize("kind", [KeyKind.P256, KeyKind.SECP256K1])
def test_a_token_key_signs_and_agrees_on_ecdh_and_never_leaves(token: str, kind: KeyKind) -> None:
    signer = Pkcs11Signer.generate(uri(token, f"gen-{kind}"), kind)
    assert isinstance(signer, Signer) and signer.kind == kind
    for n in range(20):  # low-S every time, like the software keys
        signature = signer.sign(b"message %d" % n)
        signer.public_key().verify(signature, b"message %d" % n)
        assert (
            decode_dss_signature(signature)[1]
            <= (P256_ORDER if kind is KeyKind.P256 else SECP256K1_ORDER) // 2
        )
    peer = PrivateKey.generate(kind)
    assert signer.ecdh(peer.public_key()) == peer.ecdh(signer.public_key())
    assert signer._private[Attribute.SENSITIVE] and not signer._private[Attribute.EXTRACTABLE]
    again = Pkcs11Signer.open(uri(token, f"gen-{kind}"))
    assert again.public_key() == signer.public_key()
    again.public_key().verify(again.sign(b"reopened"), b"reopened")


def test_a_p256_token_signature_verifies_in_cryptography(token: str) -> None:
    signer = Pkcs11Signer.generate(uri(token, "crypto"), KeyKind.P256)
    public = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), signer.public_key().to_bytes()
    )
    public.verify(signer.sign(b"data"), b"data", ec.ECDSA(hashes.SHA256()))


def test_a_missing_key_or_a_wrong_pin_is_a_clear_error(
    token: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(Pkcs11Error, match="no single key 'nothing-here'"):
        Pkcs11Signer.open(uri(token, "nothing-here"))
    wrong = tmp_path / "pin"
    wrong.write_text("0000")
    with pytest.raises(Pkcs11Error, match="PIN"):
        Pkcs11Signer.open(f"pkcs11:token={TOKEN};object=crypto?pin-source=file:{wrong}")
    with pytest.raises(Pkcs11Error, match="no single token"):
        Pkcs11Signer.open(uri(token.replace(TOKEN, "no-such-token"), "x"))
    with pytest.raises(Pkcs11Error, match=r"P-256 or secp256k1"):
        Pkcs11Signer.generate(uri(token, "ed"), KeyKind.ED25519)
    monkeypatch.setenv(PIN_ENV, PIN)
    assert Pkcs11Uri.parse(f"pkcs11:token={TOKEN};object=x").pin() == PIN


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("file:/key", "starts with pkcs11:"),
        ("pkcs11:token=a", "token= and its object="),
        ("pkcs11:token=a;object=b;pin-value=1234", "never put in a URI"),
        ("pkcs11:token=a;token=b;object=c", "given twice"),
        ("pkcs11:token=a;object", "name=value"),
        ("pkcs11:token=a;object=%ff", "UTF-8"),
        ("pkcs11:" + "a=b;" * 600, "at most"),
    ],
)
def test_bad_key_uris_are_refused(text: str, error: str) -> None:
    with pytest.raises(Pkcs11Error, match=error):
        Pkcs11Uri.parse(text)


def test_a_key_uri_takes_rfc_7512_parts() -> None:
    parsed = Pkcs11Uri.parse(
        "pkcs11:token=my%20token;object=node-1?pin-source=file:/run/pin&module-path=/lib/x.so"
    )
    assert parsed == Pkcs11Uri("my token", "node-1", "file:/run/pin", "/lib/x.so")
    assert parsed.module() == "/lib/x.so"


def test_no_pin_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PIN_ENV, raising=False)
    with pytest.raises(Pkcs11Error, match="no PIN"):
        Pkcs11Uri.parse("pkcs11:token=a;object=b").pin()


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_any_text_is_a_uri_or_a_typed_error(text: str) -> None:
    for candidate in (text, "pkcs11:" + text):
        with contextlib.suppress(Pkcs11Error):
            Pkcs11Uri.parse(candidate)
