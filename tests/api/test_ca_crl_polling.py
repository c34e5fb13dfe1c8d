"""Polling the CRL is cheap: the CA answers a known ETag with 304 and no body, signs the
CRL once per change (not per request), and CaClient.crl_if_changed keeps one TLS
connection open across polls, replacing it transparently when the CA closed it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ca_support import RunningCa
from cryptography import x509

from trustmesh.api.ca_client import CaClient, CaRequestFailed
from trustmesh.io.limits import Admission, ResourcePolicy
from trustmesh.pki.ca import CertificateAuthority


class Connections:
    """The connections the CA's listener admits (one TLS handshake each), kept so that a
    test can count them and drop one from the server's side."""

    def __init__(self, running: RunningCa, monkeypatch: pytest.MonkeyPatch) -> None:
        self.admitted: list[Admission] = []
        table = running.server.listener.table
        admit = table.admit

        def counting(source: str) -> Admission | None:
            admission = admit(source)
            if admission is not None:
                self.admitted.append(admission)
            return admission

        monkeypatch.setattr(table, "admit", counting)

    @property
    def count(self) -> int:
        return len(self.admitted)


def count_signatures(ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time the CA signs a CRL."""
    signed: list[int] = []
    sign = ca.crl

    def counting(**kwargs: Any) -> x509.CertificateRevocationList:
        signed.append(1)
        return sign(**kwargs)

    monkeypatch.setattr(ca, "crl", counting)
    return signed


def poll(client: CaClient, etag: str | None) -> Any:
    return asyncio.to_thread(client.crl_if_changed, etag)


async def test_an_unchanged_crl_is_a_304_on_the_same_connection(
    ca_api: RunningCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = Connections(ca_api, monkeypatch)
    signed = count_signatures(ca_api.ca, monkeypatch)
    with CaClient(ca_api.url, ca_api.directory / "ca.crt") as client:
        der, etag = await poll(client, None)
        assert der is not None
        assert etag is not None and etag.startswith('"') and not etag.startswith("W/")
        crl = x509.load_der_x509_crl(der)
        assert crl.is_signature_valid(ca_api.ca.issuing_cert.public_key())  # type: ignore[arg-type]
        for _ in range(4):
            assert await poll(client, etag) == (None, etag)
        assert connections.count == 1
        assert client.connects == 1
    # Signed when the server started (its metrics show a CRL from the start): the first
    # request and the 304s cost no signature.
    assert signed == []


async def test_a_revocation_shows_in_the_next_poll_with_a_new_etag(
    ca_api: RunningCa, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, _, cert = ca_api.write_node(tmp_path, "node-1")
    connections = Connections(ca_api, monkeypatch)
    with CaClient(ca_api.url, ca_api.directory / "ca.crt") as client:
        first, etag = await poll(client, None)
        assert first is not None
        assert cert.serial_number not in {e.serial_number for e in x509.load_der_x509_crl(first)}
        ca_api.ca.revoke(serial=cert.serial_number, reason="keyCompromise")
        der, new_etag = await poll(client, etag)
        assert der is not None
        assert new_etag is not None and new_etag != etag
        listed = {e.serial_number for e in x509.load_der_x509_crl(der)}
        assert cert.serial_number in listed
        assert await poll(client, new_etag) == (None, new_etag)
        # The old ETag no longer matches: whoever holds it gets the new CRL.
        again, newest = await poll(client, etag)
        assert (again, newest) == (der, new_etag)
    assert connections.count == 1


async def test_a_connection_the_ca_dropped_is_replaced_transparently(
    ca_api: RunningCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = Connections(ca_api, monkeypatch)
    with CaClient(ca_api.url, ca_api.directory / "ca.crt") as client:
        _, etag = await poll(client, None)
        (admission,) = connections.admitted
        assert admission.evict is not None
        admission.evict("the test drops it")  # the server resets the kept-alive connection
        assert await poll(client, etag) == (None, etag)
        assert connections.count == 2
        assert client.connects == 2
        assert await poll(client, etag) == (None, etag)
        assert connections.count == 2


async def test_a_connection_closed_idle_by_the_ca_is_replaced_transparently(
    ca_api_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CA closes a kept-alive connection cleanly (TLS close_notify, then FIN) once it
    has been idle for keepalive_timeout; the next poll reconnects."""
    running: RunningCa = await ca_api_factory(
        resources=ResourcePolicy.for_load(64).replace(keepalive_timeout=0.05)
    )
    connections = Connections(running, monkeypatch)
    closed = asyncio.Event()
    release = Admission.release

    def releasing(admission: Admission) -> None:
        release(admission)
        closed.set()

    monkeypatch.setattr(Admission, "release", releasing)
    with CaClient(running.url, running.directory / "ca.crt") as client:
        _, etag = await poll(client, None)
        await asyncio.wait_for(closed.wait(), 10)  # the CA closed the idle connection
        assert await poll(client, etag) == (None, etag)
        assert connections.count == 2
        assert client.connects == 2


async def test_polls_from_many_threads_share_one_connection(
    ca_api: RunningCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = Connections(ca_api, monkeypatch)
    with CaClient(ca_api.url, ca_api.directory / "ca.crt") as client:
        _, etag = await poll(client, None)
        answers = await asyncio.gather(*(poll(client, etag) for _ in range(8)))
        assert answers == [(None, etag)] * 8
        assert connections.count == 1


async def test_closing_the_client_ends_the_connection_and_it_stays_usable(
    ca_api: RunningCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = Connections(ca_api, monkeypatch)
    client = CaClient(ca_api.url, ca_api.directory / "ca.crt")
    try:
        _, etag = await poll(client, None)
        client.close()
        assert await poll(client, etag) == (None, etag)
        assert connections.count == 2
    finally:
        client.close()


async def test_an_unreachable_ca_is_an_unsent_failure(ca_api: RunningCa) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = CaClient(f"https://127.0.0.1:{port}", ca_api.directory / "ca.crt", timeout=5.0)
    with pytest.raises(CaRequestFailed) as failure:
        await poll(client, None)
    assert failure.value.unsent and failure.value.status == 0
    assert client.connects == 0


async def test_the_crl_route_caches_and_revalidates(ca_api: RunningCa) -> None:
    session = ca_api.session()
    url = f"{ca_api.url}/v1/crl"
    async with session.get(url) as response:
        assert response.status == 200
        body = await response.read()
        etag = response.headers["ETag"]
        assert "max-age" in response.headers["Cache-Control"]
        assert "must-revalidate" in response.headers["Cache-Control"]
    assert len(x509.load_der_x509_crl(body)) == 0  # it parses, and lists nothing yet
    for tag in (etag, f'"other", {etag}', "*"):
        async with session.get(url, headers={"If-None-Match": tag}) as response:
            assert response.status == 304
            assert await response.read() == b""
            assert response.headers["ETag"] == etag
    async with session.get(url, params={"format": "pem"}) as response:
        assert response.status == 200
        pem_etag = response.headers["ETag"]
    assert pem_etag != etag  # each encoding has its own
    async with session.get(url, headers={"If-None-Match": pem_etag}) as response:
        assert response.status == 200  # a PEM tag does not match the DER answer
