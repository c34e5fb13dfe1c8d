"""The BRC-42 proto wallet: signatures, encryption and HMACs between two wallets, for each
kind of counterparty, and the refusals (bad keys, bad counterparties, bad protocol IDs)."""

from __future__ import annotations

import hashlib
import hmac

import coincurve
import pytest
from brc103_support import ALICE_KEY, alice, anyone, bob, carol

from trustmesh.brc103.errors import InvalidProtocolIdError, NonceError
from trustmesh.brc103.nonces import NONCE_PROTOCOL, create_nonce, verify_nonce
from trustmesh.brc103.wallet import ANYONE, SELF, Counterparty, Wallet, invoice_number
from trustmesh.crypto import brc2, brc42
from trustmesh.crypto.keys import Secp256k1PrivateKey
from trustmesh.errors import (
    AuthenticationError,
    DecodeError,
    InvalidKeyError,
    InvalidSignatureError,
)

PROTO = (2, "trustmesh wallet test")
KEY_ID = "key 1"


def test_wallet_from_private_key_object_bytes_and_hex() -> None:
    secret = bytes.fromhex(ALICE_KEY)
    from_object = Wallet(Secp256k1PrivateKey.from_secret(secret))
    from_bytes = Wallet(secret)
    assert from_object.identity_key == from_bytes.identity_key == alice().identity_key
    assert from_object.public_key == bytes.fromhex(alice().identity_key)
    assert from_object.secret_bytes() == secret
    assert len(Wallet.generate().identity_key) == 66


# --- signatures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signer_cp", "verifier", "verifier_cp"),
    [
        ("bob", "bob", "alice"),  # to a named counterparty
        ("self", "alice", "self"),  # to oneself
        ("anyone", "anyone", "alice"),  # to anyone: private key 1 verifies
    ],
)
def test_sign_verify_across_wallets(signer_cp: str, verifier: str, verifier_cp: str) -> None:
    wallets = {"alice": alice(), "bob": bob(), "anyone": anyone()}

    def counterparty(name: str) -> str:
        return name if name in (SELF, ANYONE) else wallets[name].identity_key

    data = b"signed by alice"
    signature = alice().create_signature(data, PROTO, KEY_ID, counterparty(signer_cp))
    checker, cp = wallets[verifier], counterparty(verifier_cp)
    checker.verify_signature(data, signature, PROTO, KEY_ID, cp)
    # As bytes, and in upper-case hex, the counterparty key means the same.
    if cp not in (SELF, ANYONE):
        checker.verify_signature(data, signature, PROTO, KEY_ID, bytes.fromhex(cp))
        checker.verify_signature(data, signature, PROTO, KEY_ID, cp.upper())
    # Any change refuses it.
    for bad_data, bad_key_id, bad_proto in (
        (data + b"!", KEY_ID, PROTO),
        (data, KEY_ID + "!", PROTO),
        (data, KEY_ID, (1, PROTO[1])),
    ):
        with pytest.raises(InvalidSignatureError):
            checker.verify_signature(bad_data, signature, bad_proto, bad_key_id, cp)
    # A third party that uses alice as counterparty derives another key.
    with pytest.raises(InvalidSignatureError):
        carol().verify_signature(data, signature, PROTO, KEY_ID, alice().identity_key)


def test_signature_defaults_sign_anyone_verify_self() -> None:
    data = b"defaults"
    signature = alice().create_signature(data, PROTO, KEY_ID)  # counterparty anyone
    anyone().verify_signature(data, signature, PROTO, KEY_ID, alice().identity_key)
    with pytest.raises(InvalidSignatureError):
        alice().verify_signature(data, signature, PROTO, KEY_ID)  # counterparty self
    to_self = alice().create_signature(data, PROTO, KEY_ID, SELF)
    alice().verify_signature(data, to_self, PROTO, KEY_ID)


def test_signature_is_deterministic_low_s_der_over_sha256() -> None:
    data = b"rfc 6979"
    first = alice().create_signature(data, PROTO, KEY_ID, bob().identity_key)
    assert first == alice().create_signature(data, PROTO, KEY_ID, bob().identity_key)
    child = alice().derive_public_key(PROTO, KEY_ID, bob().identity_key, for_self=True)
    digest = hashlib.sha256(data).digest()
    assert coincurve.PublicKey(child).verify(first, digest, hasher=None)
    assert first[0] == 0x30  # DER


@pytest.mark.parametrize(
    "signature",
    [b"", b"\x30", b"\x30\x06\x02\x01\x01\x02\x01\x01", b"\xff" * 72, bytes(70)],
    ids=["empty", "one-byte", "tiny-r-s", "junk", "zeros"],
)
def test_verify_garbage_signature(signature: bytes) -> None:
    with pytest.raises(InvalidSignatureError):
        bob().verify_signature(b"x", signature, PROTO, KEY_ID, alice().identity_key)


# --- encryption -----------------------------------------------------------------------


def test_encrypt_decrypt_both_directions() -> None:
    a, b = alice(), bob()
    to_bob = a.encrypt(b"for bob", PROTO, KEY_ID, b.identity_key)
    assert b.decrypt(to_bob, PROTO, KEY_ID, a.identity_key) == b"for bob"
    assert a.decrypt(to_bob, PROTO, KEY_ID, b.identity_key) == b"for bob"
    to_alice = b.encrypt(b"for alice", PROTO, KEY_ID, a.identity_key)
    assert a.decrypt(to_alice, PROTO, KEY_ID, b.identity_key) == b"for alice"
    # Random IVs: the same plaintext seals differently each time.
    assert a.encrypt(b"x", PROTO, KEY_ID, b.identity_key) != a.encrypt(
        b"x", PROTO, KEY_ID, b.identity_key
    )
    # Nobody else opens it; nor does another key ID.
    with pytest.raises(AuthenticationError):
        carol().decrypt(to_bob, PROTO, KEY_ID, a.identity_key)
    with pytest.raises(AuthenticationError):
        b.decrypt(to_bob, PROTO, KEY_ID + "x", a.identity_key)


def test_encrypt_to_self_and_to_anyone() -> None:
    a = alice()
    sealed = a.encrypt(b"note to self", PROTO, KEY_ID)  # default counterparty: self
    assert a.decrypt(sealed, PROTO, KEY_ID, SELF) == b"note to self"
    assert a.decrypt(sealed, PROTO, KEY_ID, a.identity_key) == b"note to self"
    with pytest.raises(AuthenticationError):
        bob().decrypt(sealed, PROTO, KEY_ID, a.identity_key)
    public = a.encrypt(b"for anyone", PROTO, KEY_ID, ANYONE)
    assert anyone().decrypt(public, PROTO, KEY_ID, a.identity_key) == b"for anyone"


def test_symmetric_key_self_shortcut_matches_general_path() -> None:
    """``self`` takes a shortcut; naming our own key takes the general path: same key."""
    a = alice()
    assert a.symmetric_key(PROTO, KEY_ID, SELF) == a.symmetric_key(PROTO, KEY_ID, a.identity_key)


def test_decrypt_refuses_tampered_and_short_ciphertexts() -> None:
    a, b = alice(), bob()
    sealed = bytearray(a.encrypt(b"payload", PROTO, KEY_ID, b.identity_key))
    for index in (0, 31, 32, len(sealed) - 1):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x80
        with pytest.raises(AuthenticationError):
            b.decrypt(bytes(tampered), PROTO, KEY_ID, a.identity_key)
    with pytest.raises(DecodeError):
        b.decrypt(bytes(sealed[:47]), PROTO, KEY_ID, a.identity_key)


def test_brc2_key_and_iv_sizes() -> None:
    with pytest.raises(InvalidKeyError):
        brc2.encrypt(b"", b"x")
    with pytest.raises(InvalidKeyError):
        brc2.encrypt(bytes(33), b"x")
    with pytest.raises(ValueError):
        brc2.encrypt(bytes(32), b"x", iv=bytes(12))
    sealed = brc2.encrypt(bytes(32), b"")
    assert len(sealed) == brc2.IV_SIZE + brc2.TAG_SIZE
    assert brc2.decrypt(bytes(32), sealed) == b""


# --- HMAC -----------------------------------------------------------------------------


def test_hmac_between_wallets() -> None:
    a, b = alice(), bob()
    mac = a.create_hmac(b"data", PROTO, KEY_ID, b.identity_key)
    assert mac == b.create_hmac(b"data", PROTO, KEY_ID, a.identity_key)
    assert b.verify_hmac(b"data", mac, PROTO, KEY_ID, a.identity_key)
    assert not b.verify_hmac(b"datA", mac, PROTO, KEY_ID, a.identity_key)
    assert not carol().verify_hmac(b"data", mac, PROTO, KEY_ID, a.identity_key)
    assert a.create_hmac(b"data", PROTO, KEY_ID) != a.create_hmac(b"data", PROTO, KEY_ID, ANYONE)
    assert a.verify_hmac(b"data", a.create_hmac(b"data", PROTO, KEY_ID), PROTO, KEY_ID)


@pytest.mark.parametrize(
    ("key_id", "counterparty", "expected"),
    [
        ("k21", SELF, "a0d91a3bd49a9d3ec976894720b3a8dadba4207b15e9ca72a76c12809a78fd55"),
        (
            "k265",
            "034908606912c2fa643e89f323226a0815154d9b998d52dc1699ebdf58d7fedb93",
            "48a29469fa43ca091d3b56b2cd2452939a4f26e024ed485c18ab9dd0903e8c2c",
        ),
    ],
)
def test_hmac_keyed_with_minimal_symmetric_key(
    key_id: str, counterparty: str, expected: str
) -> None:
    """The two key IDs give symmetric keys with a leading zero byte; the HMAC is keyed with
    31 bytes, as the reference does (expected values from @bsv/sdk 2.1.0 createHmac)."""
    a = alice()
    key = a.symmetric_key(NONCE_PROTOCOL, key_id, counterparty)
    assert key[0] == 0 and key[1] != 0
    mac = a.create_hmac(b"abc", NONCE_PROTOCOL, key_id, counterparty)
    assert mac.hex() == expected
    assert mac == hmac.digest(key[1:], b"abc", hashlib.sha256)
    assert mac != hmac.digest(key, b"abc", hashlib.sha256)


# --- nonces ---------------------------------------------------------------------------


def test_nonces_are_bound_to_their_wallet() -> None:
    nonce = create_nonce(alice())
    assert len(nonce) == 64 and "=" not in nonce
    verify_nonce(alice(), nonce)
    with pytest.raises(NonceError):
        verify_nonce(bob(), nonce)
    assert create_nonce(alice()) != nonce


@pytest.mark.parametrize(
    "nonce",
    ["", "not base64!", "é" * 64, "AAAA", "A" * 63, "A" * 64, "A" * 68],
    ids=["empty", "punctuation", "non-ascii", "short", "bad-padding", "zeros", "too-long"],
)
def test_verify_nonce_refuses_malformed(nonce: str) -> None:
    with pytest.raises(NonceError):
        verify_nonce(alice(), nonce)


def test_create_nonce_random_part_size() -> None:
    with pytest.raises(ValueError):
        create_nonce(alice(), random_part=bytes(15))


# --- bad keys and counterparties ------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        bytes(32),
        bytes(31) + b"\x01" + b"\x00",
        b"\x01" * 31,
        brc42.CURVE_ORDER.to_bytes(32, "big"),
        (brc42.CURVE_ORDER + 1).to_bytes(32, "big"),
    ],
    ids=["zero", "33-bytes", "31-bytes", "n", "n+1"],
)
def test_wallet_refuses_bad_private_keys(secret: bytes) -> None:
    with pytest.raises(InvalidKeyError):
        Wallet(secret)


@pytest.mark.parametrize("text", ["", "zz" * 32, "00" * 31, "0" * 63])
def test_wallet_from_hex_refuses_bad_text(text: str) -> None:
    with pytest.raises(InvalidKeyError):
        Wallet.from_hex(text)


UNCOMPRESSED = coincurve.PrivateKey(bytes.fromhex(ALICE_KEY)).public_key.format(compressed=False)


@pytest.mark.parametrize(
    "counterparty",
    [
        "not hex",
        "02" + "ff" * 32,  # x beyond the field prime
        "04" + "00" * 32,
        "02" + "00" * 31,
        UNCOMPRESSED.hex(),
        UNCOMPRESSED,
        b"\x02" + b"\xff" * 32,
        b"",
        "Self",
        "ANYONE",
    ],
    ids=[
        "not-hex",
        "x-off-field",
        "prefix-04",
        "short",
        "uncompressed-hex",
        "uncompressed-bytes",
        "bytes-off-field",
        "empty-bytes",
        "Self",
        "ANYONE",
    ],
)
def test_wallet_refuses_bad_counterparties(counterparty: Counterparty) -> None:
    a = alice()
    with pytest.raises(InvalidKeyError):
        a.create_signature(b"x", PROTO, KEY_ID, counterparty)
    with pytest.raises(InvalidKeyError):
        a.encrypt(b"x", PROTO, KEY_ID, counterparty)
    with pytest.raises(InvalidKeyError):
        a.create_hmac(b"x", PROTO, KEY_ID, counterparty)
    with pytest.raises(InvalidKeyError):
        a.verify_signature(b"x", b"\x30\x00", PROTO, KEY_ID, counterparty)


# --- protocol IDs beyond the vectors --------------------------------------------------


def test_invoice_number_normalises_and_bounds_names() -> None:
    assert invoice_number((1, "  Mixed Case Name "), "id") == "1-mixed case name-id"
    assert invoice_number((0, "a" * 400), "k").startswith("0-" + "a" * 400)
    with pytest.raises(InvalidProtocolIdError, match="400 characters or less"):
        invoice_number((0, "a" * 401), "k")
    linkage = "specific linkage revelation " + "a" * 402
    assert len(linkage) == 430
    assert invoice_number((2, linkage), "k").startswith("2-specific linkage")
    with pytest.raises(InvalidProtocolIdError, match="430 characters or less"):
        invoice_number((2, linkage + "a"), "k")
    with pytest.raises(InvalidProtocolIdError, match="security level"):
        invoice_number((True, "valid name"), "k")
    with pytest.raises(InvalidProtocolIdError, match="letters, numbers and spaces"):
        invoice_number((2, "caf\u00e9 name"), "k")


def test_key_id_length_counts_utf16_units() -> None:
    """JavaScript string length: an astral character counts twice."""
    assert invoice_number(PROTO, "\U0001f600" * 400)
    with pytest.raises(InvalidProtocolIdError, match="800 characters or less"):
        invoice_number(PROTO, "\U0001f600" * 400 + "a")
    assert invoice_number(PROTO, "a" * 800)


def test_key_id_with_lone_surrogate_matches_reference() -> None:
    """A lone UTF-16 surrogate in a key ID: JavaScript writes it as U+FFFD when it encodes
    the invoice. Expected value: @bsv/sdk 2.1.0 ProtoWallet.createHmac(data [1,2,3],
    [2,"server hmac"], keyID "\\ud800x", counterparty "self") for alice."""
    expected = "73887eab3b3ce4e9639dec95a45eabd1b820df55beb61b0c522eb3322db69024"
    replaced = alice().create_hmac(bytes([1, 2, 3]), NONCE_PROTOCOL, "\ufffdx", SELF)
    assert replaced.hex() == expected
    mac = alice().create_hmac(bytes([1, 2, 3]), NONCE_PROTOCOL, "\ud800x", SELF)
    assert mac.hex() == expected


def test_protocol_validation_does_not_depend_on_what_was_validated_before() -> None:
    """``True == 1`` in Python: a cache of validated protocol IDs must not let level
    ``True`` through because level ``1`` with the same name was seen first."""
    assert invoice_number((1, "cached name"), "k") == "1-cached name-k"
    with pytest.raises(InvalidProtocolIdError, match="security level"):
        invoice_number((True, "cached name"), "k")
