"""make_credential against real TPMs: what we make in Python, tpm2_activatecredential
opens on the swtpm whose EK it was made for, and on no other; and EK certificates
chain to the swtpm's local CA, never to another's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tpmtools
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import ProtocolError
from trustmesh.tpm import structs, swtpm
from trustmesh.tpm.credential import (
    CredentialError,
    EkCertificateError,
    make_credential,
    tools_credential_file,
    verify_ek_certificate,
)

EK_CERT_RSA = "0x01c00002"  # TCG EK Credential Profile: RSA 2048 EK certificate
EK_CERT_P384 = "0x01c00016"  # ECC NIST P-384, the ECC EK swtpm_setup certifies


class Tools(tpmtools.Tools):
    """tpm2-tools on one swtpm, with its files in one directory."""

    def make_ek_and_ak(self, ek: str, algorithm: str) -> None:
        """An EK of ``algorithm`` (the TCG template) and an ECC AK under it."""
        self("tpm2_createek", "-G", algorithm, "-c", f"{ek}.ctx", "-u", f"{ek}.pub")
        self(
            "tpm2_createak", "-C", f"{ek}.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa",
            "-c", f"ak-{ek}.ctx", "-u", f"ak-{ek}.pub", "-n", f"ak-{ek}.name",
        )  # fmt: skip

    def ek_certificate(self, index: str) -> bytes:
        self("tpm2_nvread", index, "-o", f"{index}.der")
        return self.read(f"{index}.der")

    def activate(self, credential: tuple[bytes, bytes], ek: str) -> bytes | None:
        """tpm2_activatecredential with the AK made under ``ek``: the secret, or None."""
        (self.dir / "credential.bin").write_bytes(tools_credential_file(*credential))
        (self.dir / "secret.out").unlink(missing_ok=True)
        argv = (
            "tpm2_activatecredential", "-c", f"ak-{ek}.ctx", "-C", f"{ek}.ctx",
            "-i", "credential.bin", "-o", "secret.out",
        )  # fmt: skip
        if ek == "p384":
            # The high-range templates set userWithAuth: the EK's (empty) password will do.
            result = self(*argv, ok=False)
            return self.read("secret.out") if result.returncode == 0 else None
        # The low-range EK's policy: PolicySecret(endorsement hierarchy), in a session.
        self("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
        try:
            self("tpm2_policysecret", "-S", "session.ctx", "-c", "e")
            result = self(*argv, "-P", "session:session.ctx", ok=False)
        finally:
            self("tpm2_flushcontext", "session.ctx", ok=False)
        return self.read("secret.out") if result.returncode == 0 else None


@dataclass
class Tpms:
    mine: Tools  # EKs "rsa" (RSA 2048), "p256" and "p384", each with an AK
    other: Tools  # another swtpm: its own EK "rsa", AK, and local CA

    def ak_name(self, tools: Tools, ek: str) -> bytes:
        return structs.parse_public(tools.read(f"ak-{ek}.pub")).name


def _start(directory: Path) -> swtpm.Swtpm:
    if not swtpm.available():
        pytest.fail("swtpm is not installed; scripts/dev test installs it")
    return swtpm.Swtpm.start(directory)


@pytest.fixture(scope="module")
def tpms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tpms]:
    # TPMs of this module's own: the tests flush every transient object they find.
    with (
        _start(tmp_path_factory.mktemp("tpm-mine")) as mine,
        _start(tmp_path_factory.mktemp("tpm-other")) as other,
    ):
        mine_tools = Tools(mine, tmp_path_factory.mktemp("files-mine"))
        for ek, algorithm in (("rsa", "rsa"), ("p256", "ecc"), ("p384", "ecc384")):
            mine_tools.make_ek_and_ak(ek, algorithm)
        other_tools = Tools(other, tmp_path_factory.mktemp("files-other"))
        other_tools.make_ek_and_ak("rsa", "rsa")
        yield Tpms(mine_tools, other_tools)


def test_the_tpm_opens_a_credential_made_from_its_ek_certificate(tpms: Tpms) -> None:
    cert = x509.load_der_x509_certificate(tpms.mine.ek_certificate(EK_CERT_RSA))
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    secret = b"enrollment secret #1"
    credential = make_credential(key, tpms.ak_name(tpms.mine, "rsa"), secret)
    assert tpms.mine.activate(credential, "rsa") == secret


def test_the_tpm_opens_a_credential_made_from_its_ek_public_area(tpms: Tpms) -> None:
    secret = os.urandom(32)  # as long as the EK's nameAlg digest allows
    credential = make_credential(tpms.mine.read("rsa.pub"), tpms.ak_name(tpms.mine, "rsa"), secret)
    assert tpms.mine.activate(credential, "rsa") == secret


def test_ecc_eks_open_credentials_seeded_by_ecdh(tpms: Tpms) -> None:
    # P-256 from its TPM2B_PUBLIC (the low-range template: SHA-256, AES-128)...
    secret = b"an ECC P-256 secret"
    credential = make_credential(
        tpms.mine.read("p256.pub"), tpms.ak_name(tpms.mine, "p256"), secret
    )
    assert tpms.mine.activate(credential, "p256") == secret
    # ...and P-384 from swtpm's certificate (template H-3: SHA-384 names, AES-256).
    cert = x509.load_der_x509_certificate(tpms.mine.ek_certificate(EK_CERT_P384))
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    secret = b"a P-384 secret, up to 48 bytes long, for SHA-384"
    credential = make_credential(key, tpms.ak_name(tpms.mine, "p384"), secret)
    assert tpms.mine.activate(credential, "p384") == secret


def test_another_tpm_cannot_open_it(tpms: Tpms) -> None:
    # Made for my EK, naming the other TPM's AK: the other TPM's EK cannot open it.
    for_mine = make_credential(tpms.mine.read("rsa.pub"), tpms.ak_name(tpms.other, "rsa"), b"s")
    assert tpms.other.activate(for_mine, "rsa") is None
    # Made for my EK but naming an AK that is not in my TPM: my TPM refuses it too.
    assert tpms.mine.activate(for_mine, "rsa") is None
    # A flipped bit in the integrity HMAC: refused.
    id_object, encrypted = make_credential(
        tpms.mine.read("rsa.pub"), tpms.ak_name(tpms.mine, "rsa"), b"s"
    )
    tampered = id_object[:5] + bytes([id_object[5] ^ 1]) + id_object[6:]
    assert tpms.mine.activate((tampered, encrypted), "rsa") is None


def test_the_credential_layout_and_injected_randomness(tpms: Tpms) -> None:
    ek, name = tpms.mine.read("rsa.pub"), tpms.ak_name(tpms.mine, "rsa")
    seed = lambda n: b"\x07" * n  # noqa: E731
    id_object, encrypted = make_credential(ek, name, b"abc", random=seed)
    again, encrypted_again = make_credential(ek, name, b"abc", random=seed)
    assert id_object == again  # the seed decides it; only RSA-OAEP adds its own randomness
    assert encrypted != encrypted_again
    # TPM2B_ID_OBJECT: size, TPM2B_DIGEST(HMAC-SHA256), then TPM2B_DIGEST("abc") in AES-CFB.
    assert int.from_bytes(id_object[:2], "big") == len(id_object) - 2 == 2 + 32 + 2 + 3
    assert id_object[2:4] == b"\x00\x20"
    assert encrypted[:2] == b"\x01\x00" and len(encrypted) == 2 + 256


@pytest.mark.parametrize(
    ("secret", "name", "problem"),
    [
        (b"", None, "the secret is 0 bytes"),
        (b"x" * 33, None, "1..32"),
        (b"x", b"\x00", "the AK name is 1 bytes"),
    ],
)
def test_bad_arguments_are_credential_errors(
    tpms: Tpms, secret: bytes, name: bytes | None, problem: str
) -> None:
    ek = tpms.mine.read("rsa.pub")
    with pytest.raises(CredentialError, match=problem):
        make_credential(ek, name or tpms.ak_name(tpms.mine, "rsa"), secret)


def test_an_ek_that_is_not_a_storage_key_is_refused(tpms: Tpms) -> None:
    name = tpms.ak_name(tpms.mine, "rsa")
    with pytest.raises(CredentialError, match="not a restricted decryption"):
        make_credential(tpms.mine.read("ak-rsa.pub"), name, b"s")  # an AK is a signing key
    with pytest.raises(CredentialError, match="EK public: "):
        make_credential(b"\x00\x02\x00\x01", name, b"s")


# --- EK certificates -----------------------------------------------------------------


def _pems(*pems: bytes) -> list[x509.Certificate]:
    return [cert for pem in pems for cert in x509.load_pem_x509_certificates(pem)]


def test_the_ek_certificate_chains_to_its_local_ca(tpms: Tpms) -> None:
    der = tpms.mine.ek_certificate(EK_CERT_RSA)
    cert = x509.load_der_x509_certificate(der)
    now = cert.not_valid_before_utc + timedelta(minutes=1)
    tpm = tpms.mine.tpm
    assert verify_ek_certificate(der, _pems(tpm.ek_ca, tpm.ek_root), now) == cert
    assert verify_ek_certificate(der, _pems(tpm.ek_root, tpm.ek_ca), now) == cert
    # The issuing CA alone is a trust anchor too.
    assert verify_ek_certificate(der, _pems(tpm.ek_ca), now) == cert
    p384 = tpms.mine.ek_certificate(EK_CERT_P384)
    assert verify_ek_certificate(p384, _pems(tpm.ek_ca, tpm.ek_root), now).public_key()


def test_the_ek_certificate_is_refused_by_another_ca_or_out_of_time(tpms: Tpms) -> None:
    der = tpms.mine.ek_certificate(EK_CERT_RSA)
    cert = x509.load_der_x509_certificate(der)
    now = cert.not_valid_before_utc + timedelta(minutes=1)
    mine, other = tpms.mine.tpm, tpms.other.tpm
    # The other swtpm's CA has the very same names, but not the same keys.
    with pytest.raises(EkCertificateError, match="not trusted"):
        verify_ek_certificate(der, _pems(other.ek_ca, other.ek_root), now)
    with pytest.raises(EkCertificateError, match="not trusted"):
        verify_ek_certificate(der, _pems(mine.ek_root), now)  # the intermediate is missing
    with pytest.raises(EkCertificateError, match="not trusted"):
        verify_ek_certificate(der, [], now)
    with pytest.raises(EkCertificateError, match="not valid before"):
        verify_ek_certificate(der, _pems(mine.ek_ca), cert.not_valid_before_utc - timedelta(1))
    with pytest.raises(EkCertificateError, match="aware"):
        verify_ek_certificate(der, _pems(mine.ek_ca), now.replace(tzinfo=None))
    with pytest.raises(EkCertificateError, match="not DER"):
        verify_ek_certificate(der[:-1], _pems(mine.ek_ca), now)
    assert issubclass(EkCertificateError, ProtocolError)


def _cert(
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = True,
    days: tuple[int, int] = (0, 365),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 + timedelta(days=days[0]))
        .not_valid_after(T0 + timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


T0 = datetime(2030, 1, 1, tzinfo=UTC)


def test_every_link_of_the_chain_is_checked() -> None:
    root = _cert("root", None)
    issuer = _cert("issuer", root)
    leaf = _cert("ek", issuer, ca=False)[0].public_bytes(serialization.Encoding.DER)
    now = T0 + timedelta(days=1)
    assert verify_ek_certificate(leaf, [root[0], issuer[0]], now)
    # An expired root above a trusted intermediate fails the chain.
    old_root = _cert("root", None, days=(-10, -1))
    old_issuer = _cert("issuer", old_root)
    leaf2 = _cert("ek", old_issuer, ca=False)[0].public_bytes(serialization.Encoding.DER)
    with pytest.raises(EkCertificateError, match="'CN=root' expired"):
        verify_ek_certificate(leaf2, [old_issuer[0], old_root[0]], now)
    # A certificate that is no CA cannot issue an EK certificate.
    not_ca = _cert("issuer", root, ca=False)
    leaf3 = _cert("ek", not_ca, ca=False)[0].public_bytes(serialization.Encoding.DER)
    with pytest.raises(EkCertificateError, match="is not a CA"):
        verify_ek_certificate(leaf3, [not_ca[0], root[0]], now)
    # The EK certificate itself expires.
    short = _cert("ek", issuer, ca=False, days=(0, 2))[0].public_bytes(serialization.Encoding.DER)
    with pytest.raises(EkCertificateError, match="the EK certificate expired"):
        verify_ek_certificate(short, [issuer[0]], T0 + timedelta(days=3))


EK_RSA_PUBLIC = bytes.fromhex(
    "013a0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b3314"
    "69aa000600800043001008000000000001009a3d343d360427b0c6c9968c66eaf1aac6f06a6f8d17eb72"
    "2e4bffab6d1b61383d1cc0f7883f025dac77053060f81fdbf5a620dffac0e5589aa002c3d8e1daf73b11"
    "586186256735e1a4d2e424b002094a10b236cae0838c176daed3e330c1ade357efae182567f02463022e"
    "68aa8ef50e50f5998b22769a30f165571c2243bd1805e07a4a9ccf2cd8c737f667358df796eb42386bb7"
    "494bef64faebff26986af0b3a80c9e3dd97e8d8474f75c770c812d24aa499480580935ab4faf0eb99f89"
    "451c75ce5af8579247f35f15056596f800f2864c37c8e8406b9a26fdec8bf1e778bb94ed3e56a0b2ec7e"
    "9800982d2a1a73f7bfc343114161d201220fd1c19081"
)
EK_P256_PUBLIC = bytes.fromhex(
    "007a0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b3314"
    "69aa000600800043001000030010002089b93a13e5a3597c3a4e00bbd43d0afb3d4dd0e0c7e09a997451"
    "b5d1683086db002052bc9e410961c6a5aab517660a782828001e6fb49ad070f505f6e68e3052b743"
)


@settings(max_examples=200, deadline=None)
@given(
    base=st.sampled_from([EK_RSA_PUBLIC, EK_P256_PUBLIC]),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
    secret=st.binary(max_size=70),
    name=st.binary(max_size=80),
)
def test_hostile_eks_names_and_secrets_are_credential_errors(
    base: bytes, edits: list[tuple[int, int]], secret: bytes, name: bytes
) -> None:
    raw = bytearray(base)
    for at, value in edits:
        raw[at % len(raw)] = value
    try:
        id_object, encrypted = make_credential(bytes(raw), name, secret)
    except CredentialError:
        return
    assert len(id_object) > 2 + 2 + len(secret) and len(encrypted) > 2
