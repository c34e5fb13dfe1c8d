"""Hostile OPENs that frame and parse correctly and look plausible, so that they reach
the PSK and JWS checks: whatever they carry, the session answers with one NOTIFICATION
(2/240..2/245) and closes, and no exception escapes (issue 16, item 16)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey, OKPKey

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.jose import JwsSigner
from trustmesh.catalyst.session import (
    CatalystConfig,
    CatalystSession,
    NotificationEvent,
    State,
    jws_payload,
    psk_proof,
)
from trustmesh.sansio import ConnectionClosed
from trustmesh.tls import TlsEstablished
from trustmesh.wire.frames import encode_frame


class FakeTls:
    established: TlsEstablished | None = None  # no certificate expiry

    def peer_names(self) -> frozenset[str]:
        return frozenset({"node-a"})

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return hmac.new(b"session-1", label + b"|" + context, hashlib.sha256).digest()


TLS = FakeTls()
SECRET = b"0123456789abcdef0123"
SIGNERS = (
    JwsSigner(ECKey.generate_key("P-256", private=True)),
    JwsSigner(OKPKey.generate_key("Ed25519", private=True)),
)
# The refusals an OPEN that passed the hold-time, identifier and ASN checks can get.
PSK_AND_JWS = {
    (m.OPEN_MESSAGE_ERROR, subcode)
    for subcode in (
        m.PSK_UNKNOWN_KEY,
        m.PSK_BAD_PROOF,
        m.PSK_REQUIRED,
        m.JWS_BAD_SIGNATURE,
        m.JWS_UNKNOWN_KID,
        m.JWKS_MALFORMED,
    )
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def base(**changes: Any) -> m.Open:
    return dataclasses.replace(m.Open(65001, "node-a", 180), **changes)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
b64url_text = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
headers = st.one_of(
    st.builds(
        lambda alg, kid, extra: json.dumps({"alg": alg, "kid": kid, **extra}).encode(),
        st.sampled_from(["ES256", "Ed25519", "HS256", "none", "EdDSA"]) | json_values,
        st.sampled_from([s.kid for s in SIGNERS]) | json_values,
        st.dictionaries(st.sampled_from(["crit", "b64", "jwk", "typ", "x5u"]), json_values),
    ),
    st.integers(min_value=1, max_value=2500).map(nested),  # RecursionError in json.loads
    st.binary(max_size=64),
    json_values.map(lambda value: json.dumps(value).encode()),
)


@st.composite
def jwk_members(draw: st.DrawFn) -> Any:
    signer = draw(st.sampled_from(SIGNERS))
    key = dict(signer.jwks()["keys"][0])
    change = draw(st.sampled_from(["none", "drop-kid", "fresh-kid", "replace", "add"]))
    if change == "drop-kid":
        del key["kid"]
    elif change == "fresh-kid":
        key["kid"] = draw(st.text(max_size=20))
    elif change == "replace":
        key[draw(st.sampled_from(sorted(key)))] = draw(json_values | b64url_text)
    elif change == "add":
        key[draw(st.sampled_from(["d", "use", "key_ops", "k", "x5c"]))] = draw(json_values)
    return key


jwks_values = st.one_of(
    st.builds(lambda keys: {"keys": keys}, st.lists(jwk_members(), min_size=1, max_size=3)),
    st.builds(lambda keys: {"keys": keys}, st.lists(json_values, max_size=3)),
    st.just({"keys": []}),
)


@st.composite
def hostile_opens(draw: st.DrawFn) -> m.Open:
    psk = draw(st.sampled_from([None, None, "k1", "k1", "k2"]))
    proof_kind = draw(st.sampled_from(["none", "valid", "valid", "base64url", "text"]))
    proof = {
        "none": None,
        "valid": psk_proof(SECRET, TLS, sender_is_initiator=True),
        "base64url": draw(b64url_text),
        "text": draw(st.text(min_size=1, max_size=64)),  # non-ASCII included
    }[proof_kind]
    jws_kind = draw(st.sampled_from(["none", "signed", "header", "text"]))
    if jws_kind == "none":
        return base(psk=psk, psk_proof=proof, jwks=draw(st.none() | jwks_values))
    signer = draw(st.sampled_from(SIGNERS))
    jwks = draw(st.just(signer.jwks()) | st.sampled_from(SIGNERS).map(JwsSigner.jwks) | jwks_values)
    unsigned = base(psk=psk, psk_proof=proof, jwks=jwks)
    signature = signer.sign_detached(jws_payload(unsigned, TLS, sender_is_initiator=True))
    if jws_kind == "header":
        header = b64url(draw(headers))[:3000] or "e30"
        signature = f"{header}..{draw(b64url_text | st.just(signature.split('.')[2]))}"
    elif jws_kind == "text":
        signature = draw(st.text(min_size=1, max_size=64))
    return dataclasses.replace(unsigned, jws=signature)


def answer(
    offer: m.Open, *, require_psk: bool = False, require_jws: bool = False
) -> tuple[list[Any], str]:
    config = CatalystConfig(
        65002,
        "node-b",
        psk_secrets={"k1": SECRET},
        require_psk=require_psk,
        require_jws=require_jws,
    )
    b = CatalystSession(config, initiator=False, binding=TLS)
    b.start(0.0)
    b.data_to_send()
    events = b.receive_data(encode_frame(m.encode(offer), m.MAX_MESSAGE), 0.0)
    sent = [e for e in events if isinstance(e, NotificationEvent) and e.direction == "sent"]
    if b.state is State.OPEN_CONFIRM:
        assert sent == []
        return events, "accepted"
    assert len(sent) == 1
    assert isinstance(events[-1], ConnectionClosed)
    assert b.data_to_send(), "the NOTIFICATION is queued"
    assert (sent[0].code, sent[0].subcode) in PSK_AND_JWS, sent[0]
    return events, f"{sent[0].code}/{sent[0].subcode}"


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_opens(), st.booleans(), st.booleans())
@example(base(psk="k1", psk_proof="é" * 43), False, False)
@example(
    base(jwks=SIGNERS[0].jwks(), jws=f"{b64url(nested(1500))}..AAAA"),
    False,
    True,
)
def test_hostile_opens_reach_psk_and_jws_checks_and_get_a_notification(
    offer: m.Open, require_psk: bool, require_jws: bool
) -> None:
    _, outcome = answer(offer, require_psk=require_psk, require_jws=require_jws)
    event(outcome)


def refusal(offer: m.Open) -> tuple[int, int]:
    events, _ = answer(offer)
    sent = [e for e in events if isinstance(e, NotificationEvent)]
    return sent[0].code, sent[0].subcode


def test_a_non_ascii_psk_proof_gets_2_241() -> None:
    assert refusal(base(psk="k1", psk_proof="é" * 43)) == (2, m.PSK_BAD_PROOF)
    assert refusal(base(psk="k1", psk_proof="\u0661" * 43)) == (2, m.PSK_BAD_PROOF)


def test_a_deeply_nested_jws_header_gets_2_243() -> None:
    forged = f"{b64url(nested(1500))}..AAAA"
    assert refusal(base(jwks=SIGNERS[0].jwks(), jws=forged)) == (2, m.JWS_BAD_SIGNATURE)


def test_a_valid_psk_and_jws_open_is_accepted() -> None:
    """The fuzzer's valid inputs really are valid: its refusals come from its mutations."""
    signer = SIGNERS[0]
    unsigned = base(
        psk="k1", psk_proof=psk_proof(SECRET, TLS, sender_is_initiator=True), jwks=signer.jwks()
    )
    signed = dataclasses.replace(
        unsigned,
        jws=signer.sign_detached(jws_payload(unsigned, TLS, sender_is_initiator=True)),
    )
    assert answer(signed, require_psk=True, require_jws=True)[1] == "accepted"
