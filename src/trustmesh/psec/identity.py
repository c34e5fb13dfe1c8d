"""A node's PSEC identity: its peer ID (the libp2p peer ID of its certificate's key)
and the scheme adapters it offers, built on contexts made once per identity."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trustmesh.crypto.keys import PublicKey
from trustmesh.psec.dtls import NAME as DTLS
from trustmesh.psec.dtls import DtlsContext, DtlsScheme
from trustmesh.psec.quic import NAME as QUIC
from trustmesh.psec.quic import QuicContext, QuicScheme
from trustmesh.psec.scheme import SchemeFactory
from trustmesh.tls import TlsConfig, TlsContext
from trustmesh.wire.peerid import KeyType, PeerId

FactoriesFor = Callable[[bytes], Mapping[str, SchemeFactory]]  # peer address -> schemes
AVAILABLE = (DTLS, QUIC)


@functools.lru_cache(maxsize=256)
def peer_id_of(cert: x509.Certificate) -> PeerId:
    """The libp2p peer ID of a certificate's public key (a node's PSEC identity).
    Remembered for the last certificates asked about (peers come back; a certificate
    is immutable and its peer ID a function of it alone)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        # libp2p's ECDSA key data is the DER SubjectPublicKeyInfo (what P256PublicKey's
        # libp2p_data gives, without its two compressed-point encodings on the way).
        spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return PeerId.from_public_key(KeyType.ECDSA, spki)
    return PublicKey.from_cryptography(key).peer_id()


@dataclass(frozen=True)
class PsecIdentity:
    peer_id: PeerId
    factories_for: FactoriesFor
    contexts: tuple[TlsContext, ...] = ()  # the schemes' contexts, which check peers

    def replace_crl(self, crl: x509.CertificateRevocationList) -> None:
        """Check peers against ``crl`` from the next handshake on, in every scheme (it
        must be signed by a CA we know and be no older than the one in use, else
        :class:`TlsConfigError` and nothing changes). A CRL loaded from
        ``TlsConfig.crl_file`` expires: without a newer one, handshakes fail."""
        for context in self.contexts:
            context.replace_crl(crl)


def psec_identity(config: TlsConfig, schemes: Sequence[str] = AVAILABLE) -> PsecIdentity:
    """The identity of ``config``'s certificate, offering ``schemes`` in that order.
    Each scheme's contexts are built once here. A server's DTLS cookie and QUIC Retry
    token bind the peer address each factory is made for."""
    unknown = [s for s in schemes if s not in AVAILABLE]
    if unknown:
        raise ValueError(f"unknown schemes: {', '.join(unknown)}")
    makers: dict[str, Callable[[bytes], SchemeFactory]] = {}
    contexts: list[TlsContext] = []
    if DTLS in schemes:
        makers[DTLS], pair = _dtls_maker(config)
        contexts += pair
    if QUIC in schemes:
        context = QuicContext(config)
        contexts.append(context.checks)

        def quic_for(address: bytes) -> SchemeFactory:
            def quic(initiator: bool) -> QuicScheme:
                return QuicScheme(context, initiator=initiator, peer_address=address)

            return quic

        makers[QUIC] = quic_for
    return _identity(config, {name: makers[name] for name in schemes}, tuple(contexts))


def dtls_identity(config: TlsConfig, schemes: Sequence[str] = (DTLS,)) -> PsecIdentity:
    """An identity whose every scheme name is served by the DTLS adapter (tests name
    extra schemes so to exercise the negotiation)."""
    maker, contexts = _dtls_maker(config)
    return _identity(config, dict.fromkeys(schemes, maker), contexts)


def _dtls_maker(
    config: TlsConfig,
) -> tuple[Callable[[bytes], SchemeFactory], tuple[DtlsContext, DtlsContext]]:
    """DTLS factories per peer address (a server's cookie binds the address), and the
    two contexts they share."""
    client, server = DtlsContext(config, server=False), DtlsContext(config, server=True)

    def dtls_for(address: bytes) -> SchemeFactory:
        def dtls(initiator: bool) -> DtlsScheme:
            context = client if initiator else server
            return DtlsScheme(context, initiator=initiator, peer_address=address)

        return dtls

    return dtls_for, (client, server)


def _identity(
    config: TlsConfig,
    makers: Mapping[str, Callable[[bytes], SchemeFactory]],
    contexts: Sequence[TlsContext],
) -> PsecIdentity:
    def factories_for(address: bytes) -> Mapping[str, SchemeFactory]:
        return {name: make(address) for name, make in makers.items()}

    own = x509.load_pem_x509_certificates(config.cert_file.read_bytes())[0]
    return PsecIdentity(peer_id_of(own), factories_for, tuple(contexts))
