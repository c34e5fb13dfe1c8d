"""Hostile input to the BRC-103 core (Hypothesis).

- The message parser on arbitrary bytes and on valid messages that were truncated, had
  bytes flipped, members replaced with JSON of the wrong type, or arrays and maps blown
  past their limits: it returns a message or raises a DecodeError, nothing else.
- The peer, fed whatever the parser lets through: events or a Brc103Error.
- Certificates from binary and from JSON: a certificate or a CertificateFormatError.
- Varints, JSON.stringify-identical text and the localeCompare order as properties.

Every peer here is deterministic (fixed keys, seeded randomness), so a failing example
replays; only AES-GCM IVs inside certificate keyrings are random.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import re
from typing import Any

from brc103_support import (
    CERT_TYPE,
    OUTPOINT,
    alice,
    bob,
    carol,
    certifier,
    handshake,
    one,
    relay,
    seeded_random,
    vector,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trustmesh.brc103.certificates import Certificate, MasterCertificate, VerifiableCertificate
from trustmesh.brc103.collation import locale_sorted, sort_key
from trustmesh.brc103.encoding import js_stringify, read_varint, write_varint
from trustmesh.brc103.errors import Brc103Error, CertificateFormatError
from trustmesh.brc103.messages import AuthMessage, RequestedCertificates, parse_message_bytes
from trustmesh.brc103.peer import Peer, PeerConfig
from trustmesh.brc103.revocation import LocalRevocationRegistry
from trustmesh.errors import DecodeError, TruncatedError

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
LIGHT = settings(FUZZ, max_examples=100)  # the costlier properties
REQUEST = RequestedCertificates((certifier().identity_key,), {CERT_TYPE: ("name",)})
ALICE_CERT = MasterCertificate.issue(
    certifier(),
    alice().identity_key,
    CERT_TYPE,
    {"name": "Alice", "email": "alice@example.com"},
    revocation_outpoint=OUTPOINT,
)
BOB_CERT = MasterCertificate.issue(certifier(), bob().identity_key, CERT_TYPE, {"name": "Bob"})


def world() -> tuple[Peer, list[AuthMessage]]:
    """Bob, mid-conversation, and one valid message of each type addressed to him.

    Alice has handshaken with bob (who wants her certificate); bob has started a
    handshake with carol; carol starts one with bob."""
    a = Peer(
        alice(),
        PeerConfig(certificates=[ALICE_CERT]),
        revocation=LocalRevocationRegistry(),
        random=seeded_random("fuzz-a"),
    )
    b = Peer(
        bob(),
        PeerConfig(requested_certificates=REQUEST, certificates=[BOB_CERT]),
        revocation=LocalRevocationRegistry(),
        random=seeded_random("fuzz-b"),
    )
    c = Peer(carol(), random=seeded_random("fuzz-c"))
    _, _, queued = handshake(a, b, 0)
    certificate_response = one(queued)
    b_to_c = b.initiate(0)
    c.receive(relay(b_to_c), 0)
    initial_response = one(c.messages_to_send())
    general = a.create_general(b"general payload", identity_key=bob().identity_key)
    certificate_request = a.create_certificate_request(REQUEST, identity_key=bob().identity_key)
    initial_request = c.initiate(0)
    return b, [
        initial_request,
        initial_response,
        certificate_request,
        certificate_response,
        general,
    ]


CORPUS = [m.to_bytes() for m in world()[1]]
CORPUS_JSON: list[Any] = [json.loads(m) for m in CORPUS]


# --- JSON mutations -------------------------------------------------------------------

# Text from a small alphabet that still holds every kind of character the JSON writers
# and readers treat specially: quotes, escapes, controls, DEL, non-ASCII, astral, U+2028,
# and a lone surrogate (which no UTF-8 writer can put out).
ALPHABET = st.sampled_from(
    [*"az09AZ _-+/=.\\\"'{}[]:,", "\0", "\n", "\x1f", "\x7f", "\u00e9", "\u2028", "\U0001f600"]
)
json_text = st.text(ALPHABET | st.just("\ud800"), max_size=16)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=6,
)

Path = tuple[str | int, ...]


def node_paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every node's path (at most the first three items of a list: byte arrays are long)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += node_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            out += node_paths(item, (*prefix, index))
    return out


def get_at(value: Any, path: Path) -> Any:
    for step in path:
        value = value[step]
    return value


HEX = "0123456789abcdef"
BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def mutate(obj: Any, path: Path, kind: str, replacement: Any, size: int) -> Any:
    """``obj`` with the node at ``path`` replaced, deleted, blown up to ``size`` items, or
    (a string) one character changed within its alphabet: hex stays hex, base64 base64."""
    obj = copy.deepcopy(obj)
    if not path:
        return replacement
    parent, last = get_at(obj, path[:-1]), path[-1]
    node = parent[last]
    if kind == "tweak" and isinstance(node, str) and node:
        alphabet = HEX if all(ch in HEX for ch in node) else BASE64
        position = size % len(node)
        swap = alphabet[(alphabet.find(node[position]) + 1 + size) % len(alphabet)]
        parent[last] = node[:position] + swap + node[position + 1 :]
    elif kind == "delete":
        del parent[last]
    elif kind == "oversize" and isinstance(node, list):
        parent[last] = (node or [replacement]) * (size // max(len(node), 1) + 1)
    elif kind == "oversize" and isinstance(node, dict):
        parent[last] = {**node, **{f"k{i}": next(iter(node.values()), []) for i in range(size)}}
    else:
        parent[last] = replacement
    return obj


@st.composite
def mutated_json(draw: st.DrawFn, corpus: list[Any]) -> bytes:
    obj = draw(st.sampled_from(corpus))
    for _ in range(draw(st.integers(1, 3))):
        paths = node_paths(obj)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["replace", "delete", "oversize", "tweak", "tweak"]))
        replacement = draw(json_values)
        size = draw(
            st.sampled_from([65, 81, 257, 300]) if kind == "oversize" else st.integers(0, 99)
        )
        obj = mutate(obj, path, kind, replacement, size)
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def mutated_bytes(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus)))
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    position = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        return bytes(data[:position])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[position] ^= draw(st.integers(1, 255))
            position = draw(st.integers(0, len(data) - 1))
        return bytes(data)
    if kind == "insert":
        return bytes(data[:position] + draw(st.binary(min_size=1, max_size=8)) + data[position:])
    return bytes(data[:position] + data[position + draw(st.integers(1, 16)) :])


def parse_or_refuse(data: bytes) -> AuthMessage | None:
    """The parser's contract: a message, or a DecodeError (nothing else escapes)."""
    try:
        return parse_message_bytes(data)
    except DecodeError:
        return None


# --- the parser -----------------------------------------------------------------------


def test_corpus_is_valid() -> None:
    b, messages = world()
    for message in messages:
        assert parse_message_bytes(message.to_bytes()).to_bytes() == message.to_bytes()
        b.receive(relay(message), 1)


@FUZZ
@given(st.binary(max_size=600))
@example(b"")
@example(b"{}")
@example(b'{"version":"0.1"}')
def test_parse_arbitrary_bytes(data: bytes) -> None:
    parse_or_refuse(data)


@FUZZ
@given(json_values)
def test_parse_arbitrary_json(value: Any) -> None:
    parse_or_refuse(json.dumps(value).encode())
    if isinstance(value, dict):
        parse_or_refuse(json.dumps({**CORPUS_JSON[-1], **value}).encode())


@FUZZ
@given(mutated_bytes(CORPUS))
def test_parse_mutated_bytes(data: bytes) -> None:
    parse_or_refuse(data)


@FUZZ
@given(mutated_json(CORPUS_JSON))
def test_parse_mutated_json(data: bytes) -> None:
    parse_or_refuse(data)


# --- the peer -------------------------------------------------------------------------


def receive_or_refuse(peer: Peer, message: AuthMessage) -> None:
    """The peer's contract: events, or a Brc103Error that refuses the message."""
    with contextlib.suppress(Brc103Error):
        peer.receive(message, 10)


@LIGHT
@given(st.one_of(mutated_bytes(CORPUS), mutated_json(CORPUS_JSON)))
def test_peer_receives_mutated_messages(data: bytes) -> None:
    message = parse_or_refuse(data)
    if message is None:
        return
    b, _ = world()
    receive_or_refuse(b, message)
    receive_or_refuse(b, message)  # and again (a replay, or the same refusal)


@FUZZ
@given(st.sampled_from(["02", "03"]), st.binary(min_size=32, max_size=32))
def test_peer_receives_initial_request_from_any_hex_key(prefix: str, x: bytes) -> None:
    """Any identityKey the parser lets through (on the curve or not) gets an answer or a
    Brc103Error from the peer."""
    obj = copy.deepcopy(CORPUS_JSON[0])
    obj["identityKey"] = prefix + x.hex()
    message = parse_or_refuse(json.dumps(obj).encode())
    if message is not None:
        b, _ = world()
        receive_or_refuse(b, message)


# --- certificates ---------------------------------------------------------------------

CERTIFICATE_BINARIES = [
    bytes.fromhex(
        vector("certificate.json")["deterministicCertificate"]["fullBinaryHex_toBinaryTrue"]
    ),
    ALICE_CERT.certificate.to_binary(),
    ALICE_CERT.certificate.to_binary(include_signature=False),
    *(
        bytes.fromhex(c["preimageHex"])
        for c in vector("certificate.json")["serializationEdgeCases"]
    ),
]
VERIFIABLE_JSON: list[Any] = [
    ALICE_CERT.reveal(alice(), bob().identity_key, ["name", "email"]).to_json(),
    {
        **vector("certificate.json")["deterministicCertificate"]["certificateJson"],
        "keyring": {"name": "AAAA"},
    },
]


def certificate_or_refuse(data: bytes) -> Certificate | None:
    try:
        cert = Certificate.from_binary(data)
    except CertificateFormatError:
        return None
    # What parses, writes out and parses back to the same certificate.
    assert Certificate.from_binary(cert.to_binary()) == cert
    return cert


@FUZZ
@given(st.binary(max_size=400))
def test_certificate_from_arbitrary_bytes(data: bytes) -> None:
    certificate_or_refuse(data)


@FUZZ
@given(mutated_bytes(CERTIFICATE_BINARIES))
def test_certificate_from_mutated_bytes(data: bytes) -> None:
    certificate_or_refuse(data)


@FUZZ
@given(st.sampled_from(CERTIFICATE_BINARIES), st.data())
def test_certificate_from_truncated_bytes(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(data)))
    certificate_or_refuse(data[:cut])


@LIGHT
@given(mutated_json(VERIFIABLE_JSON))
def test_verifiable_certificate_from_mutated_json(data: bytes) -> None:
    try:
        value = json.loads(data)
    except ValueError:
        return
    try:
        cert = VerifiableCertificate.from_json(value)
    except CertificateFormatError:
        return
    assert VerifiableCertificate.from_json(cert.to_json()) == cert


# --- varints --------------------------------------------------------------------------


@FUZZ
@given(
    st.one_of(
        st.integers(0, 0xFC),
        st.integers(0xFD, 0xFFFF),
        st.integers(0x10000, 0xFFFFFFFF),
        st.integers(0x100000000, (1 << 64) - 2),
        st.just(-1),
    ),
    st.binary(max_size=4),
)
def test_varint_round_trip(value: int, suffix: bytes) -> None:
    encoded = write_varint(value)
    if value == -1:
        size = 9
    else:
        size = 1 if value < 0xFD else 3 if value <= 0xFFFF else 5 if value <= 0xFFFFFFFF else 9
    assert len(encoded) == size
    assert read_varint(encoded + suffix, 0) == (value, size)
    assert read_varint(suffix + encoded, len(suffix)) == (value, len(suffix) + size)


@FUZZ
@given(st.binary(max_size=12), st.integers(0, 14))
def test_read_varint_on_arbitrary_bytes(data: bytes, offset: int) -> None:
    try:
        value, end = read_varint(data, offset)
    except TruncatedError:
        return
    assert offset < end <= len(data)
    assert value == -1 or 0 <= value < (1 << 64) - 1


# --- JSON.stringify-identical text ----------------------------------------------------

_INDEX = re.compile(r"0|[1-9][0-9]*")


def is_array_index(key: str) -> bool:
    """ECMAScript: a canonical numeric string below 2**32 - 1."""
    return _INDEX.fullmatch(key) is not None and int(key) < 2**32 - 1


def js_order(value: Any) -> Any:
    """An independent model of JavaScript's property order."""
    if isinstance(value, dict):
        index = sorted((k for k in value if is_array_index(k)), key=int)
        rest = [k for k in value if not is_array_index(k)]
        return {k: js_order(value[k]) for k in index + rest}
    if isinstance(value, list):
        return [js_order(item) for item in value]
    return value


text = st.text(ALPHABET, max_size=10)
plain_keys = text.filter(lambda k: not is_array_index(k))
index_keys = st.one_of(
    st.integers(0, 2**32).map(str),
    st.sampled_from(["0", "01", "00", "-1", "1.5", "4294967294", "4294967295", "1e3", "٣"]),
)
plain_values = st.none() | st.booleans() | st.integers(-(2**60), 2**60) | text


def json_trees(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        plain_values,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=5,
    )


@settings(LIGHT, max_examples=60)
@given(st.dictionaries(plain_keys, json_trees(plain_keys), max_size=5))
def test_js_stringify_is_compact_json_without_index_keys(value: dict[str, Any]) -> None:
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert js_stringify(value) == expected.encode("utf-8")


@settings(LIGHT, max_examples=60)
@given(st.dictionaries(plain_keys | index_keys, json_trees(plain_keys | index_keys), max_size=6))
def test_js_stringify_puts_index_keys_first(value: dict[str, Any]) -> None:
    expected = json.dumps(js_order(value), ensure_ascii=False, separators=(",", ":"))
    assert js_stringify(value) == expected.encode("utf-8")


# --- localeCompare order --------------------------------------------------------------

# Orders recorded with Node 20 (ICU 78.2, en-US): names.sort((a, b) => a.localeCompare(b)).
TS_ORDERS: list[list[str]] = [
    *(c["fieldOrderUsedByTS"] for c in vector("certificate.json")["serializationEdgeCases"]),
    [
        "\t",
        "_u",
        "|",
        "~",
        "$",
        "10",
        "9",
        "a",
        "A",
        "a\tb",
        "a b",
        "a_b",
        "a-b",
        "a.b",
        "A.b",
        "ab",
        "b",
        "B",
        "e",
        "E",
        "\u00e9",
        "\u00c9",
        "prenom",
        "pr\u00e9nom",
        "x_y",
        "x-y",
        "Zeta",
    ],
    [
        "-x",
        ",]L",
        "[Kv/",
        "@{D;",
        "*0<j",
        "#",
        "#]ZJ",
        "%",
        "%]2",
        "%IrE",
        "+O",
        "=Q",
        "=tio",
        "|y~;",
        "6",
        "7T}",
        "c8zc",
        "Cwr",
        "d,",
        "e",
        'E"f]',
        "EDl|",
        "f",
        "G",
        "GR77",
        "h>",
        "j;",
        "j*",
        "L1Jr",
        "m",
        "mb",
        "Ncl",
        "p}4T",
        "P}XA",
        "s",
        "t",
        "u/h,",
        "Ua",
        "v$",
        "y",
    ],
]


def test_locale_order_matches_reference_cases() -> None:
    for order in TS_ORDERS:
        assert locale_sorted(list(reversed(order))) == order
        assert locale_sorted(sorted(order)) == order


def test_locale_order_of_accents_matches_reference() -> None:
    """ICU orders accents by its own secondary weights, not by code point: acute before
    grave, then breve, circumflex, caron, diaeresis, tilde, dot, ogonek, macron.
    Recorded with Node 20 (ICU 78.2)."""
    names = [
        *("\u00e9", "\u00c9", "\u00e8", "\u00c8", "\u0115", "\u00ea", "\u00ca"),
        *("\u011b", "\u00eb", "\u00cb", "\u1ebd", "\u0117", "\u0119", "\u0113"),
    ]
    assert locale_sorted(list(reversed(names))) == names
    assert locale_sorted(["pr\u00e8nom", "pr\u00e9nom"]) == ["pr\u00e9nom", "pr\u00e8nom"]


names = st.lists(st.text(max_size=6), max_size=10, unique=True)


@LIGHT
@given(names, st.randoms(use_true_random=False))
def test_locale_sorted_is_a_total_order(values: list[str], rng: Any) -> None:
    ordered = locale_sorted(values)
    assert sorted(ordered) == sorted(values)  # a permutation
    shuffled = list(values)
    rng.shuffle(shuffled)
    assert locale_sorted(shuffled) == ordered  # independent of input order
    assert locale_sorted(set(values)) == ordered
    assert locale_sorted(ordered) == ordered
    keys = [(sort_key(v), v) for v in ordered]
    assert all(x < y for x, y in itertools.pairwise(keys))  # strictly increasing


@LIGHT
@given(st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789", max_size=6), unique=True))
def test_lowercase_alphanumeric_names_sort_by_code_point(values: list[str]) -> None:
    """Field names in [a-z0-9] (what the notes recommend) sort as plain strings do."""
    assert locale_sorted(values) == sorted(values)
