"""Keys in a real TPM (swtpm): made there, signing (low-S, verified by cryptography) and
agreeing on ECDH with software keys, from several threads, without leaving a transient
object behind; and the key URI's parser."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.crypto.keys import P256_ORDER, KeyKind, PrivateKey
from trustmesh.errors import KeyStoreError
from trustmesh.keystore.signer import Signer
from trustmesh.keystore.tpm import MAX_URI, TpmKeyError, TpmSigner, TpmUri
from trustmesh.tpm.device import TpmDevice, TpmError
from trustmesh.tpm.swtpm import Swtpm

_HANDLES = itertools.count(0x81000E10)  # these tests' own persistent handles


@pytest.fixture
def key_uri(shared_swtpm: Swtpm) -> Iterator[str]:
    """A free handle on the shared swtpm, emptied again after the test."""
    uri = f"tpm:{shared_swtpm.tcti};handle=0x{next(_HANDLES):08x}"
    yield uri
    with TpmDevice.open(shared_swtpm.tcti) as device, contextlib.suppress(TpmError):
        device.evict(TpmUri.parse(uri).handle)


def transient_objects(tpm: Swtpm) -> str:
    """``tpm2_getcap handles-transient`` (prints nothing when none are loaded)."""
    tool = shutil.which("tpm2_getcap")
    if tool is None:
        pytest.fail("tpm2-tools is not installed; scripts/dev test installs it")
    return subprocess.run(
        [tool, "handles-transient"],
        env={**os.environ, "TPM2TOOLS_TCTI": tpm.tcti},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def test_a_tpm_key_signs_low_s_and_agrees_on_ecdh(key_uri: str, shared_swtpm: Swtpm) -> None:
    with TpmSigner.generate(key_uri, KeyKind.P256) as signer:
        assert isinstance(signer, Signer) and signer.kind == KeyKind.P256
        public = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), signer.public_key().to_bytes()
        )
        for n in range(10):  # low-S every time, like the software keys
            message = b"message %d" % n
            signature = signer.sign(message)
            signer.public_key().verify(signature, message)  # trustmesh insists on low-S
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            assert decode_dss_signature(signature)[1] <= P256_ORDER // 2
        peer = PrivateKey.generate(KeyKind.P256)
        shared = signer.ecdh(peer.public_key())
        assert len(shared) == 32 and shared == peer.ecdh(signer.public_key())
        other = ec.generate_private_key(ec.SECP256R1())
        assert signer.ecdh(PrivateKey.from_cryptography(other).public_key()) == other.exchange(
            ec.ECDH(), public
        )
    with TpmSigner.open(key_uri) as again:
        assert again.public_key() == signer.public_key()
        again.public_key().verify(again.sign(b"reopened"), b"reopened")
    assert transient_objects(shared_swtpm) == ""


def test_a_taken_handle_a_missing_key_and_the_ak_are_refused(
    key_uri: str, shared_swtpm: Swtpm
) -> None:
    TpmSigner.generate(key_uri).close()
    with pytest.raises(TpmKeyError, match="is taken"):
        TpmSigner.generate(key_uri, KeyKind.P256)
    TpmSigner.delete(key_uri)
    with pytest.raises(TpmKeyError, match="no key is persisted"):
        TpmSigner.open(key_uri)
    with pytest.raises(TpmKeyError, match="no key is persisted"):
        TpmSigner.delete(key_uri)
    with pytest.raises(TpmKeyError, match="P-256"):
        TpmSigner.generate(key_uri, KeyKind.SECP256K1)
    with TpmDevice.open(shared_swtpm.tcti) as device:
        device.ensure_ak()
    ak_uri = f"tpm:{shared_swtpm.tcti};handle=0x81010002"
    for refused in (TpmSigner.open, TpmSigner.delete):
        with pytest.raises(TpmKeyError, match="not an unrestricted signing key"):
            refused(ak_uri)
    assert transient_objects(shared_swtpm) == ""


def test_signing_from_threads_and_in_a_row_leaves_no_transient_object(
    key_uri: str, shared_swtpm: Swtpm
) -> None:
    with TpmSigner.generate(key_uri) as signer:
        messages = [b"thread message %d" % n for n in range(16)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            signatures = list(pool.map(signer.sign, messages))
        for message, signature in zip(messages, signatures, strict=True):
            signer.public_key().verify(signature, message)
        # And another signer on the same TPM at the same time: one lock per TPM.
        with TpmSigner.open(key_uri) as twin, ThreadPoolExecutor(max_workers=4) as pool:
            jobs = [pool.submit(s.sign, b"both") for s in (signer, twin) * 5]
            for job in jobs:
                signer.public_key().verify(job.result(), b"both")
        for n in range(10):
            signer.sign_digest(bytes([n]) * 32)
        with pytest.raises(ValueError, match="32 bytes"):
            signer.sign_digest(b"short")
        with pytest.raises(TpmKeyError, match="P-256"):
            signer.ecdh(PrivateKey.generate(KeyKind.SECP256K1).public_key())
    assert transient_objects(shared_swtpm) == ""
    with pytest.raises(TpmKeyError, match="closed"):
        signer.sign(b"after close")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_no_reachable_tpm_is_a_tpm_key_error() -> None:
    uri = f"tpm:swtpm:host=127.0.0.1,port={closed_port()};handle=0x81000010"
    for attempt in (TpmSigner.open, TpmSigner.generate, TpmSigner.delete):
        with pytest.raises(TpmKeyError, match="cannot reach the TPM") as caught:
            attempt(uri)
        assert isinstance(caught.value, KeyStoreError) and isinstance(caught.value, TpmError)


def test_a_key_uri_is_a_tcti_and_a_persistent_handle() -> None:
    parsed = TpmUri.parse("tpm:swtpm:host=127.0.0.1,port=2321;handle=0x81000010")
    assert parsed == TpmUri("swtpm:host=127.0.0.1,port=2321", 0x81000010)
    assert str(parsed) == "tpm:swtpm:host=127.0.0.1,port=2321;handle=0x81000010"
    assert TpmUri.parse("tpm:device:/dev/tpmrm0;handle=0x81FFFFFF").handle == 0x81FFFFFF


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("pkcs11:token=a;object=b", "starts with tpm:"),
        ("tpm:device:/dev/tpmrm0", "ends with ;handle="),
        ("tpm:;handle=0x81000010", "names its TCTI"),
        ("tpm:device;handle=0x1;handle=0x81000010", "given twice"),
        ("tpm:device;handle=0x80000010", "not persistent"),
        ("tpm:device;handle=0x82000000", "not persistent"),
        ("tpm:device;handle=0x810000100", "not hex"),
        ("tpm:device;handle=2164260880", "not hex"),
        ("tpm:device;handle=0x8100_0010", "not hex"),
        ("tpm:device;handle= 0x81000010", "not hex"),
        ("tpm:device;handle=", "not hex"),
        ("tpm:dev\x00ice;handle=0x81000010", "control characters"),
        ("tpm:a;b;handle=0x81000010", "no ; in it"),
        ("tpm:" + "d" * MAX_URI + ";handle=0x81000010", "at most"),
    ],
)
def test_bad_key_uris_are_refused(text: str, error: str) -> None:
    with pytest.raises(TpmKeyError, match=error):
        TpmUri.parse(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_any_text_is_a_uri_or_a_typed_error(text: str) -> None:
    for candidate in (text, "tpm:" + text, f"tpm:{text};handle=0x81000010", f"tpm:x;handle={text}"):
        try:
            parsed = TpmUri.parse(candidate)
        except TpmKeyError:
            continue
        assert TpmUri.parse(str(parsed)) == parsed  # what it prints, it reads back


@settings(max_examples=200, deadline=None)
@given(
    tcti=st.text(
        st.characters(codec="utf-8", exclude_characters=";", exclude_categories=["C", "Z"]),
        min_size=1,
        max_size=100,
    ),
    handle=st.integers(0x81000000, 0x81FFFFFF),
)
def test_every_tcti_and_persistent_handle_round_trip(tcti: str, handle: int) -> None:
    parsed = TpmUri.parse(str(TpmUri(tcti, handle)))
    assert parsed == TpmUri(tcti, handle)
