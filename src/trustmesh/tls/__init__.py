"""TLS 1.3 with mutual authentication, on pyOpenSSL memory BIOs (sans-IO)."""

from trustmesh.tls.context import TlsConfig, TlsContext, hybrid_group_available
from trustmesh.tls.errors import TlsConfigError, TlsError
from trustmesh.tls.stream import TlsEstablished, TlsStream

__all__ = [
    "TlsConfig",
    "TlsConfigError",
    "TlsContext",
    "TlsError",
    "TlsEstablished",
    "TlsStream",
    "hybrid_group_available",
]
