"""What the CLI tests share: the installed ``trustmesh`` script and a clean environment.

Not a test module (no ``test_`` prefix); tests import it as ``clitools`` because the
pytest configuration puts ``tests/cli`` on the import path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def trustmesh_executable() -> str:
    """The console script of the venv running the tests, else the one on PATH."""
    beside = Path(sys.executable).parent / "trustmesh"
    if beside.exists():
        return str(beside)
    found = shutil.which("trustmesh")
    # `pip install -e .[test]` always installs the script; its absence is a setup bug.
    assert found is not None, "the trustmesh console script is not installed"
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any TRUSTMESH_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTMESH_")}
    env.update(extra)
    return env


TRUSTMESH = trustmesh_executable()


# The openssl command line's minimal config (none from the system): requests without
# prompts, and a "ca" extension section for self-signed CAs.
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

# An -extfile for a node certificate: CN and DNS SAN ``name``, server and client use.
LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:{name}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

P256 = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
