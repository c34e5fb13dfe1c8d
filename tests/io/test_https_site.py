"""HttpsSite: aiohttp over trustmesh TLS. Client certificates reach handlers unverified
in "request" mode, junk and silent clients are dropped without hurting others, large
bodies flow both ways, and a new context applies to new connections only."""

from __future__ import annotations

import asyncio
import io
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509

from trustmesh.io.https import HttpsSite, peer_chain
from trustmesh.tls.context import TlsConfig, TlsContext
from trustmesh.tls.stream import certificate_names


@dataclass
class Site:
    site: HttpsSite
    ca: trustme.CA
    directory: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.site.port}"

    def client_ssl(self, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if client is not None:
            client.configure_cert(ctx)
        return ctx


def server_context(ca: trustme.CA, directory: Path, name: str = "s") -> TlsContext:
    leaf = ca.issue_cert("127.0.0.1")
    pem = directory / f"{name}.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    config = TlsConfig(pem, pem, directory / "ca.pem", client_auth="request")
    return TlsContext(config, server=True)


async def whoami(request: web.Request) -> web.Response:
    chain = peer_chain(request)
    names = [sorted(certificate_names(c)) for c in chain[:1]]
    return web.json_response({"chain": names, "scheme": request.scheme})


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    ca = trustme.CA()
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_get("/whoami", whoami)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    https = HttpsSite(runner, "127.0.0.1", 0, server_context(ca, tmp_path), handshake_timeout=0.5)
    await https.start()
    yield Site(https, ca, tmp_path)
    await runner.cleanup()


async def _get(site: Site, client: trustme.LeafCert | None = None) -> dict[str, object]:
    connector = aiohttp.TCPConnector(ssl=site.client_ssl(client))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{site.url}/whoami") as response,
    ):
        assert response.status == 200
        answer: dict[str, object] = await response.json()
        return answer


async def test_handlers_see_the_presented_chain(site: Site) -> None:
    assert await _get(site) == {"chain": [], "scheme": "https"}
    client = site.ca.issue_cert("client.example")
    answer = await _get(site, client)
    assert answer["chain"] == [["client.example"]]
    # A chain from a CA the server does not trust still arrives: the app decides.
    stranger = trustme.CA().issue_cert("stranger.example")
    answer = await _get(site, stranger)
    assert answer["chain"] == [["stranger.example"]]


async def test_junk_and_silent_clients_are_dropped_and_others_served(site: Site) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", site.site.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed (after any alert bytes, none here)
    writer.close()
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", site.site.port)
    served = await _get(site)  # a silent connection holds nothing up
    assert served["scheme"] == "https"
    async with asyncio.timeout(5):  # the handshake timeout (0.5 s) closes the silent one
        assert await silent_reader.read() == b""
    silent_writer.close()


async def test_large_bodies_round_trip(site: Site) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, streamed by the client
    connector = aiohttp.TCPConnector(ssl=site.client_ssl())
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(2):  # the second on the same keep-alive connection
            async with session.post(f"{site.url}/echo", data=io.BytesIO(body)) as response:
                assert await response.read() == body


async def _open(site: Site) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", site.site.port, ssl=site.client_ssl(), server_hostname="127.0.0.1"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return reader, writer, der


async def _whoami_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    async with asyncio.timeout(5):
        return await reader.readuntil(b"\r\n\r\n")


async def test_a_new_context_applies_to_new_connections_only(site: Site) -> None:
    reader, writer, old_der = await _open(site)
    assert (await _whoami_on(reader, writer)).startswith(b"HTTP/1.1 200")
    site.site.context = server_context(site.ca, site.directory, "renewed")
    _, new_writer, new_der = await _open(site)
    assert x509.load_der_x509_certificate(new_der).serial_number != (
        x509.load_der_x509_certificate(old_der).serial_number
    )
    # The connection made before the switch keeps working on its certificate.
    await reader.readuntil(b"}")  # the rest of the first response
    assert (await _whoami_on(reader, writer)).startswith(b"HTTP/1.1 200")
    for w in (writer, new_writer):
        w.close()
