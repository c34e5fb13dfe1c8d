"""``trustmesh catalyst listen / connect`` as real processes, with openssl-made certificates.

One listener per configuration serves every test that needs it (started on first use,
interrupted when the module ends); each ``connect`` is its own process. A test reads the
listener's lines for its own session (through that session's ``closed`` line), so every
connect is checked from both ends.
"""

from __future__ import annotations

import datetime
import functools
import http.server
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from clitools import LEAF_EXTENSIONS, OPENSSL_CONFIG, P256, TRUSTMESH, clean_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.cli.main import EXIT_INTERRUPTED

# Fails, never skips, without openssl. The module-scoped pki fixture repeats the check, so
# that a missing openssl is the same plain failure whichever fixture is set up first.
pytestmark = pytest.mark.usefixtures("require_openssl")

WAIT = 15.0  # upper bound on any one process or line; each takes well under a second

Event = dict[str, Any]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRUSTMESH, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        env=clean_env(),
    )


def json_lines(text: str) -> list[Event]:
    return [json.loads(line) for line in text.splitlines()]


def kinds(events: list[Event]) -> list[str]:
    return [e["event"] for e in events]


def notifications(events: list[Event]) -> list[tuple[int, int, str]]:
    """(code, subcode, direction) of each notification line, in order."""
    return [
        (e["code"], e["subcode"], e["direction"]) for e in events if e["event"] == "notification"
    ]


# --- certificates, keys and secrets, all made by the openssl command line ----------------

# Permit only a peer that proved a pre-shared secret (validated against CEDAR_SCHEMA).
PSK_ONLY_POLICY = """\
permit(principal, action == Action::"peer", resource)
when { context.psk };
"""
MISSPELT_POLICY = """\
permit(principal, action == Action::"peer", resource)
when { context.pks };
"""


@dataclass(frozen=True)
class Identity:
    """One node's identity options: certificate, key, trusted CA, ASN and BGP identifier."""

    cert: Path
    key: Path
    ca: Path
    asn: int
    id: str

    def options(self) -> list[str]:
        return [
            *("--cert", str(self.cert), "--key", str(self.key), "--ca", str(self.ca)),
            *("--asn", str(self.asn), "--id", self.id),
        ]


@dataclass(frozen=True)
class Pki:
    a: Identity  # node-a, AS65001: the connecting side
    b: Identity  # node-b, AS65002: the listening side
    foreign: Identity  # node-a's name on a certificate from another CA
    foreign_ca: Path
    jws_ed25519: Path
    jws_p256: Path
    psk: Path  # 32 random bytes, hex
    other_psk: Path
    short_psk: Path  # 4 bytes: too short
    psk_policy: Path
    misspelt_policy: Path


class OpenSsl:
    def __init__(self, executable: str, config: Path) -> None:
        self.executable = executable
        self.env = {**os.environ, "OPENSSL_CONF": str(config)}

    def __call__(self, *args: str | Path) -> None:
        result = subprocess.run(
            [self.executable, *map(str, args)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
            env=self.env,
        )
        assert result.returncode == 0, f"openssl {' '.join(map(str, args))}: {result.stderr}"

    def ca(self, folder: Path, name: str) -> tuple[Path, Path]:
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        self(
            *("req", "-x509", "-new", *P256, "-nodes", "-keyout", key, "-out", cert),
            *("-days", "7", "-subj", f"/CN=trustmesh test {name}"),
            *("-config", self.env["OPENSSL_CONF"], "-extensions", "ca"),
        )
        return cert, key

    def leaf(self, folder: Path, name: str, ca: tuple[Path, Path], file: str) -> tuple[Path, Path]:
        """A P-256 certificate with CN and DNS SAN ``name``, for server and client use."""
        cert, key, csr = (folder / f"{file}.{ext}" for ext in ("crt", "key", "csr"))
        extensions = folder / f"{file}.ext"
        extensions.write_text(LEAF_EXTENSIONS.format(name=name))
        self(
            *("req", "-new", *P256, "-nodes", "-keyout", key, "-out", csr),
            *("-subj", f"/CN={name}", "-config", self.env["OPENSSL_CONF"]),
        )
        self(
            *("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-sha256"),
            *("-set_serial", "0x" + os.urandom(8).hex(), "-days", "7", "-extfile", extensions),
            *("-out", cert),
        )
        return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    executable = shutil.which("openssl")
    if executable is None:  # as require_openssl: fail, never skip
        pytest.fail("the openssl command line is missing; scripts/dev test installs it")
    folder = tmp_path_factory.mktemp("catalyst-pki")
    config = folder / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG)
    openssl = OpenSsl(executable, config)

    ca = openssl.ca(folder, "ca")
    foreign_ca = openssl.ca(folder, "foreign-ca")
    a_cert, a_key = openssl.leaf(folder, "node-a", ca, "node-a")
    b_cert, b_key = openssl.leaf(folder, "node-b", ca, "node-b")
    f_cert, f_key = openssl.leaf(folder, "node-a", foreign_ca, "foreign-node-a")

    jws_ed25519, jws_p256 = folder / "jws-ed25519.pem", folder / "jws-p256.pem"
    openssl("genpkey", "-algorithm", "ed25519", "-out", jws_ed25519)
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", jws_p256)
    psk, other_psk, short_psk = (folder / f"{n}.psk" for n in ("k1", "other", "short"))
    openssl("rand", "-hex", "-out", psk, "32")
    openssl("rand", "-hex", "-out", other_psk, "32")
    openssl("rand", "-hex", "-out", short_psk, "2")  # 4 characters and a newline
    for file in (a_key, b_key, f_key, jws_ed25519, jws_p256, psk, other_psk):
        file.chmod(0o600)

    (psk_policy := folder / "psk-only.cedar").write_text(PSK_ONLY_POLICY)
    (misspelt_policy := folder / "misspelt.cedar").write_text(MISSPELT_POLICY)
    return Pki(
        a=Identity(a_cert, a_key, ca[0], 65001, "node-a"),
        b=Identity(b_cert, b_key, ca[0], 65002, "node-b"),
        foreign=Identity(f_cert, f_key, ca[0], 65001, "node-a"),
        foreign_ca=foreign_ca[0],
        jws_ed25519=jws_ed25519,
        jws_p256=jws_p256,
        psk=psk,
        other_psk=other_psk,
        short_psk=short_psk,
        psk_policy=psk_policy,
        misspelt_policy=misspelt_policy,
    )


# --- processes --------------------------------------------------------------------------


class Process:
    """A running trustmesh command; a thread turns its stdout into a queue of JSON lines."""

    def __init__(self, proc: subprocess.Popen[str], stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.events: list[Event] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next_event(self, timeout: float = WAIT) -> Event:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output in {timeout} s; stderr: {self._errors()}") from None
        assert line is not None, f"exited ({self.proc.poll()}); stderr: {self._errors()}"
        event: Event = json.loads(line)
        self.events.append(event)
        return event

    def until(self, predicate: Callable[[Event], bool]) -> list[Event]:
        """Lines up to and including the first that ``predicate`` accepts."""
        deadline = time.monotonic() + WAIT
        seen = []
        while True:
            seen.append(event := self.next_event(max(deadline - time.monotonic(), 0.01)))
            if predicate(event):
                return seen

    def drain(self) -> None:
        """Drop lines already out (left by an earlier test that failed half-way)."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._lines.put(None)
                return

    def interrupt(self) -> int:
        """SIGINT; the exit code once it has stopped, with every line read."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=WAIT)
        self._reader.join(WAIT)
        while (line := self._lines.get_nowait()) is not None:
            self.events.append(json.loads(line))
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)
        self._reader.join(WAIT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def _errors(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""


class Listener(Process):
    """A ``catalyst listen --port 0``: its first line names the port."""

    def __init__(self, proc: subprocess.Popen[str], stderr: Path) -> None:
        super().__init__(proc, stderr)
        listening = self.next_event()
        assert listening["event"] == "listening", listening
        assert listening["host"] == "127.0.0.1"
        assert listening["id"] == "node-b"
        self.port: int = listening["port"]
        assert self.port > 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def session(self) -> list[Event]:
        """The lines of the next session, through its ``closed`` line."""
        return self.until(lambda e: e["event"] == "closed")


class Processes:
    """Every process the module starts; listeners shared per configuration."""

    def __init__(self, pki: Pki, folder: Path) -> None:
        self.pki = pki
        self.folder = folder
        self.started: list[Process] = []
        self._procs: list[subprocess.Popen[str]] = []
        self._shared: dict[tuple[str, ...], Listener] = {}

    def _popen(self, args: list[str]) -> tuple[subprocess.Popen[str], Path]:
        stderr_path = self.folder / f"process{len(self._procs)}.err"
        with stderr_path.open("w") as stderr:
            proc = subprocess.Popen(
                [TRUSTMESH, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=clean_env(),
            )
        self._procs.append(proc)
        return proc, stderr_path

    def listener(self, *extra: str) -> Listener:
        """The shared listener (node-b, AS65002) with these extra options."""
        if extra not in self._shared:
            self._shared[extra] = self.new_listener(*extra)
        listener = self._shared[extra]
        assert listener.proc.poll() is None, "a shared listener stopped"
        return listener

    def new_listener(self, *extra: str) -> Listener:
        args = ["catalyst", "listen", *self.pki.b.options(), "--port", "0", *extra]
        listener = Listener(*self._popen(args))
        self.started.append(listener)
        return listener

    def connector(self, address: str, identity: Identity, *extra: str) -> Process:
        """A ``catalyst connect`` that runs until its session ends or it is interrupted."""
        args = ["catalyst", "connect", address, *identity.options(), *extra]
        process = Process(*self._popen(args))
        self.started.append(process)
        return process

    def close(self) -> None:
        for process in self.started:
            process.stop()
        for proc in self._procs:  # a listener that died before its first line
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=WAIT)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture(scope="module")
def processes(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    started = Processes(pki, tmp_path_factory.mktemp("catalyst-processes"))
    try:
        yield started
    finally:
        started.close()


@dataclass(frozen=True)
class Outcome:
    """One ``connect --once``, seen from both ends."""

    returncode: int
    events: list[Event]  # the connector's lines
    stderr: str
    listener: list[Event]  # the listener's lines for this session


def connect_once(listener: Listener, identity: Identity, *extra: str) -> Outcome:
    listener.drain()
    result = run(
        "catalyst",
        "connect",
        listener.address,
        *identity.options(),
        *("--once", "--timeout", "10"),
        *extra,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return Outcome(result.returncode, json_lines(result.stdout), result.stderr, listener.session())


def assert_established(outcome: Outcome, *, hold_time: int = 180, asn: int = 65001) -> None:
    """Established both ways, then ceased by ``--once`` (6/2)."""
    assert outcome.returncode == 0, outcome
    assert kinds(outcome.events) == ["established", "notification", "closed"], outcome.events
    established, _, closed = outcome.events
    assert established["peer_id"] == "node-b"
    assert established["peer_asn"] == 65002
    assert established["hold_time"] == hold_time
    assert notifications(outcome.events) == [(6, 2, "sent")]
    assert closed["error"] is False

    assert kinds(outcome.listener) == ["established", "notification", "closed"], outcome.listener
    theirs = outcome.listener[0]
    assert theirs["peer_id"] == "node-a"
    assert theirs["peer_asn"] == asn
    assert theirs["hold_time"] == hold_time
    assert notifications(outcome.listener) == [(6, 2, "received")]
    assert outcome.listener[2]["error"] is False


def assert_refused_by_listener(outcome: Outcome, code: int, subcode: int) -> None:
    """The listener checked our OPEN and sent code/subcode; we heard it and exit 1."""
    assert outcome.returncode == 1, outcome
    assert kinds(outcome.events) == ["notification", "closed"], outcome.events
    assert notifications(outcome.events) == [(code, subcode, "received")]
    closed = outcome.events[1]
    assert closed["error"] is True
    assert closed["by_peer"] is True
    assert f"NOTIFICATION {code}/{subcode}" in closed["reason"]

    assert kinds(outcome.listener) == ["notification", "closed"], outcome.listener
    assert notifications(outcome.listener) == [(code, subcode, "sent")]
    assert outcome.listener[1]["error"] is True


def assert_crossed(outcome: Outcome, ours: tuple[int, int], theirs: tuple[int, int]) -> None:
    """Each side refused the other's OPEN: both sent a NOTIFICATION, neither heard one."""
    assert outcome.returncode == 1, outcome
    assert kinds(outcome.events) == ["notification", "closed"], outcome.events
    assert notifications(outcome.events) == [(*ours, "sent")]
    assert outcome.events[1]["error"] is True
    assert kinds(outcome.listener) == ["notification", "closed"], outcome.listener
    assert notifications(outcome.listener) == [(*theirs, "sent")]
    assert outcome.listener[1]["error"] is True


# --- sessions ----------------------------------------------------------------------------


def test_two_processes_with_openssl_certificates_reach_established(
    processes: Processes, pki: Pki
) -> None:
    listener = processes.listener("--hold-time", "90")
    outcome = connect_once(listener, pki.a)  # offers the default 180: the lower offer wins
    assert_established(outcome, hold_time=90)
    assert outcome.stderr == ""
    for established in (outcome.events[0], outcome.listener[0]):
        assert established["resumed"] is False
        assert isinstance(established["group"], str)
    assert outcome.events[0]["remote"] == listener.address
    assert outcome.listener[0]["remote"].startswith("127.0.0.1:")


def test_an_identifier_not_in_the_certificate_is_refused(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--hold-time", "90")
    outcome = connect_once(listener, replace(pki.a, id="node-x"))
    assert_refused_by_listener(outcome, 2, 3)  # Bad BGP Identifier
    assert "'node-x' is not in the peer certificate" in outcome.listener[0]["message"]
    # The connector warned before dialling.
    assert "--id 'node-x' is not in" in outcome.stderr
    assert "2/3" in outcome.stderr


@pytest.mark.parametrize(
    ("allow", "asn", "permitted"),
    [
        (("65009",), 65001, False),
        (("65009",), 65009, True),
        (("65001:other-id",), 65001, False),
        (("65001:other-id", "65001:node-a"), 65001, True),
    ],
    ids=["asn-not-listed", "asn-listed", "pinned-to-another-id", "pinned-to-our-id"],
)
def test_allow_list(
    processes: Processes, pki: Pki, allow: tuple[str, ...], asn: int, permitted: bool
) -> None:
    listener = processes.listener(*(option for spec in allow for option in ("--allow", spec)))
    outcome = connect_once(listener, replace(pki.a, asn=asn))
    if not permitted:
        assert_refused_by_listener(outcome, 2, 2)  # Bad Peer AS
        assert f"AS{asn} (node-a) is not a permitted peer" in outcome.listener[0]["message"]
        return
    assert_established(outcome, asn=asn)


# PSK, as in the spec's flow: the connector proves its first --psk, the listener requires
# a proof of one of its own, so a refusal always comes from the listener.


def test_psk_matching_secret(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--psk", f"k1:{pki.psk}")
    assert_established(connect_once(listener, pki.a, "--psk", f"k1:{pki.psk}"))


def test_psk_missing_on_the_connector(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--psk", f"k1:{pki.psk}")
    outcome = connect_once(listener, pki.a)
    assert_refused_by_listener(outcome, 2, 242)


def test_psk_another_secret_under_the_same_key_id(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--psk", f"k1:{pki.psk}")
    outcome = connect_once(listener, pki.a, "--psk", f"k1:{pki.other_psk}")
    assert_refused_by_listener(outcome, 2, 241)


def test_psk_unknown_key_id(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--psk", f"k1:{pki.psk}")
    outcome = connect_once(listener, pki.a, "--psk", f"k9:{pki.psk}")
    assert_refused_by_listener(outcome, 2, 240)
    assert "'k9'" in outcome.listener[0]["message"]


def test_psk_second_key_id_is_accepted(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--psk", f"k1:{pki.psk}", "--psk", f"k9:{pki.other_psk}")
    outcome = connect_once(listener, pki.a, "--psk", f"k9:{pki.other_psk}")
    assert_established(outcome)


def test_psk_proof_to_a_listener_without_secrets_is_ignored(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--hold-time", "90")
    assert_established(connect_once(listener, pki.a, "--psk", f"k1:{pki.psk}"), hold_time=90)


@pytest.mark.parametrize("key", ["ed25519", "p256"])
def test_jws_signed_open_is_accepted(processes: Processes, pki: Pki, key: str) -> None:
    listener = processes.listener("--require-jws", "--jwks-key", str(pki.jws_p256))
    jws_key = pki.jws_ed25519 if key == "ed25519" else pki.jws_p256
    assert_established(connect_once(listener, pki.a, "--jwks-key", str(jws_key)))


def test_jws_required_but_absent(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--require-jws", "--jwks-key", str(pki.jws_p256))
    outcome = connect_once(listener, pki.a)
    assert_refused_by_listener(outcome, 2, 243)
    assert outcome.listener[0]["message"] == "OPEN carries no jws signature"


def test_a_certificate_from_another_ca_fails_tls(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--hold-time", "90")
    outcome = connect_once(listener, pki.foreign)
    assert outcome.returncode == 1, outcome
    assert kinds(outcome.events) == ["closed"], outcome.events
    closed = outcome.events[0]
    assert closed["error"] is True
    assert closed["peer_id"] is None
    assert "TLS" in closed["reason"]
    assert "unknown ca" in closed["reason"]
    assert kinds(outcome.listener) == ["closed"], outcome.listener
    assert outcome.listener[0]["error"] is True
    assert "certificate verify failed" in outcome.listener[0]["reason"]


def test_a_listener_from_an_untrusted_ca_fails_tls(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--hold-time", "90")
    outcome = connect_once(listener, replace(pki.a, ca=pki.foreign_ca))
    assert outcome.returncode == 1, outcome
    assert kinds(outcome.events) == ["closed"], outcome.events
    assert outcome.events[0]["error"] is True
    assert "TLS" in outcome.events[0]["reason"]
    assert "certificate verify failed" in outcome.events[0]["reason"]
    assert kinds(outcome.listener) == ["closed"]
    assert outcome.listener[0]["error"] is True


def test_policy_refuses_a_peer_without_psk(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--policy", str(pki.psk_policy))
    outcome = connect_once(listener, pki.a)
    assert_refused_by_listener(outcome, 2, 246)
    assert "peering policy refused node-a" in outcome.listener[0]["message"]


def test_policy_permits_a_peer_with_psk(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--policy", str(pki.psk_policy), "--psk", f"k1:{pki.psk}")
    assert_established(connect_once(listener, pki.a, "--psk", f"k1:{pki.psk}"))


def test_policy_decides_when_the_psk_is_optional(processes: Processes, pki: Pki) -> None:
    listener = processes.listener(
        "--policy", str(pki.psk_policy), "--psk", f"k1:{pki.psk}", "--psk-optional"
    )
    assert_established(connect_once(listener, pki.a, "--psk", f"k1:{pki.psk}"))
    assert_refused_by_listener(connect_once(listener, pki.a), 2, 246)
    assert_refused_by_listener(
        connect_once(listener, pki.a, "--psk", f"k1:{pki.other_psk}"), 2, 241
    )


def test_policy_on_the_connector(processes: Processes, pki: Pki) -> None:
    # The connector's own policy refuses the listener, which proved no PSK.
    listener = processes.listener("--hold-time", "90")
    outcome = connect_once(listener, pki.a, "--policy", str(pki.psk_policy))
    assert outcome.returncode == 1, outcome
    assert notifications(outcome.events) == [(2, 246, "sent")]
    assert kinds(outcome.events) == ["notification", "closed"]
    assert notifications(outcome.listener) == [(2, 246, "received")]
    assert kinds(outcome.listener) == ["notification", "closed"]


# --- long-lived sessions and signals -----------------------------------------------------


def test_interrupting_the_connector_ceases_its_session(processes: Processes, pki: Pki) -> None:
    listener = processes.listener("--hold-time", "90")
    listener.drain()
    connector = processes.connector(listener.address, pki.a)
    assert connector.next_event()["event"] == "established"
    assert listener.next_event()["event"] == "established"
    # At once: the signal handlers are in place before the connector dials.
    assert connector.interrupt() == EXIT_INTERRUPTED, connector.events
    ours = connector.events
    assert kinds(ours) == ["established", "notification", "closed"]
    assert notifications(ours) == [(6, 2, "sent")]
    assert ours[-1]["error"] is False
    theirs = listener.session()
    assert notifications(theirs) == [(6, 2, "received")]
    assert theirs[-1]["error"] is False
    assert theirs[-1]["by_peer"] is True


def test_interrupting_the_listener_ceases_every_session(processes: Processes, pki: Pki) -> None:
    listener = processes.new_listener("--hold-time", "90")  # its own: this test stops it
    connector = processes.connector(listener.address, pki.a)
    assert connector.next_event()["event"] == "established"
    assert listener.next_event()["event"] == "established"
    assert listener.interrupt() == EXIT_INTERRUPTED
    expected = ["listening", "established", "notification", "closed", "stopped"]
    assert kinds(listener.events) == expected
    assert notifications(listener.events) == [(6, 2, "sent")]
    stopped = listener.events[-1]
    assert stopped["sessions_established"] == 1
    assert stopped["notifications_sent"] == {"6/2": 1}
    assert stopped["notifications_received"] == {}
    # The peer ended the session: the connector exits 1.
    assert connector.proc.wait(timeout=WAIT) == 1
    connector.until(lambda e: e["event"] == "closed")
    assert kinds(connector.events) == ["established", "notification", "closed"]
    assert notifications(connector.events) == [(6, 2, "received")]
    assert connector.events[-1]["by_peer"] is True
    assert connector.events[-1]["error"] is False


# --- usage errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "extra", "messages"),
    [
        ("connect", ("--hold-time", "2"), ("'--hold-time'", "(1 and 2 are refused)")),
        ("listen", ("--hold-time", "1"), ("'--hold-time'", "(1 and 2 are refused)")),
        ("connect", ("--psk", "k1:{short_psk}"), ("'--psk'", "is 4 bytes; at least 16")),
        ("connect", ("--psk", "k1"), ("'--psk'", "expected KEYID:FILE, got 'k1'")),
        ("connect", ("--allow", "abc"), ("'--allow'", "expected ASN or ASN:ID, got 'abc'")),
        ("listen", ("--allow", "0"), ("'--allow'", "ASN 0 is outside 1..4294967295")),
        ("connect", ("--policy", "{misspelt_policy}"), ("'--policy'", "pks")),
        ("connect", ("--jwks-key", "{psk}"), ("'--jwks-key'", "not a P-256 or Ed25519")),
        ("connect", ("--once", "--reconnect"), ("--once and --reconnect exclude each other",)),
    ],
    ids=[
        "hold-time-2",
        "listen-hold-time-1",
        "short-psk",
        "psk-without-file",
        "allow-abc",
        "allow-asn-0",
        "misspelt-policy",
        "jwks-key-not-a-key",
        "once-and-reconnect",
    ],
)
def test_usage_errors_exit_2(
    pki: Pki, command: str, extra: tuple[str, ...], messages: tuple[str, ...]
) -> None:
    files = {"short_psk": pki.short_psk, "misspelt_policy": pki.misspelt_policy, "psk": pki.psk}
    where = ["127.0.0.1:9"] if command == "connect" else ["--port", "0"]  # never reached
    args = [arg.format(**files) for arg in extra]
    result = run("catalyst", command, *where, *pki.a.options(), *args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    for message in messages:
        assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option", ["--key", "--jwks-key"])
def test_a_key_file_others_may_read_is_refused(pki: Pki, tmp_path: Path, option: str) -> None:
    # As `keys show` refuses it: the key is private or it is not used.
    source = pki.a.key if option == "--key" else pki.jws_p256
    shared = tmp_path / "shared.key"
    shared.write_bytes(source.read_bytes())
    shared.chmod(0o644)
    options, extra = pki.a.options(), ["--jwks-key", str(shared)]
    if option == "--key":
        options, extra = [str(shared) if a == str(pki.a.key) else a for a in options], []
    for command, where in (("connect", ["127.0.0.1:9"]), ("listen", ["--port", "0"])):
        result = run("catalyst", command, *where, *options, *extra)
        assert result.returncode == 1, result
        assert result.stdout == ""
        assert result.stderr.strip() == (
            f"trustmesh: error: {shared} has mode 0644; a private key must be private"
            f" (chmod 600 {shared})"
        )


def test_help_names_the_events() -> None:
    for command in ("listen", "connect"):
        helped = run("catalyst", command, "--help")
        assert helped.returncode == 0
        for option in ("--cert", "--key", "--ca", "--asn", "--id", "--allow", "--psk"):
            assert option in helped.stdout
        text = " ".join(helped.stdout.split())  # click wraps the help
        for option in ("--crl-url", "--crl-interval"):
            assert option in text
        assert "read again whenever it changes" in text
        assert "6/241" in text
    group = run("catalyst", "--help")
    for event in ("listening", "established", "notification", "closed"):
        assert event in group.stdout


def test_reconnect_backs_off_from_one_second_until_interrupted(
    processes: Processes, pki: Pki
) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    connector = processes.connector(address, pki.a, "--reconnect")
    [retry] = [e for e in connector.until(lambda e: e["event"] == "retry")]
    assert 1.0 <= retry["delay_s"] <= 1.2
    assert retry["reason"].startswith(f"cannot connect to {address}")
    assert connector.interrupt() == EXIT_INTERRUPTED


# --- revocation during a session (issue 16 item 7) ----------------------------------------


def write_crl(pki: Pki, path: Path, *revoked: Identity, minutes_ago: int) -> None:
    """A CRL from the test CA (its key beside its certificate), issued ``minutes_ago``,
    revoking ``revoked``; the file replaced atomically, as a CRL publisher should."""
    ca_cert = x509.load_pem_x509_certificate(pki.a.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(
        pki.a.ca.with_suffix(".key").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    issued = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=minutes_ago)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(issued)
        .next_update(issued + datetime.timedelta(days=1))
    )
    for identity in revoked:
        serial = x509.load_pem_x509_certificate(identity.cert.read_bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build()
        )
    fresh = path.with_suffix(".new")
    fresh.write_bytes(
        builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    fresh.replace(path)


def test_a_changed_crl_file_ends_the_revoked_session_and_refuses_its_next_handshake(
    processes: Processes, pki: Pki, tmp_path: Path
) -> None:
    crl = tmp_path / "ca.crl"
    write_crl(pki, crl, minutes_ago=60)  # nothing revoked yet
    listener = processes.new_listener("--crl", str(crl), "--crl-interval", "0.05")
    connector = processes.connector(listener.address, pki.a)
    assert connector.next_event()["event"] == "established"
    assert listener.next_event()["event"] == "established"

    write_crl(pki, crl, pki.a, minutes_ago=30)
    [update] = [e for e in listener.until(lambda e: e["event"] == "crl") if e["event"] == "crl"]
    assert update["source"] == str(crl)
    assert update["revoked"] == 1
    assert update["sessions_ended"] == ["node-a"]
    ours = connector.until(lambda e: e["event"] == "closed")
    assert notifications(ours) == [(6, 241, "received")]
    assert ours[-1]["error"] is True and "certificate revoked" in ours[-1]["reason"]
    assert connector.proc.wait(timeout=WAIT) == 1
    theirs = listener.session()
    assert notifications(theirs) == [(6, 241, "sent")]

    refused = connect_once(listener, pki.a)  # a new process: a full handshake
    assert refused.returncode == 1, refused
    assert kinds(refused.events) == ["closed"], refused.events
    assert refused.events[0]["reason"] == "TLS failed: tls alert certificate revoked"
    assert kinds(refused.listener) == ["closed"]
    assert "certificate revoked" in refused.listener[0]["reason"]
    assert listener.interrupt() == EXIT_INTERRUPTED


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder (with Last-Modified, to 1 s, and 304 to If-Modified-Since), quietly."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


def test_connect_fetches_the_crl_from_a_url_and_ends_a_revoked_listener_session(
    processes: Processes, pki: Pki, tmp_path: Path
) -> None:
    crl = tmp_path / "ca.crl"
    write_crl(pki, crl, minutes_ago=60)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        functools.partial(QuietFiles, directory=str(tmp_path)),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ca.crl"
        listener = processes.new_listener()
        connector = processes.connector(
            listener.address, pki.a, "--crl-url", url, "--crl-interval", "0.05"
        )
        assert connector.next_event()["event"] == "established"
        write_crl(pki, crl, pki.b, minutes_ago=30)
        ours = connector.until(lambda e: e["event"] == "closed")
        [update] = [e for e in ours if e["event"] == "crl"]
        assert update == {
            "event": "crl",
            "source": url,
            "revoked": 1,
            "last_update": update["last_update"],
            "sessions_ended": ["node-b"],
        }
        assert notifications(ours) == [(6, 241, "sent")]
        assert connector.proc.wait(timeout=WAIT) == 1
        assert notifications(listener.session()) == [(6, 241, "received")]
        assert listener.interrupt() == EXIT_INTERRUPTED
    finally:
        server.shutdown()
        server.server_close()


def test_crl_option_errors(pki: Pki, tmp_path: Path) -> None:
    crl = tmp_path / "ca.crl"
    write_crl(pki, crl, minutes_ago=60)
    cases = [
        (["--crl", str(crl), "--crl-url", "http://127.0.0.1:9/x"], 2, "exclude each other"),
        (["--crl-interval", "5"], 2, "--crl-interval needs --crl or --crl-url"),
        (["--crl-url", "ftp://example/x"], 2, "http:// or https://"),
        (["--crl-url", "http://127.0.0.1:9/ca.crl"], 1, "cannot load the CRL from"),
    ]
    for extra, code, message in cases:
        result = run("catalyst", "connect", "127.0.0.1:9", *pki.a.options(), "--once", *extra)
        assert result.returncode == code, (extra, result)
        assert message in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr
