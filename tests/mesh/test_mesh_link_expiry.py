"""A link lives no longer than its certificates (issue 16 item 7): MeshLink gets the
earlier expiry of the two certificates from TLS at link start (TlsEstablished.expires_at,
on the link's own clock) and closes with CLOSE ``certificate-expired`` then; fake clock."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from meshtools import Binding, MeshPki, Node
from test_mesh_link import close_code_sent, make_pair

from trustmesh.mesh.link import CloseCode, LinkClosed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path_factory.mktemp("link-expiry") / "ca")
    yield mesh
    mesh.close()


@pytest.fixture(scope="module")
def nodes(pki: MeshPki) -> tuple[Node, Node]:
    return pki.node("node-a"), pki.node("node-b")


def test_the_link_closes_when_a_certificate_expires(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = make_pair(pki, nodes, hold_a=0, hold_b=0, allow_zero_hold=True, start=False)
    for link in (pair.a, pair.b):
        binding = link._binding
        assert isinstance(binding, Binding) and binding.established is not None
        binding.established = dataclasses.replace(binding.established, expires_at=500.0)
    assert pair.a.start(0.0) == [] and pair.b.start(0.0) == []
    pair.pump()
    assert pair.a.established and pair.b.established
    # No hold timer (hold time 0): the only deadline left is the certificates' expiry.
    assert pair.a.get_timer() == 500.0
    assert pair.a.handle_timer(499.9) == []
    [closed] = pair.a.handle_timer(500.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.EXPIRED
    assert close_code_sent(pair.a) == "certificate-expired"
    assert pair.a.get_timer() is None
