"""JWKS in the OPEN and its detached JWS bound to the TLS session."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc.jwk import ECKey, OKPKey

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.jose import JwsSigner, verify_detached
from trustmesh.catalyst.session import (
    CatalystConfig,
    CatalystSession,
    NotificationEvent,
    SessionEstablished,
)
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsEstablished
from trustmesh.wire.frames import FrameDecoder, encode_frame


class FakeTls:
    established: TlsEstablished | None = None  # no certificate expiry

    def __init__(self, names: frozenset[str], secret: bytes = b"session-1") -> None:
        self.names = names
        self.secret = secret

    def peer_names(self) -> frozenset[str]:
        return self.names

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return hmac.new(self.secret, label + b"|" + context, hashlib.sha256).digest()


def ec_signer() -> JwsSigner:
    return JwsSigner(ECKey.generate_key("P-256", private=True))


def ed_signer() -> JwsSigner:
    return JwsSigner(OKPKey.generate_key("Ed25519", private=True))


def run(
    a_cfg: CatalystConfig, b_cfg: CatalystConfig, *, b_secret: bytes = b"session-1"
) -> tuple[list[Event], list[Event]]:
    a = CatalystSession(a_cfg, initiator=True, binding=FakeTls(frozenset({"node-b"})))
    b = CatalystSession(b_cfg, initiator=False, binding=FakeTls(frozenset({"node-a"}), b_secret))
    a.start(0.0)
    b.start(0.0)
    a_events: list[Event] = []
    b_events: list[Event] = []
    for _ in range(6):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if out_a:
            b_events += b.receive_data(out_a, 0.0)
        if out_b:
            a_events += a.receive_data(out_b, 0.0)
    return a_events, b_events


def refusal(events: list[Event]) -> tuple[int, int]:
    [note] = [e for e in events if isinstance(e, NotificationEvent) and e.direction == "sent"]
    assert isinstance(events[-1], ConnectionClosed)
    return note.code, note.subcode


B = CatalystConfig(65002, "node-b", require_jws=True)


@pytest.mark.parametrize("signer", [ec_signer, ed_signer], ids=["ES256", "Ed25519"])
def test_signed_open_is_accepted(signer: object) -> None:
    assert callable(signer)
    a_cfg = CatalystConfig(65001, "node-a", jws_key=signer())
    _, b_events = run(a_cfg, B)
    assert any(isinstance(e, SessionEstablished) for e in b_events)


def test_missing_jws_is_refused_when_required() -> None:
    _, b_events = run(CatalystConfig(65001, "node-a"), B)
    assert refusal(b_events) == (2, m.JWS_BAD_SIGNATURE)


def test_open_replayed_on_another_session_fails() -> None:
    _, b_events = run(CatalystConfig(65001, "node-a", jws_key=ec_signer()), B, b_secret=b"other")
    assert refusal(b_events) == (2, m.JWS_BAD_SIGNATURE)


def tampered_open(change: dict[str, object]) -> bytes:
    a = CatalystSession(
        CatalystConfig(65001, "node-a", jws_key=ec_signer()),
        initiator=True,
        binding=FakeTls(frozenset({"node-b"})),
    )
    a.start(0.0)
    [payload] = FrameDecoder(m.MAX_MESSAGE).feed(a.data_to_send())
    sent = m.decode(payload)
    assert isinstance(sent, m.Open)
    return encode_frame(m.encode(dataclasses.replace(sent, **change)))  # type: ignore[arg-type]


def deliver(frame: bytes) -> list[Event]:
    b = CatalystSession(B, initiator=False, binding=FakeTls(frozenset({"node-a"})))
    b.start(0.0)
    return b.receive_data(frame, 0.0)


def test_a_changed_field_breaks_the_signature() -> None:
    assert refusal(deliver(tampered_open({"hold_time": 90}))) == (2, m.JWS_BAD_SIGNATURE)


def test_unknown_kid_is_refused() -> None:
    other = ec_signer()
    assert refusal(deliver(tampered_open({"jwks": other.jwks()}))) == (2, m.JWS_UNKNOWN_KID)


def test_key_swapped_under_the_same_kid_is_refused() -> None:
    frame = tampered_open({})
    sent = m.decode(FrameDecoder(m.MAX_MESSAGE).feed(frame)[0])
    assert isinstance(sent, m.Open)
    assert sent.jwks is not None
    impostor = ec_signer().jwks()["keys"][0]
    impostor["kid"] = sent.jwks["keys"][0]["kid"]
    forged = encode_frame(m.encode(dataclasses.replace(sent, jwks={"keys": [impostor]})))
    # A kid is the key's RFC 7638 thumbprint: another key cannot carry it (2/245) ...
    assert refusal(deliver(forged)) == (2, m.JWKS_MALFORMED)
    # ... and without a kid the impostor key is known by its own thumbprint only (2/244).
    del impostor["kid"]
    forged = encode_frame(m.encode(dataclasses.replace(sent, jwks={"keys": [impostor]})))
    assert refusal(deliver(forged)) == (2, m.JWS_UNKNOWN_KID)


@pytest.mark.parametrize(
    ("jwks", "jws", "subcode"),
    [
        ({"keys": []}, "a..b", m.JWKS_MALFORMED),
        ({"keys": [{"kty": "nope"}]}, "a..b", m.JWKS_MALFORMED),
        ({"keys": [{"kty": "oct", "k": "AAAA", "kid": "x"}]}, "e30..AAAA", m.JWKS_MALFORMED),
    ],
)
def test_malformed_jwks_and_jws(jwks: dict[str, object], jws: str, subcode: int) -> None:
    with pytest.raises(Exception) as info:  # the subcode is checked below
        verify_detached(jws, b"payload", jwks)
    assert getattr(info.value, "subcode", None) == subcode


def test_non_detached_jws_is_refused() -> None:
    signer = ec_signer()
    detached = signer.sign_detached(b"payload")
    header, _, signature = detached.split(".")
    with pytest.raises(Exception) as info:  # the subcode is checked below
        verify_detached(f"{header}.cGF5bG9hZA.{signature}", b"payload", signer.jwks())
    assert getattr(info.value, "subcode", None) == m.JWS_BAD_SIGNATURE


def test_signer_loads_pem_files(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for name, key in (("ec.pem", ec_key), ("ed.pem", ed_key)):
        (tmp_path / name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    assert JwsSigner.from_pem_file(tmp_path / "ec.pem").alg == "ES256"
    assert JwsSigner.from_pem_file(tmp_path / "ed.pem").alg == "Ed25519"
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(ValueError):
        JwsSigner.from_pem_file(tmp_path / "junk.pem")
