"""TPM attestation at enrollment and renewal, end to end on swtpm: the challenge, the
credential that ties the AK to the EK, the quote over SHA-256(nonce || SHA-256(SPKI)),
the certificate's attested-platform extension, the audit's evidence (re-checked with
tpm2_checkquote), and the attacks: each is refused with attestation_failed."""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.pki.attestation import Attestation, AttestationPolicy
from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.challenge import Challenges
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.errors import AttestationFailed, PkiError, PolicyDenied, TokenRejected
from trustmesh.pki.extensions import attested_platform_of, spki_der
from trustmesh.pki.store import IssuedCertificate
from trustmesh.pki.tpm_verifier import TpmQuoteVerifier
from trustmesh.tpm.attester import TpmAttester
from trustmesh.tpm.device import AK_HANDLE, TpmDevice, TpmError
from trustmesh.tpm.evidence import QuoteEvidence
from trustmesh.tpm.policy import load_policy
from trustmesh.tpm.swtpm import Swtpm
from trustmesh.tpm.verify import qualifying_data

PASS = b"tpm enrollment"
PCRS = (0, 1, 2, 3, 4, 5, 6, 7)


def write_policy(directory: Path, *tpms: Swtpm, require_ek: bool = True) -> Path:
    """The policy docs/protocols/attestation.md shows: a fresh swtpm's PCRs 0-7 are zero."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ek-ca.pem").write_bytes(b"".join(t.ek_ca + t.ek_root for t in tpms))
    zeros = "0" * 64
    lines = [
        f"pcrs = {list(PCRS)}",
        f"require_ek = {'true' if require_ek else 'false'}",
        'ek_ca_files = ["ek-ca.pem"]',
        "[[device_class]]",
        'name = "swtpm"',
        "[device_class.pcrs]",
        *(f'{i} = "{zeros}"' for i in PCRS),
    ]
    path = directory / "attestation.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclasses.dataclass
class Desk:
    ca: CertificateAuthority
    registrar: Registrar

    def ask_enroll(self, token: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """What POST /v1/enroll/challenge answers for ``token``."""

        def ask(body: dict[str, Any]) -> dict[str, Any]:
            now = self.registrar.clock.now()
            nonce, expires = self.registrar.enrollment_challenge(token, now=now)
            extra = self.registrar.policy.attestation.challenge(nonce, body, now)
            return {"nonce": base64.b64encode(nonce).decode(), "expires": str(expires), **extra}

        return ask

    def ask_rotate(self, current: IssuedCertificate) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """What POST /v1/enroll/challenge answers the holder of ``current`` (mTLS)."""

        def ask(body: dict[str, Any]) -> dict[str, Any]:
            now = self.registrar.clock.now()
            nonce, _ = self.registrar.rotation_challenge(current, now=now)
            extra = self.registrar.policy.attestation.challenge(nonce, body, now)
            return {"nonce": base64.b64encode(nonce).decode(), **extra}

        return ask

    def enroll(
        self, node_id: str, attestation: dict[str, str] | None, key: PrivateKey, token: str
    ) -> x509.Certificate:
        parsed = None if attestation is None else Attestation.from_json(attestation)
        return self.registrar.enroll(token, make_csr(key, node_id), attestation=parsed).certificate


@pytest.fixture
def tpm(make_swtpm: Callable[[], Swtpm]) -> Swtpm:
    return make_swtpm()


@pytest.fixture
def desk(tmp_path: Path, tpm: Swtpm) -> Iterator[Desk]:
    ca = CertificateAuthority.init(tmp_path / "ca", PASS)
    challenges = Challenges.for_directory(ca.directory)
    verifier = TpmQuoteVerifier(load_policy(write_policy(tmp_path, tpm)), challenges, ca.clock)
    policy = EnrollmentPolicy(attestation=AttestationPolicy("required", {verifier.type: verifier}))
    yield Desk(ca, Registrar(ca, policy, MeshSettings(), challenges=challenges))
    ca.close()


def attest(tpm: Swtpm, desk: Desk, token: str, key: PrivateKey) -> dict[str, str]:
    return TpmAttester(tpm.tcti)(
        desk.ask_enroll(token), spki_der(key.to_cryptography().public_key())
    )


def test_an_attested_enrollment_puts_the_ak_in_the_certificate_and_the_quote_in_the_audit(
    tpm: Swtpm, desk: Desk, tmp_path: Path
) -> None:
    key = PrivateKey.generate(KeyKind.P256)
    token = desk.ca.create_token("node-1")
    cert = desk.enroll("node-1", attest(tpm, desk, token, key), key, token)
    platform = attested_platform_of(cert)
    assert platform is not None and platform.device_class == "swtpm"
    assert platform.pcrs == PCRS
    with TpmDevice.open(tpm.tcti) as device:
        assert platform.ak_public == device.ensure_ak(AK_HANDLE)

    # The audit keeps the evidence; tpm2_checkquote re-checks it from the base64 alone.
    entry = next(e for e in desk.ca.store.audit() if e.event == "enroll")
    evidence = entry.detail["attestation"]["evidence"]  # type: ignore[index]
    for name in ("quote", "signature", "ak_public"):
        (tmp_path / name).write_bytes(base64.b64decode(evidence[name]))
    checkquote = shutil.which("tpm2_checkquote")
    assert checkquote is not None, "scripts/dev test installs tpm2-tools"
    result = subprocess.run(
        [
            *(checkquote, "-u", str(tmp_path / "ak_public"), "-m", str(tmp_path / "quote")),
            *("-s", str(tmp_path / "signature"), "-g", "sha256"),
            *("-q", evidence["qualifying_data"]),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_required_attestation_renews_with_a_fresh_quote_and_refuses_without(
    tpm: Swtpm, desk: Desk
) -> None:
    key = PrivateKey.generate(KeyKind.P256)
    token = desk.ca.create_token("node-2")
    cert = desk.enroll("node-2", attest(tpm, desk, token, key), key, token)
    current = desk.ca.store.get(cert.serial_number)
    assert current is not None
    registrar = desk.registrar
    new_key = PrivateKey.generate(KeyKind.P256)
    csr = make_csr(new_key, "node-2")
    with pytest.raises(AttestationFailed, match="requires an attestation"):
        registrar.rotate(current, csr)

    ask = desk.ask_rotate(current)
    fresh = TpmAttester(tpm.tcti)(ask, spki_der(new_key.to_cryptography().public_key()))
    rotated = registrar.rotate(current, csr, attestation=Attestation.from_json(fresh))
    assert attested_platform_of(rotated.certificate) is not None
    entry = next(e for e in desk.ca.store.audit() if e.event == "rotate")
    assert entry.detail["attestation"]["device_class"] == "swtpm"  # type: ignore[index]


# --- attacks ------------------------------------------------------------------------------


def test_a_replayed_quote_is_refused(tpm: Swtpm, desk: Desk) -> None:
    key = PrivateKey.generate(KeyKind.P256)
    first = desk.ca.create_token("node-3")
    recorded = attest(tpm, desk, first, key)
    desk.enroll("node-3", recorded, key, first)
    # The same evidence for another token: its nonce was for the first one.
    second = desk.ca.create_token("node-3b")
    with pytest.raises(AttestationFailed, match="not issued by this CA for this request"):
        desk.enroll("node-3b", recorded, key, second)
    # An old nonce: expired.
    third = desk.ca.create_token("node-3c")
    old = attest(tpm, desk, third, key)
    later = desk.registrar.clock.now() + timedelta(minutes=6)
    with pytest.raises(AttestationFailed, match="expired"):
        desk.registrar.enroll(
            third, make_csr(key, "node-3c"), attestation=Attestation.from_json(old), now=later
        )


def test_a_quote_bound_to_another_csr_key_is_refused(tpm: Swtpm, desk: Desk) -> None:
    quoted, other = PrivateKey.generate(KeyKind.P256), PrivateKey.generate(KeyKind.P256)
    token = desk.ca.create_token("node-4")
    evidence = attest(tpm, desk, token, quoted)
    with pytest.raises(AttestationFailed, match="qualifying data"):
        desk.enroll("node-4", evidence, other, token)
    spent = desk.ca.store.token(token_hash(token))
    assert spent is not None and spent.used_at is None  # refused before the token is spent


def test_pcrs_changed_after_an_extend_are_refused(tpm: Swtpm, desk: Desk) -> None:
    with TpmDevice.open(tpm.tcti) as device:
        device.pcr_extend(7, bytes(range(32)))  # e.g. Secure Boot state changed
    key = PrivateKey.generate(KeyKind.P256)
    token = desk.ca.create_token("node-5")
    with pytest.raises(AttestationFailed, match="PCR"):
        desk.enroll("node-5", attest(tpm, desk, token, key), key, token)


def _tamper(attestation: dict[str, str], **changes: Any) -> dict[str, str]:
    evidence = QuoteEvidence.from_bytes(base64.b64decode(attestation["payload"]))
    evidence = dataclasses.replace(evidence, **changes)
    return {**attestation, "payload": base64.b64encode(evidence.to_bytes()).decode()}


def test_a_quote_forged_with_a_non_restricted_key_is_refused(tpm: Swtpm, desk: Desk) -> None:
    key = PrivateKey.generate(KeyKind.P256)
    token = desk.ca.create_token("node-6")
    genuine = attest(tpm, desk, token, key)
    quote = QuoteEvidence.from_bytes(base64.b64decode(genuine["payload"])).quote
    with TpmDevice.open(tpm.tcti) as device:
        # The attacker's own TPMS_ATTEST (here: the genuine bytes, any PCRs could be
        # claimed), signed by an ordinary signing key, which signs whatever it is given.
        public, signature = device.sign_with_unrestricted_key(quote)
    forged = _tamper(genuine, ak_public=public, signature=signature)
    with pytest.raises(AttestationFailed, match="restricted"):
        desk.enroll("node-6", forged, key, token)


def test_the_wrong_ak_is_refused(tpm: Swtpm, desk: Desk, make_swtpm: Callable[[], Swtpm]) -> None:
    other = make_swtpm()
    with TpmDevice.open(other.tcti) as device:
        other_ak = device.ensure_ak(AK_HANDLE)
    key = PrivateKey.generate(KeyKind.P256)
    token = desk.ca.create_token("node-7")
    claimed = _tamper(attest(tpm, desk, token, key), ak_public=other_ak)
    with pytest.raises(AttestationFailed, match="signature"):
        desk.enroll("node-7", claimed, key, token)


def test_an_ak_not_tied_to_the_ek_is_refused(
    tpm: Swtpm, desk: Desk, make_swtpm: Callable[[], Swtpm]
) -> None:
    # The attacker quotes on a TPM of its own (a software TPM, say) but shows the EK
    # certificate of a genuine one: the credential is encrypted to the genuine EK.
    attacker = make_swtpm()
    with TpmDevice.open(tpm.tcti) as genuine:
        genuine_ek = genuine.ek_certificate()
    key = PrivateKey.generate(KeyKind.P256)
    token = desk.ca.create_token("node-8")
    ask = desk.ask_enroll(token)
    with TpmDevice.open(attacker.tcti) as device:
        ak_public = device.ensure_ak(AK_HANDLE)
        answer = ask(
            {
                "ak_public": base64.b64encode(ak_public).decode(),
                "ek_certificate": base64.b64encode(genuine_ek).decode(),
            }
        )
        with pytest.raises(TpmError):
            device.activate_credential(
                AK_HANDLE,
                base64.b64decode(answer["credential_blob"]),
                base64.b64decode(answer["encrypted_secret"]),
            )
        nonce = base64.b64decode(answer["nonce"])
        evidence = device.quote(
            AK_HANDLE, qualifying_data(nonce, spki_der(key.to_cryptography().public_key())), PCRS
        )
    guessed = dataclasses.replace(evidence, ek_certificate=genuine_ek, credential=os.urandom(32))
    attestation = {
        "type": "tpm_quote",
        "payload": base64.b64encode(guessed.to_bytes()).decode(),
        "nonce": answer["nonce"],
    }
    with pytest.raises(AttestationFailed, match="not tied to the EK"):
        desk.enroll("node-8", attestation, key, token)


def test_an_ek_certificate_from_an_unknown_maker_gets_no_challenge(
    desk: Desk, make_swtpm: Callable[[], Swtpm]
) -> None:
    stranger = make_swtpm()  # its own local CA, which the policy does not trust
    with TpmDevice.open(stranger.tcti) as device:
        body = {
            "ak_public": base64.b64encode(device.ensure_ak(AK_HANDLE)).decode(),
            "ek_certificate": base64.b64encode(device.ek_certificate()).decode(),
        }
    token = desk.ca.create_token("node-9")
    with pytest.raises(PkiError, match="EK certificate"):
        desk.ask_enroll(token)(body)


def test_an_attested_enrollment_whose_answer_was_lost_finishes_on_retry(
    tpm: Swtpm, desk: Desk
) -> None:
    key = PrivateKey.generate(KeyKind.P256)
    token = desk.ca.create_token("node-10")
    first = desk.enroll("node-10", attest(tpm, desk, token, key), key, token)
    # The answer never reached the node: it asks again, with the same key and token.
    again = desk.registrar.enroll(
        token,
        make_csr(key, "node-10"),
        attestation=Attestation.from_json(attest(tpm, desk, token, key)),
    )
    assert again.retried and again.certificate.serial_number == first.serial_number
    # Another key with the spent token gets nothing; nor does a revoked enrollment.
    other = PrivateKey.generate(KeyKind.P256)
    with pytest.raises(TokenRejected):
        desk.enroll("node-10", attest(tpm, desk, token, other), other, token)
    desk.ca.revoke(serial=first.serial_number)
    with pytest.raises(TokenRejected, match="already used"):
        desk.ask_enroll(token)({})


def test_an_attested_certificate_renews_only_on_a_quote_by_its_own_tpm(
    tmp_path: Path, make_swtpm: Callable[[], Swtpm]
) -> None:
    tpm, other = make_swtpm(), make_swtpm()
    ca = CertificateAuthority.init(tmp_path / "ca-none", PASS)
    challenges = Challenges.for_directory(ca.directory)
    policy_file = load_policy(write_policy(tmp_path / "p", tpm, other))
    verifier = TpmQuoteVerifier(policy_file, challenges, ca.clock)
    # Attestation optional: yet a certificate issued on a quote renews only on one.
    policy = EnrollmentPolicy(attestation=AttestationPolicy("none", {verifier.type: verifier}))
    desk = Desk(ca, Registrar(ca, policy, MeshSettings(), challenges=challenges))
    key = PrivateKey.generate(KeyKind.P256)
    token = ca.create_token("node-11")
    cert = desk.enroll("node-11", attest(tpm, desk, token, key), key, token)
    current = ca.store.get(cert.serial_number)
    assert current is not None
    registrar = desk.registrar
    new_key = PrivateKey.generate(KeyKind.P256)
    with pytest.raises(AttestationFailed, match="needs a fresh one"):
        registrar.rotate(current, make_csr(new_key, "node-11"))

    ask = desk.ask_rotate(current)
    spki = spki_der(new_key.to_cryptography().public_key())
    elsewhere = TpmAttester(other.tcti)(ask, spki)  # a genuine TPM, but not this one
    with pytest.raises(PolicyDenied, match="another TPM"):
        registrar.rotate(
            current, make_csr(new_key, "node-11"), attestation=Attestation.from_json(elsewhere)
        )
    same = TpmAttester(tpm.tcti)(ask, spki)
    rotated = registrar.rotate(
        current, make_csr(new_key, "node-11"), attestation=Attestation.from_json(same)
    )
    assert attested_platform_of(rotated.certificate) is not None
    ca.close()
