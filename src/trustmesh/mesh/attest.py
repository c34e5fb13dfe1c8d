"""Attestation on mesh links, after the handshake (zero-trust-mesh.md 2.2, 5.1), sans-IO.

When both HELLOs are in, each side that checks its peers sends ATTEST_CHALLENGE, 32
random bytes. A node with a TPM answers with ATTEST_EVIDENCE: a TPM2_Quote by its AK
whose qualifying data is ``SHA-256(nonce || exporter)``, the exporter being 32 bytes
of the link's TLS exporter (label ``EXPORTER-dadm-mesh-attestation``), so the quote
proves this very session and cannot be relayed to another. Both sides compute the same
exporter, so one quote answers one challenge on one link, and nothing else.

The checker verifies the quote against its peer's certificate: the AK and the PCR
digest that the CA put there after it checked the enrollment's quote (the
attested-platform extension, trustmesh.pki.extensions). A quote by another AK, over
other data, or over PCRs that changed since enrollment fails; so does a peer whose
certificate names no attested platform, or who does not answer within the deadline.

What failure does is the node's policy (``link_attestation`` in node.toml):

- ``off``: no challenge is sent (a node still answers its peers' challenges);
- ``demote``: the link stays, but the peer's gossip is dropped and none is forwarded
  to it (it gets no say in what spreads);
- ``close``: the link is closed with ``attestation-failed``;
- ``revoke``: closed, and a failing quote is reported to the CA, which revokes the
  peer if the quote, checked again by the CA, shows PCRs its policy refuses.

A node answers one challenge per link: a peer cannot make it quote in a loop.

Under any policy but ``off``, a peer is *excluded* from gossip (as a demoted one is)
from link-up until its quote checks out: no gossip flows on a link before its peer has
proven its platform, so a demoted peer gains nothing by reconnecting.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from trustmesh.errors import ProtocolError
from trustmesh.mesh.link import ATTEST_NONCE
from trustmesh.pki.extensions import AttestedPlatform
from trustmesh.tpm.evidence import QuoteEvidence
from trustmesh.tpm.policy import DeviceClass, PcrPolicy
from trustmesh.tpm.verify import QuoteRejected, verify_quote

NONCE_SIZE = ATTEST_NONCE
DEFAULT_TIMEOUT_MS = 15_000  # a TPM quote takes tens of ms; a loaded swtpm, more
MAX_REPORTED = 1024  # serials reported to the CA, remembered so each goes once

L = TypeVar("L")


class LinkAttestationPolicy(enum.StrEnum):
    OFF = "off"
    DEMOTE = "demote"
    CLOSE = "close"
    REVOKE = "revoke"


def link_qualifying_data(nonce: bytes, exporter: bytes) -> bytes:
    """What a link quote is made over."""
    return hashlib.sha256(nonce + exporter).digest()


def check_link_quote(
    raw: bytes, platform: AttestedPlatform | None, nonce: bytes, exporter: bytes
) -> QuoteEvidence:
    """The evidence a peer sent, once it proves this link (raises :class:`QuoteRejected`)."""
    if platform is None:
        raise QuoteRejected("the peer's certificate names no attested platform")
    if not raw:
        raise QuoteRejected("the peer has no TPM to quote with")
    try:
        evidence = QuoteEvidence.from_bytes(raw)
    except ProtocolError as exc:
        raise QuoteRejected(f"evidence: {exc}") from None
    if evidence.ak_public != platform.ak_public:
        raise QuoteRejected("the quote is by another AK than the one the CA certified")
    # Any values of the enrolled PCRs pass here; the digest must then be the enrolled one.
    policy = PcrPolicy(platform.pcrs, (DeviceClass(platform.device_class or "enrolled", {}),))
    claims = verify_quote(evidence, link_qualifying_data(nonce, exporter), policy)
    if claims.pcr_digest != platform.pcr_digest:
        raise QuoteRejected("the PCRs changed since enrollment (the digest differs)")
    return evidence


@dataclass(frozen=True, slots=True)
class SendAttestChallenge(Generic[L]):
    link: L
    nonce: bytes


@dataclass(frozen=True, slots=True)
class SendAttestEvidence(Generic[L]):
    link: L
    raw: bytes  # QuoteEvidence JSON; empty: this node has no TPM


@dataclass(frozen=True, slots=True)
class MakeQuote(Generic[L]):
    """Quote over ``qualifying`` on our TPM, then call ``NodeCore.quote_made``."""

    link: L
    qualifying: bytes


@dataclass(frozen=True, slots=True)
class ReportAttestation:
    """Ask the CA to revoke ``serial``: its quote (``raw``) fails (policy ``revoke``)."""

    peer: str
    serial: int
    raw: bytes


@dataclass(slots=True)
class _Pending:
    peer: str
    nonce: bytes
    exporter: bytes
    platform: AttestedPlatform | None
    deadline_ms: int


@dataclass
class LinkAttestation(Generic[L]):
    """The attestation state of one node's links; its methods return what to do, the
    node core turns failures into demotion or CLOSE."""

    policy: LinkAttestationPolicy = LinkAttestationPolicy.OFF
    can_quote: bool = False  # a TPM answers challenges
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    demoted: set[str] = field(default_factory=set)  # failed: their gossip is dropped
    unproven: set[str] = field(default_factory=set)  # challenged, no answer yet
    _pending: dict[L, _Pending] = field(default_factory=dict)
    _answered: set[L] = field(default_factory=set)  # links whose challenge we answered
    _exporters: dict[L, bytes] = field(default_factory=dict)
    _reported: dict[int, None] = field(default_factory=dict)  # oldest first

    def first_report(self, serial: int) -> bool:
        """Whether ``serial`` was not reported yet (a peer redialling with the same
        failing quote costs the CA one report, not one per link)."""
        if serial in self._reported:
            return False
        self._reported[serial] = None
        if len(self._reported) > MAX_REPORTED:
            del self._reported[next(iter(self._reported))]
        return True

    def link_up(
        self,
        link: L,
        peer: str,
        exporter: bytes,
        platform: AttestedPlatform | None,
        nonce: bytes,
        now_ms: int,
    ) -> list[SendAttestChallenge[L]]:
        """A link was accepted: challenge its peer (unless the policy is off)."""
        self._exporters[link] = exporter
        if self.policy is LinkAttestationPolicy.OFF:
            return []
        self.unproven.add(peer)
        self._pending[link] = _Pending(peer, nonce, exporter, platform, now_ms + self.timeout_ms)
        return [SendAttestChallenge(link, nonce)]

    def excluded(self, peer: str) -> bool:
        """Whether ``peer`` has no say in gossip: it failed, or has yet to prove itself."""
        return peer in self.demoted or peer in self.unproven

    def failed(self, peer: str, *, demote: bool) -> None:
        """``peer``'s attestation failed: under ``demote`` its link stays, excluded; else
        it stays unproven (excluded too) until its link is closed."""
        if demote:
            self.unproven.discard(peer)
            self.demoted.add(peer)

    def on_challenge(self, link: L, nonce: bytes) -> list[MakeQuote[L] | SendAttestEvidence[L]]:
        """The peer's challenge: one quote per link, or an empty answer without a TPM."""
        exporter = self._exporters.get(link)
        if exporter is None or link in self._answered or len(nonce) != NONCE_SIZE:
            return []
        self._answered.add(link)
        if not self.can_quote:
            return [SendAttestEvidence(link, b"")]
        return [MakeQuote(link, link_qualifying_data(nonce, exporter))]

    def on_evidence(self, link: L, raw: bytes) -> tuple[str, str | None] | None:
        """The peer's answer: ``(peer, None)`` when it proves the link, ``(peer,
        reason)`` when it fails, None when no challenge of ours was open."""
        pending = self._pending.pop(link, None)
        if pending is None:
            return None
        try:
            check_link_quote(raw, pending.platform, pending.nonce, pending.exporter)
        except QuoteRejected as exc:
            return pending.peer, exc.reason
        self.unproven.discard(pending.peer)
        self.demoted.discard(pending.peer)  # proven on this link (a new certificate, say)
        return pending.peer, None

    def expired(self, now_ms: int) -> list[tuple[L, str]]:
        """Links whose peer did not answer in time, and their peers."""
        late = [(link, p.peer) for link, p in self._pending.items() if now_ms >= p.deadline_ms]
        for link, _ in late:
            del self._pending[link]
        return late

    def next_deadline(self) -> int | None:
        return min((p.deadline_ms for p in self._pending.values()), default=None)

    def link_closed(self, link: L, peer: str | None, still_linked: bool) -> None:
        self._pending.pop(link, None)
        self._answered.discard(link)
        self._exporters.pop(link, None)
        if peer is not None and not still_linked:
            self.demoted.discard(peer)
            self.unproven.discard(peer)
