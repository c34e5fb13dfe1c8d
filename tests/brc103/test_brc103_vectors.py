"""The TypeScript reference vectors (tests/brc103/vectors/*.json, made by @bsv/sdk 2.1.0):
BRC-42 derivation, wallet signatures, BRC-2 encryption, session nonces and certificates.

http_request_payloads.json belongs to the BRC-104 layer and is tested there.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from brc103_support import anyone, vector, wallet

from trustmesh.brc103.certificates import SIGNATURE_PROTOCOL, Certificate
from trustmesh.brc103.collation import locale_sorted
from trustmesh.brc103.errors import CertificateError, InvalidProtocolIdError, NonceError
from trustmesh.brc103.nonces import NONCE_PROTOCOL, create_nonce, verify_nonce
from trustmesh.brc103.wallet import ANYONE, SELF, Wallet, invoice_number, minimal_bytes
from trustmesh.crypto import brc2, brc42
from trustmesh.errors import InvalidSignatureError

BRC42 = vector("brc42.json")
SIGNATURES = vector("signatures.json")
SYMMETRIC = vector("symmetric.json")
NONCES = vector("nonces.json")
CERTIFICATE = vector("certificate.json")


def named_wallet(keys: dict[str, Any], name: str) -> Wallet:
    return wallet(keys[name]["privateKey"])


def wallet_of(keys: dict[str, Any], public_key: str) -> Wallet:
    """The vector wallet whose identity key is ``public_key``."""
    for entry in keys.values():
        if entry["publicKey"] == public_key:
            return wallet(entry["privateKey"])
    raise AssertionError(f"no vector key {public_key}")


def protocol(case: dict[str, Any]) -> tuple[int, str]:
    level, name = case["protocolID"]
    return int(level), str(name)


# --- brc42.json -----------------------------------------------------------------------


def test_vector_keys_are_what_the_wallet_derives() -> None:
    for entry in BRC42["keys"].values():
        assert wallet(entry["privateKey"]).identity_key == entry["publicKey"]
    assert BRC42["anyonePublicKey"] == brc42.ANYONE_PUBLIC_KEY.hex()
    assert anyone().identity_key == BRC42["anyonePublicKey"]


@pytest.mark.parametrize(
    "case",
    BRC42["cases"],
    ids=[f"{c['counterparty'][:8]}-{c['protocolID'][1]}-{c['keyID']}" for c in BRC42["cases"]],
)
def test_brc42_case(case: dict[str, Any]) -> None:
    own = wallet(case["rootPrivateKey"])
    assert own.identity_key == case["rootPublicKey"]
    proto, key_id = protocol(case), case["keyID"]

    invoice = invoice_number(proto, key_id)
    assert invoice == case["invoiceNumber"]
    assert invoice.encode().hex() == case["invoiceNumberUtf8Hex"]

    # The arithmetic, step by step.
    their_root = brc42.parse_public_key(bytes.fromhex(case["counterpartyPublicKeyUsed"]))
    shared = brc42.shared_point(int(case["rootPrivateKey"], 16), their_root)
    assert shared.hex() == case["sharedSecretCompressed"]
    h = brc42.invoice_scalar(shared, invoice.encode())
    assert h.to_bytes(32, "big").hex() == case["hmacSha256"]

    # The wallet, with the counterparty as named ("self", "anyone", a key) and as a key.
    for counterparty in (case["counterparty"], case["counterpartyPublicKeyUsed"]):
        assert (
            own.derive_private_key(proto, key_id, counterparty).hex() == (case["derivedPrivateKey"])
        )
        mine = own.derive_public_key(proto, key_id, counterparty, for_self=True)
        assert mine.hex() == case["derivedPublicKeyForSelf"]
        theirs = own.derive_public_key(proto, key_id, counterparty)
        assert theirs.hex() == case["counterpartyDerivedPublicKey"]
        symmetric = own.symmetric_key(proto, key_id, counterparty)
        assert symmetric.hex() == case["symmetricKey32"]
        assert minimal_bytes(symmetric).hex() == case["symmetricKeyMinimalBytes"]

    if case.get("check_counterpartyDerivesSamePublicKey"):
        other = wallet_of(BRC42["keys"], case["counterpartyPublicKeyUsed"])
        me = own.identity_key
        assert other.derive_public_key(proto, key_id, me).hex() == case["derivedPublicKeyForSelf"]
        assert (
            other.derive_public_key(proto, key_id, me, for_self=True).hex()
            == (case["counterpartyDerivedPublicKey"])
        )
    if case.get("check_counterpartyDerivesSameSymmetricKey"):
        other = wallet_of(BRC42["keys"], case["counterpartyPublicKeyUsed"])
        assert (
            other.symmetric_key(proto, key_id, own.identity_key).hex() == (case["symmetricKey32"])
        )


def test_brc42_anyone_cases_are_derivable_by_anyone() -> None:
    """Counterparty "anyone": the wallet of private key 1 derives the same keys."""
    for case in BRC42["cases"]:
        if case["counterparty"] != ANYONE:
            continue
        proto, key_id = protocol(case), case["keyID"]
        owner = case["rootPublicKey"]
        assert (
            anyone().derive_public_key(proto, key_id, owner).hex()
            == (case["derivedPublicKeyForSelf"])
        )
        assert anyone().symmetric_key(proto, key_id, owner).hex() == case["symmetricKey32"]


def test_brc42_minimal_bytes_form() -> None:
    quirk = SYMMETRIC["quirk_symmetricKeyToArrayMinimal"]
    padded = bytes.fromhex(quirk["keyWithLeadingZeroHex"])
    assert minimal_bytes(padded).hex() == quirk["toArrayNoLength"]
    assert len(minimal_bytes(padded)) == quirk["toArrayNoLengthLength"] == 31
    assert minimal_bytes(b"\x01" * 32) == b"\x01" * 32
    assert minimal_bytes(b"\0" * 32) == b"\0"


@pytest.mark.parametrize(
    "case", BRC42["invalidProtocolIDs"], ids=[c["error"] for c in BRC42["invalidProtocolIDs"]]
)
def test_brc42_invalid_protocol_id(case: dict[str, Any]) -> None:
    proto, key_id = protocol(case), "k" * case["keyIDLength"]
    with pytest.raises(InvalidProtocolIdError) as caught:
        invoice_number(proto, key_id)
    assert str(caught.value) == case["error"]
    # Every wallet operation validates the same way, before any key is touched.
    with pytest.raises(InvalidProtocolIdError) as caught:
        wallet(BRC42["keys"]["alice"]["privateKey"]).create_signature(b"x", proto, key_id)
    assert str(caught.value) == case["error"]


# --- signatures.json ------------------------------------------------------------------

SIGNING_CASES = [c for c in SIGNATURES["cases"] if "signer" in c]


@pytest.mark.parametrize("case", SIGNING_CASES, ids=[c["label"][:40] for c in SIGNING_CASES])
def test_signature_case(case: dict[str, Any]) -> None:
    keys = SIGNATURES["keys"]
    signer = named_wallet(keys, case["signer"])
    proto, key_id = protocol(case), case["keyID"]
    data = bytes.fromhex(case["dataHex"])
    assert hashlib.sha256(data).hexdigest() == case["sha256OfData"]
    default_counterparty = case["counterparty"].startswith("(default")
    counterparty = ANYONE if default_counterparty else case["counterparty"]

    assert (
        signer.derive_private_key(proto, key_id, counterparty).hex() == (case["signingPrivateKey"])
    )
    if default_counterparty:
        signature = signer.create_signature(data, proto, key_id)
        verifier = anyone()
    else:
        signature = signer.create_signature(data, proto, key_id, counterparty)
        verifier = wallet_of(keys, counterparty)
    assert signature.hex() == case["signatureDerHex"]

    # The counterparty verifies with the signer's identity key as its counterparty.
    assert case["verifierCounterparty"] == signer.identity_key
    signer_key = case["verifierCounterparty"]
    assert verifier.derive_public_key(proto, key_id, signer_key).hex() == case["signingPublicKey"]
    verifier.verify_signature(data, signature, proto, key_id, signer_key)
    # Anyone else, or another key ID, does not verify it.
    with pytest.raises(InvalidSignatureError):
        verifier.verify_signature(data, signature, proto, key_id + "x", signer_key)
    with pytest.raises(InvalidSignatureError):
        verifier.verify_signature(data + b"x", signature, proto, key_id, signer_key)


def _der_integers(der: bytes) -> tuple[int, int]:
    assert der[0] == 0x30 and der[1] == len(der) - 2
    assert der[2] == 0x02
    r_len = der[3]
    r = int.from_bytes(der[4 : 4 + r_len], "big")
    assert der[4 + r_len] == 0x02
    s_len = der[5 + r_len]
    s = int.from_bytes(der[6 + r_len : 6 + r_len + s_len], "big")
    assert 6 + r_len + s_len == len(der)
    return r, s


def test_signature_high_s_variant_is_refused() -> None:
    """TS accepts the high-S twin of a valid signature; we refuse it (stricter)."""
    (high,) = [c for c in SIGNATURES["cases"] if "highSDerHex" in c]
    assert high["tsVerifierAccepts"] is True
    general = next(c for c in SIGNING_CASES if c["label"].startswith("general-style"))
    low_sig, high_sig = (
        bytes.fromhex(general["signatureDerHex"]),
        bytes.fromhex(high["highSDerHex"]),
    )
    r_low, s_low = _der_integers(low_sig)
    r_high, s_high = _der_integers(high_sig)
    assert r_low == r_high and s_low + s_high == brc42.CURVE_ORDER  # the same signature, twin s
    assert s_low <= brc42.CURVE_ORDER // 2 < s_high

    keys = SIGNATURES["keys"]
    verifier = wallet_of(keys, general["counterparty"])
    proto, key_id = protocol(general), general["keyID"]
    data, signer_key = bytes.fromhex(general["dataHex"]), general["verifierCounterparty"]
    verifier.verify_signature(data, low_sig, proto, key_id, signer_key)
    with pytest.raises(InvalidSignatureError):
        verifier.verify_signature(data, high_sig, proto, key_id, signer_key)


# --- symmetric.json -------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", SYMMETRIC["aesGcmFixedIv"], ids=[c["label"] for c in SYMMETRIC["aesGcmFixedIv"]]
)
def test_aes_gcm_fixed_iv(case: dict[str, Any]) -> None:
    key, iv = bytes.fromhex(case["keyHex"]), bytes.fromhex(case["ivHex"])
    plaintext = bytes.fromhex(case["plaintextHex"])
    assert plaintext == case["plaintextUtf8"].encode()
    sealed = brc2.encrypt(key, plaintext, iv=iv)
    assert sealed.hex() == case["combinedHex"]
    assert sealed.hex() == case["ivHex"] + case["ciphertextHex"] + case["tagHex"]
    assert base64.b64encode(sealed).decode() == case["combinedBase64"]
    # We open the empty plaintext too (TS refuses to: "Cipher text must not be empty").
    assert brc2.decrypt(key, sealed) == plaintext


@pytest.mark.parametrize("case", SYMMETRIC["walletEncrypt"], ids=lambda c: c["keyID"])
def test_wallet_encrypt_vector(case: dict[str, Any]) -> None:
    keys = BRC42["keys"]  # symmetric.json names the same vector wallets
    encryptor = named_wallet(keys, case["encryptor"])
    decryptor = named_wallet(keys, case["decryptor"])
    proto, key_id = protocol(case), case["keyID"]
    key = encryptor.symmetric_key(proto, key_id, decryptor.identity_key)
    assert key.hex() == case["symmetricKeyHex"]
    assert decryptor.symmetric_key(proto, key_id, encryptor.identity_key) == key
    sealed = bytes.fromhex(case["ciphertextHex"])
    plaintext = case["plaintextUtf8"].encode()
    assert decryptor.decrypt(sealed, proto, key_id, encryptor.identity_key) == plaintext
    assert encryptor.decrypt(sealed, proto, key_id, decryptor.identity_key) == plaintext
    assert brc2.decrypt(key, sealed) == plaintext


def test_minimal_31_byte_key_decrypts() -> None:
    quirk = SYMMETRIC["quirk_symmetricKeyToArrayMinimal"]
    full = bytes.fromhex(quirk["keyWithLeadingZeroHex"])
    short = bytes.fromhex(quirk["toArrayNoLength"])
    assert len(full) == 32 and len(short) == 31
    sealed = brc2.encrypt(full, b"field value")
    assert brc2.decrypt(short, sealed) == b"field value"
    iv = bytes(range(32))
    assert brc2.encrypt(short, b"x", iv=iv) == brc2.encrypt(full, b"x", iv=iv)


# --- nonces.json ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    NONCES["constructedWithFixedFirstHalf"],
    ids=[c["label"] for c in NONCES["constructedWithFixedFirstHalf"]],
)
def test_nonce_constructed(case: dict[str, Any]) -> None:
    keys = NONCES["keys"]
    owner = named_wallet(keys, case["wallet"])
    first_half = bytes.fromhex(case["firstHalfHex"])
    key_id = case["keyIdString"]
    invoice = invoice_number(NONCE_PROTOCOL, key_id)
    assert invoice.encode().hex() == case["invoiceNumberUtf8Hex"]
    hmac_key = minimal_bytes(owner.symmetric_key(NONCE_PROTOCOL, key_id, SELF))
    assert hmac_key.hex() == case["hmacKeyHex_asUsedByTS"]
    assert owner.create_hmac(first_half, NONCE_PROTOCOL, key_id, SELF).hex() == case["hmacHex"]

    nonce = create_nonce(owner, random_part=first_half)
    assert nonce == case["nonceBase64"]
    assert len(base64.b64decode(nonce)) == case["nonceByteLength"] == 48
    verify_nonce(owner, nonce)
    other = named_wallet(keys, "bob")
    with pytest.raises(NonceError, match="HMAC is not valid"):
        verify_nonce(other, nonce)


@pytest.mark.parametrize("case", NONCES["createdByCreateNonce"], ids=lambda c: c["nonceBase64"])
def test_nonce_created_by_reference(case: dict[str, Any]) -> None:
    keys = NONCES["keys"]
    assert case["verifyNonce_alice"] is True
    verify_nonce(named_wallet(keys, "alice"), case["nonceBase64"])
    with pytest.raises(NonceError):
        verify_nonce(named_wallet(keys, "bob"), case["nonceBase64"])


# --- certificate.json -----------------------------------------------------------------

DETERMINISTIC = CERTIFICATE["deterministicCertificate"]
CERT_JSON = DETERMINISTIC["certificateJson"]


def test_certificate_field_encryption() -> None:
    for name, spec in DETERMINISTIC["fieldEncryption"].items():
        key, iv = bytes.fromhex(spec["fieldKeyHex"]), bytes.fromhex(spec["ivHex"])
        sealed = brc2.encrypt(key, spec["plaintext"].encode(), iv=iv)
        assert (
            base64.b64encode(sealed).decode()
            == spec["ciphertextBase64"]
            == (CERT_JSON["fields"][name])
        )
        assert brc2.decrypt(key, sealed).decode() == spec["plaintext"]


def test_certificate_preimage_and_binary() -> None:
    cert = Certificate.from_json(CERT_JSON)
    preimage = cert.to_binary(include_signature=False)
    assert preimage.hex() == DETERMINISTIC["preimageHex_toBinaryFalse"]
    assert "".join(p["hex"] for p in DETERMINISTIC["preimageBreakdown"]) == preimage.hex()
    assert hashlib.sha256(preimage).hexdigest() == DETERMINISTIC["sha256OfPreimage"]
    assert cert.to_binary().hex() == DETERMINISTIC["fullBinaryHex_toBinaryTrue"]
    assert cert.to_binary() == preimage + cert.signature
    assert cert.to_json() == CERT_JSON


def test_certificate_signature_matches_when_resigned() -> None:
    keys = CERTIFICATE["keys"]
    certifier = named_wallet(keys, "certifier")
    cert = Certificate.from_json(CERT_JSON)
    assert cert.key_id == DETERMINISTIC["signatureKeyID"]
    assert tuple(DETERMINISTIC["signatureProtocolID"]) == SIGNATURE_PROTOCOL
    child = certifier.derive_private_key(SIGNATURE_PROTOCOL, cert.key_id, ANYONE)
    assert child.hex() == DETERMINISTIC["certifierSigningChildPrivateKey"]
    verifying = anyone().derive_public_key(SIGNATURE_PROTOCOL, cert.key_id, cert.certifier)
    assert verifying.hex() == DETERMINISTIC["verifierDerivedPublicKey_anyone"]
    assert verifying.hex() == DETERMINISTIC["certifierSigningChildPublicKey"]

    unsigned = Certificate.from_json({**CERT_JSON, "signature": ""})
    resigned = unsigned.sign(certifier)
    assert resigned.signature.hex() == DETERMINISTIC["signatureDerHex"] == CERT_JSON["signature"]
    assert resigned == cert
    resigned.verify()
    assert DETERMINISTIC["verifyResult"] is True
    cert.verify()


def test_certificate_from_binary_round_trip() -> None:
    full = bytes.fromhex(DETERMINISTIC["fullBinaryHex_toBinaryTrue"])
    parsed = Certificate.from_binary(full)
    assert parsed == Certificate.from_json(CERT_JSON)
    assert parsed.to_json() == DETERMINISTIC["fromBinaryParsed"]
    assert parsed.to_binary() == full
    parsed.verify()
    # Without the signature the same bytes parse as an unsigned certificate.
    unsigned = Certificate.from_binary(bytes.fromhex(DETERMINISTIC["preimageHex_toBinaryFalse"]))
    assert unsigned.signature == b""
    with pytest.raises(CertificateError):
        unsigned.verify()


def _flip_base64(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    "tamper",
    [
        lambda j: {**j, "fields": {**j["fields"], "name": _flip_base64(j["fields"]["name"])}},
        lambda j: {**j, "fields": {**j["fields"], "extra": "AAAA"}},
        lambda j: {**j, "fields": {k: v for k, v in j["fields"].items() if k != "Zip"}},
        lambda j: {**j, "serialNumber": _flip_base64(j["serialNumber"])},
        lambda j: {**j, "subject": vector("certificate.json")["keys"]["bob"]["publicKey"]},
        lambda j: {**j, "certifier": vector("certificate.json")["keys"]["alice"]["publicKey"]},
        lambda j: {**j, "revocationOutpoint": j["revocationOutpoint"][:-1] + "8"},
        lambda j: {**j, "signature": j["signature"][:-2] + "00"},
    ],
    ids=[
        "field-value",
        "added-field",
        "removed-field",
        "serial",
        "subject",
        "certifier",
        "outpoint",
        "signature",
    ],
)
def test_certificate_tampering_is_refused(tamper: Any) -> None:
    cert = Certificate.from_json(tamper(dict(CERT_JSON)))
    assert DETERMINISTIC["tamperedFieldVerifyResult"].endswith("Signature is not valid")
    with pytest.raises(CertificateError):
        cert.verify()


EDGE_CASES = CERTIFICATE["serializationEdgeCases"]


@pytest.mark.parametrize("case", EDGE_CASES, ids=[c["label"][:40] for c in EDGE_CASES])
def test_certificate_serialization_edge_case(case: dict[str, Any]) -> None:
    assert case["error"] is None
    cert = Certificate(
        type=CERT_JSON["type"],
        serial_number=CERT_JSON["serialNumber"],
        subject=CERT_JSON["subject"],
        certifier=CERT_JSON["certifier"],
        revocation_outpoint=case["revocationOutpoint"],
        fields=case["fields"],
    )
    assert locale_sorted(list(case["fields"])) == case["fieldOrderUsedByTS"]
    preimage = cert.to_binary(include_signature=False)
    assert preimage.hex() == case["preimageHex"]
    # ... and the bytes parse back into the same certificate.
    parsed = Certificate.from_binary(preimage)
    assert parsed == cert
    assert parsed.to_binary(include_signature=False) == preimage
