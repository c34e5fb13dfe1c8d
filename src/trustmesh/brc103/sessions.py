"""Session records and their index: by our session nonce, and by peer identity key.

A peer may hold several sessions with one identity (two tabs, a re-handshake); sending
by identity prefers the most recently used session whose peer has proven itself. The table
is bounded three ways, least recently used first: in sessions, in sessions whose peer
has not yet signed anything (an initialRequest is unsigned, so anyone can make those),
and in message nonces remembered for replay checks across all sessions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from trustmesh.brc103.certificates import VerifiableCertificate
from trustmesh.brc103.messages import AuthMessage, RequestedCertificates


@dataclass(slots=True, eq=False)
class Session:
    session_nonce: str  # ours: the key incoming messages name in yourNonce
    peer_identity_key: str | None
    initiator: bool
    last_update_ms: int
    peer_nonce: str | None = None
    is_authenticated: bool = False  # the handshake is done (for a responder: at once)
    peer_proven: bool = False  # a signature from the peer has verified in this session
    handshake_deadline_ms: int | None = None
    certificates_required: bool = False  # we asked this peer for certificates
    certificates_validated: bool = False
    requested: RequestedCertificates | None = None  # what we asked this peer for
    certificates: list[VerifiableCertificate] = field(default_factory=list)
    seen_nonces: set[str] = field(default_factory=set)
    held: list[AuthMessage] = field(default_factory=list)  # general messages awaiting certs
    held_bytes: int = 0
    held_deadline_ms: int | None = None


class SessionTable:
    def __init__(self, max_sessions: int, *, max_unproven: int, max_seen: int) -> None:
        if max_sessions < 1 or max_unproven < 1 or max_seen < 1:
            raise ValueError("session limits must be at least 1")
        self._max = max_sessions
        self._max_unproven = max_unproven
        self._max_seen = max_seen
        self._by_nonce: OrderedDict[str, Session] = OrderedDict()
        self._unproven: OrderedDict[str, Session] = OrderedDict()
        self._by_identity: dict[str, list[Session]] = {}
        self.seen_total = 0  # message nonces remembered, all sessions together
        self.held_total = 0  # bytes of general messages held, all sessions together

    def __len__(self) -> int:
        return len(self._by_nonce)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_nonce.values()))

    def add(self, session: Session) -> list[Session]:
        """Store ``session``; return the sessions evicted to make room."""
        evicted: list[Session] = []
        if not session.peer_proven:
            while len(self._unproven) >= self._max_unproven:
                evicted.append(self._evict(next(iter(self._unproven.values()))))
        while len(self._by_nonce) >= self._max:
            pool = self._unproven if self._unproven else self._by_nonce
            evicted.append(self._evict(next(iter(pool.values()))))
        self._by_nonce[session.session_nonce] = session
        if not session.peer_proven:
            self._unproven[session.session_nonce] = session
        if session.peer_identity_key is not None:
            self._by_identity.setdefault(session.peer_identity_key, []).append(session)
        return evicted

    def mark_proven(self, session: Session) -> None:
        session.peer_proven = True
        self._unproven.pop(session.session_nonce, None)

    def remember_nonce(self, session: Session, nonce: str) -> list[Session]:
        """Record a message nonce; return the (other) sessions evicted to stay in budget."""
        session.seen_nonces.add(nonce)
        self.seen_total += 1
        evicted: list[Session] = []
        while self.seen_total > self._max_seen and len(self._by_nonce) > 1:
            oldest = next(iter(self._by_nonce.values()))
            if oldest is session:
                self._by_nonce.move_to_end(session.session_nonce)
                continue
            evicted.append(self._evict(oldest))
        return evicted

    def set_identity(self, session: Session, identity_key: str) -> None:
        self._unindex(session)
        session.peer_identity_key = identity_key
        self._by_identity.setdefault(identity_key, []).append(session)

    def get(self, nonce: str) -> Session | None:
        """Look up without counting as a use."""
        return self._by_nonce.get(nonce)

    def touch(self, session: Session) -> None:
        if session.session_nonce in self._by_nonce:
            self._by_nonce.move_to_end(session.session_nonce)

    def by_identity(self, identity_key: str) -> Session | None:
        """The session to send on: the most recently updated one with this peer in which it
        has signed, else (a responder before the peer's first signed message) the latest
        with a completed handshake. An unsigned initialRequest naming someone else's key
        thus never displaces a session that key has proven."""
        best: Session | None = None
        for session in self._by_identity.get(identity_key, ()):
            if session.is_authenticated and (
                best is None
                or (session.peer_proven, session.last_update_ms)
                >= (best.peer_proven, best.last_update_ms)
            ):
                best = session
        return best

    def sessions_of(self, identity_key: str) -> list[Session]:
        return list(self._by_identity.get(identity_key, ()))

    def remove(self, session: Session) -> None:
        if self._by_nonce.pop(session.session_nonce, None) is not None:
            self._forget(session)

    def _evict(self, session: Session) -> Session:
        del self._by_nonce[session.session_nonce]
        self._forget(session)
        return session

    def _forget(self, session: Session) -> None:
        self._unproven.pop(session.session_nonce, None)
        self.seen_total -= len(session.seen_nonces)
        self.held_total -= session.held_bytes
        session.held_bytes = 0  # the held messages themselves stay, for the report
        self._unindex(session)

    def _unindex(self, session: Session) -> None:
        if session.peer_identity_key is None:
            return
        sessions = self._by_identity.get(session.peer_identity_key)
        if sessions and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._by_identity[session.peer_identity_key]
