"""The demo's TPM node: when swtpm is installed, one mesh node keeps its identity key in
a software TPM and attests to the demo CA with a quote, as ``node init --key tpm:...
--attest tpm:...`` does against ``ca serve --attestation-policy FILE``.

The swtpm is manufactured and started in a thread while the CA and the other nodes
start (manufacturing takes about a second), in the demo's work directory, and stopped
by :meth:`DemoTpm.close` at the end of the demo, also when it fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

from trustmesh.api.ca_server import CaServer
from trustmesh.crypto.keys import KeyKind
from trustmesh.keystore.uri import close_signer, generate_signer
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode
from trustmesh.pki.attestation import AttestationPolicy
from trustmesh.pki.tpm_verifier import TpmQuoteVerifier
from trustmesh.tpm.attester import AK_HANDLE, DEFAULT_PCRS
from trustmesh.tpm.policy import load_policy
from trustmesh.tpm.swtpm import Swtpm, SwtpmError, available

IDENTITY_HANDLE = 0x81000100  # where the node's identity key persists in the TPM
DEVICE_CLASS = "swtpm"
POLICY_FILE = "attestation.toml"  # in the CA's directory, as ``ca serve`` would be given
EK_CA_FILE = "swtpm-ek-ca.pem"
NO_TPM_LINE = "every node keeps its key in a file"


def tpm_absence() -> str | None:
    """Why the demo runs no TPM node ("no swtpm"...), or None when it can."""
    if not available():
        return "no swtpm"
    if importlib.util.find_spec("tpm2_pytss") is None:
        return "no tpm2-pytss (pip install 'trustmesh[tpm]')"
    return None


def pcr_range(pcrs: tuple[int, ...]) -> str:
    """``0-7`` for a run of PCRs, else ``0,2,7``."""
    if pcrs and list(pcrs) == list(range(pcrs[0], pcrs[-1] + 1)) and len(pcrs) > 1:
        return f"{pcrs[0]}-{pcrs[-1]}"
    return ",".join(str(p) for p in pcrs)


@dataclass(frozen=True)
class TpmReady:
    """A started swtpm with the demo's identity key made in it."""

    swtpm: Swtpm
    identity_uri: str
    ak_public: bytes  # the AK's TPM2B_PUBLIC, as the TPM holds it

    @property
    def tcti(self) -> str:
        return self.swtpm.tcti

    @property
    def attest(self) -> str:
        return f"tpm:{self.tcti}"


class DemoTpm:
    """The swtpm under ``directory``: started once (in a thread), stopped once."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._closed = False
        self._swtpm: Swtpm | None = None
        self._started: asyncio.Future[TpmReady] | None = None

    def begin(self) -> None:
        """Start the swtpm in a thread; :meth:`ready` waits for it."""
        if self._started is None:
            # Submitted to a thread now (a task would wait for the loop, which the CA's
            # key generation holds next).
            self._started = asyncio.get_running_loop().run_in_executor(None, self._start)
            # A start that fails after the demo stopped waiting is not "never retrieved".
            self._started.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def ready(self) -> TpmReady:
        self.begin()
        assert self._started is not None
        return await self._started

    def _start(self) -> TpmReady:
        swtpm = Swtpm.start(self.directory)
        with self._lock:
            keep = not self._closed
            if keep:
                self._swtpm = swtpm
        if not keep:  # the demo ended (failed, or Ctrl-C) while this thread worked
            swtpm.stop()
            raise SwtpmError("the demo ended while its swtpm started")
        # The identity key, made now rather than on the enrollment's critical path.
        signer, uri = generate_signer(
            f"tpm:{swtpm.tcti};handle=0x{IDENTITY_HANDLE:08x}", KeyKind.P256, out=None
        )
        close_signer(signer)
        # And the AK under the EK, which the enrollment's quote needs, for the same reason.
        from trustmesh.tpm.device import TpmDevice  # needs tpm2-pytss: only with a TPM

        with TpmDevice.open(swtpm.tcti) as device:
            ak_public = device.ensure_ak(AK_HANDLE)
        return TpmReady(swtpm, uri, ak_public)

    def close(self) -> None:
        """Stop the swtpm (by its PID): at the end, after the nodes closed their sessions,
        or on the way out of a failed or interrupted demo. A start still under way stops
        it as soon as it has it."""
        with self._lock:
            self._closed = True
            swtpm, self._swtpm = self._swtpm, None
        if swtpm is not None:
            swtpm.stop()


def admit_swtpm(server: CaServer, ca_dir: Path, tpm: TpmReady) -> Path:
    """Write the CA's attestation policy for this swtpm (a fresh TPM: PCRs 0-7 all zero;
    AKs tied to EKs certified by the swtpm's local CA) and have the running CA apply it
    to TPM quotes, as ``ca serve --attestation-policy FILE`` does. Nodes that send no
    attestation still enroll (mode none); a quote that is sent must verify."""
    (ca_dir / EK_CA_FILE).write_bytes(tpm.swtpm.ek_ca + tpm.swtpm.ek_root)
    zero = "0" * 64
    lines = [
        f"pcrs = {list(DEFAULT_PCRS)}",
        "require_ek = true",
        f'ek_ca_files = ["{EK_CA_FILE}"]',
        "[[device_class]]",
        f'name = "{DEVICE_CLASS}"',
        "[device_class.pcrs]",
        *(f'{i} = "{zero}"' for i in DEFAULT_PCRS),
    ]
    path = ca_dir / POLICY_FILE
    path.write_text("\n".join(lines) + "\n")
    registrar = server.registrar
    verifier = TpmQuoteVerifier(load_policy(path), registrar.challenges, registrar.ca.clock)
    registrar.policy = dataclasses.replace(
        registrar.policy,
        attestation=AttestationPolicy(
            registrar.policy.attestation.mode,
            {**registrar.policy.attestation.verifiers, verifier.type: verifier},
        ),
    )
    return path


async def start_tpm_node(mesh: LocalMesh, index: int, token: str, demo_tpm: DemoTpm) -> MeshNode:
    """Enroll node-``index`` with its identity key in the TPM and a quote over the CA's
    challenge (once the swtpm is up, and the CA admits it), start it and add it to the
    mesh (at the end)."""
    assert mesh.ca_server is not None
    tpm = await demo_tpm.ready()
    await asyncio.to_thread(admit_swtpm, mesh.ca_server, mesh.ca_dir, tpm)
    directory = await mesh.enroll(
        index, token=token, identity_key=tpm.identity_uri, attest=tpm.attest
    )
    # It reads enrollment.json: its identity key and attesting TPM are the ones above.
    node = await asyncio.to_thread(MeshNode.from_directory, directory)
    await node.start()
    mesh.nodes.append(node)
    return node
