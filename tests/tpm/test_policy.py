"""The attestation policy file: what loads, and a named PolicyFileError for every mistake."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import event, given, settings
from hypothesis import strategies as st

from trustmesh.errors import ProtocolError
from trustmesh.tpm.policy import (
    AttestationPolicyFile,
    DeviceClass,
    PcrPolicy,
    PolicyFileError,
    load_policy,
)

ZERO = "00" * 32
ONES = "11" * 32
TWOS = "22" * 32

EXAMPLE = f"""\
# which PCRs every quote covers (SHA-256 bank)
pcrs = [0, 1, 2, 3, 4, 5, 6, 7]
# require an EK certificate from these CAs and credential activation
require_ek = true
ek_ca_files = ["swtpm-localca.pem"]   # relative to this file
[[device_class]]
name = "swtpm"
[device_class.pcrs]
0 = "{ZERO}"  # one allowed value, or a list of allowed values
"""


def _ca_pem(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


CA_PEM = _ca_pem("issuer")


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    (tmp_path / "swtpm-localca.pem").write_bytes(_ca_pem("issuer") + _ca_pem("root"))
    (tmp_path / "other.pem").write_bytes(_ca_pem("other"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    return tmp_path


def _write(directory: Path, text: str) -> Path:
    path = directory / "attestation.toml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(policy_dir: Path) -> None:
    policy = load_policy(_write(policy_dir, EXAMPLE))
    assert isinstance(policy, AttestationPolicyFile)
    assert isinstance(policy, PcrPolicy)
    assert policy.pcrs == tuple(range(8))
    assert policy.require_ek is True
    assert [c.subject.rfc4514_string() for c in policy.ek_cas] == ["CN=issuer", "CN=root"]
    assert policy.device_classes == (DeviceClass("swtpm", {0: frozenset({bytes(32)})}),)
    name, pcrs = policy.device_classes[0]  # a (name, {pcr: allowed}) pair
    assert name == "swtpm" and set(pcrs) == {0}


def test_lists_of_values_several_classes_and_classification(policy_dir: Path) -> None:
    policy = load_policy(
        _write(
            policy_dir,
            f"""
            pcrs = [7, 0]
            ek_ca_files = ["swtpm-localca.pem", "other.pem"]
            [[device_class]]
            name = "laptop"
            pcrs = {{ 0 = ["{ONES}", "{TWOS.upper()}"], 7 = "{ONES}" }}
            [[device_class]]
            name = "anything-with-pcr0-zero"
            pcrs.0 = "{ZERO}"
            [[device_class]]
            name = "fallback"
            """,
        )
    )
    assert policy.pcrs == (0, 7)  # sorted
    assert policy.require_ek is True and len(policy.ek_cas) == 3  # the default
    laptop = policy.device_classes[0]
    assert laptop.pcrs[0] == frozenset({bytes.fromhex(ONES), bytes.fromhex(TWOS)})
    one, two, zero = bytes.fromhex(ONES), bytes.fromhex(TWOS), bytes(32)
    assert policy.classify({0: two, 7: one}) == "laptop"
    assert policy.classify({0: zero, 7: one}) == "anything-with-pcr0-zero"
    assert policy.classify({0: one, 7: zero}) == "fallback"  # a class with no PCRs admits all


BAD: dict[str, tuple[str, str]] = {
    "require_ek false, silently": (
        'pcrs = [0]\nrequire_ek = false\n[[device_class]]\nname = "a"\n',
        "accepts any software key as an AK",
    ),
    "unverified_aks not bool": (
        'pcrs = [0]\nrequire_ek = false\nunverified_aks = 1\n[[device_class]]\nname = "a"\n',
        "'unverified_aks' must be true or false",
    ),
    "unknown top key": (f"require_ak = true\n{EXAMPLE}", "unknown key 'require_ak'"),
    "unknown class key": (
        'pcrs = [0]\n[[device_class]]\nname = "a"\nvendor = "x"\n',
        "unknown key 'vendor'",
    ),
    "no pcrs": ('[[device_class]]\nname = "a"\n', "'pcrs' must be a non-empty list"),
    "empty pcrs": ('pcrs = []\n[[device_class]]\nname = "a"\n', "non-empty list"),
    "pcr 24": ('pcrs = [0, 24]\n[[device_class]]\nname = "a"\n', "24 is not a PCR index"),
    "negative pcr": ('pcrs = [-1]\n[[device_class]]\nname = "a"\n', "-1 is not a PCR index"),
    "pcr as string": ('pcrs = ["7"]\n[[device_class]]\nname = "a"\n', "'7' is not a PCR"),
    "pcr as bool": ('pcrs = [true]\n[[device_class]]\nname = "a"\n', "True is not a PCR"),
    "pcr twice": ('pcrs = [1, 1]\n[[device_class]]\nname = "a"\n', "PCR 1 is listed twice"),
    "require_ek not bool": (
        'pcrs = [0]\nrequire_ek = "yes"\n[[device_class]]\nname = "a"\n',
        "'require_ek' must be true or false",
    ),
    "require_ek without CAs": (
        'pcrs = [0]\nrequire_ek = true\n[[device_class]]\nname = "a"\n',
        "names no CA",
    ),
    "ek_ca_files not a list": (
        'pcrs = [0]\nek_ca_files = "a.pem"\n[[device_class]]\nname = "a"\n',
        "'ek_ca_files' must be a list",
    ),
    "missing CA file": (
        'pcrs = [0]\nek_ca_files = ["gone.pem"]\n[[device_class]]\nname = "a"\n',
        "cannot read 'gone.pem'",
    ),
    "CA file not PEM": (
        'pcrs = [0]\nek_ca_files = ["junk.pem"]\n[[device_class]]\nname = "a"\n',
        "'junk.pem' holds no PEM certificate",
    ),
    "no device class": ("pcrs = [0]\n", "at least one [[device_class]]"),
    "device_class not tables": (
        'pcrs = [0]\ndevice_class = ["a"]\n',
        "device_class #1 must be a table",
    ),
    "class without name": ("pcrs = [0]\n[[device_class]]\n", "'name' must be a non-empty"),
    "class named twice": (
        'pcrs = [0]\n[[device_class]]\nname = "a"\n[[device_class]]\nname = "a"\n',
        "'a' is defined twice",
    ),
    "class pcrs not a table": (
        'pcrs = [0]\n[[device_class]]\nname = "a"\npcrs = [0]\n',
        "'pcrs' must be a table",
    ),
    "class pcr out of range": (
        f'pcrs = [0]\n[[device_class]]\nname = "a"\npcrs.24 = "{ZERO}"\n',
        "PCR 24 is not in 0..23",
    ),
    "class pcr not canonical": (
        f'pcrs = [7]\n[[device_class]]\nname = "a"\npcrs.07 = "{ZERO}"\n',
        "PCR key '07' is not a PCR index",
    ),
    "class pcr not a number": (
        f'pcrs = [7]\n[[device_class]]\nname = "a"\npcrs.x = "{ZERO}"\n',
        "PCR key 'x'",
    ),
    "class pcr outside the policy": (
        f'pcrs = [0]\n[[device_class]]\nname = "a"\npcrs.7 = "{ZERO}"\n',
        "PCR 7 is not in the policy's 'pcrs'",
    ),
    "bad hex": (
        f'pcrs = [0]\n[[device_class]]\nname = "a"\npcrs.0 = "{"zz" * 32}"\n',
        "is not hex",
    ),
    "hex with spaces": (
        f'pcrs = [0]\n[[device_class]]\nname = "a"\npcrs.0 = "{"00 " * 21}0"\n',
        "is not hex",
    ),
    "short value": (
        'pcrs = [0]\n[[device_class]]\nname = "a"\npcrs.0 = "0000"\n',
        "not a SHA-256 value",
    ),
    "value not a string": (
        'pcrs = [0]\n[[device_class]]\nname = "a"\npcrs.0 = 0\n',
        "not a SHA-256 value",
    ),
    "empty list of values": (
        'pcrs = [0]\n[[device_class]]\nname = "a"\npcrs.0 = []\n',
        "PCR 0 allows no value",
    ),
    "not TOML": ("pcrs = [0\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_mistake_is_a_policy_file_error_naming_file_and_problem(
    policy_dir: Path, case: str
) -> None:
    text, problem = BAD[case]
    path = _write(policy_dir, text)
    with pytest.raises(PolicyFileError) as caught:
        load_policy(path)
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in caught.value.problem, caught.value.problem


def test_a_missing_or_binary_file_is_a_policy_file_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="cannot read"):
        load_policy(tmp_path / "absent.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"pcrs = [0]\n\xff\xfe")
    with pytest.raises(PolicyFileError, match="not UTF-8"):
        load_policy(binary)


_SCALARS = st.one_of(
    st.integers(-3, 30),
    st.booleans(),
    st.sampled_from([ZERO, ONES, "zz" * 32, "", "a", "swtpm-localca.pem", "gone.pem"]),
    st.text(max_size=8),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["0", "7", "24", "07", "name", "pcrs", "x"]), inner),
    ),
    max_leaves=12,
)
_DOCS = st.dictionaries(
    st.sampled_from(
        ["pcrs", "require_ek", "unverified_aks", "ek_ca_files", "device_class", "other"]
    ),
    _VALUES,
    max_size=5,
)


# Documents near a valid one, so that some load and the checks between keys are reached.
_NEAR = st.fixed_dictionaries(
    {
        "pcrs": st.one_of(
            st.just([0, 1, 7]),
            st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True),
            st.lists(st.integers(-1, 25), max_size=4),
        ),
        "device_class": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["a", "b", "c", ""]),
                    "pcrs": st.dictionaries(
                        st.sampled_from(["0", "1", "7", "0", "1", "24", "07"]),
                        st.one_of(
                            st.sampled_from([ZERO, ONES, "zz" * 32]),
                            st.lists(st.sampled_from([ZERO, ONES]), max_size=2),
                        ),
                    ),
                }
            ),
            min_size=1,
            max_size=2,
        ),
    },
    optional={
        "require_ek": st.booleans(),
        "unverified_aks": st.booleans(),
        "ek_ca_files": st.just(["swtpm-localca.pem"]),
    },
)


@settings(max_examples=300, deadline=None)
@given(doc=st.one_of(_DOCS, _NEAR))
def test_any_toml_document_loads_or_is_a_policy_file_error(doc: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        (base / "swtpm-localca.pem").write_bytes(CA_PEM)
        path = base / "attestation.toml"
        path.write_text(tomli_w.dumps(doc))
        error: PolicyFileError | None
        try:
            policy = load_policy(path)
        except PolicyFileError as exc:
            error = exc
        else:
            error = None
    event("refused" if error else "loaded")
    if error is not None:
        assert error.path == path and error.problem
        return
    assert policy.device_classes and set(policy.pcrs) <= set(range(24))
    for device_class in policy.device_classes:
        assert set(device_class.pcrs) <= set(policy.pcrs)


def test_unverified_aks_must_be_said_out_loud(tmp_path: Path) -> None:
    path = tmp_path / "attestation.toml"
    path.write_text(
        'pcrs = [0]\nrequire_ek = false\nunverified_aks = true\n[[device_class]]\nname = "a"\n'
    )
    policy = load_policy(path)
    assert policy.require_ek is False and policy.ek_cas == ()
