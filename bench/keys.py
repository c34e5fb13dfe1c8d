"""Keys and attestation: signatures per second on each key device, quote verifications per
second, each against software doing the same work in the same run.

- pkcs11_sign_per_s: P-256 ``Pkcs11Signer.sign`` on a SoftHSM2 token (the data hashed
  here, CKM_ECDSA on the token, r||s made DER and low-S); anchor: the software P-256 key
  (``PrivateKey.sign``, ``cryptography``) signing the same messages.
- pkcs11_secp256k1_sign_per_s: the same on secp256k1; anchor: the software secp256k1
  key (coincurve).
- tpm_sign_per_s: ``TpmSigner.sign`` with a P-256 key persisted in an swtpm (each call
  one locked command sequence over the TPM's TCP socket); anchor: software P-256.
- quote_verify_per_s: ``verify_quote`` on real swtpm quotes (PCRs 0-7, SHA-256 bank),
  distinct qualifying data each, taken round robin, against a ``PcrPolicy`` built from
  the quoted values; anchor: ``cryptography``'s ECDSA P-256 verify of the same quotes'
  signatures over their TPMS_ATTEST bytes (key and DER signature decoded beforehand),
  so the ratio is what the verifier costs beyond the one signature check.
- tpm_quote_per_s: ``TpmDevice.quote`` of PCRs 0-7 (PCR read, quote, digest checked),
  for information; anchor: ``TpmSigner.sign`` on the same swtpm.

The bench makes its own token (``softhsm2-util`` with a SOFTHSM2_CONF in a temporary
directory, set before python-pkcs11 loads SoftHSM2, which reads it once a process) and
its own swtpm (manufactured in a temporary directory, stopped by its PID), and removes
both. Rounds alternate, anchor first; the ratio is the median of per-round ratios.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from bench.harness import Result, compare
from trustmesh.crypto.keys import KeyKind, PrivateKey, PublicKey
from trustmesh.keystore.pkcs11 import Pkcs11Error, Pkcs11Signer, Pkcs11Uri
from trustmesh.keystore.tpm import TpmSigner
from trustmesh.tpm import structs, swtpm
from trustmesh.tpm.device import AK_HANDLE, TpmDevice
from trustmesh.tpm.evidence import QuoteEvidence
from trustmesh.tpm.policy import DeviceClass, PcrPolicy
from trustmesh.tpm.verify import qualifying_data, verify_quote

ROUNDS = 5
ROUND_TIME = 0.2  # seconds per round and side: each TPM figure spends about 1 s on the TPM
QUOTES = 20
QUICK_ROUNDS = 1
QUICK_ROUND_TIME = 0.02
QUICK_QUOTES = 4
MESSAGES = 64
MESSAGE_SIZE = 256
PCRS = tuple(range(8))
SIGNING_HANDLE = 0x81000010
TOKEN = "trustmesh-bench"
PIN = "4321"
SO_PIN = "8765"
DEVICE_CLASS = "bench"
SETUP_TIMEOUT = 30


class BenchFailure(RuntimeError):
    """The bench cannot run (a tool missing) or a device gave a wrong answer."""


class _Signs(Protocol):
    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


def require_tools() -> str:
    """``softhsm2-util``'s path, once SoftHSM2's module and swtpm are known to be there."""
    tool = shutil.which("softhsm2-util")
    if tool is None:
        raise BenchFailure(
            "softhsm2 is not installed (softhsm2-util); scripts/dev test installs it"
        )
    try:
        Pkcs11Uri(TOKEN, "probe").module()
    except Pkcs11Error:
        raise BenchFailure(
            "SoftHSM2's PKCS#11 module (libsofthsm2.so) is not installed; "
            "scripts/dev test installs it"
        ) from None
    if not swtpm.available():
        raise BenchFailure(
            "swtpm is not installed (swtpm, swtpm_setup); scripts/dev test installs it"
        )
    return tool


@contextmanager
def softhsm_token(tool: str, directory: Path) -> Iterator[str]:
    """A new SoftHSM2 token in ``directory``, as a URI base ``pkcs11:token=...?pin-source=...``
    (insert ``;object=LABEL`` before the ``?``). SOFTHSM2_CONF is set for as long as the
    block runs; SoftHSM2 reads it when python-pkcs11 first loads it in this process, so a
    process that loaded it already with another configuration does not see this token."""
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n")
    init = [tool, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN]
    result = subprocess.run(
        init,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        timeout=SETUP_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()[-300:]
        raise BenchFailure(f"softhsm2-util could not make the token: {detail}")
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield f"pkcs11:token={TOKEN}?pin-source=file:{pin_file}"
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


def token_key(base: str, label: str, kind: KeyKind) -> Pkcs11Signer:
    path, _, query = base.partition("?")
    try:
        return Pkcs11Signer.generate(f"{path};object={label}?{query}", kind)
    except Pkcs11Error as exc:
        raise BenchFailure(
            f"{exc} (SoftHSM2 reads its configuration once a process: run the bench in a "
            "process that has not loaded it)"
        ) from None


def messages(count: int = MESSAGES) -> list[bytes]:
    return [os.urandom(MESSAGE_SIZE) for _ in range(count)]


def signing(signer: _Signs, data: list[bytes]) -> Callable[[], None]:
    """One signature per call, over ``data`` round robin; each signer's first signatures
    are checked with its public key, so a device that signs wrongly fails the bench."""
    for message in data[:4]:
        try:
            signer.public_key().verify(signer.sign(message), message)
        except Exception as exc:
            raise BenchFailure(f"{type(signer).__name__}'s signature does not verify") from exc
    cycle = itertools.cycle(data)

    def sign() -> None:
        signer.sign(next(cycle))

    return sign


def _sign_result(
    metric: str,
    device: _Signs,
    software: PrivateKey,
    anchor: str,
    rounds: int,
    round_time: float,
) -> Result:
    data = messages()
    comparison = compare(
        signing(device, data),
        signing(software, data),
        work=1,
        rounds=rounds,
        min_time=round_time,
    )
    return Result.of(metric, comparison, "sig/s", anchor)


@dataclass(frozen=True)
class Quotes:
    """Quotes by one AK with their expected qualifying data, the policy they satisfy, and
    what the anchor checks: (AK, DER signature, TPMS_ATTEST) of each."""

    evidence: tuple[QuoteEvidence, ...]
    expected: tuple[bytes, ...]
    policy: PcrPolicy
    raw: tuple[tuple[ec.EllipticCurvePublicKey, bytes, bytes], ...]


def make_quotes(device: TpmDevice, count: int) -> Quotes:
    """``count`` quotes of PCRs 0-7, each over the qualifying data of a fresh nonce and a
    CSR key (as the CA asks at enrollment)."""
    device.ensure_ak(AK_HANDLE)
    csr_key = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    expected = tuple(qualifying_data(os.urandom(32), csr_key) for _ in range(count))
    evidence = tuple(device.quote(AK_HANDLE, q, PCRS) for q in expected)
    if len({e.quote for e in evidence}) != count:
        raise BenchFailure("two quotes are the same bytes")
    values = evidence[0].pcrs
    if any(e.pcrs != values for e in evidence):
        raise BenchFailure("the PCRs changed between the quotes")
    policy = PcrPolicy(
        PCRS, (DeviceClass(DEVICE_CLASS, {i: frozenset({values[i]}) for i in PCRS}),)
    )
    raw = []
    for e in evidence:
        key = structs.public_key_of(e.ak_public)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise BenchFailure("the AK is not an EC key")
        sig = structs.parse_signature(e.signature)
        der = encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
        raw.append((key, der, e.quote))
    return Quotes(evidence, expected, policy, tuple(raw))


def verifying(quotes: Quotes) -> Callable[[], None]:
    """``verify_quote`` of each quote in turn (all checked once first)."""
    pairs = list(zip(quotes.evidence, quotes.expected, strict=True))
    for evidence, expected in pairs:
        if verify_quote(evidence, expected, quotes.policy).device_class != DEVICE_CLASS:
            raise BenchFailure("a quote was not classed by the policy")
    cycle = itertools.cycle(pairs)

    def verify() -> None:
        evidence, expected = next(cycle)
        verify_quote(evidence, expected, quotes.policy)

    return verify


def raw_verifying(quotes: Quotes) -> Callable[[], None]:
    """The anchor: the one ECDSA P-256 verify of each quote, nothing else."""
    cycle = itertools.cycle(quotes.raw)
    algorithm = ec.ECDSA(hashes.SHA256())

    def verify() -> None:
        key, der, attest = next(cycle)
        key.verify(der, attest, algorithm)

    for _ in quotes.raw:
        verify()  # raises InvalidSignature if any does not verify
    return verify


def quoting(device: TpmDevice) -> Callable[[], None]:
    """One quote of PCRs 0-7 per call, each over new qualifying data."""
    counter = itertools.count()

    def quote() -> None:
        device.quote(AK_HANDLE, next(counter).to_bytes(32, "big"), PCRS)

    return quote


def _token_figures(tool: str, work: Path, rounds: int, round_time: float) -> list[Result]:
    with softhsm_token(tool, work) as base, ExitStack() as stack:
        results = []
        for metric, kind, label in (
            ("pkcs11_sign_per_s", KeyKind.P256, "P-256"),
            ("pkcs11_secp256k1_sign_per_s", KeyKind.SECP256K1, "secp256k1"),
        ):
            device = token_key(base, f"bench-{kind}", kind)
            stack.callback(device.close)
            software = PrivateKey.generate(kind)
            library = "cryptography" if kind == KeyKind.P256 else "coincurve"
            anchor = f"software {label} PrivateKey.sign ({library}), same messages"
            results.append(_sign_result(metric, device, software, anchor, rounds, round_time))
        return results


def _tpm_figures(work: Path, rounds: int, round_time: float, quotes: int) -> list[Result]:
    with swtpm.Swtpm.start(work) as tpm, TpmDevice.open(tpm.tcti) as device:
        # The signer shares the device's connection (swtpm serves one client at a time).
        signer = TpmSigner(
            device,
            SIGNING_HANDLE,
            PublicKey.from_bytes(KeyKind.P256, device.create_signing_key(SIGNING_HANDLE)),
        )
        software = PrivateKey.generate(KeyKind.P256)
        sign = _sign_result(
            "tpm_sign_per_s",
            signer,
            software,
            "software P-256 PrivateKey.sign (cryptography), same messages",
            rounds,
            round_time,
        )
        made = make_quotes(device, quotes)
        comparison = compare(
            verifying(made), raw_verifying(made), work=1, rounds=rounds, min_time=round_time
        )
        verify = Result.of(
            "quote_verify_per_s",
            comparison,
            "verify/s",
            f"cryptography ECDSA P-256 verify of the same {quotes} quotes over their TPMS_ATTEST",
        )
        comparison = compare(
            quoting(device),
            signing(signer, messages()),
            work=1,
            rounds=rounds,
            min_time=round_time,
        )
        quote = Result.of(
            "tpm_quote_per_s", comparison, "quote/s", "TpmSigner.sign on the same swtpm (sig/s)"
        )
    return [sign, verify, quote]


def run(*, quick: bool = False) -> list[Result]:
    tool = require_tools()
    rounds = QUICK_ROUNDS if quick else ROUNDS
    round_time = QUICK_ROUND_TIME if quick else ROUND_TIME
    quotes = QUICK_QUOTES if quick else QUOTES
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as tmp:
        work = Path(tmp)
        (work / "softhsm").mkdir()
        results = _token_figures(tool, work / "softhsm", rounds, round_time)
        results += _tpm_figures(work / "swtpm", rounds, round_time, quotes)
    return results
