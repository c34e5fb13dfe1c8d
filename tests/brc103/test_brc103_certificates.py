"""BRC-52 certificates: issuing, the subject's view, selective revelation to a verifier,
JSON and binary forms, and the local revocation registry."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from brc103_support import (
    CERT_TYPE,
    OUTPOINT,
    alice,
    anyone,
    bob,
    carol,
    certifier,
    other_certifier,
)

from trustmesh.brc103.certificates import (
    FIELD_PROTOCOL,
    MAX_FIELDS,
    NO_REVOCATION,
    Certificate,
    MasterCertificate,
    VerifiableCertificate,
    is_revocable,
    parse_outpoint,
)
from trustmesh.brc103.errors import CertificateError, CertificateFormatError
from trustmesh.brc103.revocation import LocalRevocationRegistry, RevocationChecker
from trustmesh.brc103.wallet import minimal_bytes
from trustmesh.crypto import brc2
from trustmesh.errors import DecodeError

FIELDS = {"name": "Alice Example", "email": "alice@example.com", "country": "NZ"}


@pytest.fixture(scope="module")
def master() -> MasterCertificate:
    return MasterCertificate.issue(
        certifier(), alice().identity_key, CERT_TYPE, FIELDS, revocation_outpoint=OUTPOINT
    )


# --- issuing and the subject's view ---------------------------------------------------


def test_issue_signs_and_subject_decrypts(master: MasterCertificate) -> None:
    cert = master.certificate
    assert cert.subject == alice().identity_key
    assert cert.certifier == certifier().identity_key
    assert cert.type == CERT_TYPE
    assert cert.revocation_outpoint == OUTPOINT
    assert len(base64.b64decode(cert.serial_number)) == 32
    assert set(cert.fields) == set(master.master_keyring) == set(FIELDS)
    cert.verify()
    assert master.decrypt_fields(alice()) == FIELDS
    # Field values are ciphertexts, not plaintexts.
    assert not set(cert.fields.values()) & set(FIELDS.values())


def test_master_keyring_opens_for_the_certifier_too(master: MasterCertificate) -> None:
    """Each master key is sealed certifier↔subject: either side opens it."""
    sealed = base64.b64decode(master.master_keyring["name"])
    key = certifier().decrypt(sealed, FIELD_PROTOCOL, "name", alice().identity_key)
    assert key == master.field_key(alice(), "name")
    field = base64.b64decode(master.certificate.fields["name"])
    assert brc2.decrypt(key, field).decode() == FIELDS["name"]


def test_issue_defaults_and_explicit_serial() -> None:
    serial = base64.b64encode(bytes(range(32))).decode()
    issued = MasterCertificate.issue(
        certifier(), bob().identity_key, CERT_TYPE, {"a": "1"}, serial_number=serial
    )
    assert issued.certificate.serial_number == serial
    assert issued.certificate.revocation_outpoint == NO_REVOCATION
    assert not is_revocable(NO_REVOCATION)
    assert is_revocable(OUTPOINT)
    issued.certificate.verify()
    with pytest.raises(CertificateError):
        MasterCertificate.issue(certifier(), bob().identity_key, CERT_TYPE, {})


def test_non_subject_cannot_decrypt_master_keyring(master: MasterCertificate) -> None:
    with pytest.raises(CertificateError):
        master.decrypt_fields(bob())
    with pytest.raises(CertificateError):
        master.field_key(alice(), "no such field")
    with pytest.raises(CertificateError):
        master.reveal(bob(), carol().identity_key, ["name"])  # only the subject reveals


# --- selective revelation -------------------------------------------------------------


def test_verifier_decrypts_only_revealed_fields(master: MasterCertificate) -> None:
    shown = master.reveal(alice(), bob().identity_key, ["name", "country"])
    assert set(shown.keyring) == {"name", "country"}
    assert shown.certificate == master.certificate
    assert shown.decrypt_fields(bob()) == {"name": "Alice Example", "country": "NZ"}
    # The keyring holds nothing that opens "email" ...
    with pytest.raises(CertificateError):
        VerifiableCertificate(
            master.certificate, {**shown.keyring, "email": shown.keyring["name"]}
        ).decrypt_fields(bob())
    # ... and a keyring naming a field the certificate lacks is refused.
    with pytest.raises(CertificateError):
        VerifiableCertificate(master.certificate, {"nope": shown.keyring["name"]}).decrypt_fields(
            bob()
        )


def test_third_party_cannot_decrypt_revealed_fields(master: MasterCertificate) -> None:
    shown = master.reveal(alice(), bob().identity_key, ["name"])
    for outsider in (carol(), alice(), certifier(), anyone()):
        with pytest.raises(CertificateError):
            shown.decrypt_fields(outsider)


def test_reveal_refuses_unknown_field_and_empty_keyring(master: MasterCertificate) -> None:
    with pytest.raises(CertificateError):
        master.reveal(alice(), bob().identity_key, ["salary"])
    nothing = master.reveal(alice(), bob().identity_key, [])
    with pytest.raises(CertificateError):
        nothing.decrypt_fields(bob())


def test_keyring_entry_that_is_not_base64(master: MasterCertificate) -> None:
    with pytest.raises(CertificateError):
        VerifiableCertificate(master.certificate, {"name": "!!"}).decrypt_fields(bob())
    broken = MasterCertificate(master.certificate, {**master.master_keyring, "name": "!!"})
    with pytest.raises(CertificateError):
        broken.decrypt_fields(alice())


def test_31_byte_field_key_in_a_keyring() -> None:
    """A field key with a leading zero travels in minimal form (31 bytes, as the reference
    writes it) and still opens its field."""
    field_key = b"\0" + bytes(range(1, 32))
    ciphertext = base64.b64encode(brc2.encrypt(field_key, b"short key")).decode()
    cert = Certificate(
        type=CERT_TYPE,
        serial_number=base64.b64encode(b"s" * 32).decode(),
        subject=alice().identity_key,
        certifier=certifier().identity_key,
        revocation_outpoint=OUTPOINT,
        fields={"nick": ciphertext},
    ).sign(certifier())
    sealed = certifier().encrypt(minimal_bytes(field_key), FIELD_PROTOCOL, "nick", cert.subject)
    assert len(minimal_bytes(field_key)) == 31
    master = MasterCertificate(cert, {"nick": base64.b64encode(sealed).decode()})
    assert master.decrypt_fields(alice()) == {"nick": "short key"}
    shown = master.reveal(alice(), bob().identity_key, ["nick"])
    assert shown.decrypt_fields(bob()) == {"nick": "short key"}


def test_field_value_that_does_not_decrypt(master: MasterCertificate) -> None:
    cert = master.certificate
    garbled = Certificate(
        type=cert.type,
        serial_number=cert.serial_number,
        subject=cert.subject,
        certifier=cert.certifier,
        revocation_outpoint=cert.revocation_outpoint,
        fields={**cert.fields, "name": base64.b64encode(bytes(60)).decode()},
        signature=cert.signature,
    )
    with pytest.raises(CertificateError):
        MasterCertificate(garbled, master.master_keyring).decrypt_fields(alice())


# --- JSON and binary forms ------------------------------------------------------------


def test_certificate_json_round_trip(master: MasterCertificate) -> None:
    cert = master.certificate
    obj = cert.to_json()
    assert list(obj) == [
        "type",
        "serialNumber",
        "subject",
        "certifier",
        "revocationOutpoint",
        "fields",
        "signature",
    ]
    assert obj["signature"] == cert.signature.hex()
    again = Certificate.from_json(json.loads(json.dumps(obj)))
    assert again == cert
    again.verify()


def test_master_certificate_json_round_trip(master: MasterCertificate) -> None:
    obj = master.to_json()
    assert list(obj)[-1] == "masterKeyring"
    again = MasterCertificate.from_json(json.loads(json.dumps(obj)))
    assert again == master
    assert again.decrypt_fields(alice()) == FIELDS


def test_verifiable_certificate_json_round_trip(master: MasterCertificate) -> None:
    shown = master.reveal(alice(), bob().identity_key, ["email"])
    obj = shown.to_json()
    assert list(obj)[-2:] == ["signature", "keyring"]  # the reference's wire order
    again = VerifiableCertificate.from_json(json.loads(json.dumps(obj)))
    assert again == shown
    assert again.decrypt_fields(bob()) == {"email": "alice@example.com"}


def test_certificate_binary_round_trip(master: MasterCertificate) -> None:
    cert = master.certificate
    assert Certificate.from_binary(cert.to_binary()) == cert
    unsigned = Certificate.from_binary(cert.to_binary(include_signature=False))
    assert unsigned.signature == b""
    assert unsigned.sign(certifier()).to_binary() == cert.to_binary()


def test_sign_sets_the_certifier(master: MasterCertificate) -> None:
    resigned = master.certificate.sign(other_certifier())
    assert resigned.certifier == other_certifier().identity_key
    resigned.verify()
    assert resigned.to_binary(include_signature=False) != master.certificate.to_binary(
        include_signature=False
    )


@pytest.mark.parametrize(
    ("member", "value"),
    [
        ("type", "AAAA"),
        ("type", "not base64"),
        ("serialNumber", base64.b64encode(bytes(31)).decode()),
        ("subject", "02" + "AB" * 32),
        ("subject", "04" + "ab" * 32),
        ("certifier", "02ab"),
        ("revocationOutpoint", "ab" * 32 + ".01"),
        ("revocationOutpoint", "AB" * 32 + ".1"),
        ("revocationOutpoint", "ab" * 31 + ".1"),
        ("revocationOutpoint", "ab" * 32 + "."),
        ("fields", {"": "x"}),
        ("fields", {"a": 1}),
        ("fields", ["a"]),
        ("fields", {"a" * 257: "x"}),
        ("fields", {f"f{i}": "x" for i in range(MAX_FIELDS + 1)}),
        ("signature", "xyz"),
        ("signature", 12),
        ("signature", "30" * 74),
        ("type", None),
    ],
)
def test_certificate_from_json_refuses(
    member: str, value: object, master: MasterCertificate
) -> None:
    obj = {**master.certificate.to_json(), member: value}
    with pytest.raises(CertificateFormatError):
        Certificate.from_json(obj)
    assert issubclass(CertificateFormatError, DecodeError)


@pytest.mark.parametrize("obj", [None, [], "x", 1])
def test_from_json_refuses_non_objects(obj: object) -> None:
    for parse in (
        Certificate.from_json,
        MasterCertificate.from_json,
        VerifiableCertificate.from_json,
    ):
        with pytest.raises(CertificateFormatError):
            parse(obj)


def test_verifiable_and_master_from_json_need_their_keyring(master: MasterCertificate) -> None:
    with pytest.raises(CertificateFormatError):
        VerifiableCertificate.from_json(master.certificate.to_json())
    with pytest.raises(CertificateFormatError):
        MasterCertificate.from_json({**master.certificate.to_json(), "masterKeyring": {"a": 1}})


def test_outpoints() -> None:
    assert parse_outpoint("ab" * 32 + ".0") == (bytes.fromhex("ab" * 32), 0)
    assert parse_outpoint("ab" * 32) == (bytes.fromhex("ab" * 32), None)
    assert parse_outpoint("ab" * 32 + ".4294967295")[1] == 0xFFFFFFFF


def test_outpoint_index_range_matches_binary_form() -> None:
    """Every certificate the constructor accepts must survive its own binary form: an
    output index is a uint32, so the JSON side must refuse what from_binary refuses."""
    unsigned = Certificate(
        type=CERT_TYPE,
        serial_number=CERT_TYPE,
        subject=alice().identity_key,
        certifier=certifier().identity_key,
        revocation_outpoint="ab" * 32 + ".4294967295",
        fields={"a": "x"},
    )
    assert Certificate.from_binary(unsigned.to_binary()) == unsigned
    too_big = "ab" * 32 + ".4294967296"
    try:
        cert = Certificate(
            type=CERT_TYPE,
            serial_number=CERT_TYPE,
            subject=alice().identity_key,
            certifier=certifier().identity_key,
            revocation_outpoint=too_big,
            fields={"a": "x"},
        )
    except CertificateFormatError:
        return  # refused up front: consistent
    assert Certificate.from_binary(cert.to_binary()) == cert


# --- revocation -----------------------------------------------------------------------


def test_revocation_registry_in_memory() -> None:
    registry = LocalRevocationRegistry()
    assert isinstance(registry, RevocationChecker)
    assert not registry.is_revoked(OUTPOINT)
    registry.revoke(OUTPOINT)
    registry.revoke(OUTPOINT)  # idempotent
    assert registry.is_revoked(OUTPOINT)
    assert not registry.is_revoked("ab" * 32 + ".2")
    with pytest.raises(CertificateFormatError):
        registry.revoke("not an outpoint")
    registry.close()


def test_revocation_registry_persists_in_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "revoked.sqlite"
    first = LocalRevocationRegistry(path)
    try:
        first.revoke(OUTPOINT, now_ms=1234, reason="key compromise")
        assert first.is_revoked(OUTPOINT)
    finally:
        first.close()
    second = LocalRevocationRegistry(path)
    try:
        assert second.is_revoked(OUTPOINT)
        assert not second.is_revoked("ab" * 32 + ".2")
        second.revoke(OUTPOINT)  # already there: no error
        second.revoke("cd" * 32 + ".0")
    finally:
        second.close()
    third = LocalRevocationRegistry(path)
    try:
        assert third.is_revoked("cd" * 32 + ".0")
        assert third.is_revoked(OUTPOINT)
    finally:
        third.close()


def test_two_registries_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    writer, reader = LocalRevocationRegistry(path), LocalRevocationRegistry(path)
    try:
        assert not reader.is_revoked(OUTPOINT)
        writer.revoke(OUTPOINT)
        assert reader.is_revoked(OUTPOINT)
    finally:
        writer.close()
        reader.close()
