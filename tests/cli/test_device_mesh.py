"""A mesh whose nodes keep their identities in several places, run as an operator would:
node-1 on its key file, node-2 on a PKCS#11 token (SoftHSM2), node-3 on a TPM (swtpm),
which also attests to the CA at enrollment and at renewal, and node-4 on the encrypted
file `keys generate` fell back to when its TPM was absent (issue 20, "Tests").

Gossip from the device nodes is signed on the device and verified by the others with
the identity key their certificates bind; a renewal keeps the binding and attests
again; the CA's audit keeps the quote for anyone to re-check."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from catools import Call, concurrently, serving, succeeds
from cryptography import x509
from nodetools import running

from trustmesh.pki.extensions import attested_platform_of, identity_binding_of
from trustmesh.tpm.swtpm import Swtpm

ANOMALY = {"hash": "c0ffee00c0ffee00", "kind": "port-scan", "risk": 0.7, "meta": {}}
SPREAD = 10.0


IDENTITY_PASS = "identity key passphrase"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _json(stdout: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stdout)
    return data


def _policy(directory: Path, tpm: Swtpm) -> Path:
    (directory / "ek-ca.pem").write_bytes(tpm.ek_ca + tpm.ek_root)
    zero = "0" * 64
    pcrs = "".join(f'{i} = "{zero}"\n' for i in range(8))
    path = directory / "attestation.toml"
    path.write_text(
        "pcrs = [0, 1, 2, 3, 4, 5, 6, 7]\nrequire_ek = true\n"
        'ek_ca_files = ["ek-ca.pem"]\n[[device_class]]\nname = "swtpm"\n'
        f"[device_class.pcrs]\n{pcrs}"
    )
    return path


def _leaf(directory: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())[0]


def test_a_mesh_of_file_token_and_tpm_identities(
    tmp_path: Path, token: str, make_swtpm: Callable[[], Swtpm]
) -> None:
    tpm = make_swtpm()
    ca = tmp_path / "ca"
    succeeds("ca", "init", "--dir", ca, "--json")
    policy = _policy(tmp_path, tpm)
    path, _, query = token.partition("?")
    token_key = _json(
        succeeds(
            *("keys", "generate", "--type", "p256", "--json"),
            *("--store", f"{path};object=mesh-node-2?{query}"),
        )
    )
    assert token_key["store"] == "pkcs11"
    tpm_key = _json(
        succeeds(
            *("keys", "generate", "--type", "p256", "--json", "--out", tmp_path / "fallback.key"),
            *("--store", f"tpm:{tpm.tcti};handle=0x81000200"),
            passphrase="unused",
        )
    )
    assert tpm_key["store"] == "tpm" and not tpm_key.get("fallback"), tpm_key
    # No TPM answers here: the identity falls back to an encrypted file, still usable.
    absent = f"tpm:swtpm:host=127.0.0.1,port={_closed_port()};handle=0x81000201"
    file_key = _json(
        succeeds(
            *("keys", "generate", "--type", "p256", "--json", "--out", tmp_path / "id-4.key"),
            *("--store", absent),
            passphrase=IDENTITY_PASS,
        )
    )
    assert file_key["fallback"] is True and file_key["store"] == "file", file_key
    dirs = {f"node-{i}": tmp_path / f"n{i}" for i in (1, 2, 3, 4)}
    extra = {
        "node-1": (),
        "node-2": ("--key", token_key["key"]),
        "node-3": ("--key", tpm_key["key"], "--attest", f"tpm:{tpm.tcti}"),
        "node-4": ("--key", file_key["key"]),
    }
    secret = {n: IDENTITY_PASS if n == "node-4" else None for n in dirs}
    with serving(ca, "--attestation-policy", str(policy)) as server:
        tokens = {
            n: _json(succeeds("ca", "token", "create", "--dir", ca, "--node-id", n, "--json"))[
                "token"
            ]
            for n in dirs
        }

        def init(node_id: str, *more: str) -> Call:
            return (
                *("node", "init", "--dir", dirs[node_id], "--ca-url", server.url),
                *("--ca-cert", ca / "ca.crt", "--token", tokens[node_id], "--node-id", node_id),
                *("--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--no-encrypt", "--json"),
                *extra[node_id],
                *more,
            ), secret[node_id]

        first = concurrently(init("node-1"))[0]
        assert first.returncode == 0, first.stderr
        # Only node-3 attested; node-2's identity is bound, node-1 has none.
        assert identity_binding_of(_leaf(dirs["node-1"])) is None
        with running((dirs["node-1"], None)) as (one,):
            seed = one.started()["listen"]
            joining = ("node-2", "node-3", "node-4")
            made = concurrently(*(init(n, "--bootstrap", seed) for n in joining))
            assert all(r.returncode == 0 for r in made), [r.stderr for r in made]
            assert identity_binding_of(_leaf(dirs["node-2"])) is not None
            assert identity_binding_of(_leaf(dirs["node-4"])) is not None
            platform = attested_platform_of(_leaf(dirs["node-3"]))
            assert platform is not None and platform.device_class == "swtpm"
            others = [(dirs[n], secret[n]) for n in joining]
            with running(*others) as (two, three, four):
                nodes = {"node-1": one, "node-2": two, "node-3": three, "node-4": four}
                for node_id, node in nodes.items():
                    for peer in nodes.keys() - {node_id}:
                        node.event("link.up", peer=peer)
                # Gossip signed on the token, on the TPM and with the file identity
                # reaches every node.
                for origin in joining:
                    published = _json(
                        succeeds(
                            *("node", "publish", "--dir", dirs[origin], "--json"),
                            *("--payload-json", json.dumps({**ANOMALY, "meta": {"o": origin}})),
                            passphrase=secret[origin],
                        )
                    )
                    assert published["status"] == "accepted", published
                    for node in nodes.values():
                        line = node.event(
                            "gossip.anomaly", SPREAD, message_id=published["message_id"]
                        )
                        assert line["origin"] == origin
        # A renewal of node-3 attests again and keeps its identity.
        before = identity_binding_of(_leaf(dirs["node-3"]))
        succeeds("rotate", "--dir", dirs["node-3"], "--json", passphrase=None)
        after = identity_binding_of(_leaf(dirs["node-3"]))
        assert before is not None and after is not None
        assert after.identity_spki == before.identity_spki
        assert attested_platform_of(_leaf(dirs["node-3"])) is not None
        server.terminate()
    audit = [
        json.loads(line) for line in succeeds("ca", "audit", "--dir", ca, "--jsonl").splitlines()
    ]
    attested = [e for e in audit if "attestation" in (e["detail"] or {})]
    assert {(e["event"], e["node_id"]) for e in attested} == {
        ("enroll", "node-3"),
        ("rotate", "node-3"),
    }
    for entry in attested:
        evidence = entry["detail"]["attestation"]["evidence"]
        assert {"quote", "signature", "ak_public", "qualifying_data"} <= set(evidence)
