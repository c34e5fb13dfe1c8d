"""Session records and their index: by our session nonce, and by peer identity key.

A peer may hold several sessions with one identity (two tabs, a re-handshake); lookups
by identity return the most recently used authenticated one. The table is bounded: the
least recently used session goes first when it is full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from trustmesh.brc103.certificates import VerifiableCertificate
from trustmesh.brc103.messages import AuthMessage, RequestedCertificates

MAX_SEEN_NONCES = 1_000_000  # per session; past this the peer must handshake again


@dataclass(slots=True, eq=False)
class Session:
    session_nonce: str  # ours: the key incoming messages name in yourNonce
    peer_identity_key: str | None
    initiator: bool
    created_ms: int
    last_update_ms: int
    peer_nonce: str | None = None
    is_authenticated: bool = False
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
    def __init__(self, max_sessions: int) -> None:
        self._max = max_sessions
        self._by_nonce: OrderedDict[str, Session] = OrderedDict()
        self._by_identity: dict[str, list[Session]] = {}

    def __len__(self) -> int:
        return len(self._by_nonce)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_nonce.values()))

    def add(self, session: Session) -> list[Session]:
        """Store ``session``; return the sessions evicted to make room."""
        evicted: list[Session] = []
        while len(self._by_nonce) >= self._max:
            _, oldest = self._by_nonce.popitem(last=False)
            self._unindex(oldest)
            evicted.append(oldest)
        self._by_nonce[session.session_nonce] = session
        if session.peer_identity_key is not None:
            self._by_identity.setdefault(session.peer_identity_key, []).append(session)
        return evicted

    def set_identity(self, session: Session, identity_key: str) -> None:
        self._unindex(session)
        session.peer_identity_key = identity_key
        self._by_identity.setdefault(identity_key, []).append(session)

    def get(self, nonce: str) -> Session | None:
        """Look up without counting as a use."""
        return self._by_nonce.get(nonce)

    def by_nonce(self, nonce: str) -> Session | None:
        session = self._by_nonce.get(nonce)
        if session is not None:
            self._by_nonce.move_to_end(nonce)
        return session

    def by_identity(self, identity_key: str) -> Session | None:
        """The most recently updated authenticated session with this peer."""
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
            self._unindex(session)

    def _unindex(self, session: Session) -> None:
        if session.peer_identity_key is None:
            return
        sessions = self._by_identity.get(session.peer_identity_key)
        if sessions and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._by_identity[session.peer_identity_key]
