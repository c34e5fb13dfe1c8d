"""The node directory's crash safety: a rotation interrupted between writing the new
pair and moving it into place is finished, never left half done, and never pairs a key
with a certificate for another key; the previous pair is deleted once its certificate
has expired or is revoked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.api.ca_client import (
    NEXT_CERT,
    NEXT_KEY,
    NEXT_PUB,
    PREV_CERT,
    PREV_KEY,
    finish_interrupted_rotation,
    forget_previous_key,
    prune_previous,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _cert(key: ec.EllipticCurvePrivateKey, *, serial: int = 1, hours: float = 72) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - timedelta(minutes=5))
        .not_valid_after(NOW + timedelta(hours=hours))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _pub(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def old() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def new() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _node(directory: Path, key: ec.EllipticCurvePrivateKey) -> bytes:
    (directory / "node.key").write_text("old key")
    (directory / "node.crt").write_bytes(current := _cert(key))
    return current


def test_nothing_to_finish(tmp_path: Path, old: ec.EllipticCurvePrivateKey) -> None:
    _node(tmp_path, old)
    assert not finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.key").read_text() == "old key"


def test_a_complete_new_pair_is_moved_into_place(
    tmp_path: Path, old: ec.EllipticCurvePrivateKey, new: ec.EllipticCurvePrivateKey
) -> None:
    _node(tmp_path, old)
    (tmp_path / NEXT_KEY).write_text("new key")
    (tmp_path / NEXT_PUB).write_bytes(_pub(new))
    issued = _cert(new)
    (tmp_path / NEXT_CERT).write_bytes(issued)
    assert finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.key").read_text() == "new key"
    assert (tmp_path / "node.crt").read_bytes() == issued
    assert not any((tmp_path / n).exists() for n in (NEXT_KEY, NEXT_CERT, NEXT_PUB))


def test_a_crash_after_the_key_moved_is_finished(
    tmp_path: Path, old: ec.EllipticCurvePrivateKey, new: ec.EllipticCurvePrivateKey
) -> None:
    _node(tmp_path, old)
    (tmp_path / "node.key").write_text("new key")  # moved; the certificate was not yet
    (tmp_path / NEXT_PUB).write_bytes(_pub(new))
    issued = _cert(new)
    (tmp_path / NEXT_CERT).write_bytes(issued)
    assert finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.crt").read_bytes() == issued


def test_a_new_key_without_its_certificate_is_not_used(
    tmp_path: Path, old: ec.EllipticCurvePrivateKey
) -> None:
    _node(tmp_path, old)
    (tmp_path / NEXT_KEY).write_text("half-written rotation")  # the certificate comes last
    assert not finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.key").read_text() == "old key"
    assert (tmp_path / NEXT_KEY).exists()  # kept: the next rotation asks again with it


def test_a_kept_key_certificate_is_never_paired_with_a_stale_new_key(
    tmp_path: Path, old: ec.EllipticCurvePrivateKey, new: ec.EllipticCurvePrivateKey
) -> None:
    """A rotation to a new key crashed before its certificate came (node.next.key left);
    then `rotate --keep-key` got a certificate for the current key. Today's code moves
    the stale key into node.key beside that certificate: a key paired with a certificate
    for another key."""
    _node(tmp_path, old)
    (tmp_path / NEXT_KEY).write_text("stale new key")
    (tmp_path / NEXT_PUB).write_bytes(_pub(new))
    renewed = _cert(old, serial=2)
    (tmp_path / NEXT_CERT).write_bytes(renewed)
    assert finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.key").read_text() == "old key"
    assert (tmp_path / "node.crt").read_bytes() == renewed
    assert not (tmp_path / NEXT_KEY).exists()


def test_a_certificate_for_a_key_not_held_is_discarded(
    tmp_path: Path, old: ec.EllipticCurvePrivateKey, new: ec.EllipticCurvePrivateKey
) -> None:
    current = _node(tmp_path, old)
    (tmp_path / NEXT_KEY).write_text("new key")
    (tmp_path / NEXT_PUB).write_bytes(_pub(new))
    stranger = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / NEXT_CERT).write_bytes(_cert(stranger))
    assert not finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.key").read_text() == "old key"
    assert (tmp_path / "node.crt").read_bytes() == current
    assert not (tmp_path / NEXT_CERT).exists() and (tmp_path / NEXT_KEY).exists()


def _previous(directory: Path, key: ec.EllipticCurvePrivateKey, serial: int) -> None:
    (directory / PREV_KEY).write_text("previous key")
    (directory / PREV_CERT).write_bytes(_cert(key, serial=serial, hours=1))


def test_the_previous_pair_goes_once_expired_or_revoked(
    tmp_path: Path, old: ec.EllipticCurvePrivateKey
) -> None:
    _previous(tmp_path, old, 7)
    assert not prune_previous(tmp_path, now=NOW)
    assert not prune_previous(tmp_path, now=NOW, revoked={8})
    assert prune_previous(tmp_path, now=NOW, revoked={7})
    assert not (tmp_path / PREV_KEY).exists() and not (tmp_path / PREV_CERT).exists()
    _previous(tmp_path, old, 7)
    assert prune_previous(tmp_path, now=NOW + timedelta(hours=1))
    assert not (tmp_path / PREV_KEY).exists()


async def test_a_running_node_forgets_the_previous_key_at_the_end_of_the_overlap(
    tmp_path: Path, old: ec.EllipticCurvePrivateKey
) -> None:
    _previous(tmp_path, old, 7)
    clock = [NOW]
    waits: list[float] = []

    class Stop(Exception):
        pass

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            raise Stop
        clock[0] += timedelta(seconds=seconds)

    with pytest.raises(Stop):
        await forget_previous_key(tmp_path, now=lambda: clock[0], sleep=sleep, recheck=7200)
    # It slept until the previous certificate expired (1 h), deleted the pair, then
    # looked again every `recheck` seconds for the next one.
    assert waits == [3600.0, 7200, 7200]
    assert not (tmp_path / PREV_KEY).exists() and not (tmp_path / PREV_CERT).exists()
