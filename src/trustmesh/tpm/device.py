"""A TPM 2.0 through tpm2-pytss (ESAPI): the EK, an attestation key, quotes, credential
activation, and the persistent keys behind :class:`trustmesh.keystore.tpm.TpmSigner`.

    with TpmDevice.open("swtpm:host=127.0.0.1,port=2321") as tpm:
        ak_public = tpm.ensure_ak()
        evidence = tpm.quote(AK_HANDLE, nonce, [0, 1, 7])

No resource manager is assumed (swtpm has none, and only three transient object slots):
every transient object and session a method loads is flushed before it returns, whatever
happened. One lock per TCTI string serialises command sequences in this process, so two
threads (or a device and a signer on the same TPM) never hold objects at the same time.

Bytes in and out are the TPM's own marshalled structures, the files tpm2-tools reads and
writes (``tpm2_readpublic -o``, ``tpm2_quote -m/-s``, ``tpm2_makecredential -o``), so
anyone can re-check them with the tpm2-tools command line.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import Any

from tpm2_pytss import (  # type: ignore[import-untyped]
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_GENERATED,
    TPM2_SE,
    TPM2_ST,
    TPM2B_ECC_POINT,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_RSA_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_HA,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_HA,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
    TSS2_Exception,
)
from tpm2_pytss.constants import TPM2_PT_NV  # type: ignore[import-untyped]

from trustmesh.errors import ProtocolError
from trustmesh.tpm.evidence import QuoteEvidence

EK_CERT_INDEX = 0x01C00002  # RSA 2048 EK certificate (TCG EK Credential Profile, low range)
AK_HANDLE = 0x81010002
PERSISTENT_FIRST = 0x81000000
PERSISTENT_LAST = 0x81FFFFFF
PCR_COUNT = 24
MAX_QUALIFYING_DATA = 64  # TPM2B_DATA holds a TPMT_HA: at most a SHA-512 digest
QUOTE_ATTEMPTS = 5
MAX_TCTI = 2048

# PolicySecret(TPM_RH_ENDORSEMENT) with an empty policyRef: "PolicyA" of the TCG EK
# Credential Profile (B.3.2). Checked against its definition in the tests.
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")

_SHA256_NAME = b"\x00\x0b"  # TPM_ALG_SHA256, the prefix of every name we compute

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class TpmError(ProtocolError):
    """A TPM that cannot be reached, refused a command, or holds something unexpected."""


def _lock_for(tcti: str) -> threading.Lock:
    # Per TPM, not per object: without a resource manager every connection shares the
    # same three transient slots.
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(tcti, threading.Lock())


class TpmDevice:
    """One ESAPI context on one TPM; every method is one locked command sequence."""

    def __init__(self, esapi: Any, tcti: str) -> None:
        self._esapi: Any = esapi
        self.tcti = tcti
        self._lock = _lock_for(tcti)

    @classmethod
    def open(cls, tcti: str) -> TpmDevice:
        """Connect to the TPM at ``tcti`` (a tpm2-tss TCTI string such as
        ``swtpm:host=127.0.0.1,port=2321`` or ``device:/dev/tpmrm0``)."""
        if not isinstance(tcti, str) or not tcti or len(tcti) > MAX_TCTI:
            raise TpmError(f"a TCTI is a non-empty string of at most {MAX_TCTI} characters")
        if not tcti.isprintable():
            raise TpmError("a TCTI string has no control characters")
        try:
            esapi = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TpmError(f"cannot reach the TPM at {tcti!r}: {exc}") from None
        except (ValueError, TypeError, RuntimeError) as exc:
            raise TpmError(f"cannot use the TCTI {tcti!r}: {exc}") from None
        return cls(esapi, tcti)

    def close(self) -> None:
        with self._lock:
            if self._esapi is not None:
                esapi, self._esapi = self._esapi, None
                esapi.close()

    def __enter__(self) -> TpmDevice:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    # --- the endorsement key ----------------------------------------------------------

    def ek_certificate(self) -> bytes:
        """The RSA 2048 EK certificate (DER) the manufacturer left in NV."""
        with self._command("reading the EK certificate") as (esapi, stack):
            if not _present(esapi, EK_CERT_INDEX):
                raise TpmError(f"no EK certificate at NV index 0x{EK_CERT_INDEX:08x}")
            index = esapi.tr_from_tpmpublic(EK_CERT_INDEX)
            stack.callback(esapi.tr_close, index)
            nv_public, _ = esapi.nv_read_public(index)
            size = int(nv_public.nvPublic.dataSize)
            chunk = _nv_buffer_max(esapi)
            data = b""
            while len(data) < size:
                # The index's own (empty) auth: the owner's may be set on a real machine.
                part = esapi.nv_read(index, min(chunk, size - len(data)), len(data), index)
                data += bytes(part)
        return _der_prefix(data)

    def ek_public(self) -> bytes:
        """The marshalled TPM2B_PUBLIC of the RSA EK made from the standard template."""
        with self._command("creating the EK") as (esapi, stack):
            _, public = _create_ek(esapi, stack)
            return bytes(public.marshal())

    # --- the attestation key ----------------------------------------------------------

    def ensure_ak(self, handle: int = AK_HANDLE) -> bytes:
        """The AK persisted at ``handle``, made under the EK if none is there yet.

        Returns its marshalled TPM2B_PUBLIC. A key at ``handle`` that is not a restricted
        P-256 ECDSA signing key under this TPM's EK is left alone and refused.
        """
        _check_persistent(handle)
        with self._command(f"making the AK at 0x{handle:08x}") as (esapi, stack):
            ek, _ = _create_ek(esapi, stack)
            _, _, ek_qualified = esapi.read_public(ek)
            if _present(esapi, handle):
                ak = _persistent(esapi, stack, handle)
                public, name, qualified = esapi.read_public(ak)
                if not _has_shape(public, _ak_template()):
                    raise TpmError(f"0x{handle:08x} holds a key that is not an AK")
                # A child's qualified name is H(parent's qualified name || its own name):
                # the TPM's proof of which parent this key was made under.
                expected = _SHA256_NAME + hashlib.sha256(bytes(ek_qualified) + bytes(name)).digest()
                if bytes(qualified) != expected:
                    raise TpmError(f"0x{handle:08x} holds an AK that is not under this EK")
                return bytes(public.marshal())
            session = _ek_session(esapi, stack)
            private, public, _, _, _ = esapi.create(ek, None, _ak_template(), session1=session)
            _satisfy_ek_policy(esapi, session)  # a policy session is reset once used
            loaded = esapi.load(ek, private, public, session1=session)
            stack.callback(esapi.flush_context, loaded)
            esapi.tr_close(esapi.evict_control(ESYS_TR.OWNER, loaded, handle))
            return bytes(public.marshal())

    def quote(self, ak_handle: int, qualifying_data: bytes, pcrs: Sequence[int]) -> QuoteEvidence:
        """A quote of the SHA-256 bank's ``pcrs`` by the AK, with their values.

        The values are read before the quote and kept only if they hash to the quote's
        pcrDigest; an extend in between makes it try again, a bounded number of times.
        """
        indexes = _pcr_indexes(pcrs)
        if len(qualifying_data) > MAX_QUALIFYING_DATA:
            raise TpmError(f"qualifying data is at most {MAX_QUALIFYING_DATA} bytes")
        _check_persistent(ak_handle)
        with self._command(f"quoting with 0x{ak_handle:08x}") as (esapi, stack):
            ak = _persistent(esapi, stack, ak_handle)
            public, _, _ = esapi.read_public(ak)
            selection = _sha256_selection(indexes)
            for _ in range(QUOTE_ATTEMPTS):
                values = _read_pcrs(esapi, indexes)
                attest, signature = esapi.quote(ak, selection, qualifying_data, _ecdsa_sha256())
                quoted = bytes(attest)
                digest = hashlib.sha256(b"".join(values[i] for i in indexes)).digest()
                if _quoted_pcr_digest(quoted) == digest:
                    return QuoteEvidence(
                        quote=quoted,
                        signature=bytes(signature.marshal()),
                        ak_public=bytes(public.marshal()),
                        pcrs=values,
                    )
        raise TpmError(f"the PCRs changed during each of {QUOTE_ATTEMPTS} quotes")

    def activate_credential(
        self, ak_handle: int, credential_blob: bytes, encrypted_secret: bytes
    ) -> bytes:
        """The secret a verifier wrapped for this EK and the AK's name (MakeCredential)."""
        blob = _unmarshal_exact(TPM2B_ID_OBJECT, credential_blob, "the credential blob")
        secret = _unmarshal_exact(TPM2B_ENCRYPTED_SECRET, encrypted_secret, "the secret")
        _check_persistent(ak_handle)
        what = "activating the credential (made for this TPM's EK and this AK?)"
        with self._command(what) as (esapi, stack):
            ak = _persistent(esapi, stack, ak_handle)
            ek, _ = _create_ek(esapi, stack)
            session = _ek_session(esapi, stack)
            recovered = esapi.activate_credential(
                ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
            )
            return bytes(recovered)

    def pcr_extend(self, index: int, data: bytes) -> None:
        """Extend SHA-256 PCR ``index`` with ``data``, a 32-byte digest (as tpm2_pcrextend)."""
        _pcr_indexes([index])
        if len(data) != 32:
            raise TpmError("a SHA-256 PCR is extended with a 32-byte digest")
        digests = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=bytes(data)))]
        )
        with self._command(f"extending PCR {index}") as (esapi, _):
            esapi.pcr_extend(ESYS_TR(index), digests)

    def sign_with_unrestricted_key(self, message: bytes) -> tuple[bytes, bytes]:
        """Sign SHA-256(``message``) with a throwaway unrestricted P-256 key.

        What an attacker with the TPM can do to forge a "quote": returns the key's
        marshalled TPM2B_PUBLIC and the marshalled TPMT_SIGNATURE.
        """
        digest = hashlib.sha256(message).digest()
        with self._command("signing with an unrestricted key") as (esapi, stack):
            # The null hierarchy: its seed changes at every reset, so the key is ephemeral.
            key, public, _, _, _ = esapi.create_primary(
                None, _unrestricted_signing_template(), ESYS_TR.NULL
            )
            stack.callback(esapi.flush_context, key)
            signature = esapi.sign(key, digest, _ecdsa_sha256())
            return bytes(public.marshal()), bytes(signature.marshal())

    # --- persistent keys for TpmSigner ------------------------------------------------

    def create_signing_key(self, handle: int) -> bytes:
        """A new P-256 key (sign and ECDH) under the SRK, persisted at ``handle``.

        Returns its uncompressed point. Refuses a handle that is taken.
        """
        _check_persistent(handle)
        with self._command(f"making a key at 0x{handle:08x}") as (esapi, stack):
            if _present(esapi, handle):
                raise TpmError(f"0x{handle:08x} is taken")
            srk, _, _, _, _ = esapi.create_primary(None, _srk_template(), ESYS_TR.OWNER)
            stack.callback(esapi.flush_context, srk)
            private, public, _, _, _ = esapi.create(srk, None, _signing_key_template())
            loaded = esapi.load(srk, private, public)
            stack.callback(esapi.flush_context, loaded)
            esapi.tr_close(esapi.evict_control(ESYS_TR.OWNER, loaded, handle))
            return _signing_point(public, handle)

    def signing_key(self, handle: int) -> bytes:
        """The uncompressed point of the unrestricted P-256 signing key at ``handle``."""
        _check_persistent(handle)
        with self._command(f"reading the key at 0x{handle:08x}") as (esapi, stack):
            key = _persistent(esapi, stack, handle)
            public, _, _ = esapi.read_public(key)
            return _signing_point(public, handle)

    def sign_digest(self, handle: int, digest: bytes) -> tuple[int, int]:
        """ECDSA (r, s) over a SHA-256 ``digest`` by the key at ``handle``."""
        if len(digest) != 32:
            raise TpmError("a SHA-256 digest is 32 bytes")
        _check_persistent(handle)
        with self._command(f"signing with 0x{handle:08x}") as (esapi, stack):
            key = _persistent(esapi, stack, handle)
            signature = esapi.sign(key, digest, _ecdsa_sha256())
            ecdsa = signature.signature.ecdsa
            r = int.from_bytes(bytes(ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(ecdsa.signatureS), "big")
            return r, s

    def ecdh_zgen(self, handle: int, point: bytes) -> bytes:
        """The 32-byte x of the key at ``handle`` times ``point`` (uncompressed P-256)."""
        if len(point) != 65 or point[0] != 4:
            raise TpmError("ECDH takes an uncompressed P-256 point (65 bytes)")
        peer = TPM2B_ECC_POINT(point=TPMS_ECC_POINT(x=point[1:33], y=point[33:]))
        _check_persistent(handle)
        with self._command(f"ECDH with 0x{handle:08x}") as (esapi, stack):
            key = _persistent(esapi, stack, handle)
            shared = esapi.ecdh_zgen(key, peer)
            return bytes(shared.point.x).rjust(32, b"\x00")

    def evict(self, handle: int) -> None:
        """Remove the persistent object at ``handle``."""
        _check_persistent(handle)
        with self._command(f"evicting 0x{handle:08x}") as (esapi, stack):
            # ESAPI keeps its record of an evicted object: _persistent closes it, or a
            # new key at the handle would not match the stale name it remembers.
            key = _persistent(esapi, stack, handle)
            esapi.evict_control(ESYS_TR.OWNER, key, handle)

    def transient_handles(self) -> list[int]:
        """The transient objects loaded now (empty between calls, for every caller)."""
        with self._command("listing transient handles") as (esapi, _):
            return _handles(esapi, 0x80000000, 0x80FFFFFF)

    # --- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _command(self, what: str) -> Iterator[tuple[Any, ExitStack]]:
        """The context, under the lock, with a stack that flushes what gets loaded."""
        with self._lock:
            if self._esapi is None:
                raise TpmError("the TPM device is closed")
            try:
                with ExitStack() as stack:
                    yield self._esapi, stack
            except TSS2_Exception as exc:
                raise TpmError(f"{what}: {exc}") from None


def p256_point(tpm2b_public: bytes) -> bytes:
    """The uncompressed point of a marshalled TPM2B_PUBLIC of an ECC P-256 key."""
    public = _unmarshal_exact(TPM2B_PUBLIC, tpm2b_public, "the public area")
    return _point(public)


def _point(public: Any) -> bytes:
    area = public.publicArea
    if area.type != TPM2_ALG.ECC or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        raise TpmError("the key is not an ECC P-256 key")
    x, y = bytes(area.unique.ecc.x), bytes(area.unique.ecc.y)
    if len(x) > 32 or len(y) > 32:
        raise TpmError("the key's point is not on P-256")
    return b"\x04" + x.rjust(32, b"\x00") + y.rjust(32, b"\x00")


def _signing_point(public: Any, handle: int) -> bytes:
    attributes = int(public.publicArea.objectAttributes)
    if not attributes & TPMA_OBJECT.SIGN_ENCRYPT or attributes & TPMA_OBJECT.RESTRICTED:
        raise TpmError(f"0x{handle:08x} is not an unrestricted signing key")
    return _point(public)


def _check_persistent(handle: int) -> None:
    if not isinstance(handle, int) or not PERSISTENT_FIRST <= handle <= PERSISTENT_LAST:
        raise TpmError(f"{handle!r} is not a persistent handle (0x81000000-0x81ffffff)")


def _pcr_indexes(pcrs: Sequence[int]) -> list[int]:
    indexes = sorted(set(pcrs))
    if not indexes:
        raise TpmError("select at least one PCR")
    for index in indexes:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < PCR_COUNT:
            raise TpmError(f"PCR {index!r} is not 0..{PCR_COUNT - 1}")
    return indexes


def _handles(esapi: Any, first: int, last: int) -> list[int]:
    found: list[int] = []
    while True:
        more, data = esapi.get_capability(TPM2_CAP.HANDLES, first, 64)
        batch = [int(h) for h in data.data.handles]
        found += [h for h in batch if h <= last]
        if not more or not batch or batch[-1] >= last:
            return found
        first = batch[-1] + 1


def _present(esapi: Any, handle: int) -> bool:
    # Asking for the handle list, not ReadPublic: an absent handle is not an error.
    _, data = esapi.get_capability(TPM2_CAP.HANDLES, handle, 1)
    return any(int(h) == handle for h in data.data.handles)


def _persistent(esapi: Any, stack: ExitStack, handle: int) -> Any:
    if not _present(esapi, handle):
        raise TpmError(f"no key is persisted at 0x{handle:08x}")
    key = esapi.tr_from_tpmpublic(handle)
    stack.callback(esapi.tr_close, key)
    return key


def _nv_buffer_max(esapi: Any) -> int:
    _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX, 1)
    for prop in data.data.tpmProperties:
        if int(prop.property) == TPM2_PT_NV.BUFFER_MAX and int(prop.value) > 0:
            return int(prop.value)
    return 512  # the least any TPM 2.0 allows


def _der_prefix(data: bytes) -> bytes:
    """The DER SEQUENCE at the start of ``data``: some TPMs pad the NV index after it."""
    if len(data) < 2 or data[0] != 0x30:
        raise TpmError("the EK certificate in NV is not DER")
    if data[1] < 0x80:
        header, length = 2, data[1]
    else:
        count = data[1] & 0x7F
        if not 1 <= count <= 3 or len(data) < 2 + count:
            raise TpmError("the EK certificate in NV has a bad DER length")
        header, length = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    if header + length > len(data):
        raise TpmError("the EK certificate in NV is truncated")
    return data[: header + length]


def _create_ek(esapi: Any, stack: ExitStack) -> tuple[Any, Any]:
    ek, public, _, _, _ = esapi.create_primary(None, _ek_template(), ESYS_TR.ENDORSEMENT)
    stack.callback(esapi.flush_context, ek)
    return ek, public


def _ek_session(esapi: Any, stack: ExitStack) -> Any:
    """A policy session that satisfies the EK's PolicySecret(endorsement)."""
    session = esapi.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256
    )
    stack.callback(esapi.flush_context, session)
    _satisfy_ek_policy(esapi, session)
    return session


def _satisfy_ek_policy(esapi: Any, session: Any) -> None:
    esapi.policy_restart(session)
    # The endorsement hierarchy's password (empty on a fresh TPM), no ticket.
    esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, expiration=0)


def _sha256_selection(indexes: Sequence[int]) -> Any:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(i) for i in indexes))


def _read_pcrs(esapi: Any, indexes: Sequence[int]) -> dict[int, bytes]:
    """The SHA-256 values of ``indexes``; PCR_Read answers at most 8 at a time."""
    values: dict[int, bytes] = {}
    while len(values) < len(indexes):
        wanted = [i for i in indexes if i not in values]
        _, selected, digests = esapi.pcr_read(_sha256_selection(wanted))
        got: list[int] = []
        for selection in selected.pcrSelections:
            if selection.hash != TPM2_ALG.SHA256:
                continue
            bitmap = bytes(selection.pcrSelect[0 : selection.sizeofSelect])
            got += [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
        if not got or len(got) != len(digests):
            raise TpmError("the TPM has no SHA-256 PCR bank")
        for index, digest in zip(got, digests, strict=True):
            values[index] = bytes(digest)
    return values


def _quoted_pcr_digest(quoted: bytes) -> bytes:
    attest = _unmarshal_exact(TPMS_ATTEST, quoted, "the quote")
    if attest.magic != TPM2_GENERATED.VALUE or attest.type != TPM2_ST.ATTEST_QUOTE:
        raise TpmError("the TPM's quote is not a TPMS_ATTEST of a quote")
    return bytes(attest.attested.quote.pcrDigest)


def _unmarshal_exact(kind: Any, data: bytes, what: str) -> Any:
    try:
        value, used = kind.unmarshal(bytes(data))
    except TSS2_Exception as exc:
        raise TpmError(f"{what} does not parse: {exc}") from None
    if used != len(data):
        raise TpmError(f"{what} has {len(data) - used} bytes left over")
    return value


def _has_shape(public: Any, template: Any) -> bool:
    """Whether ``public`` is ``template`` but for its point: a marshalled ECC TPMT_PUBLIC
    ends with the point, and the template's is two empty buffers."""
    shape = bytes(template.publicArea.marshal())[:-4]
    return bytes(public.publicArea.marshal()).startswith(shape)


def _ecdsa_sha256() -> Any:
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    # Set in place: pytss's TPMS_SIG_SCHEME_ECDSA does not construct (a typedef'd struct).
    scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    return scheme


def _aes128_cfb() -> Any:
    return TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES,
        keyBits=TPMU_SYM_KEY_BITS(aes=128),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
    )


def _ecc_template(
    attributes: int, scheme: Any, symmetric: Any, policy: bytes = b"", unique: int = 0
) -> Any:
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attributes,
            authPolicy=policy,
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=symmetric,
                    scheme=scheme,
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
            unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=b"\x00" * unique, y=b"\x00" * unique)),
        )
    )


def _ek_template() -> Any:
    """Template L-1 of the TCG EK Credential Profile: the key its certificate is for."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.ADMINWITHPOLICY
            | TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.DECRYPT,
            authPolicy=EK_POLICY,
            parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=TPMS_RSA_PARMS(
                    symmetric=_aes128_cfb(),
                    scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                    keyBits=2048,
                    exponent=0,
                )
            ),
            unique=TPMU_PUBLIC_ID(rsa=b"\x00" * 256),
        )
    )


AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)


def _ak_template() -> Any:
    """What tpm2_createak -G ecc -g sha256 -s ecdsa asks for."""
    scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    return _ecc_template(AK_ATTRIBUTES, scheme, TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL))


def _srk_template() -> Any:
    """The ECC P-256 storage root key of the TCG provisioning guidance."""
    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT
    )
    return _ecc_template(attributes, TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL), _aes128_cfb())


def _unrestricted_template(uses: Any) -> Any:
    """A non-restricted ECC key of ours for ``uses`` (no scheme or symmetric cipher
    fixed: each command names its own)."""
    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | uses
    )
    null = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    return _ecc_template(attributes, TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL), null)


def _signing_key_template() -> Any:
    """Sign and decrypt, so one key both signs (any scheme given) and does ECDH_ZGen."""
    return _unrestricted_template(TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.DECRYPT)


def _unrestricted_signing_template() -> Any:
    return _unrestricted_template(TPMA_OBJECT.SIGN_ENCRYPT)
