"""Challenge nonces: recognised by their MAC, for one token or one serial, for 5
minutes, with nothing stored per challenge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.pki.challenge import KEY_FILE, Challenges, Purpose
from trustmesh.pki.errors import AttestationFailed

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
KEY = bytes(range(32))


def test_a_nonce_is_good_for_its_purpose_until_it_expires() -> None:
    challenges = Challenges(KEY)
    purpose = Purpose.enroll("ab" * 32)
    nonce, expires = challenges.issue(purpose, NOW)
    assert len(nonce) == 40 and expires == NOW + timedelta(minutes=5)
    challenges.check(nonce, purpose, NOW + timedelta(minutes=4, seconds=59))
    with pytest.raises(AttestationFailed, match="expired"):
        challenges.check(nonce, purpose, expires)
    with pytest.raises(AttestationFailed, match="not issued by this CA for this request"):
        challenges.check(nonce, Purpose.enroll("cd" * 32), NOW)
    with pytest.raises(AttestationFailed, match="not issued by this CA"):
        challenges.check(nonce, Purpose.rotate(0xAB), NOW)
    with pytest.raises(AttestationFailed, match="not issued by this CA"):
        Challenges(bytes(32)).check(nonce, purpose, NOW)
    # The expiry is under the MAC: pushing it out breaks the tag.
    later = (int.from_bytes(nonce[:8], "big") + 3600).to_bytes(8, "big")
    with pytest.raises(AttestationFailed, match="not issued"):
        challenges.check(later + nonce[8:], purpose, NOW + timedelta(minutes=6))


def test_nonces_are_fresh_and_the_key_is_kept_in_the_ca_directory(tmp_path: Path) -> None:
    first = Challenges.for_directory(tmp_path)
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    purpose = Purpose.rotate(12345)
    a, _ = first.issue(purpose, NOW)
    b, _ = first.issue(purpose, NOW)
    assert a != b
    # Another process serving the same CA recognises the nonce.
    Challenges.for_directory(tmp_path).check(a, purpose, NOW)


def test_the_credential_secret_depends_on_nonce_ak_and_ek() -> None:
    challenges = Challenges(KEY)
    nonce, _ = challenges.issue(Purpose.rotate(1), NOW)
    secret = challenges.credential_secret(nonce, b"ak", b"ek")
    assert len(secret) == 32
    assert secret == challenges.credential_secret(nonce, b"ak", b"ek")
    others = {
        challenges.credential_secret(nonce, b"ak2", b"ek"),
        challenges.credential_secret(nonce, b"ak", b"ek2"),
        challenges.credential_secret(bytes(40), b"ak", b"ek"),
    }
    assert secret not in others and len(others) == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_are_refused_unless_issued(nonce: bytes) -> None:
    with pytest.raises(AttestationFailed):
        Challenges(KEY).check(nonce, Purpose.enroll("00"), NOW)
