"""Catalyst sessions over real TLS 1.3 on loopback TCP, through :class:`CatalystNode`:
a full session, every refusal the issue names, resumption, collision, and redial."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from joserfc.jwk import OKPKey

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.errors import PeeringFailed
from trustmesh.catalyst.jose import JwsSigner
from trustmesh.catalyst.session import CatalystConfig, NotificationEvent, Peer, SessionEstablished
from trustmesh.io.catalyst import Backoff, CatalystNode, Session
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig

WAIT = 10.0  # bound on any single wait; tests finish far sooner
SECRET = b"0123456789abcdef-shared"


@dataclass(frozen=True)
class Certs:
    directory: Path
    ca: Path

    def tls(self, name: str) -> TlsConfig:
        return TlsConfig(self.directory / f"{name}.pem", self.directory / f"{name}.key", self.ca)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("catalyst-pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    for issuer, name, label in [
        (ca, "node-a", "node-a"),
        (ca, "node-b", "node-b"),
        (ca, "node-c", "node-c"),
        (other, "node-a", "foreign-a"),
    ]:
        leaf = issuer.issue_cert(name)
        leaf.cert_chain_pems[0].write_to_path(str(directory / f"{label}.pem"))
        leaf.private_key_pem.write_to_path(str(directory / f"{label}.key"))
    return Certs(directory, directory / "ca.pem")


A = CatalystConfig(my_asn=65001, bgp_identifier="node-a")
B = CatalystConfig(my_asn=65002, bgp_identifier="node-b", hold_time=90)


class Recorder:
    """Every event of every session a node runs, with a wait for a condition."""

    def __init__(self) -> None:
        self.events: list[tuple[Session, Event]] = []
        self._changed = asyncio.Event()

    def __call__(self, session: Session, event: Event) -> None:
        self.events.append((session, event))
        self._changed.set()

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, kind)]

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Listening:
    node: CatalystNode
    port: int
    recorder: Recorder


@pytest.fixture
async def serve(certs: Certs) -> AsyncIterator[Callable[..., Any]]:
    servers = []

    async def start(config: CatalystConfig = B, name: str = "node-b") -> Listening:
        node = CatalystNode(config, certs.tls(name))
        recorder = Recorder()
        server = await node.serve(host="127.0.0.1", port=0, listener=recorder)
        servers.append(server)
        return Listening(node, server.port, recorder)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def refused(node: CatalystNode, port: int) -> PeeringFailed:
    with pytest.raises(PeeringFailed) as info:
        async with asyncio.timeout(WAIT):
            await node.connect("127.0.0.1", port)
    return info.value


# --- a full session ---------------------------------------------------------------------


async def test_full_session_then_resumption(certs: Certs, serve: Callable[..., Any]) -> None:
    b = await serve()
    a = CatalystNode(A, certs.tls("node-a"))
    async with asyncio.timeout(WAIT):
        session = await a.connect("127.0.0.1", b.port)
        assert session.established == SessionEstablished("node-b", 65002, 90)
        assert session.tls is not None and not session.tls.resumed
        await b.recorder.until(lambda: len(b.recorder.of(SessionEstablished)) == 1)
        assert b.recorder.of(SessionEstablished) == [SessionEstablished("node-a", 65001, 90)]
        closed = await session.close("done")
        assert closed.reason == "sent NOTIFICATION 6/2: done" and not closed.error
        await b.recorder.until(lambda: len(b.recorder.of(ConnectionClosed)) == 1)
        assert [(n.code, n.subcode, n.direction) for n in b.recorder.of(NotificationEvent)] == [
            (m.CEASE, m.CEASE_ADMIN_SHUTDOWN, "received")
        ]
        again = await a.connect("127.0.0.1", b.port)  # with the ticket from the first
        assert again.tls is not None and again.tls.resumed
        assert again.established == SessionEstablished("node-b", 65002, 90)
        await again.close()
    assert a.counters.sessions_established == 2
    assert a.counters.notifications_sent[(m.CEASE, m.CEASE_ADMIN_SHUTDOWN)] == 2
    assert b.node.counters.notifications_received[(m.CEASE, m.CEASE_ADMIN_SHUTDOWN)] == 2


async def test_server_shutdown_ceases_live_sessions(
    certs: Certs, serve: Callable[..., Any]
) -> None:
    b = await serve()
    a = CatalystNode(A, certs.tls("node-a"))
    session = await a.connect("127.0.0.1", b.port)
    async with asyncio.timeout(WAIT):
        await b.recorder.until(lambda: bool(b.recorder.of(SessionEstablished)))
        [server_side] = b.node.sessions
        await server_side.close("maintenance")
        closed = await session.wait_closed()
    assert closed.by_peer and not closed.error
    assert [(n.code, n.subcode) for n in session.notifications] == [(6, 2)]


# --- every refusal ------------------------------------------------------------------------


async def test_certificate_must_name_the_bgp_identifier(
    certs: Certs, serve: Callable[..., Any]
) -> None:
    b = await serve()
    a = CatalystNode(replace(A, bgp_identifier="node-x"), certs.tls("node-a"))
    failure = await refused(a, b.port)
    assert (failure.notification, failure.direction) == ((2, 3), "received")
    # And the other way round: the listener's certificate does not name its identifier.
    liar = await serve(replace(B, bgp_identifier="node-y"), "node-b")
    failure = await refused(CatalystNode(A, certs.tls("node-a")), liar.port)
    assert (failure.notification, failure.direction) == ((2, 3), "sent")


@pytest.mark.parametrize(
    "permitted", [(Peer(65009),), (Peer(65001, "node-c"),)], ids=["asn", "asn-and-id"]
)
async def test_asn_not_permitted(
    certs: Certs, serve: Callable[..., Any], permitted: tuple[Peer, ...]
) -> None:
    b = await serve(replace(B, permitted=permitted))
    failure = await refused(CatalystNode(A, certs.tls("node-a")), b.port)
    assert failure.notification == (m.OPEN_MESSAGE_ERROR, m.BAD_PEER_AS)
    assert failure.peer_id == "node-b"  # its OPEN passed our checks before its refusal


async def test_permitted_peer_is_accepted(certs: Certs, serve: Callable[..., Any]) -> None:
    b = await serve(replace(B, permitted=(Peer(65009), Peer(65001, "node-a"))))
    async with asyncio.timeout(WAIT):
        session = await CatalystNode(A, certs.tls("node-a")).connect("127.0.0.1", b.port)
        assert session.established == SessionEstablished("node-b", 65002, 90)
        # node-b, whose list it is, let node-a in (its second entry) and refused nothing.
        await b.recorder.until(lambda: bool(b.recorder.of(SessionEstablished)))
        assert b.recorder.of(SessionEstablished) == [SessionEstablished("node-a", 65001, 90)]
        assert b.recorder.of(NotificationEvent) == []
        closed = await session.close("done")
    assert closed.reason == "sent NOTIFICATION 6/2: done" and not closed.error


PSK_B = replace(B, psk_secrets={"k1": SECRET}, require_psk=True)  # requires, proves none


@pytest.mark.parametrize(
    ("psk", "subcode"),
    [
        ({"psk_secrets": {"k1": SECRET}, "psk_key_id": "k1"}, None),
        ({}, m.PSK_REQUIRED),
        ({"psk_secrets": {"k1": b"another-secret-entirely"}, "psk_key_id": "k1"}, m.PSK_BAD_PROOF),
        ({"psk_secrets": {"k9": SECRET}, "psk_key_id": "k9"}, m.PSK_UNKNOWN_KEY),
    ],
    ids=["good", "missing", "wrong-secret", "unknown-key-id"],
)
async def test_psk(
    certs: Certs, serve: Callable[..., Any], psk: dict[str, Any], subcode: int | None
) -> None:
    b = await serve(PSK_B)
    a = CatalystNode(replace(A, **psk), certs.tls("node-a"))
    if subcode is None:
        session = await a.connect("127.0.0.1", b.port)
        await session.close()
        return
    failure = await refused(a, b.port)
    assert (failure.notification, failure.direction) == ((2, subcode), "received")


def _ed25519_signer() -> JwsSigner:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return JwsSigner(OKPKey.import_key(pem))


class WrongPayloadSigner(JwsSigner):
    """Signs something other than what the receiver checks (another session's bytes)."""

    def sign_detached(self, payload: bytes) -> str:
        return super().sign_detached(b"another session" + payload)


class ForeignKidSigner(JwsSigner):
    """Publishes its key under a kid that is not the key's thumbprint."""

    def jwks(self) -> dict[str, Any]:
        keys = super().jwks()
        keys["keys"][0]["kid"] = "published-kid"
        return keys


class OtherKeySigner(JwsSigner):
    """Publishes another key than the one it signs with."""

    def jwks(self) -> dict[str, Any]:
        return _ed25519_signer().jwks()


@pytest.mark.parametrize(
    ("signer", "subcode"),
    [
        (_ed25519_signer, None),
        (lambda: None, m.JWS_BAD_SIGNATURE),
        (lambda: WrongPayloadSigner(_ed25519_signer().key), m.JWS_BAD_SIGNATURE),
        (lambda: ForeignKidSigner(_ed25519_signer().key), m.JWKS_MALFORMED),
        (lambda: OtherKeySigner(_ed25519_signer().key), m.JWS_UNKNOWN_KID),
    ],
    ids=["good", "missing", "wrong-signature", "kid-not-thumbprint", "unknown-kid"],
)
async def test_jws(
    certs: Certs,
    serve: Callable[..., Any],
    signer: Callable[[], JwsSigner | None],
    subcode: int | None,
) -> None:
    b = await serve(replace(B, require_jws=True))
    a = CatalystNode(replace(A, jws_key=signer()), certs.tls("node-a"))
    if subcode is None:
        session = await a.connect("127.0.0.1", b.port)
        await session.close()
        return
    failure = await refused(a, b.port)
    assert (failure.notification, failure.direction) == ((2, subcode), "received")


async def test_certificate_from_another_ca_fails_tls(
    certs: Certs, serve: Callable[..., Any]
) -> None:
    b = await serve()
    failure = await refused(CatalystNode(A, certs.tls("foreign-a")), b.port)
    assert failure.notification is None
    assert "TLS failed" in failure.reason
    await b.recorder.until(lambda: bool(b.recorder.of(ConnectionClosed)))
    [closed] = b.recorder.of(ConnectionClosed)
    assert closed.error and "TLS failed" in closed.reason
    assert not b.recorder.of(SessionEstablished)


def _stdlib_client(certs: Certs, *, tls12: bool, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    ctx.check_hostname = False
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if with_cert:
        ctx.load_cert_chain(
            str(certs.directory / "node-a.pem"), str(certs.directory / "node-a.key")
        )
    return ctx


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while chunk := await reader.read(4096):
        data += chunk
    return data


@pytest.mark.parametrize(
    ("tls12", "with_cert"), [(True, True), (False, False)], ids=["tls12-only", "no-client-cert"]
)
async def test_tls_refusals_never_reach_the_session(
    certs: Certs, serve: Callable[..., Any], tls12: bool, with_cert: bool
) -> None:
    b = await serve()
    ctx = _stdlib_client(certs, tls12=tls12, with_cert=with_cert)
    async with asyncio.timeout(WAIT):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port, ssl=ctx)
        except (ssl.SSLError, ConnectionError):
            pass  # TLS 1.2: refused in the handshake
        else:  # TLS 1.3 without a certificate: the client finished first; the alert follows
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
                await read_to_end(reader)
            writer.close()
        await b.recorder.until(lambda: bool(b.recorder.of(ConnectionClosed)))
    [closed] = b.recorder.of(ConnectionClosed)
    assert closed.error and "TLS failed" in closed.reason
    assert not b.recorder.of(SessionEstablished)
    assert not b.recorder.of(NotificationEvent)  # no OPEN was ever sent over it


# --- collision ------------------------------------------------------------------------------


async def test_simultaneous_dials_leave_one_session_the_higher_identifier_initiated(
    certs: Certs, serve: Callable[..., Any]
) -> None:
    a_rec, b_rec = Recorder(), Recorder()
    a_node = CatalystNode(A, certs.tls("node-a"))
    b_node = CatalystNode(B, certs.tls("node-b"))
    a_server = await a_node.serve(host="127.0.0.1", port=0, listener=a_rec)
    b_server = await b_node.serve(host="127.0.0.1", port=0, listener=b_rec)
    try:
        results = await asyncio.gather(
            a_node.connect("127.0.0.1", b_server.port, listener=a_rec),
            b_node.connect("127.0.0.1", a_server.port, listener=b_rec),
            return_exceptions=True,
        )

        def collisions(rec: Recorder) -> int:
            return sum(1 for e in rec.of(NotificationEvent) if (e.code, e.subcode) == (6, 7))

        # One 6/7 per node: sent by one side of the losing connection, received or sent
        # by the other (each side may reach the verdict on its own).
        await a_rec.until(lambda: collisions(a_rec) >= 1 and len(a_node.sessions) == 1)
        await b_rec.until(lambda: collisions(b_rec) >= 1 and len(b_node.sessions) == 1)
        [a_keeps], [b_keeps] = a_node.sessions, b_node.sessions
        assert not a_keeps.initiator and b_keeps.initiator  # node-b dialled the survivor
        assert a_keeps.peer_id == "node-b" and b_keeps.peer_id == "node-a"
        assert isinstance(results[1], Session) and results[1] is b_keeps
        if isinstance(results[0], Session):  # a's dial made it to Established first
            assert results[0].closed is not None
        else:
            assert isinstance(results[0], PeeringFailed)
            assert results[0].notification == (6, 7)
        await b_keeps.close()
    finally:
        for server in (a_server, b_server):
            server.close()
            await server.wait_closed()


# --- redial -------------------------------------------------------------------------------


def test_backoff_doubles_from_one_second_to_sixty() -> None:
    plain = Backoff(jitter=0)
    assert [plain.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    plain.reset()
    assert plain.next_delay() == 1
    jittered = Backoff(rng=lambda: 0.999)
    delays = [jittered.next_delay() for _ in range(10)]
    assert delays[0] > 1 and all(1 <= d <= 60 for d in delays) and delays[-1] == 60


async def test_maintain_redials_after_a_session_ends(
    certs: Certs, serve: Callable[..., Any]
) -> None:
    b = await serve()
    a = CatalystNode(A, certs.tls("node-a"))
    rec = Recorder()
    keeper = asyncio.create_task(
        a.maintain("127.0.0.1", b.port, backoff=Backoff(initial=0.01, jitter=0), listener=rec)
    )
    try:
        await rec.until(lambda: len(rec.of(SessionEstablished)) == 1)
        await b.recorder.until(lambda: len(b.node.sessions) == 1)
        await b.node.sessions[0].close("go away")
        await rec.until(lambda: len(rec.of(SessionEstablished)) == 2)
    finally:
        keeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keeper
    # Cancelling the keeper ceased its session in an orderly way.
    await b.recorder.until(lambda: len(b.recorder.of(ConnectionClosed)) == 2)
    assert b.recorder.of(NotificationEvent)[-1].subcode == m.CEASE_ADMIN_SHUTDOWN


async def test_maintain_backs_off_while_refused(certs: Certs, serve: Callable[..., Any]) -> None:
    b = await serve(replace(B, permitted=(Peer(65009),)))
    a = CatalystNode(A, certs.tls("node-a"))
    failures: list[tuple[BaseException, float]] = []
    enough = asyncio.Event()

    def failed(exc: BaseException, delay: float) -> None:
        failures.append((exc, delay))
        if len(failures) == 4:
            enough.set()

    backoff = Backoff(initial=0.005, maximum=0.02, jitter=0)
    keeper = asyncio.create_task(
        a.maintain("127.0.0.1", b.port, backoff=backoff, on_failure=failed)
    )
    try:
        async with asyncio.timeout(WAIT):
            await enough.wait()
    finally:
        keeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keeper
    assert [d for _, d in failures[:4]] == [0.005, 0.01, 0.02, 0.02]
    assert all(isinstance(e, PeeringFailed) and e.notification == (2, 2) for e, _ in failures)
