"""Link attestation, sans-IO: the ATTEST_CHALLENGE and ATTEST_EVIDENCE frames between two
MeshLink cores, and LinkAttestation's rules (one quote per link, deadlines, what a
quote must prove), with real quotes from an swtpm."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from meshtools import T0, MeshPki, tls_with

from trustmesh.mesh.attest import (
    LinkAttestation,
    LinkAttestationPolicy,
    MakeQuote,
    SendAttestChallenge,
    SendAttestEvidence,
    check_link_quote,
    link_qualifying_data,
)
from trustmesh.mesh.link import (
    ATTEST_NONCE,
    AttestChallengeFrame,
    AttestEvidenceFrame,
    CloseCode,
    Frame,
    LinkClosed,
    LinkConfig,
    LinkUp,
    MeshLink,
)
from trustmesh.pki.extensions import AttestedPlatform
from trustmesh.tpm.device import AK_HANDLE, TpmDevice
from trustmesh.tpm.swtpm import Swtpm
from trustmesh.tpm.verify import QuoteRejected, verify_quote
from trustmesh.wire.frames import encode_frame

PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
NONCE = bytes(range(ATTEST_NONCE))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path_factory.mktemp("attest") / "ca")
    yield mesh
    mesh.close()


def pair(
    pki: MeshPki, *, attest_a: bool = True, attest_b: bool = True
) -> tuple[MeshLink, MeshLink]:
    a_node, b_node = pki.node("node-a"), pki.node("node-b")
    trust = pki.trust()

    def authorize(chain: Sequence[x509.Certificate]) -> str:
        return trust.identity_of(chain, now=T0).node_id

    a = MeshLink(LinkConfig("node-a", attest=attest_a), initiator=True, authorize=authorize)
    b = MeshLink(LinkConfig("node-b", attest=attest_b), initiator=False, authorize=authorize)
    a.bind(tls_with(b_node.chain))
    b.bind(tls_with(a_node.chain))
    a.start(0.0)
    b.start(0.0)
    return a, b


def pump(a: MeshLink, b: MeshLink) -> tuple[list[object], list[object]]:
    got_a: list[object] = []
    got_b: list[object] = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return got_a, got_b
        if to_b:
            got_b += b.receive_data(to_b, 0.0)
        if to_a:
            got_a += a.receive_data(to_a, 0.0)


def test_both_sides_speaking_attestation_get_the_exporter_and_the_frames(pki: MeshPki) -> None:
    a, b = pair(pki)
    got_a, got_b = pump(a, b)
    (up_a,), (up_b,) = got_a, got_b
    assert isinstance(up_a, LinkUp) and isinstance(up_b, LinkUp)
    assert up_a.exporter == up_b.exporter and len(up_a.exporter) == 32
    assert up_a.platform is None  # these test certificates name no attested platform
    a.send_attest_challenge(NONCE)
    b.send_attest_evidence(b'{"x":1}')
    got_a, got_b = pump(a, b)
    assert got_b == [AttestChallengeFrame(NONCE)]
    assert got_a == [AttestEvidenceFrame(b'{"x":1}')]


def test_a_peer_that_does_not_speak_attestation_gets_no_frames_and_no_exporter(
    pki: MeshPki,
) -> None:
    a, b = pair(pki, attest_b=False)
    got_a, _ = pump(a, b)
    (up_a,) = got_a
    assert isinstance(up_a, LinkUp) and up_a.exporter == b""
    a.send_attest_challenge(NONCE)
    assert a.data_to_send() == b""


@pytest.mark.parametrize(
    ("kind", "body", "error"),
    [
        (Frame.ATTEST_CHALLENGE, b"short", "ATTEST_CHALLENGE is 32 bytes"),
        (Frame.ATTEST_CHALLENGE, bytes(33), "ATTEST_CHALLENGE is 32 bytes"),
        (Frame.ATTEST_EVIDENCE, bytes(64 * 1024 + 1), "at most"),
    ],
)
def test_malformed_attestation_frames_close_the_link(
    pki: MeshPki, kind: int, body: bytes, error: str
) -> None:
    a, b = pair(pki)
    pump(a, b)
    events = a.receive_data(encode_frame(bytes((kind,)) + body, 1 << 20), 0.0)
    (closed,) = events
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL
    assert error in closed.reason


# --- the state machine ------------------------------------------------------------------------


def test_a_node_answers_one_challenge_per_link_and_says_when_it_has_no_tpm() -> None:
    quoting: LinkAttestation[str] = LinkAttestation(can_quote=True)
    assert quoting.link_up("l1", "peer", b"e" * 32, None, NONCE, 0) == []  # policy off
    (make,) = quoting.on_challenge("l1", NONCE)
    assert make == MakeQuote("l1", link_qualifying_data(NONCE, b"e" * 32))
    assert quoting.on_challenge("l1", NONCE) == []  # a second challenge: no second quote
    assert quoting.on_challenge("unknown", NONCE) == []
    quoting.link_closed("l1", "peer", still_linked=False)
    assert quoting.on_challenge("l1", NONCE) == []  # gone with its link

    plain: LinkAttestation[str] = LinkAttestation()
    plain.link_up("l2", "peer", b"e" * 32, None, NONCE, 0)
    assert plain.on_challenge("l2", NONCE) == [SendAttestEvidence("l2", b"")]


def test_a_checker_challenges_waits_and_gives_up_at_the_deadline() -> None:
    checker: LinkAttestation[str] = LinkAttestation(LinkAttestationPolicy.CLOSE, timeout_ms=100)
    assert checker.link_up("l1", "peer", b"e" * 32, None, NONCE, 1_000) == [
        SendAttestChallenge("l1", NONCE)
    ]
    assert checker.next_deadline() == 1_100
    assert checker.expired(1_099) == []
    assert checker.expired(1_100) == [("l1", "peer")]
    assert checker.on_evidence("l1", b"{}") is None  # too late: no challenge open


def test_evidence_without_a_platform_or_a_tpm_fails() -> None:
    checker: LinkAttestation[str] = LinkAttestation(LinkAttestationPolicy.DEMOTE)
    checker.link_up("l1", "peer", b"e" * 32, None, NONCE, 0)
    verdict = checker.on_evidence("l1", b"")
    assert verdict is not None and "no attested platform" in str(verdict[1])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_any_evidence_bytes_fail_cleanly(raw: bytes) -> None:
    platform = AttestedPlatform(b"\x00" * 90, bytes(32), PCRS, "swtpm")
    with pytest.raises(QuoteRejected):
        check_link_quote(raw, platform, NONCE, b"e" * 32)


# --- real quotes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Swtpm, AttestedPlatform]]:
    """An swtpm, and the platform its enrollment would have put in its certificate."""
    with Swtpm.start(tmp_path_factory.mktemp("attest-tpm")) as tpm:
        with TpmDevice.open(tpm.tcti) as device:
            device.ensure_ak(AK_HANDLE)
            evidence = device.quote(AK_HANDLE, bytes(32), PCRS)
        claims = verify_quote(evidence, bytes(32))
        yield tpm, AttestedPlatform(evidence.ak_public, claims.pcr_digest, PCRS, "swtpm")


def quote(tpm: Swtpm, qualifying: bytes) -> bytes:
    with TpmDevice.open(tpm.tcti) as device:
        device.ensure_ak(AK_HANDLE)
        return device.quote(AK_HANDLE, qualifying, PCRS).to_bytes()


def test_a_quote_proves_its_link_and_no_other(
    enrolled: tuple[Swtpm, AttestedPlatform], make_swtpm: Callable[[], Swtpm]
) -> None:
    tpm, platform = enrolled
    exporter = b"x" * 32
    raw = quote(tpm, link_qualifying_data(NONCE, exporter))
    check_link_quote(raw, platform, NONCE, exporter)
    # Relayed to another session (another exporter), or answering another nonce: refused.
    with pytest.raises(QuoteRejected, match="qualifying data"):
        check_link_quote(raw, platform, NONCE, b"y" * 32)
    with pytest.raises(QuoteRejected, match="qualifying data"):
        check_link_quote(raw, platform, bytes(32), exporter)
    # By another TPM's AK: refused before anything else.
    other = quote(make_swtpm(), link_qualifying_data(NONCE, exporter))
    with pytest.raises(QuoteRejected, match="another AK"):
        check_link_quote(other, platform, NONCE, exporter)
    # Evidence whose PCR values were edited: the quoted digest gives it away.
    edited = json.loads(raw)
    edited["pcrs"]["sha256"]["7"] = "11" * 32
    with pytest.raises(QuoteRejected):
        check_link_quote(json.dumps(edited).encode(), platform, NONCE, exporter)


def test_a_peer_has_no_say_in_gossip_until_its_quote_checks_out() -> None:
    checker: LinkAttestation[str] = LinkAttestation(LinkAttestationPolicy.DEMOTE)
    checker.link_up("l1", "peer", b"e" * 32, None, NONCE, 0)
    assert checker.excluded("peer")  # challenged, not yet answered
    checker.failed("peer", demote=True)
    assert checker.excluded("peer") and "peer" in checker.demoted
    # Reconnecting does not wash the demotion off: the new link must prove itself.
    checker.link_closed("l1", "peer", still_linked=True)
    checker.link_up("l2", "peer", b"f" * 32, None, NONCE, 0)
    assert checker.excluded("peer")
    checker.link_closed("l2", "peer", still_linked=False)
    assert not checker.excluded("peer")  # gone: nothing left to exclude
