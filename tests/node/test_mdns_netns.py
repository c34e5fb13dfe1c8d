"""mDNS discovery end to end (docs/protocols/discovery.md): real ``trustmesh node run``
processes in two network namespaces this test creates, joined by a veth pair, with
mDNS on and no bootstrap peers. They must find each other and link up; an advert that
names a real node with a wrong certificate fingerprint must be refused on the link.

Needs root (``ip netns add``); skipped with the reason otherwise. The namespaces hold
their own addresses (10.x, never the host's network) and go at the end, failed or not.
Every wait is on a JSON line a process prints, bounded by ``WAIT``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from catools import WAIT
from clitools import TRUSTMESH, clean_env
from cryptography import x509
from nodetools import JsonLines, NodeRun

from trustmesh.node.config import NodeConfig, write_config
from trustmesh.node.discovery import certificate_fingerprint
from trustmesh.node.local import issue_node_files
from trustmesh.pki.ca import CertificateAuthority

pytestmark = pytest.mark.timeout(60)

# A third advertiser: zeroconf alone, announcing ``node_id`` at ``address:port`` with
# the fingerprint it is given. It runs until stdin closes.
ROGUE = """
import asyncio, json, sys
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
from trustmesh.node.discovery import SERVICE_TYPE, Advert, encode_txt

async def main(address, port, node_id, fingerprint):
    zc = AsyncZeroconf(interfaces=[address])
    info = AsyncServiceInfo(
        SERVICE_TYPE, f"{node_id}.{SERVICE_TYPE}", port=port,
        properties=encode_txt(Advert(node_id, fingerprint)),
        server=f"rogue-{node_id}.local.", parsed_addresses=[address],
    )
    await (await zc.async_register_service(info))
    print(json.dumps({"event": "advertised", "name": info.name}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await zc.async_close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
"""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=WAIT, check=False)


def _netns_missing() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to create network namespaces"
    probe = f"tmprobe-{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Lan:
    """Two namespaces joined by a veth pair: ``a`` holds ``address_a``, ``b``
    ``address_b`` (one /24 of 10.0.0.0/8)."""

    a: str
    b: str
    address_a: str
    address_b: str


def _must(*args: str) -> None:
    done = _ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


@pytest.fixture
def lan() -> Iterator[Lan]:
    missing = _netns_missing()
    if missing is not None:
        print(f"skipped: {missing}")
        pytest.skip(missing)
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    subnet = f"10.{secrets.randbelow(200) + 40}.{secrets.randbelow(250) + 1}"
    lan = Lan(f"tm-mdns-a-{tag}", f"tm-mdns-b-{tag}", f"{subnet}.1", f"{subnet}.2")
    try:
        _must("netns", "add", lan.a)
        _must("netns", "add", lan.b)
        # Made inside the namespaces: the host's interfaces never see these names.
        _must("link", "add", "veth-a", "netns", lan.a, "type", "veth", "peer", "veth-b",
              "netns", lan.b)  # fmt: skip
        for ns, dev, address in (
            (lan.a, "veth-a", lan.address_a),
            (lan.b, "veth-b", lan.address_b),
        ):
            _must("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _must("-n", ns, "link", "set", "lo", "up")
            _must("-n", ns, "link", "set", dev, "multicast", "on", "up")
        yield lan
    finally:
        for ns in (lan.a, lan.b):
            _ip("netns", "del", ns)  # its veth end goes with it


class NsNodeRun(NodeRun):
    """``node run`` inside a network namespace (``ip netns exec``): NodeRun's waits and
    shutdown, its process started under the namespace."""

    def __init__(self, namespace: str, directory: Path) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(
            [
                *("ip", "netns", "exec", namespace),
                *(TRUSTMESH, "node", "run", "--dir", str(directory), "--log-level", "debug"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.stdout = JsonLines(self.proc.stdout, f"{directory.name} stdout")
        self.stderr = JsonLines(self.proc.stderr, f"{directory.name} stderr")

    def count(self, event: str, **fields: str) -> int:
        return sum(
            1
            for line in self.stderr.lines
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        )


class Rogue:
    """The third advertiser, inside ``namespace``."""

    def __init__(self, namespace: str, address: str, port: int, node_id: str, fp: str) -> None:
        self.proc = subprocess.Popen(
            [
                *("ip", "netns", "exec", namespace, sys.executable, "-c", ROGUE),
                *(address, str(port), node_id, fp),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
        )
        assert self.proc.stdout is not None
        self.stdout = JsonLines(self.proc.stdout, "rogue advertiser")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        self.stdout.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def _node_dir(ca: CertificateAuthority, root: Path, node_id: str, listen: str, mdns: bool) -> Path:
    directory = root / node_id
    issue_node_files(ca, node_id, directory)
    config = NodeConfig(
        node_id=node_id,
        ca_url="https://127.0.0.1:9",  # no CA inside the namespaces: CRL fetches fail fast
        listen=listen,
        api="127.0.0.1:0",
        mdns=mdns,
        key_encrypted=False,
    )
    write_config(directory, config)
    return directory


def _fingerprint(directory: Path) -> str:
    return certificate_fingerprint(
        x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())[0]
    )


def test_two_nodes_link_through_mdns_and_a_false_advert_is_refused(
    lan: Lan, tmp_path: Path
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="mdns test CA")
    try:
        # node-a listens on its one address (zeroconf on that interface only), node-b
        # on every interface; node-c does not advertise: the rogue does, in its name.
        a_dir = _node_dir(ca, tmp_path, "node-a", f"{lan.address_a}:0", mdns=True)
        b_dir = _node_dir(ca, tmp_path, "node-b", "0.0.0.0:0", mdns=True)
        c_dir = _node_dir(ca, tmp_path, "node-c", f"{lan.address_b}:0", mdns=False)
    finally:
        ca.close()
    runs: list[NsNodeRun] = []
    rogue: Rogue | None = None
    try:
        c = NsNodeRun(lan.b, c_dir)
        runs.append(c)
        c_port = int(c.started()["listen"].rsplit(":", 1)[1])
        # node-c's address and name, node-b's certificate: a wrong fingerprint.
        rogue = Rogue(lan.b, lan.address_b, c_port, "node-c", _fingerprint(b_dir))
        a, b = NsNodeRun(lan.a, a_dir), NsNodeRun(lan.b, b_dir)
        runs += [a, b]
        a.started()
        b.started()
        rogue.stdout.wait_for(lambda line: line.get("event") == "advertised", "its advert")

        up = a.event("link.up", peer="node-b")
        b.event("link.up", peer="node-a")
        # The side that dialled (both may have: one link is kept) checked the advert.
        if up["direction"] == "outbound":
            a.event("mdns.verified", node_id="node-b")
        else:
            b.event("mdns.verified", node_id="node-a")
        refused = a.event("mdns.refused", node_id="node-c")
        assert refused["level"] == "warning"
        assert refused["address"] == f"{lan.address_b}:{c_port}"
        assert "SHA-256" in refused["reason"], refused
        mdns = a.event("mdns.started")
        assert mdns["addresses"] == [lan.address_a]
        assert lan.address_b in b.event("mdns.started")["addresses"]

        for run in (a, b, c):
            assert run.terminate() == 0, run.stderr.dump()
    except BaseException:
        for run in runs:  # what each node logged, for the failure's report
            print(f"--- {run.directory.name}\n{run.stderr.dump()}")
        raise
    finally:
        for run in runs:
            run.close()
        if rogue is not None:
            rogue.close()
    # The false advert was dropped after one refusal (no redial loop), node-a never
    # linked with node-c, and no node took its own advert for a peer.
    assert a.count("mdns.refused", node_id="node-c") == 1, a.stderr.dump()
    assert a.count("link.up", peer="node-c") == 0
    assert a.count("mdns.discovered", node_id="node-a") == 0
    assert b.count("mdns.discovered", node_id="node-b") == 0
