"""PSEC peer IDs cross-checked against py-libp2p (PyPI ``libp2p``), an independent
libp2p implementation.

py-libp2p pins a protobuf runtime older than the project's, so it lives in its own venv,
``<repo>/.venv-libp2p``, created on first use with the project's Python and a pinned,
dependency-free install (only the packages its key and peer-ID modules import), and
reused while its ``.installed`` marker names the same pins.  One worker process,
tests/interop/pylibp2p_ids.py, answers every question over JSON lines.  A venv that
cannot be made (no registry) fails these tests: it is never a skip.

secp256k1 and Ed25519 keys must give the same peer ID as ours.  ECDSA (P-256) does not,
and a test below pins down how: py-libp2p's ``ECCPublicKey`` serializes as
``PublicKey { Type = 4 (its own ECC_P256); Data = 65-byte SEC1 point }``, where the
libp2p peer-ids spec (and go-libp2p, and trustmesh) use ``Type = 3 (ECDSA)`` with the
DER SubjectPublicKeyInfo as Data, and py-libp2p cannot decode the spec's ECDSA key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import base58
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from trustmesh.demo.run import LIBP2P_SECP256K1_PEER_ID, LIBP2P_SECP256K1_PUBLIC
from trustmesh.psec.identity import peer_id_of
from trustmesh.wire.peerid import KeyType, PeerId, decode_public_key, encode_public_key

REPO = Path(__file__).resolve().parents[2]
LIBP2P_VENV = REPO / ".venv-libp2p"
WORKER = Path(__file__).resolve().parent / "pylibp2p_ids.py"
VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "libp2p_peer_ids.json").read_text(encoding="utf-8")
)

# Installed with --no-deps: py-libp2p 0.8.1 itself (its declared dependencies include
# protobuf<7, trio, aioquic, grpcio, ...) and the closure of what libp2p.peer.id and
# libp2p.crypto.{keys,serialization,secp256k1,ed25519,rsa,ecc} import.  The worker skips
# libp2p/__init__.py, which imports the rest of the stack.
REQUIREMENTS = (
    "libp2p==0.8.1",
    "base58==2.1.1",
    "blake3==1.0.11",  # py-multihash
    "cffi==2.1.1",  # cryptography, pynacl
    "coincurve==21.0.0",  # secp256k1 keys (the version libp2p pins)
    "cryptography==50.0.2",  # crypto.rsa, imported by crypto.serialization
    # P-256 keys (crypto.ecc). py-libp2p pins 2.3.2, which PyPI has only as source to
    # compile against libgmp; 3.0.1 has wheels and the same SEC1Encoder/keys/point API
    # (4.x changed it).
    "fastecdsa==3.0.1",
    "mmh3==5.3.1",  # py-multihash
    "morphys==1.0",  # py-multihash, py-multibase
    "protobuf==5.29.6",  # crypto/pb/crypto_pb2.py is protoc 5.29.3 output
    "py-multibase==2.0.0",  # peer.id
    "py-multihash==3.0.0",  # peer.id
    "pycparser==3.12",  # cffi
    "pycryptodome==4.5.0",  # crypto.rsa
    "pynacl==1.6.2",  # Ed25519 keys
    "python-baseconv==1.2.2",  # py-multibase
    "six==1.17.0",  # py-multihash, py-multibase
    "typing-extensions==4.16.0",  # blake3
    "varint==1.0.2",  # py-multihash
)
# compiled packages must come as wheels: a source build would need a C toolchain
BINARY_ONLY = "blake3,cffi,coincurve,cryptography,fastecdsa,mmh3,protobuf,pycryptodome,pynacl"
INSTALL_TIMEOUT = 600.0
REPLY_TIMEOUT = 30.0
RANDOM_KEYS = 20

# the whole module may have to create the venv first
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 120)


# --- the venv and its worker ------------------------------------------------------------


def _venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _base_python() -> str:
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    return str(base)


def _run(command: list[str], what: str) -> None:
    __tracebackhide__ = True
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"cannot create {LIBP2P_VENV}: {what} took over {INSTALL_TIMEOUT:.0f} s")
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-6000:]
        pytest.fail(
            f"cannot create {LIBP2P_VENV} for the py-libp2p cross-check: {what} failed "
            f"(exit {done.returncode}). It needs PyPI (pip); without it this test fails, "
            f"it is not skipped.\n--- output ---\n{output}"
        )


def libp2p_python() -> Path:
    """The python of ``<repo>/.venv-libp2p``, creating the venv and installing the pinned
    packages first unless its ``.installed`` marker already names exactly these pins."""
    python = _venv_python(LIBP2P_VENV)
    marker = LIBP2P_VENV / ".installed"
    pins = "\n".join(REQUIREMENTS) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == pins:
        return python
    print(f"creating {LIBP2P_VENV} with py-libp2p", file=sys.stderr)
    marker.unlink(missing_ok=True)
    if not python.exists():
        _run([_base_python(), "-m", "venv", str(LIBP2P_VENV)], "python -m venv")
    _run(
        [
            str(python),
            *("-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"),
            f"--only-binary={BINARY_ONLY}",
            *REQUIREMENTS,
        ],
        "pip install " + " ".join(REQUIREMENTS),
    )
    marker.write_text(pins)
    return python


class PyLibp2p:
    """The worker process: ``ask(type, key)`` returns its answer (a dict)."""

    def __init__(self, python: Path) -> None:
        # lives as long as the worker; closed in close()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            [str(python), "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )

    def ask_all(self, requests: list[tuple[str, bytes]]) -> list[dict[str, str]]:
        """Send every request, then read the answers (one round trip for a batch)."""
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        lines = "".join(json.dumps({"type": t, "key": k.hex()}) + "\n" for t, k in requests)
        try:
            proc.stdin.write(lines)
            proc.stdin.flush()
        except OSError as exc:
            pytest.fail(self._failure(f"cannot write to the worker: {exc}"))
        answers = []
        for _ in requests:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(self._failure("the worker closed its output"))
            answers.append(json.loads(line))
        return answers

    def ask(self, key_type: str, key: bytes) -> dict[str, str]:
        return self.ask_all([(key_type, key)])[0]

    def peer_ids(self, key_type: str, keys: list[bytes]) -> list[str]:
        answers = self.ask_all([(key_type, key) for key in keys])
        for key, answer in zip(keys, answers, strict=True):
            assert "error" not in answer, f"py-libp2p refused {key_type} key {key.hex()}: {answer}"
        return [answer["peer_id"] for answer in answers]

    def _failure(self, what: str) -> str:
        fd = self._stderr.fileno()
        stderr = os.pread(fd, os.fstat(fd).st_size, 0)[-20_000:].decode("utf-8", "replace")
        return f"py-libp2p worker ({WORKER.name}): {what}" + (
            f"\n--- worker stderr ---\n{stderr.rstrip()}" if stderr.strip() else ""
        )

    def close(self) -> None:
        proc = self._proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write("quit\n")
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def pylibp2p() -> Iterator[PyLibp2p]:
    worker = PyLibp2p(libp2p_python())
    try:
        yield worker
    finally:
        worker.close()


# --- certificates and their keys --------------------------------------------------------


def certificate(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-x")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def ec_point(cert: x509.Certificate, curve: type[ec.EllipticCurve], compressed: bool) -> bytes:
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, curve)
    form = (
        serialization.PublicFormat.CompressedPoint
        if compressed
        else serialization.PublicFormat.UncompressedPoint
    )
    return key.public_bytes(serialization.Encoding.X962, form)


def ed25519_raw(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    assert isinstance(key, ed25519.Ed25519PublicKey)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sha256_peer_id(protobuf: bytes) -> str:
    """base58btc of the SHA-256 multihash of a PublicKey protobuf over 42 bytes."""
    assert len(protobuf) > 42
    return base58.b58encode(b"\x12\x20" + hashlib.sha256(protobuf).digest()).decode()


# --- secp256k1 and Ed25519: the same peer IDs -------------------------------------------


def test_secp256k1_certificates_peer_ids_match_pylibp2p(pylibp2p: PyLibp2p) -> None:
    certs = [certificate(ec.generate_private_key(ec.SECP256K1())) for _ in range(RANDOM_KEYS)]
    compressed = [ec_point(cert, ec.SECP256K1, compressed=True) for cert in certs]
    uncompressed = [ec_point(cert, ec.SECP256K1, compressed=False) for cert in certs]
    ours = [peer_id_of(cert).to_base58() for cert in certs]
    assert len(set(ours)) == RANDOM_KEYS
    assert pylibp2p.peer_ids("secp256k1", compressed) == ours
    # py-libp2p re-encodes a 65-byte point compressed, as the spec's Data requires
    assert pylibp2p.peer_ids("secp256k1", uncompressed) == ours


def test_ed25519_certificates_peer_ids_match_pylibp2p(pylibp2p: PyLibp2p) -> None:
    certs = [certificate(ed25519.Ed25519PrivateKey.generate()) for _ in range(RANDOM_KEYS)]
    ours = [peer_id_of(cert).to_base58() for cert in certs]
    assert len(set(ours)) == RANDOM_KEYS
    assert all(peer_id.startswith("12D3KooW") for peer_id in ours)  # identity multihash
    assert pylibp2p.peer_ids("ed25519", [ed25519_raw(cert) for cert in certs]) == ours


@pytest.mark.parametrize("kind", ["secp256k1", "ed25519"])
def test_pylibp2p_serializes_the_public_key_protobuf_as_we_do(
    pylibp2p: PyLibp2p, kind: str
) -> None:
    if kind == "secp256k1":
        cert = certificate(ec.generate_private_key(ec.SECP256K1()))
        key_type, data = KeyType.SECP256K1, ec_point(cert, ec.SECP256K1, compressed=True)
    else:
        cert = certificate(ed25519.Ed25519PrivateKey.generate())
        key_type, data = KeyType.ED25519, ed25519_raw(cert)
    answer = pylibp2p.ask(kind, data)
    assert bytes.fromhex(answer["protobuf"]) == encode_public_key(key_type, data)
    assert answer["peer_id"] == peer_id_of(cert).to_base58()


# --- the spec's test vectors ------------------------------------------------------------


def test_spec_secp256k1_vector_through_pylibp2p(pylibp2p: PyLibp2p) -> None:
    """The peer-ids spec's secp256k1 public key (the one `trustmesh demo` checks)."""
    key_type, data = decode_public_key(LIBP2P_SECP256K1_PUBLIC)
    assert key_type is KeyType.SECP256K1
    assert PeerId.from_public_key(key_type, data).to_base58() == LIBP2P_SECP256K1_PEER_ID
    decoded = pylibp2p.ask("protobuf", LIBP2P_SECP256K1_PUBLIC)
    assert decoded == {
        "peer_id": LIBP2P_SECP256K1_PEER_ID,
        "protobuf": LIBP2P_SECP256K1_PUBLIC.hex(),
    }
    assert pylibp2p.peer_ids("secp256k1", [data]) == [LIBP2P_SECP256K1_PEER_ID]
    # the vector file holds the same key
    assert bytes.fromhex(VECTORS["keys"]["secp256k1"]["public"]) == LIBP2P_SECP256K1_PUBLIC


def test_spec_ed25519_vector_through_pylibp2p(pylibp2p: PyLibp2p) -> None:
    public = bytes.fromhex(VECTORS["keys"]["ed25519"]["public"])
    key_type, data = decode_public_key(public)
    assert key_type is KeyType.ED25519
    ours = PeerId.from_public_key(key_type, data).to_base58()
    assert ours == VECTORS["derived"]["ed25519"]["peer_id"]
    assert pylibp2p.ask("protobuf", public) == {"peer_id": ours, "protobuf": public.hex()}
    assert pylibp2p.peer_ids("ed25519", [data]) == [ours]


# --- ECDSA (P-256): py-libp2p departs from the spec -------------------------------------


def test_pylibp2p_ecdsa_peer_ids_depart_from_the_spec(pylibp2p: PyLibp2p) -> None:
    """Not a match, and pinned down exactly, so that a py-libp2p that follows the spec
    makes this test fail (then it should assert equality, as for the other key types).

    The peer-ids spec: ECDSA is ``Type = 3`` and its Data the DER SubjectPublicKeyInfo
    (what go-libp2p does; trustmesh follows it, checked independently in
    test_psec_peer_ids.py and against the spec's vector in test_libp2p_peer_ids.py).
    py-libp2p 0.8.1: ``ECCPublicKey`` (libp2p/crypto/ecc.py) is ``Type = 4``
    (``ECC_P256``, a value the spec does not define) with the 65-byte uncompressed SEC1
    point as Data; and its deserializer knows no ECDSA key, so the spec's own ECDSA
    public key does not decode at all."""
    spec_public = bytes.fromhex(VECTORS["keys"]["ecdsa"]["public"])
    spec_type, spec_spki = decode_public_key(spec_public)
    assert spec_type is KeyType.ECDSA
    spec_key = serialization.load_der_public_key(spec_spki)
    assert isinstance(spec_key, ec.EllipticCurvePublicKey)
    spec_point = spec_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )

    certs = [certificate(ec.generate_private_key(ec.SECP256R1())) for _ in range(5)]
    cases: list[tuple[bytes, str]] = [
        (spec_point, VECTORS["derived"]["ecdsa"]["peer_id"]),
        *(
            (ec_point(cert, ec.SECP256R1, compressed=False), peer_id_of(cert).to_base58())
            for cert in certs
        ),
    ]
    answers = pylibp2p.ask_all([("ecdsa", point) for point, _ in cases])
    for (point, ours), answer in zip(cases, answers, strict=True):
        assert "error" not in answer, answer
        spki = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # ours: the spec's PublicKey { Type = 3; Data = DER SPKI (91 bytes) }
        assert ours == sha256_peer_id(encode_public_key(KeyType.ECDSA, spki))
        # py-libp2p's: PublicKey { Type = 4; Data = SEC1 uncompressed point (65 bytes) }
        theirs = bytes.fromhex(answer["protobuf"])
        assert len(point) == 65 and point[0] == 0x04
        assert theirs == b"\x08\x04\x12\x41" + point, (
            "py-libp2p's ECDSA key encoding changed: if it now matches the spec "
            "(Type 3, DER SPKI), make this an equality cross-check"
        )
        assert answer["peer_id"] == sha256_peer_id(theirs)
        assert answer["peer_id"] != ours

    # the spec's ECDSA public key itself: py-libp2p has no deserializer for Type 3
    refused = pylibp2p.ask("protobuf", spec_public)
    assert "peer_id" not in refused
    assert refused["error"].startswith("MissingDeserializerError"), refused
