"""TPM 2.0 structures in the TPM's own encoding (TPM 2.0 Part 2), read strictly.

Only what a CA needs to check a quote and make a credential: TPM2B_PUBLIC and
TPMT_PUBLIC of RSA and ECC keys, TPMS_ATTEST of a quote, TPMT_SIGNATURE (ECDSA,
RSASSA, RSAPSS) and TPML_PCR_SELECTION. Everything is big-endian. Every TPM2B size
is checked against the largest value its type can hold, as a TPM would, so hostile
input fails fast with a typed :class:`~trustmesh.errors.DecodeError` that names the
field and the byte offset; nothing else escapes.

Each ``parse_*`` function takes the whole input and refuses bytes left over after the
structure; each ``marshal_*`` function gives back exactly the bytes it parsed.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.errors import (
    DecodeError,
    InvalidKeyError,
    OversizeError,
    TrailingDataError,
    TruncatedError,
    UnsupportedError,
)

# --- constants (TPM 2.0 Part 2) ------------------------------------------------------

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ST_ATTEST_CERTIFY = 0x8017

TPM_ALG_RSA = 0x0001
TPM_ALG_SHA1 = 0x0004
TPM_ALG_HMAC = 0x0005
TPM_ALG_AES = 0x0006
TPM_ALG_MGF1 = 0x0007
TPM_ALG_KEYEDHASH = 0x0008
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
TPM_ALG_NULL = 0x0010
TPM_ALG_SM4 = 0x0013
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAES = 0x0015
TPM_ALG_RSAPSS = 0x0016
TPM_ALG_OAEP = 0x0017
TPM_ALG_ECDSA = 0x0018
TPM_ALG_ECDH = 0x0019
TPM_ALG_ECDAA = 0x001A
TPM_ALG_SM2 = 0x001B
TPM_ALG_ECSCHNORR = 0x001C
TPM_ALG_ECMQV = 0x001D
TPM_ALG_KDF1_SP800_56A = 0x0020
TPM_ALG_KDF2 = 0x0021
TPM_ALG_KDF1_SP800_108 = 0x0022
TPM_ALG_ECC = 0x0023
TPM_ALG_SYMCIPHER = 0x0025
TPM_ALG_CAMELLIA = 0x0026
TPM_ALG_CFB = 0x0043

TPM_ECC_NIST_P256 = 0x0003
TPM_ECC_NIST_P384 = 0x0004
TPM_ECC_NIST_P521 = 0x0005

# TPMA_OBJECT bits
TPMA_OBJECT_FIXEDTPM = 1 << 1
TPMA_OBJECT_STCLEAR = 1 << 2
TPMA_OBJECT_FIXEDPARENT = 1 << 4
TPMA_OBJECT_SENSITIVEDATAORIGIN = 1 << 5
TPMA_OBJECT_USERWITHAUTH = 1 << 6
TPMA_OBJECT_ADMINWITHPOLICY = 1 << 7
TPMA_OBJECT_NODA = 1 << 10
TPMA_OBJECT_ENCRYPTEDDUPLICATION = 1 << 11
TPMA_OBJECT_RESTRICTED = 1 << 16
TPMA_OBJECT_DECRYPT = 1 << 17
TPMA_OBJECT_SIGN = 1 << 18

HASHES: dict[int, str] = {
    TPM_ALG_SHA1: "sha1",
    TPM_ALG_SHA256: "sha256",
    TPM_ALG_SHA384: "sha384",
    TPM_ALG_SHA512: "sha512",
}
DIGEST_SIZES = {alg: hashlib.new(name).digest_size for alg, name in HASHES.items()}
CURVES: dict[int, ec.EllipticCurve] = {
    TPM_ECC_NIST_P256: ec.SECP256R1(),
    TPM_ECC_NIST_P384: ec.SECP384R1(),
    TPM_ECC_NIST_P521: ec.SECP521R1(),
}

# Largest contents of each TPM2B, as sizeof() of its union in Part 2 (64-byte digests,
# 4096-bit RSA, ECC coordinates up to MAX_ECC_KEY_BYTES).
MAX_DIGEST = 64
MAX_NAME = 2 + MAX_DIGEST  # TPMT_HA
MAX_DATA = 2 + MAX_DIGEST  # TPMT_HA
MAX_RSA = 512
MAX_ECC_PARAMETER = 128
MAX_PUBLIC = 2 + 2 + 4 + (2 + MAX_DIGEST) + 32 + (2 + MAX_RSA) + 2 * (2 + MAX_ECC_PARAMETER)
MAX_PCR_BANKS = 16  # HASH_COUNT in any real TPM is far below this
MAX_SIZEOF_SELECT = 4  # 32 PCRs; a PC-client TPM has 24

_SYM_CIPHERS = frozenset({TPM_ALG_AES, TPM_ALG_SM4, TPM_ALG_CAMELLIA})
_KDFS = frozenset({TPM_ALG_MGF1, TPM_ALG_KDF1_SP800_56A, TPM_ALG_KDF2, TPM_ALG_KDF1_SP800_108})


class TpmFormatError(DecodeError):
    """A field holds a value its TPM type does not allow (a zero-sized public area, a
    magic that is not TPM_GENERATED_VALUE, a TPMI_YES_NO that is neither 0 nor 1)."""


# --- the reader ----------------------------------------------------------------------


class Reader:
    """Big-endian reads from one buffer; every failure is a typed error with an offset."""

    def __init__(self, data: bytes, what: str, *, base: int = 0) -> None:
        self.data = bytes(data)
        self.what = what
        self.offset = 0
        self.base = base  # where ``data`` starts in the outermost input, for messages

    def take(self, size: int, field: str) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise TruncatedError(
                f"{self.what}: {field} needs {size} bytes, {len(self.data) - self.offset} left",
                offset=self.base + self.offset,
            )
        out = self.data[self.offset : end]
        self.offset = end
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str, limit: int) -> bytes:
        at = self.base + self.offset
        size = self.u16(f"{field}.size")
        if size > limit:
            raise OversizeError(f"{self.what}: {field} is {size} bytes, at most {limit}", offset=at)
        return self.take(size, field)

    def sub(self, size: int, what: str) -> Reader:
        """A reader over the next ``size`` bytes (a sized structure inside this one)."""
        base = self.base + self.offset
        return Reader(self.take(size, what), what, base=base)

    def fail(self, kind: type[DecodeError], message: str, at: int) -> DecodeError:
        return kind(f"{self.what}: {message}", offset=self.base + at)

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise TrailingDataError(
                f"{self.what}: {len(self.data) - self.offset} bytes after the structure",
                offset=self.base + self.offset,
            )


def _u16(value: int) -> bytes:
    return struct.pack(">H", value)


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def tpm2b(data: bytes) -> bytes:
    """A TPM2B: a 2-byte big-endian size, then the bytes."""
    return _u16(len(data)) + data


# --- algorithm parameters ------------------------------------------------------------


@dataclass(frozen=True)
class SymDef:
    """TPMT_SYM_DEF_OBJECT; ``key_bits`` and ``mode`` are 0 when ``algorithm`` is NULL."""

    algorithm: int = TPM_ALG_NULL
    key_bits: int = 0
    mode: int = 0


@dataclass(frozen=True)
class Scheme:
    """A TPMT_*_SCHEME or TPMT_KDF_SCHEME: the scheme, its hash (0 when it has none) and
    the ECDAA count."""

    scheme: int = TPM_ALG_NULL
    hash_alg: int = 0
    count: int = 0


def _read_sym(r: Reader, field: str) -> SymDef:
    at = r.offset
    algorithm = r.u16(f"{field}.algorithm")
    if algorithm == TPM_ALG_NULL:
        return SymDef()
    if algorithm not in _SYM_CIPHERS:
        raise r.fail(UnsupportedError, f"{field}: cipher 0x{algorithm:04x} not supported", at)
    return SymDef(algorithm, r.u16(f"{field}.keyBits"), r.u16(f"{field}.mode"))


def _marshal_sym(sym: SymDef) -> bytes:
    if sym.algorithm == TPM_ALG_NULL:
        return _u16(TPM_ALG_NULL)
    return _u16(sym.algorithm) + _u16(sym.key_bits) + _u16(sym.mode)


def _read_scheme(r: Reader, field: str, allowed: frozenset[int]) -> Scheme:
    at = r.offset
    scheme = r.u16(f"{field}.scheme")
    if scheme in (TPM_ALG_NULL, TPM_ALG_RSAES) and scheme in allowed:
        return Scheme(scheme)  # no details (TPMS_ENC_SCHEME_RSAES is empty)
    if scheme not in allowed:
        raise r.fail(UnsupportedError, f"{field}: scheme 0x{scheme:04x} not supported", at)
    hash_alg = r.u16(f"{field}.hashAlg")
    count = r.u16(f"{field}.count") if scheme == TPM_ALG_ECDAA else 0
    return Scheme(scheme, hash_alg, count)


def _marshal_scheme(scheme: Scheme) -> bytes:
    if scheme.scheme in (TPM_ALG_NULL, TPM_ALG_RSAES):
        return _u16(scheme.scheme)
    out = _u16(scheme.scheme) + _u16(scheme.hash_alg)
    if scheme.scheme == TPM_ALG_ECDAA:
        out += _u16(scheme.count)
    return out


_RSA_SCHEMES = frozenset(
    {TPM_ALG_NULL, TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_RSAES, TPM_ALG_OAEP}
)
_ECC_SCHEMES = frozenset(
    {
        TPM_ALG_NULL,
        TPM_ALG_ECDSA,
        TPM_ALG_ECDAA,
        TPM_ALG_SM2,
        TPM_ALG_ECSCHNORR,
        TPM_ALG_ECDH,
        TPM_ALG_ECMQV,
    }
)
_KDF_SCHEMES = _KDFS | {TPM_ALG_NULL}


# --- TPMT_PUBLIC ---------------------------------------------------------------------


@dataclass(frozen=True)
class RsaParms:
    """TPMS_RSA_PARMS; an ``exponent`` of 0 means the default, 65537."""

    symmetric: SymDef
    scheme: Scheme
    key_bits: int
    exponent: int


@dataclass(frozen=True)
class EccParms:
    """TPMS_ECC_PARMS."""

    symmetric: SymDef
    scheme: Scheme
    curve: int
    kdf: Scheme


@dataclass(frozen=True)
class EccPoint:
    """TPMS_ECC_POINT: the coordinates as the TPM sent them (big-endian, any length)."""

    x: bytes
    y: bytes


@dataclass(frozen=True)
class TpmtPublic:
    """A parsed TPMT_PUBLIC; ``raw`` is its exact encoding, which its name hashes."""

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: RsaParms | EccParms
    unique: bytes | EccPoint  # the RSA modulus, or the ECC point
    raw: bytes

    def has(self, attributes: int) -> bool:
        """Whether every bit of ``attributes`` is set."""
        return self.object_attributes & attributes == attributes

    @property
    def name(self) -> bytes:
        """nameAlg || H_nameAlg(TPMT_PUBLIC) (Part 1, 16: Names)."""
        hash_name = HASHES.get(self.name_alg)
        if hash_name is None:
            raise UnsupportedError(f"nameAlg 0x{self.name_alg:04x} is not supported")
        return _u16(self.name_alg) + hashlib.new(hash_name, self.raw).digest()


def _read_tpmt_public(r: Reader) -> TpmtPublic:
    start = r.offset
    at = r.offset
    kind = r.u16("type")
    if kind not in (TPM_ALG_RSA, TPM_ALG_ECC):
        raise r.fail(UnsupportedError, f"key type 0x{kind:04x} is not RSA or ECC", at)
    at = r.offset
    name_alg = r.u16("nameAlg")
    if name_alg not in HASHES:
        raise r.fail(UnsupportedError, f"nameAlg 0x{name_alg:04x} is not supported", at)
    attributes = r.u32("objectAttributes")
    auth_policy = r.tpm2b("authPolicy", MAX_DIGEST)
    parameters: RsaParms | EccParms
    unique: bytes | EccPoint
    if kind == TPM_ALG_RSA:
        symmetric = _read_sym(r, "parameters.symmetric")
        scheme = _read_scheme(r, "parameters.scheme", _RSA_SCHEMES)
        parameters = RsaParms(symmetric, scheme, r.u16("keyBits"), r.u32("exponent"))
        unique = r.tpm2b("unique.rsa", MAX_RSA)
    else:
        symmetric = _read_sym(r, "parameters.symmetric")
        scheme = _read_scheme(r, "parameters.scheme", _ECC_SCHEMES)
        curve = r.u16("curveID")
        kdf = _read_scheme(r, "parameters.kdf", _KDF_SCHEMES)
        parameters = EccParms(symmetric, scheme, curve, kdf)
        unique = EccPoint(
            r.tpm2b("unique.ecc.x", MAX_ECC_PARAMETER), r.tpm2b("unique.ecc.y", MAX_ECC_PARAMETER)
        )
    return TpmtPublic(
        kind, name_alg, attributes, auth_policy, parameters, unique, r.data[start : r.offset]
    )


def parse_tpmt_public(data: bytes) -> TpmtPublic:
    """A TPMT_PUBLIC that fills ``data`` exactly."""
    r = Reader(data, "TPMT_PUBLIC")
    public = _read_tpmt_public(r)
    r.finish()
    return public


def parse_public(data: bytes) -> TpmtPublic:
    """A TPM2B_PUBLIC (what ``tpm2_createak -u`` writes) that fills ``data`` exactly."""
    outer = Reader(data, "TPM2B_PUBLIC")
    size = outer.u16("size")
    if size == 0:
        raise outer.fail(TpmFormatError, "the public area is empty", 0)
    if size > MAX_PUBLIC:
        raise outer.fail(OversizeError, f"size {size} is over {MAX_PUBLIC}", 0)
    inner = outer.sub(size, "TPM2B_PUBLIC.publicArea")
    outer.finish()
    public = _read_tpmt_public(inner)
    inner.finish()
    return public


def marshal_tpmt_public(public: TpmtPublic) -> bytes:
    out = _u16(public.type) + _u16(public.name_alg) + _u32(public.object_attributes)
    out += tpm2b(public.auth_policy)
    params = public.parameters
    out += _marshal_sym(params.symmetric) + _marshal_scheme(params.scheme)
    if isinstance(params, RsaParms):
        out += _u16(params.key_bits) + _u32(params.exponent)
    else:
        out += _u16(params.curve) + _marshal_scheme(params.kdf)
    if isinstance(public.unique, EccPoint):
        out += marshal_ecc_point(public.unique)
    else:
        out += tpm2b(public.unique)
    return out


def marshal_public(public: TpmtPublic) -> bytes:
    """TPM2B_PUBLIC."""
    return tpm2b(marshal_tpmt_public(public))


def marshal_ecc_point(point: EccPoint) -> bytes:
    return tpm2b(point.x) + tpm2b(point.y)


def name_of(tpmt_public: bytes) -> bytes:
    """The name of an object: nameAlg (2 bytes) || H_nameAlg(TPMT_PUBLIC).

    ``tpmt_public`` is the marshalled TPMT_PUBLIC (without the TPM2B size); it is
    parsed first, so only a well-formed public area gets a name.
    """
    return parse_tpmt_public(tpmt_public).name


def public_key_of(
    public: TpmtPublic | bytes,
) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The key of a TPM public area (a :class:`TpmtPublic` or TPM2B_PUBLIC bytes).

    Raises :class:`DecodeError` for bytes that do not parse, :class:`UnsupportedError`
    for a curve we do not know, and :class:`InvalidKeyError` for a point off the curve
    or an RSA key that is not one.
    """
    if isinstance(public, bytes):
        public = parse_public(public)
    params = public.parameters
    if isinstance(params, EccParms):
        assert isinstance(public.unique, EccPoint)
        curve = CURVES.get(params.curve)
        if curve is None:
            raise UnsupportedError(f"ECC curve 0x{params.curve:04x} is not supported")
        size = (curve.key_size + 7) // 8
        if len(public.unique.x) > size or len(public.unique.y) > size:
            raise InvalidKeyError(f"ECC point coordinates are longer than {size} bytes")
        x = int.from_bytes(public.unique.x, "big")
        y = int.from_bytes(public.unique.y, "big")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError:
            raise InvalidKeyError("the ECC point is not on its curve") from None
    assert isinstance(public.unique, bytes)
    modulus = int.from_bytes(public.unique, "big")
    exponent = params.exponent or 65537
    if params.key_bits != modulus.bit_length() or params.key_bits < 1024:
        raise InvalidKeyError(
            f"RSA modulus is {modulus.bit_length()} bits, keyBits says {params.key_bits}"
        )
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:
        raise InvalidKeyError("the RSA public key is not valid") from None


# --- PCR selections ------------------------------------------------------------------


@dataclass(frozen=True)
class PcrSelection:
    """TPMS_PCR_SELECTION: one bank and its bitmap (bit n of byte n//8 selects PCR n)."""

    hash_alg: int
    select: bytes

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(
            8 * i + bit
            for i, octet in enumerate(self.select)
            for bit in range(8)
            if octet >> bit & 1
        )

    @classmethod
    def of(cls, hash_alg: int, indices: tuple[int, ...] | list[int], size: int = 3) -> PcrSelection:
        bitmap = bytearray(size)
        for index in indices:
            bitmap[index // 8] |= 1 << (index % 8)
        return cls(hash_alg, bytes(bitmap))


def _read_pcr_selection(r: Reader) -> tuple[PcrSelection, ...]:
    at = r.offset
    count = r.u32("TPML_PCR_SELECTION.count")
    if count > MAX_PCR_BANKS:
        raise r.fail(OversizeError, f"{count} PCR banks, at most {MAX_PCR_BANKS}", at)
    out = []
    for i in range(count):
        hash_alg = r.u16(f"pcrSelections[{i}].hash")
        at = r.offset
        size = r.u8(f"pcrSelections[{i}].sizeofSelect")
        if size > MAX_SIZEOF_SELECT:
            raise r.fail(OversizeError, f"sizeofSelect {size} is over {MAX_SIZEOF_SELECT}", at)
        out.append(PcrSelection(hash_alg, r.take(size, f"pcrSelections[{i}].pcrSelect")))
    return tuple(out)


def parse_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    """A TPML_PCR_SELECTION that fills ``data`` exactly."""
    r = Reader(data, "TPML_PCR_SELECTION")
    out = _read_pcr_selection(r)
    r.finish()
    return out


def marshal_pcr_selection(selections: tuple[PcrSelection, ...]) -> bytes:
    out = _u32(len(selections))
    for sel in selections:
        out += _u16(sel.hash_alg) + bytes([len(sel.select)]) + sel.select
    return out


# --- TPMS_ATTEST ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class QuoteInfo:
    """TPMS_QUOTE_INFO."""

    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST of a quote (the only kind this module reads)."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    quote: QuoteInfo


def parse_attest(data: bytes) -> Attest:
    """A TPMS_ATTEST of a quote that fills ``data`` exactly (what ``tpm2_quote -m``
    writes). Another magic is refused; another attestation type is unsupported."""
    r = Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    if magic != TPM_GENERATED_VALUE:
        raise r.fail(TpmFormatError, f"magic 0x{magic:08x} is not TPM_GENERATED_VALUE", 0)
    kind = r.u16("type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise r.fail(UnsupportedError, f"type 0x{kind:04x} is not TPM_ST_ATTEST_QUOTE", 4)
    signer = r.tpm2b("qualifiedSigner", MAX_NAME)
    extra = r.tpm2b("extraData", MAX_DATA)
    clock, resets, restarts = r.u64("clock"), r.u32("resetCount"), r.u32("restartCount")
    at = r.offset
    safe = r.u8("safe")
    if safe > 1:
        raise r.fail(TpmFormatError, f"clockInfo.safe is {safe}, not 0 or 1", at)
    firmware = r.u64("firmwareVersion")
    selection = _read_pcr_selection(r)
    digest = r.tpm2b("pcrDigest", MAX_DIGEST)
    r.finish()
    return Attest(
        magic,
        kind,
        signer,
        extra,
        ClockInfo(clock, resets, restarts, bool(safe)),
        firmware,
        QuoteInfo(selection, digest),
    )


def marshal_attest(attest: Attest) -> bytes:
    info = attest.clock_info
    return (
        _u32(attest.magic)
        + _u16(attest.type)
        + tpm2b(attest.qualified_signer)
        + tpm2b(attest.extra_data)
        + struct.pack(">QIIB", info.clock, info.reset_count, info.restart_count, info.safe)
        + struct.pack(">Q", attest.firmware_version)
        + marshal_pcr_selection(attest.quote.pcr_select)
        + tpm2b(attest.quote.pcr_digest)
    )


# --- TPMT_SIGNATURE ------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """TPMT_SIGNATURE: ECDSA carries ``r`` and ``s``; RSASSA and RSAPSS ``rsa``."""

    sig_alg: int
    hash_alg: int
    r: bytes = b""
    s: bytes = b""
    rsa: bytes = b""


def parse_signature(data: bytes) -> Signature:
    """A TPMT_SIGNATURE (what ``tpm2_quote -s`` writes) that fills ``data`` exactly."""
    r = Reader(data, "TPMT_SIGNATURE")
    alg = r.u16("sigAlg")
    if alg == TPM_ALG_ECDSA:
        hash_alg = r.u16("hash")
        sig = Signature(
            alg,
            hash_alg,
            r=r.tpm2b("signatureR", MAX_ECC_PARAMETER),
            s=r.tpm2b("signatureS", MAX_ECC_PARAMETER),
        )
    elif alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        hash_alg = r.u16("hash")
        sig = Signature(alg, hash_alg, rsa=r.tpm2b("sig", MAX_RSA))
    else:
        raise r.fail(UnsupportedError, f"signature algorithm 0x{alg:04x} is not supported", 0)
    r.finish()
    return sig


def marshal_signature(sig: Signature) -> bytes:
    head = _u16(sig.sig_alg) + _u16(sig.hash_alg)
    if sig.sig_alg == TPM_ALG_ECDSA:
        return head + tpm2b(sig.r) + tpm2b(sig.s)
    return head + tpm2b(sig.rsa)
