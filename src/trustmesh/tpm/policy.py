"""The attestation policy a CA applies to TPM quotes, and the TOML file it lives in.

    # which PCRs every quote covers (SHA-256 bank)
    pcrs = [0, 1, 2, 3, 4, 5, 6, 7]
    # require an EK certificate from these CAs and credential activation (the default;
    # false needs unverified_aks = true: without it any software key passes as an AK)
    require_ek = true
    ek_ca_files = ["swtpm-localca.pem"]   # relative to this file; PEM, one or more certs

    [[device_class]]
    name = "swtpm"
    [device_class.pcrs]
    0 = "00…00"              # one allowed SHA-256 value (64 hex digits)
    7 = ["aa…aa", "bb…bb"]   # or a list of allowed values

A quote must cover exactly ``pcrs``; its values must then satisfy one device class
(every PCR the class names holds one of its allowed values; PCRs it does not name are
free). A policy has at least one class: a class with no PCRs admits any values, so
"no constraint" is written down rather than implied. Every mistake in the file is a
:class:`PolicyFileError` that names the file and the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509

from trustmesh.errors import ProtocolError

PCR_COUNT = 24
MAX_POLICY_FILE = 1024 * 1024

_TOP_KEYS = frozenset({"pcrs", "require_ek", "unverified_aks", "ek_ca_files", "device_class"})
_CLASS_KEYS = frozenset({"name", "pcrs"})
_HEX = frozenset("0123456789abcdefABCDEF")

_Fail = Callable[[str], "PolicyFileError"]


class PolicyFileError(ProtocolError):
    """The attestation policy file is missing, unreadable or malformed."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class DeviceClass(NamedTuple):
    """A kind of device the policy admits: PCR index -> the values allowed there."""

    name: str
    pcrs: Mapping[int, frozenset[bytes]]

    def admits(self, values: Mapping[int, bytes]) -> bool:
        return all(values.get(index) in allowed for index, allowed in self.pcrs.items())


@dataclass(frozen=True)
class PcrPolicy:
    """What :func:`trustmesh.tpm.verify.verify_quote` checks: the PCRs a quote covers
    (sorted) and the device classes whose values are allowed."""

    pcrs: tuple[int, ...]
    device_classes: tuple[DeviceClass, ...]

    def classify(self, values: Mapping[int, bytes]) -> str | None:
        """The first device class (in file order) that admits ``values``, or None."""
        for device_class in self.device_classes:
            if device_class.admits(values):
                return device_class.name
        return None


@dataclass(frozen=True)
class AttestationPolicyFile(PcrPolicy):
    """A loaded policy file; it is itself the :class:`PcrPolicy` quotes are checked
    against, plus what enrollment checks around the quote (EK certificate, credential)."""

    require_ek: bool
    ek_cas: tuple[x509.Certificate, ...]
    path: Path


def load_policy(path: Path | str) -> AttestationPolicyFile:
    """Read and check a policy file; :class:`PolicyFileError` on any problem."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_POLICY_FILE + 1)
    except OSError as exc:
        raise PolicyFileError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_POLICY_FILE:
        raise PolicyFileError(path, f"larger than {MAX_POLICY_FILE} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyFileError(path, "not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(path, f"not valid TOML: {exc}") from None
    return _policy_from(doc, path)


def _policy_from(doc: dict[str, object], path: Path) -> AttestationPolicyFile:
    def fail(problem: str) -> PolicyFileError:
        return PolicyFileError(path, problem)

    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")

    pcrs_value = doc.get("pcrs")
    if not isinstance(pcrs_value, list) or not pcrs_value:
        raise fail("'pcrs' must be a non-empty list of PCR indices (0..23)")
    pcrs: list[int] = []
    for item in pcrs_value:
        if type(item) is not int or not 0 <= item < PCR_COUNT:
            raise fail(f"'pcrs': {item!r} is not a PCR index 0..23")
        if item in pcrs:
            raise fail(f"'pcrs': PCR {item} is listed twice")
        pcrs.append(item)

    require_ek = doc.get("require_ek", True)
    unverified = doc.get("unverified_aks", False)
    if not isinstance(require_ek, bool):
        raise fail("'require_ek' must be true or false")
    if not isinstance(unverified, bool):
        raise fail("'unverified_aks' must be true or false")
    ca_files = doc.get("ek_ca_files", [])
    if not isinstance(ca_files, list) or not all(isinstance(f, str) and f for f in ca_files):
        raise fail("'ek_ca_files' must be a list of file names")
    ek_cas: list[x509.Certificate] = []
    for name in ca_files:
        ek_cas.extend(_load_cas(path, name))

    classes_value = doc.get("device_class")
    if not isinstance(classes_value, list) or not classes_value:
        raise fail("at least one [[device_class]] is required")
    classes: list[DeviceClass] = []
    for number, entry in enumerate(classes_value, 1):
        device_class = _device_class(entry, f"device_class #{number}", set(pcrs), fail)
        if any(c.name == device_class.name for c in classes):
            raise fail(f"device class {device_class.name!r} is defined twice")
        classes.append(device_class)

    if require_ek and not ca_files:
        raise fail("'require_ek' is true (the default) but 'ek_ca_files' names no CA")
    if not require_ek and not unverified:
        # Without credential activation an "AK" is whatever public key the node sends:
        # its restricted attribute is a bit the node sets itself, and a software key
        # signs any quote. Say so in the file, or tie AKs to EKs.
        raise fail(
            "'require_ek = false' accepts any software key as an AK (a forged quote"
            " passes); add 'unverified_aks = true' to accept that, or tie AKs to EKs"
        )
    return AttestationPolicyFile(
        pcrs=tuple(sorted(pcrs)),
        device_classes=tuple(classes),
        require_ek=require_ek,
        ek_cas=tuple(ek_cas),
        path=path,
    )


def _load_cas(policy_path: Path, name: str) -> list[x509.Certificate]:
    ca_path = policy_path.parent / name
    try:
        pem = ca_path.read_bytes()
    except OSError as exc:
        raise PolicyFileError(
            policy_path, f"'ek_ca_files': cannot read {name!r}: {exc.strerror or exc}"
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise PolicyFileError(
            policy_path, f"'ek_ca_files': {name!r} holds no PEM certificate"
        ) from None
    return certs


def _device_class(entry: object, where: str, policy_pcrs: set[int], fail: _Fail) -> DeviceClass:
    if not isinstance(entry, dict):
        raise fail(f"{where} must be a table")
    unknown = sorted(set(entry) - _CLASS_KEYS)
    if unknown:
        raise fail(f"{where}: unknown key {unknown[0]!r} (allowed: name, pcrs)")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise fail(f"{where}: 'name' must be a non-empty string")
    where = f"device class {name!r}"
    table = entry.get("pcrs", {})
    if not isinstance(table, dict):
        raise fail(f"{where}: 'pcrs' must be a table of PCR index = value(s)")
    pcrs: dict[int, frozenset[bytes]] = {}
    for key, value in table.items():
        # Canonical decimal only, so "7" and "07" cannot both name PCR 7.
        if not (key.isascii() and key.isdigit() and str(int(key)) == key):
            raise fail(f"{where}: PCR key {key!r} is not a PCR index")
        index = int(key)
        if index >= PCR_COUNT:
            raise fail(f"{where}: PCR {index} is not in 0..23")
        if index not in policy_pcrs:
            raise fail(f"{where}: PCR {index} is not in the policy's 'pcrs'")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise fail(f"{where}: PCR {index} allows no value")
        pcrs[index] = frozenset(_digest(v, f"{where}: PCR {index}", fail) for v in values)
    return DeviceClass(name, pcrs)


def _digest(value: object, where: str, fail: _Fail) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise fail(f"{where}: {str(value)[:80]!r} is not a SHA-256 value (64 hex digits)")
    # bytes.fromhex would skip spaces; a value is exactly 64 hex digits.
    if not set(value) <= _HEX:
        raise fail(f"{where}: {value!r} is not hex")
    return bytes.fromhex(value)
