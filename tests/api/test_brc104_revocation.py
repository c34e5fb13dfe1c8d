"""AuthFetch and certificates it was not asked to reveal, or cannot check (issue 16,
item 18): the unsigned ``x-bsv-auth-requested-certificates`` header never makes the
client disclose fields by itself, and a server certificate that can be revoked is
refused unless a revocation source is configured."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from trustmesh.api.authfetch import AuthFetch
from trustmesh.api.brc104 import Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.errors import CertificateError
from trustmesh.brc103.messages import RequestedCertificates
from trustmesh.brc103.peer import PeerConfig
from trustmesh.brc103.revocation import LocalRevocationRegistry, NoRevocationCheck
from trustmesh.brc103.wallet import Wallet

WAIT = 5.0
SERVER = Wallet.from_hex("a1" * 32)
CLIENT = Wallet.from_hex("b2" * 32)
CERTIFIER = Wallet.from_hex("d4" * 32)
CERT_TYPE = base64.b64encode(b"trustmesh brc104 revocation type").decode()
OUTPOINT = "ab" * 32 + ".1"  # revocable
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requested(*fields: str) -> RequestedCertificates:
    return RequestedCertificates((CERTIFIER.identity_key,), {CERT_TYPE: fields})


def master(subject: Wallet) -> MasterCertificate:
    return MasterCertificate.issue(
        CERTIFIER,
        subject.identity_key,
        CERT_TYPE,
        {"name": "Alice", "role": "admin"},
        revocation_outpoint=OUTPOINT,
    )


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def asking_app(posts: list[str], answered: asyncio.Event) -> web.Application:
    """Our server, plus someone on the path who adds the unsigned header asking for every
    field to each general response; ``posts`` collects the auth POSTs' message types and
    ``answered`` is set when a certificateResponse arrives."""

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == brc104.AUTH_PATH:
            posts.append(json.loads(await request.read()).get("messageType"))
            if posts[-1] == "certificateResponse":
                answered.set()
            return await handler(request)
        response = await handler(request)
        response.headers[brc104.REQUESTED_CERTIFICATES] = json.dumps(
            requested("name", "role").to_json()
        )
        return response

    app = demo_app(Brc104Server(SERVER))
    app.middlewares.insert(0, inject)
    return app


async def settle(answered: asyncio.Event, wait: float) -> None:
    """Let a background certificateResponse land, if one was sent, for up to ``wait`` s."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(answered.wait(), wait)


async def test_the_unsigned_request_header_discloses_nothing_by_itself() -> None:
    posts: list[str] = []
    answered = asyncio.Event()
    config = PeerConfig(certificates=[master(CLIENT)])
    async with (
        serving(asking_app(posts, answered)) as url,
        AuthFetch(CLIENT, config, request_timeout=WAIT) as client,
    ):
        response = await client.fetch(url + "/hello")
        assert response.status == 200
        await settle(answered, 0.5)
        assert posts == ["initialRequest"], "the client revealed fields on its own"
        # The request reaches the caller, who may answer it.
        assert response.requested_certificates == requested("name", "role")
        assert await client.send_certificates(url, requested("name")) == 1
        await settle(answered, WAIT)
        assert posts == ["initialRequest", "certificateResponse"]


async def test_a_revocable_server_certificate_needs_a_revocation_source() -> None:
    server_config = PeerConfig(certificates=[master(SERVER)])
    client_config = PeerConfig(requested_certificates=requested("name"))
    async with serving(demo_app(Brc104Server(SERVER, server_config))) as url:
        async with AuthFetch(CLIENT, client_config, request_timeout=WAIT) as client:
            with pytest.raises(CertificateError) as info:
                await client.fetch(url + "/hello")
            assert info.value.code == "ERR_REVOCATION_UNCHECKED"
        for checker in (LocalRevocationRegistry(), NoRevocationCheck()):
            async with AuthFetch(
                CLIENT, client_config, revocation=checker, request_timeout=WAIT
            ) as client:
                response = await client.fetch(url + "/hello")
            assert response.status == 200
            [shown] = response.certificates
            assert shown.decrypted_fields == {"name": "Alice"}
