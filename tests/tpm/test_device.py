"""The TPM device on a real swtpm, checked against what others wrote: the EK certificate
swtpm_setup made, tpm2_checkquote, tpm2_makecredential and tpm2_readpublic; plus the
promise that no transient object or session outlives a call."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (  # type: ignore[import-untyped]
    ESYS_TR,
    TPM2_ALG,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPML_DIGEST_VALUES,
    TPMT_HA,
    TPMT_SIGNATURE,
    TPMU_HA,
)

from trustmesh.tpm import device as device_module
from trustmesh.tpm.device import (
    AK_ATTRIBUTES,
    AK_HANDLE,
    EK_CERT_INDEX,
    EK_POLICY,
    QUOTE_ATTEMPTS,
    TpmDevice,
    TpmError,
    p256_point,
)
from trustmesh.tpm.swtpm import Swtpm

OTHER_KEY = 0x81000F10  # a persistent handle these tests fill and empty again
CREDENTIAL_MAGIC = 0xBADCC0DE


def tpm2(tpm: Swtpm, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A tpm2-tools command against ``tpm``."""
    tool = shutil.which(f"tpm2_{args[0]}")
    if tool is None:
        pytest.fail("tpm2-tools is not installed; scripts/dev test installs it")
    result = subprocess.run(
        [tool, *args[1:]],
        env={**os.environ, "TPM2TOOLS_TCTI": tpm.tcti},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"tpm2_{args[0]} failed: {result.stderr.strip()[-800:]}")
    return result


def loaded_handles(tpm: Swtpm) -> str:
    """What tpm2_getcap lists of transient objects and loaded sessions (empty: none)."""
    return "".join(
        tpm2(tpm, "getcap", kind).stdout for kind in ("handles-transient", "handles-loaded-session")
    )


@pytest.fixture
def device(shared_swtpm: Swtpm) -> Iterator[TpmDevice]:
    with TpmDevice.open(shared_swtpm.tcti) as tpm:
        yield tpm


def ak_name(ak_public: bytes) -> bytes:
    """The name of a key: nameAlg (SHA-256) then the hash of its TPMT_PUBLIC."""
    return b"\x00\x0b" + hashlib.sha256(ak_public[2:]).digest()


def parse_quote(attest: bytes) -> tuple[bytes, list[tuple[int, bytes]], bytes]:
    """extraData, the PCR selections and pcrDigest of a TPMS_ATTEST, read by hand."""
    magic, kind = struct.unpack_from(">IH", attest, 0)
    assert (magic, kind) == (0xFF544347, 0x8018)  # TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE
    offset = 6
    (size,) = struct.unpack_from(">H", attest, offset)
    offset += 2 + size  # qualifiedSigner
    (size,) = struct.unpack_from(">H", attest, offset)
    extra = attest[offset + 2 : offset + 2 + size]
    offset += 2 + size + 17 + 8  # clockInfo, firmwareVersion
    (count,) = struct.unpack_from(">I", attest, offset)
    offset += 4
    selections = []
    for _ in range(count):
        alg, size = struct.unpack_from(">HB", attest, offset)
        selections.append((alg, attest[offset + 3 : offset + 3 + size]))
        offset += 3 + size
    (size,) = struct.unpack_from(">H", attest, offset)
    digest = attest[offset + 2 : offset + 2 + size]
    assert offset + 2 + size == len(attest)
    return extra, selections, digest


def bitmap(pcrs: Sequence[int]) -> bytes:
    bits = bytearray(3)
    for index in pcrs:
        bits[index // 8] |= 1 << (index % 8)
    return bytes(bits)


def test_the_ek_policy_is_policy_secret_of_the_endorsement_hierarchy() -> None:
    # TPM2_PolicySecret: H(H(0...0 || TPM_CC_PolicySecret || name(TPM_RH_ENDORSEMENT)) || policyRef)
    step = hashlib.sha256(bytes(32) + (0x151).to_bytes(4, "big") + (0x4000000B).to_bytes(4, "big"))
    assert hashlib.sha256(step.digest()).digest() == EK_POLICY


def test_the_ek_is_the_key_of_its_certificate(device: TpmDevice, shared_swtpm: Swtpm) -> None:
    certificate = x509.load_der_x509_certificate(device.ek_certificate())
    issuer = x509.load_pem_x509_certificate(shared_swtpm.ek_ca)
    certificate.verify_directly_issued_by(issuer)
    ek = TPM2B_PUBLIC.unmarshal(device.ek_public())[0]
    area = ek.publicArea
    key = certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert int.from_bytes(bytes(area.unique.rsa), "big") == key.public_numbers().n
    assert key.public_numbers().e == 65537 and area.parameters.rsaDetail.exponent == 0
    assert bytes(area.authPolicy) == EK_POLICY
    assert device.ek_public() == device.ek_public()  # the template makes the same key again


def test_the_ak_is_made_once_and_is_a_restricted_p256_signing_key(
    device: TpmDevice, shared_swtpm: Swtpm, tmp_path: Path
) -> None:
    first = device.ensure_ak()
    assert device.ensure_ak() == first  # the persisted key, reused
    public = TPM2B_PUBLIC.unmarshal(first)[0]
    area = public.publicArea
    assert int(area.objectAttributes) == int(AK_ATTRIBUTES)
    assert area.objectAttributes & TPMA_OBJECT.RESTRICTED
    assert area.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA
    assert area.parameters.eccDetail.scheme.details.ecdsa.hashAlg == TPM2_ALG.SHA256
    assert len(p256_point(first)) == 65
    # The very bytes tpm2_readpublic -o writes, which tpm2_checkquote -u reads.
    tpm2(shared_swtpm, "readpublic", "-c", hex(AK_HANDLE), "-o", str(tmp_path / "ak.pub"))
    assert (tmp_path / "ak.pub").read_bytes() == first
    assert loaded_handles(shared_swtpm) == ""


def test_a_handle_holding_something_else_is_not_taken_for_an_ak(
    device: TpmDevice, shared_swtpm: Swtpm, tmp_path: Path
) -> None:
    device.create_signing_key(OTHER_KEY)
    try:
        with pytest.raises(TpmError, match="not an AK"):
            device.ensure_ak(OTHER_KEY)
    finally:
        device.evict(OTHER_KEY)
    # The AK's very template, but under the SRK, not the EK: not an AK of this EK.
    srk, key = tmp_path / "srk.ctx", tmp_path / "key"
    attributes = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
    # Without a resource manager tpm2-tools leave their objects loaded: flush after each.
    pair = ["-u", f"{key}.pub", "-r", f"{key}.priv"]
    for command in [
        ["createprimary", "-C", "o", "-G", "ecc", "-c", str(srk)],
        ["create", "-C", str(srk), "-G", "ecc256:ecdsa-sha256:null", "-a", attributes, *pair],
        ["load", "-C", str(srk), *pair, "-c", f"{key}.ctx"],
        ["evictcontrol", "-C", "o", "-c", f"{key}.ctx", hex(OTHER_KEY)],
    ]:
        tpm2(shared_swtpm, *command)
        tpm2(shared_swtpm, "flushcontext", "-t")
    try:
        with pytest.raises(TpmError, match="not under this EK"):
            device.ensure_ak(OTHER_KEY)
    finally:
        device.evict(OTHER_KEY)
    assert loaded_handles(shared_swtpm) == ""


def test_a_quote_verifies_with_tpm2_checkquote(
    device: TpmDevice, shared_swtpm: Swtpm, tmp_path: Path
) -> None:
    ak = device.ensure_ak()
    nonce = os.urandom(20)
    evidence = device.quote(AK_HANDLE, nonce, [7, 0, 1, 16, 7])
    assert evidence.ak_public == ak and sorted(evidence.pcrs) == [0, 1, 7, 16]
    for name, data in [("ak.pub", ak), ("quote", evidence.quote), ("sig", evidence.signature)]:
        (tmp_path / name).write_bytes(data)
    files = ["-u", str(tmp_path / "ak.pub"), "-m", str(tmp_path / "quote")]
    files += ["-s", str(tmp_path / "sig"), "-g", "sha256"]
    tpm2(shared_swtpm, "checkquote", *files, "-q", nonce.hex())
    assert tpm2(shared_swtpm, "checkquote", *files, "-q", "00" * 20, check=False).returncode != 0
    # And the PCR values sent along are the ones the quote's digest covers.
    extra, selections, digest = parse_quote(evidence.quote)
    assert extra == nonce
    assert selections == [(0x000B, bitmap([0, 1, 7, 16]))]
    assert digest == hashlib.sha256(b"".join(evidence.pcrs[i] for i in (0, 1, 7, 16))).digest()


def test_a_quote_of_every_pcr_reads_them_eight_at_a_time(device: TpmDevice) -> None:
    device.ensure_ak()
    evidence = device.quote(AK_HANDLE, b"all", range(24))
    _, selections, digest = parse_quote(evidence.quote)
    assert selections == [(0x000B, b"\xff\xff\xff")]
    assert digest == hashlib.sha256(b"".join(evidence.pcrs[i] for i in range(24))).digest()


def extend_behind_the_back(monkeypatch: pytest.MonkeyPatch, times: int) -> Callable[[], int]:
    """Make the next ``times`` PCR reads of a quote be followed by an extend of PCR 16,
    as another process could do between the read and the quote."""
    real = device_module._read_pcrs
    calls = {"reads": 0}

    def racing(esapi: Any, indexes: Sequence[int]) -> dict[int, bytes]:
        values = real(esapi, indexes)
        calls["reads"] += 1
        if calls["reads"] <= times:
            digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=bytes(32)))
            esapi.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([digest]))
        return values

    monkeypatch.setattr(device_module, "_read_pcrs", racing)
    return lambda: calls["reads"]


def test_extends_show_in_quotes_and_a_race_makes_the_quote_retry(
    make_swtpm: Callable[[], Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    tpm = make_swtpm()
    with TpmDevice.open(tpm.tcti) as device:
        device.ensure_ak()
        before = device.quote(AK_HANDLE, b"n", [16]).pcrs[16]
        measurement = hashlib.sha256(b"the node's config").digest()
        device.pcr_extend(16, measurement)
        after = device.quote(AK_HANDLE, b"n", [16]).pcrs[16]
        assert after == hashlib.sha256(before + measurement).digest()

        reads = extend_behind_the_back(monkeypatch, times=2)
        evidence = device.quote(AK_HANDLE, b"n", [16, 23])
        assert reads() == 3  # two quotes did not match their reads; the third did
        _, _, digest = parse_quote(evidence.quote)
        assert digest == hashlib.sha256(evidence.pcrs[16] + evidence.pcrs[23]).digest()

        reads = extend_behind_the_back(monkeypatch, times=QUOTE_ATTEMPTS)
        with pytest.raises(TpmError, match="changed"):
            device.quote(AK_HANDLE, b"n", [16])
        assert reads() == QUOTE_ATTEMPTS
        with pytest.raises(TpmError, match="32-byte"):
            device.pcr_extend(16, b"not a digest")
        assert device.transient_handles() == []
        # A TPM without an EK certificate (the platform can delete it) says so.
        tpm2(tpm, "nvundefine", hex(EK_CERT_INDEX), "-C", "p")
        with pytest.raises(TpmError, match="no EK certificate"):
            device.ek_certificate()
    assert loaded_handles(tpm) == ""


def test_the_ek_certificate_is_cut_from_a_padded_nv_index() -> None:
    der = b"\x30\x82\x01\x00" + bytes(256)
    assert device_module._der_prefix(der + b"\xff" * 30) == der
    assert device_module._der_prefix(b"\x30\x03abc\x00") == b"\x30\x03abc"
    for bad in (b"", b"\x04\x01a", der[:-1], b"\x30\x85\x01", b"\x30\x80"):
        with pytest.raises(TpmError, match="EK certificate"):
            device_module._der_prefix(bad)


def make_credential(
    tpm: Swtpm, tmp_path: Path, ek_public: bytes, name: bytes, secret: bytes
) -> tuple[bytes, bytes]:
    """tpm2_makecredential's blob and secret: a header (magic, version), then a
    TPM2B_ID_OBJECT, then a TPM2B_ENCRYPTED_SECRET."""
    (tmp_path / "ek.pub").write_bytes(ek_public)
    (tmp_path / "secret").write_bytes(secret)
    files = ["-e", str(tmp_path / "ek.pub"), "-s", str(tmp_path / "secret")]
    tpm2(
        tpm, "makecredential", "-T", "none", *files, "-n", name.hex(), "-o", str(tmp_path / "cred")
    )
    out = (tmp_path / "cred").read_bytes()
    assert struct.unpack_from(">II", out) == (CREDENTIAL_MAGIC, 1)
    (size,) = struct.unpack_from(">H", out, 8)
    blob, encrypted = out[8 : 10 + size], out[10 + size :]
    assert len(encrypted) == 2 + struct.unpack_from(">H", encrypted)[0]
    return blob, encrypted


def test_activate_credential_recovers_the_secret_made_for_this_ek_and_ak(
    device: TpmDevice, shared_swtpm: Swtpm, tmp_path: Path
) -> None:
    ak = device.ensure_ak()
    secret = os.urandom(32)
    blob, encrypted = make_credential(
        shared_swtpm, tmp_path, device.ek_public(), ak_name(ak), secret
    )
    assert device.activate_credential(AK_HANDLE, blob, encrypted) == secret
    # Made for another key's name: the TPM refuses to hand the secret to this AK.
    other = ak_name(ak[:-1] + bytes([ak[-1] ^ 1]))
    blob, encrypted = make_credential(shared_swtpm, tmp_path, device.ek_public(), other, secret)
    with pytest.raises(TpmError, match="activating the credential"):
        device.activate_credential(AK_HANDLE, blob, encrypted)
    with pytest.raises(TpmError, match="does not parse"):
        device.activate_credential(AK_HANDLE, b"\x01", encrypted)
    with pytest.raises(TpmError, match="left over"):
        device.activate_credential(AK_HANDLE, blob + b"\x00", encrypted)
    assert loaded_handles(shared_swtpm) == ""


def test_a_credential_made_for_another_tpms_ek_does_not_activate(
    device: TpmDevice, shared_swtpm: Swtpm, make_swtpm: Callable[[], Swtpm], tmp_path: Path
) -> None:
    ak = device.ensure_ak()
    with TpmDevice.open(make_swtpm().tcti) as other:
        other_ek = other.ek_public()
    assert other_ek != device.ek_public()
    blob, encrypted = make_credential(shared_swtpm, tmp_path, other_ek, ak_name(ak), b"s" * 16)
    with pytest.raises(TpmError, match="activating the credential"):
        device.activate_credential(AK_HANDLE, blob, encrypted)
    assert loaded_handles(shared_swtpm) == ""


def test_an_unrestricted_key_signs_anything_even_a_fake_quote(device: TpmDevice) -> None:
    device.ensure_ak()
    real = device.quote(AK_HANDLE, b"nonce", [0]).quote
    forged = real[:-32] + hashlib.sha256(b"the PCRs I wish I had").digest()
    public, signature = device.sign_with_unrestricted_key(forged)
    area = TPM2B_PUBLIC.unmarshal(public)[0].publicArea
    assert area.objectAttributes & TPMA_OBJECT.SIGN_ENCRYPT
    assert not area.objectAttributes & TPMA_OBJECT.RESTRICTED  # what a verifier must check
    parsed = TPMT_SIGNATURE.unmarshal(signature)[0]
    assert parsed.sigAlg == TPM2_ALG.ECDSA
    der = encode_dss_signature(
        int.from_bytes(bytes(parsed.signature.ecdsa.signatureR), "big"),
        int.from_bytes(bytes(parsed.signature.ecdsa.signatureS), "big"),
    )
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256_point(public))
    key.verify(der, forged, ec.ECDSA(hashes.SHA256()))


def test_no_transient_object_or_session_outlives_a_call(
    device: TpmDevice, shared_swtpm: Swtpm
) -> None:
    device.ensure_ak()
    for n in range(10):
        device.quote(AK_HANDLE, b"%d" % n, [0, 1])
        device.sign_with_unrestricted_key(b"%d" % n)
    device.ek_public()
    device.ek_certificate()
    with pytest.raises(TpmError):
        device.quote(0x81010001, b"", [0])  # the EK cannot sign: the TPM says no
    assert device.transient_handles() == []
    assert loaded_handles(shared_swtpm) == ""


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "tcti",
    [
        "swtpm:host=127.0.0.1,port=CLOSED",  # a port found closed when the test runs
        "nosuchtcti:whatever",
        "device:/nonexistent/tpm",
        "",
        "swtpm:\x00",
    ],
)
def test_no_reachable_tpm_is_a_clear_tpm_error(tcti: str) -> None:
    tcti = tcti.replace("CLOSED", str(closed_port()))
    with pytest.raises(TpmError) as caught:
        TpmDevice.open(tcti)
    assert type(caught.value) is TpmError


def test_every_failure_is_a_tpm_error(device: TpmDevice) -> None:
    with pytest.raises(TpmError, match="no key is persisted"):
        device.quote(0x81000FFF, b"", [0])
    with pytest.raises(TpmError, match="persistent handle"):
        device.ensure_ak(0x80000000)
    with pytest.raises(TpmError, match="PCR"):
        device.quote(AK_HANDLE, b"", [24])
    with pytest.raises(TpmError, match="PCR"):
        device.quote(AK_HANDLE, b"", [])
    with pytest.raises(TpmError, match="at most 64"):
        device.quote(AK_HANDLE, bytes(65), [0])
    with pytest.raises(TpmError, match="not an unrestricted signing key"):
        device.signing_key(0x81010001)
    with pytest.raises(TpmError, match="uncompressed"):
        device.ecdh_zgen(0x81010001, b"\x02" + bytes(32))
    device.close()
    device.close()
    with pytest.raises(TpmError, match="closed"):
        device.ek_public()
