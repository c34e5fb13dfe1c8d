"""Where a node gets the CA's CRL (docs/protocols/mesh-link.md section 9.1): one kept
HTTPS connection to the CA, and ``If-None-Match`` with the last answer's ETag, so that
an unchanged CRL costs a 304 with no body (and, while the connection lasts, no TLS
handshake)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from trustmesh.api.ca_client import CaClient

FETCH_TIMEOUT = 10.0


class CrlSource:
    def __init__(self, ca_url: str, ca_cert: Path) -> None:
        self._client = CaClient(ca_url, ca_cert, timeout=FETCH_TIMEOUT)
        self._etag: str | None = None

    async def fetch(self) -> bytes | None:
        """The CRL in DER if it changed since the last fetch, else None (unverified:
        the trust view checks it). Raises CaRequestFailed."""
        der, self._etag = await asyncio.to_thread(self._client.crl_if_changed, self._etag)
        return der

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)
