"""mDNS discovery without the network (docs/protocols/discovery.md): the TXT record and
its parser (fuzzed), the choice of address, the check a discovered peer's certificate
must pass, the bounded table of candidates, the core's use of them, the zeroconf
setup for each listen address, the config key and flags, and one node in-process that
refuses a discovered peer with a wrong fingerprint, then links with the right one."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ifaddr
import pytest
from clitools import TRUSTMESH, clean_env
from cryptography.hazmat.primitives import hashes
from hypothesis import example, given
from hypothesis import strategies as st
from meshtools import T0_MS, MeshPki, Node
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange

from trustmesh.clock import FakeClock
from trustmesh.errors import DecodeError, UnsupportedError
from trustmesh.mesh.engine import GossipEngine
from trustmesh.mesh.errors import MeshError
from trustmesh.mesh.gossip import NODE_ID
from trustmesh.mesh.link import LinkUp
from trustmesh.mesh.node import Dial, NodeCore, NodeIdentity, NodeSettings
from trustmesh.mesh.peers import PeerBook
from trustmesh.node.config import ConfigError, NodeConfig, load_config, write_config
from trustmesh.node.discovery import (
    FINGERPRINT,
    MAX_NODE_ID,
    MAX_TXT,
    MAX_TXT_STRINGS,
    SERVICE_TYPE,
    Advert,
    AdvertCheck,
    AdvertMismatch,
    Candidates,
    MalformedAdvert,
    UnsupportedAdvert,
    certificate_fingerprint,
    encode_txt,
    instance_name,
    parse_txt,
    pick_address,
)
from trustmesh.node.local import LocalMesh
from trustmesh.node.mdns import MAX_PENDING, MdnsDiscovery, MdnsSetup, mdns_setup

FP = "0f" * 32
OTHER_FP = "a1" * 32
ADDRESS = "192.0.2.7:7400"


def txt(*strings: bytes) -> bytes:
    """TXT rdata of ``strings``, each behind its length byte."""
    return b"".join(bytes([len(s)]) + s for s in strings)


VALID = txt(b"txtvers=1", b"node_id=node-1", b"fp=" + FP.encode())


# --- the TXT record ----------------------------------------------------------------------


def test_the_txt_record_is_version_node_id_fingerprint_in_that_order() -> None:
    assert encode_txt(Advert("node-1", FP)) == VALID
    assert parse_txt(VALID) == Advert("node-1", FP)


@given(
    node_id=st.from_regex(NODE_ID, fullmatch=True).filter(lambda n: len(n) <= MAX_NODE_ID),
    fingerprint=st.from_regex(FINGERPRINT, fullmatch=True),
)
@example(node_id="n" * MAX_NODE_ID, fingerprint=FP)
def test_every_advert_round_trips(node_id: str, fingerprint: str) -> None:
    encoded = encode_txt(Advert(node_id, fingerprint))
    assert len(encoded) <= MAX_TXT
    assert parse_txt(encoded) == Advert(node_id, fingerprint)


def test_a_node_id_too_long_for_a_txt_string_cannot_be_advertised() -> None:
    assert MAX_NODE_ID == 247  # "node_id=" and the node_id in 255 bytes
    with pytest.raises(MalformedAdvert, match="at most 247 fit a TXT string"):
        Advert("n" * 248, FP)
    with pytest.raises(ConfigError, match="mdns: a node_id of at most 247"):
        _config(node_id="n" * 248, mdns=True)
    assert _config(node_id="n" * 248).node_id  # without mDNS the mesh's 253 hold


def test_keys_are_case_insensitive_the_first_counts_and_unknown_ones_are_ignored() -> None:
    data = txt(
        b"",  # empty strings are skipped
        b"TXTVERS=1",
        b"Node_ID=node-1",
        b"node_id=node-2",  # a repeat: ignored (RFC 6763 section 6.4)
        b"future",  # a boolean attribute we do not know
        b"fp=" + FP.encode(),
        b"colour=blue",
    )
    assert parse_txt(data) == Advert("node-1", FP)


@pytest.mark.parametrize(
    ("data", "error", "says"),
    [
        (b"", MalformedAdvert, "no txtvers"),
        (txt(b"txtvers=2", b"node_id=n", b"fp=" + FP.encode()), UnsupportedAdvert, "speaks 1"),
        (txt(b"node_id=n", b"fp=" + FP.encode()), MalformedAdvert, "no txtvers"),
        (txt(b"txtvers=1", b"fp=" + FP.encode()), MalformedAdvert, "no node_id"),
        (txt(b"txtvers=1", b"node_id", b"fp=" + FP.encode()), MalformedAdvert, "no node_id"),
        (txt(b"txtvers=1", b"node_id=n"), MalformedAdvert, "no fp"),
        (txt(b"txtvers=1", b"node_id=-bad", b"fp=" + FP.encode()), MalformedAdvert, "node_id"),
        (txt(b"txtvers=1", b"node_id=n", b"fp=" + FP.upper().encode()), MalformedAdvert, "hex"),
        (txt(b"txtvers=1", b"node_id=n", b"fp=" + FP[:-2].encode()), MalformedAdvert, "hex"),
        (txt(b"txtvers=1", b"node_id=n\xc3\xa9", b"fp=" + FP.encode()), MalformedAdvert, "ASCII"),
        (txt(b"=1"), MalformedAdvert, "empty key"),
        (txt(b"k\x00y=1"), MalformedAdvert, "printable"),
        (txt(b"k" * 33 + b"=1"), MalformedAdvert, "printable"),
        (VALID[:-1] + b"\x05ab", MalformedAdvert, "runs past the end"),
        (b"\x09txtvers=", MalformedAdvert, "runs past the end"),
        (txt(*[b"a=b"] * (MAX_TXT_STRINGS + 1)), MalformedAdvert, "TXT strings"),
        (txt(*[b"k=" + b"v" * 200] * 3), MalformedAdvert, f"at most {MAX_TXT}"),
    ],
)
def test_a_bad_txt_record_is_a_typed_error_that_says_why(
    data: bytes, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says) as caught:
        parse_txt(data)
    assert isinstance(caught.value, DecodeError)
    assert isinstance(caught.value, MeshError)
    if error is UnsupportedAdvert:
        assert isinstance(caught.value, UnsupportedError)


def _parses_or_refuses(data: bytes) -> None:
    try:
        advert = parse_txt(data)
    except MalformedAdvert:
        return
    assert NODE_ID.fullmatch(advert.node_id)
    assert FINGERPRINT.fullmatch(advert.fingerprint)


@given(st.binary(max_size=MAX_TXT + 64))
@example(b"\xff")
@example(b"\x01\x80")
@example(b"\x08txtvers\x03=\xff\xfe")
def test_any_bytes_parse_or_raise_malformed_advert(data: bytes) -> None:
    _parses_or_refuses(data)


_pieces = st.one_of(
    st.sampled_from(
        [b"txtvers=1", b"TXTVERS=1", b"node_id=node-1", b"fp=" + FP.encode(), b"fp", b"=", b""]
    ),
    st.binary(max_size=40),
    st.builds(
        lambda k, v: k + b"=" + v,
        st.sampled_from([b"txtvers", b"node_id", b"fp"]),
        st.binary(max_size=70),
    ),
)


@given(st.lists(_pieces, max_size=20))
def test_txt_records_built_of_likely_pieces_parse_or_raise_malformed_advert(
    pieces: list[bytes],
) -> None:
    _parses_or_refuses(txt(*pieces))


@given(st.data())
def test_a_valid_record_with_bytes_changed_parses_or_raises_malformed_advert(
    data: st.DataObject,
) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _parses_or_refuses(bytes(raw[:cut]))


def test_parse_takes_bytes_only() -> None:
    with pytest.raises(MalformedAdvert, match="not bytes"):
        parse_txt("txtvers=1")  # type: ignore[arg-type]


def test_the_instance_name_is_the_node_id_when_it_is_one_dns_label() -> None:
    assert instance_name("node-1") == "node-1"
    dotted = instance_name("edge.site-1.example")
    assert "." not in dotted and dotted.startswith("edge-site-1-example-")
    long_one, long_two = instance_name("n" * 200), instance_name("n" * 199)
    assert len(long_one) <= 63 and long_one != long_two


# --- the address dialled -----------------------------------------------------------------


def test_the_address_is_the_first_usable_one_preferring_our_networks() -> None:
    ours = [ipaddress.ip_network("10.1.2.0/24")]
    found = ["0.0.0.0", "224.0.0.251", "127.0.0.1", "fe80::1", "not an ip", "198.51.100.9"]
    assert pick_address([*found, "10.1.2.3"], 7400) == "198.51.100.9:7400"
    assert pick_address([*found, "10.1.2.3"], 7400, networks=ours) == "10.1.2.3:7400"
    assert pick_address(["2001:db8::5"], 7400) == "[2001:db8::5]:7400"
    assert pick_address(["10.1.2.3", "127.0.0.1"], 7400, loopback=True) == "127.0.0.1:7400"


@pytest.mark.parametrize(
    ("addresses", "port", "says"),
    [
        (["10.0.0.1"], 0, "SRV port 0"),
        (["10.0.0.1"], None, "SRV port None"),
        (["10.0.0.1"], 65536, "SRV port"),
        ([], 7400, "no usable address"),
        (["127.0.0.1", "255.255.255.255", "::", "::ffff:10.0.0.1"], 7400, "no usable"),
    ],
)
def test_an_advert_without_a_usable_address_or_port_is_malformed(
    addresses: list[str], port: int | None, says: str
) -> None:
    with pytest.raises(MalformedAdvert, match=says):
        pick_address(addresses, port)


# --- the check on the link ---------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path / "ca")
    yield mesh
    mesh.close()


def test_the_check_passes_only_the_advertised_node_and_certificate(pki: MeshPki) -> None:
    one, two = pki.node("node-1"), pki.node("node-2")
    fp = certificate_fingerprint(one.cert)
    assert fp == one.cert.fingerprint(hashes.SHA256()).hex()  # SHA-256 of the DER, hex

    good = AdvertCheck(ADDRESS, "node-1", fp)
    good("node-1", one.chain)
    assert good.passed and good.mismatch is None

    wrong_cert = AdvertCheck(ADDRESS, "node-1", certificate_fingerprint(two.cert))
    with pytest.raises(AdvertMismatch, match=f"not the node advertised by mDNS at {ADDRESS}"):
        wrong_cert("node-1", one.chain)
    assert wrong_cert.mismatch is not None and "SHA-256" in wrong_cert.mismatch
    assert not wrong_cert.passed

    wrong_name = AdvertCheck(ADDRESS, "node-2", fp)  # a node's real fingerprint, another name
    with pytest.raises(AdvertMismatch, match="names 'node-1', not 'node-2'"):
        wrong_name("node-1", one.chain)
    assert isinstance(AdvertMismatch("x"), MeshError)  # the link answers CLOSE refused


# --- the candidates ----------------------------------------------------------------------


def name(n: int | str) -> str:
    return f"node-{n}.{SERVICE_TYPE}"


def test_our_own_advert_is_never_a_candidate() -> None:
    table = Candidates("node-0", now=0.0, own_addresses={"10.0.0.1:7400"})
    assert not table.offer(name(0), Advert("node-0", FP), "10.0.0.9:7400", 1.0)
    assert not table.offer(name(9), Advert("node-9", FP), "10.0.0.1:7400", 1.0)
    assert len(table) == 0 and table.pairs() == []


def test_the_latest_advert_for_an_address_wins_and_a_moved_instance_leaves_its_old_one() -> None:
    table = Candidates("node-0", now=0.0)
    assert table.offer(name(1), Advert("node-1", FP), ADDRESS, 1.0)
    assert not table.offer(name(1).upper(), Advert("node-1", FP), ADDRESS, 2.0)  # a refresh
    assert table.get(ADDRESS) is not None and table.get(ADDRESS).seen == 2.0  # type: ignore[union-attr]
    assert table.offer(name(2), Advert("node-2", OTHER_FP), ADDRESS, 3.0)
    assert table.pairs() == [("node-2", ADDRESS)]
    assert table.offer(name(2), Advert("node-2", OTHER_FP), "192.0.2.8:7400", 4.0)
    assert table.pairs() == [("node-2", "192.0.2.8:7400")]
    assert table.withdraw(name(2)) and not table.withdraw(name(2))
    assert len(table) == 0


def test_the_table_is_bounded_and_evicts_the_oldest_unverified_first() -> None:
    table = Candidates("node-0", now=0.0, capacity=4)
    for n in range(4):
        table.offer(name(n + 1), Advert(f"node-{n + 1}", FP), f"10.0.0.{n + 1}:7400", float(n))
    oldest = table.check_for("10.0.0.1:7400")
    assert oldest is not None
    table.verified(oldest)  # node-1 proved itself: it stays
    for n in range(5, 300):  # a LAN host announcing names without end
        table.offer(name(n), Advert(f"node-{n}", FP), f"10.0.{n // 250}.{n % 250}:7400", float(n))
        assert len(table) <= 4
    assert ("node-1", "10.0.0.1:7400") in table.pairs()
    assert table.evicted == 295
    # Only when every candidate is verified does a verified one go (the oldest).
    full = Candidates("node-0", now=0.0, capacity=2)
    for n in (1, 2):
        full.offer(name(n), Advert(f"node-{n}", FP), f"10.0.0.{n}:7400", float(n))
        check = full.check_for(f"10.0.0.{n}:7400")
        assert check is not None
        full.verified(check)
    full.offer(name(3), Advert("node-3", FP), "10.0.0.3:7400", 3.0)
    assert [node_id for node_id, _ in full.pairs()] == ["node-2", "node-3"]


def test_a_refused_advert_is_dropped_and_ignored_for_the_hold_then_taken_again() -> None:
    table = Candidates("node-0", now=0.0, refuse_hold=600.0)
    table.offer(name(1), Advert("node-1", FP), ADDRESS, 1.0)
    check = table.check_for(ADDRESS)
    assert check is not None and table.check_for("192.0.2.99:1") is None
    assert table.refuse(check, 2.0)
    assert table.pairs() == [] and table.refusals == 1
    assert table.refused(ADDRESS, "node-1", FP, 3.0)
    assert not table.offer(name(1), Advert("node-1", FP), ADDRESS, 3.0)  # re-announced
    assert not table.offer(name(1), Advert("node-1", FP), ADDRESS, 601.0)
    # Another certificate (a renewal) is another advert: taken at once.
    assert table.offer(name(1), Advert("node-1", OTHER_FP), ADDRESS, 4.0)
    assert table.offer(name(1), Advert("node-1", FP), ADDRESS, 603.0)  # the hold is over
    assert not table.refused(ADDRESS, "node-1", FP, 603.0)


def test_refusing_a_stale_check_drops_only_that_advert_and_refusals_are_bounded() -> None:
    table = Candidates("node-0", now=0.0, refused_capacity=3)
    table.offer(name(1), Advert("node-1", FP), ADDRESS, 1.0)
    stale = AdvertCheck(ADDRESS, "node-1", OTHER_FP)  # the advert changed since the dial
    assert not table.refuse(stale, 2.0)
    assert table.pairs() == [("node-1", ADDRESS)]
    for n in range(10):
        table.refuse(AdvertCheck(f"10.0.0.{n}:1", "node-x", FP), 3.0)
    assert not table.refused(ADDRESS, "node-1", OTHER_FP, 3.0)  # the oldest went
    assert table.refused("10.0.0.9:1", "node-x", FP, 3.0)


def test_dials_of_candidates_are_rate_limited() -> None:
    table = Candidates("node-0", now=0.0, dial_rate=2.0, dial_burst=3)
    assert [table.dial_delay(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert table.dial_delay(0.0) == pytest.approx(0.5)  # each reserves the next slot
    assert table.dial_delay(0.0) == pytest.approx(1.0)
    assert table.dial_delay(10.0) == 0.0  # a quiet while refills the burst
    assert [table.dial_delay(10.0) for _ in range(2)] == [0.0, 0.0]
    assert table.dial_delay(10.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dial rate"):
        Candidates("node-0", now=0.0, dial_rate=0.0)


# --- the core dials candidates like the address book's -------------------------------------


def _core(pki: MeshPki, me: Node) -> NodeCore[Any]:
    trust = pki.trust()
    cert = me.cert
    identity = NodeIdentity(
        me.key,
        me.chain_der,
        int(cert.not_valid_before_utc.timestamp() * 1000),
        int(cert.not_valid_after_utc.timestamp() * 1000),
        cert.serial_number,
    )
    return NodeCore(
        NodeSettings(me.node_id, "10.0.0.1:7400", (), max_links=12),  # dial target 4
        identity,
        trust,
        GossipEngine(me.node_id, trust, rng=random.Random(1)),
        PeerBook(trust, me.node_id),
        rng=random.Random(7),
    )


@dataclasses.dataclass(eq=False)
class _Link:
    serial: int | None = None
    dialler_port: int = 1


def test_the_core_dials_discovered_nodes_but_not_itself_nor_a_linked_one(pki: MeshPki) -> None:
    me, peer = pki.node("node-a"), pki.node("node-b")
    core = _core(pki, me)
    assert [a for a in core.start(T0_MS) if isinstance(a, Dial)] == []  # nobody known
    linked = _Link(peer.serial)
    core.link_opened(linked, initiator=False, address=None)
    core.link_event(linked, LinkUp("node-b", None, -1, 30), T0_MS)
    found = [
        ("node-a", "10.0.0.9:7400"),  # our node_id elsewhere: never
        ("node-x", "10.0.0.1:7400"),  # our own address: never
        ("node-b", "10.0.0.2:7400"),  # linked already
        ("node-c", "10.0.0.3:7400"),
        ("node-d", "10.0.0.4:7400"),
    ]
    dials = {a.address for a in core.discovered(found, T0_MS) if isinstance(a, Dial)}
    assert dials == {"10.0.0.3:7400", "10.0.0.4:7400"}
    # A failed dial cools its address down: not dialled again at once.
    again = core.dial_failed("10.0.0.3:7400", "refused", T0_MS)
    assert Dial("10.0.0.3:7400") not in again
    assert core.cooldown_of("10.0.0.3:7400") is not None
    # Candidates that went away are not dialled any more.
    core.dial_failed("10.0.0.4:7400", "refused", T0_MS)
    later = core.discovered([], T0_MS + 120_000)
    assert [a for a in later if isinstance(a, Dial)] == []


# --- where zeroconf listens ----------------------------------------------------------------


def _adapters() -> list[ifaddr.Adapter]:
    loopback = [ifaddr.IP("127.0.0.1", 8, "lo"), ifaddr.IP(("::1", 0, 0), 128, "lo")]
    return [
        ifaddr.Adapter("lo", "lo", loopback, index=1),
        ifaddr.Adapter(
            "eth0",
            "eth0",
            [
                ifaddr.IP("10.1.2.3", 24, "eth0"),
                ifaddr.IP(("2001:db8::3", 0, 0), 64, "eth0"),
                ifaddr.IP(("fe80::3", 0, 2), 64, "eth0"),
            ],
            index=2,
        ),
        ifaddr.Adapter("eth1", "eth1", [ifaddr.IP("192.168.9.1", 16, "eth1")], index=3),
    ]


def test_a_wildcard_listener_advertises_on_every_interface_but_loopback() -> None:
    v4 = mdns_setup("0.0.0.0", _adapters())
    assert v4.interfaces is InterfaceChoice.All and v4.ip_version is IPVersion.V4Only
    assert v4.addresses == ["10.1.2.3", "192.168.9.1"] and not v4.loopback
    assert v4.networks == [
        ipaddress.ip_network("10.1.2.0/24"),
        ipaddress.ip_network("192.168.0.0/16"),
    ]
    both = mdns_setup("::", _adapters())
    assert both.ip_version is IPVersion.All
    assert both.addresses == ["10.1.2.3", "2001:db8::3", "192.168.9.1"]


def test_a_listener_on_one_address_advertises_on_that_interface_only() -> None:
    one = mdns_setup("10.1.2.3", _adapters())
    assert one.interfaces == ["10.1.2.3"] and one.addresses == ["10.1.2.3"]
    assert one.networks == [ipaddress.ip_network("10.1.2.0/24")]
    assert one.ip_version is IPVersion.V4Only and not one.loopback
    assert mdns_setup("127.0.0.1", _adapters()).loopback
    assert mdns_setup("2001:db8::3", _adapters()).ip_version is IPVersion.V6Only


def test_a_flood_of_names_waits_in_a_bounded_queue() -> None:
    setup = MdnsSetup(["10.1.2.3"], IPVersion.V4Only, ["10.1.2.3"], [], loopback=False)
    events: list[str] = []

    async def main() -> MdnsDiscovery:  # an event loop for the asyncio.Event
        discovery = MdnsDiscovery(
            "node-0",
            "10.1.2.3",
            7400,
            FP,
            clock=FakeClock(),
            changed=lambda found: None,
            emit=lambda event, **fields: events.append(event),
            setup=setup,
        )
        for n in range(MAX_PENDING * 3):
            discovery._on_state_change(None, SERVICE_TYPE, name(n), ServiceStateChange.Added)  # type: ignore[arg-type]
        discovery._on_state_change(None, SERVICE_TYPE, discovery.instance, ServiceStateChange.Added)  # type: ignore[arg-type]
        return discovery

    discovery = asyncio.run(main())
    assert len(discovery._pending) == MAX_PENDING
    assert discovery.instance not in discovery._pending
    assert next(iter(discovery._pending)) == name(MAX_PENDING * 2)  # the oldest went


# --- config and flags ----------------------------------------------------------------------


def _config(**values: Any) -> NodeConfig:
    base = {
        "node_id": "node-1",
        "ca_url": "https://127.0.0.1:1",
        "listen": "0.0.0.0:0",
        "api": "127.0.0.1:0",
    }
    return NodeConfig(**{**base, **values})


def test_mdns_is_off_unless_set_and_needs_an_ip_address_to_listen_on(tmp_path: Path) -> None:
    assert _config().mdns is False
    write_config(tmp_path, _config(mdns=True))
    assert "mdns = true" in (tmp_path / "node.toml").read_text()
    assert load_config(tmp_path).mdns is True
    with pytest.raises(ConfigError, match="mdns: listen must be an IP address"):
        _config(mdns=True, listen="localhost:7400")
    assert _config(listen="localhost:7400").mdns is False  # without mDNS a name is fine
    with pytest.raises(ConfigError, match="mdns must be true or false"):
        _config(mdns="yes")


def test_node_init_and_run_take_mdns_flags() -> None:
    def usage(command: str) -> str:
        done = subprocess.run(
            [TRUSTMESH, "node", command, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
            check=True,
        )
        return done.stdout

    assert "--mdns / --no-mdns" in usage("init")
    assert "--mdns / --no-mdns" in usage("run")


def test_node_init_refuses_mdns_on_a_host_name_before_the_token_is_spent(tmp_path: Path) -> None:
    ca_cert = tmp_path / "ca.crt"
    ca_cert.write_text("unused: the config is checked first")
    done = subprocess.run(
        [
            *(TRUSTMESH, "node", "init", "--dir", str(tmp_path / "n")),
            *("--ca-url", "https://127.0.0.1:1", "--ca-cert", str(ca_cert), "--token", "t"),
            *("--node-id", "node-1", "--mdns", "--listen", "localhost:7400"),
            *("--api", "127.0.0.1:0", "--no-encrypt"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )
    assert done.returncode == 1, done
    assert "mdns: listen must be an IP address" in done.stderr
    assert not (tmp_path / "n").exists()


# --- one node, in-process: the dial path with a discovery that has no sockets ----------------


async def test_a_discovered_peer_with_another_certificate_is_refused_then_the_right_one_links(
    tmp_path: Path,
) -> None:
    mesh = LocalMesh(tmp_path, 2)
    await mesh.start_ca()
    try:
        one = await mesh.start_node(await mesh.enroll(1))
        two_dir = await mesh.enroll(2)
        config = load_config(two_dir)
        write_config(two_dir, dataclasses.replace(config, bootstrap=()))  # nobody to dial
        two = await mesh.start_node(two_dir)
        events: list[tuple[str, dict[str, Any]]] = []
        setup = MdnsSetup(["127.0.0.1"], IPVersion.V4Only, ["127.0.0.1"], [], loopback=True)
        discovery = MdnsDiscovery(
            "node-2",
            "127.0.0.1",
            int(two.listen_address.rsplit(":", 1)[1]),
            certificate_fingerprint(two.identity.certificate),
            clock=two.clock,
            changed=two.discovered,
            emit=lambda event, **fields: events.append((event, fields)),
            setup=setup,
        )
        two.discovery = discovery  # as start() sets it with mdns = true (no zeroconf here)
        address = one.listen_address
        right = certificate_fingerprint(one.identity.certificate)
        wrong = certificate_fingerprint(two.identity.certificate)
        table = discovery.candidates

        assert not table.offer(name(2), Advert("node-2", wrong), address, 0.0)  # our own
        assert table.offer(name(1), Advert("node-1", wrong), address, 0.0)
        two.discovered(table.pairs())
        await mesh.wait_for(lambda: any(e == "mdns.refused" for e, _ in events), 5.0)
        refused = dict(events)["mdns.refused"]
        assert refused["node_id"] == "node-1" and refused["address"] == address
        assert "SHA-256" in refused["reason"]
        assert table.pairs() == [] and "node-1" not in two.links
        assert two.core.cooldown_of(address) is not None  # and its address cools down

        assert table.offer(name(1), Advert("node-1", right), address, 1.0)
        two.discovered(table.pairs())
        await mesh.wait_for(lambda: "node-1" in two.links and "node-2" in one.links, 10.0)
        await mesh.wait_for(lambda: any(e == "mdns.verified" for e, _ in events), 5.0)
        held = table.get(address)
        assert held is not None and held.verified
    finally:
        await mesh.stop()
