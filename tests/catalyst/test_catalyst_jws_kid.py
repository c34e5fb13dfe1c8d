"""A JWS key is named by its RFC 7638 thumbprint (issue 16, item 15): a fresh key cannot
claim the kid a peering policy pins."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.errors import CatalystError
from trustmesh.catalyst.jose import JwsSigner, verify_detached
from trustmesh.catalyst.policy import CedarPolicy, PeeringRequest
from trustmesh.catalyst.session import (
    CatalystConfig,
    CatalystSession,
    NotificationEvent,
    State,
    jws_payload,
)
from trustmesh.tls import TlsEstablished
from trustmesh.wire.frames import encode_frame


class FakeTls:
    established: TlsEstablished | None = None  # no certificate expiry

    def peer_names(self) -> frozenset[str]:
        return frozenset({"node-a"})

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return hmac.new(b"session-1", label + b"|" + context, hashlib.sha256).digest()


TLS = FakeTls()


def rfc7638(jwk: dict[str, Any]) -> str:
    """RFC 7638 section 3: SHA-256 over the required members, sorted, no whitespace."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    text = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(text.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def forged_open(key: ECKey, kid: str, jwk: dict[str, Any]) -> m.Open:
    """An OPEN signed with ``key`` under a header ``kid`` of the sender's choosing."""
    unsigned = m.Open(65001, "node-a", 180, jwks={"keys": [jwk]})
    payload = jws_payload(unsigned, TLS, sender_is_initiator=True)
    compact = jws.serialize_compact(
        {"alg": "ES256", "kid": kid}, payload, key, algorithms=["ES256"]
    )
    return dataclasses.replace(unsigned, jws=str(jws.detach_content(compact)))


def offer(message: m.Open, config: CatalystConfig) -> tuple[State, tuple[int, int] | None]:
    """The responder's state after ``message``, and the NOTIFICATION it sent, if any."""
    b = CatalystSession(config, initiator=False, binding=TLS)
    b.start(0.0)
    b.data_to_send()
    events = b.receive_data(encode_frame(m.encode(message), m.MAX_MESSAGE), 0.0)
    sent = [(e.code, e.subcode) for e in events if isinstance(e, NotificationEvent)]
    return b.state, sent[0] if sent else None


def test_a_fresh_key_cannot_claim_the_kid_a_cedar_policy_pins() -> None:
    trusted = ECKey.generate_key("P-256", private=True)
    trusted_jwk = dict(trusted.as_dict(private=False))
    pinned = rfc7638(trusted_jwk)
    seen: list[PeeringRequest] = []
    cedar = CedarPolicy(
        'permit(principal, action == Action::"peer", resource) '
        f'when {{ context has jws_kid && context.jws_kid == "{pinned}" }};'
    )

    class Recording:
        def decide(self, request: PeeringRequest) -> str | None:
            seen.append(request)
            return cedar.decide(request)

    config = CatalystConfig(65002, "node-b", require_jws=True, policy=Recording())

    # The key's owner, its kid left out or given as the thumbprint: the policy sees the
    # thumbprint and permits.
    for jwk in (trusted_jwk, {**trusted_jwk, "kid": pinned}):
        assert offer(forged_open(trusted, pinned, jwk), config) == (State.OPEN_CONFIRM, None)
    assert [r.jws_kid for r in seen] == [pinned, pinned]

    # A fresh key published under the pinned kid: refused before the policy is asked.
    fresh = ECKey.generate_key("P-256", private=True)
    impostor = {**fresh.as_dict(private=False), "kid": pinned}
    assert offer(forged_open(fresh, pinned, impostor), config) == (
        State.CLOSED,
        (m.OPEN_MESSAGE_ERROR, m.JWKS_MALFORMED),
    )
    assert len(seen) == 2  # the policy never saw the impostor

    # Without the forged kid, the fresh key is known by its own thumbprint only.
    plain = dict(fresh.as_dict(private=False))
    assert offer(forged_open(fresh, pinned, plain), config) == (
        State.CLOSED,
        (m.OPEN_MESSAGE_ERROR, m.JWS_UNKNOWN_KID),
    )


def test_verify_detached_returns_the_thumbprint_and_refuses_other_kids() -> None:
    key = OKPKey.generate_key("Ed25519", private=True)
    jwk = dict(key.as_dict(private=False))
    thumbprint = rfc7638(jwk)
    compact = jws.serialize_compact(
        {"alg": "Ed25519", "kid": thumbprint}, b"payload", key, algorithms=["Ed25519"]
    )
    detached = str(jws.detach_content(compact))
    assert verify_detached(detached, b"payload", {"keys": [jwk]}) == thumbprint
    with pytest.raises(CatalystError) as info:
        verify_detached(detached, b"payload", {"keys": [{**jwk, "kid": "edge-7"}]})
    assert info.value.subcode == m.JWKS_MALFORMED


def test_a_signer_names_its_key_by_the_thumbprint_only() -> None:
    key = ECKey.generate_key("P-256", private=True)
    signer = JwsSigner(key)
    assert signer.kid == rfc7638(dict(key.as_dict(private=False)))
    assert signer.jwks()["keys"][0]["kid"] == signer.kid
    named = ECKey.import_key({**key.as_dict(private=True), "kid": "my-own-name"})
    with pytest.raises(ValueError, match="thumbprint"):
        JwsSigner(named)
