"""py-libp2p peer-ID worker; runs only under the ``.venv-libp2p`` interpreter that
tests/interop/test_psec_peer_ids_pylibp2p.py creates (never imported by the tests).

Protocol on stdin/stdout, one JSON object a line each way.  A request is
``{"type": T, "key": HEX}``; the answer is ``{"peer_id": BASE58, "protobuf": HEX}``
(py-libp2p's ``ID.from_pubkey(key).to_base58()`` and ``key.serialize()``), or
``{"error": TEXT}``.  ``T`` is one of

``secp256k1``
    ``Secp256k1PublicKey.from_bytes(key)``, key a SEC1 point (33 or 65 bytes);
``ed25519``
    ``Ed25519PublicKey.from_bytes(key)``, key the 32 raw bytes;
``ecdsa``
    ``ECCPublicKey.from_bytes(key, "P-256")``, key a SEC1 P-256 point (py-libp2p's only
    NIST-curve key class);
``protobuf``
    ``deserialize_public_key(key)``, key a libp2p ``PublicKey`` protobuf.

End of input (or a line ``quit``) exits.  This file must import nothing from trustmesh:
py-libp2p needs a protobuf runtime older than the project's.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any


def _load() -> dict[str, Callable[[bytes], Any]]:
    # ``libp2p/__init__.py`` imports the whole stack (trio, aioquic, multiaddr, noise,
    # ...), none of which the key and peer-ID modules use.  Register an empty package
    # with the installed directory as its path, so only the submodules below are loaded
    # (``libp2p.peer`` and ``libp2p.crypto`` import nothing from the package itself).
    spec = importlib.util.find_spec("libp2p")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("py-libp2p is not installed in this interpreter")
    package = types.ModuleType("libp2p")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["libp2p"] = package

    from libp2p.crypto.ecc import ECCPublicKey  # type: ignore[import-not-found]
    from libp2p.crypto.ed25519 import Ed25519PublicKey  # type: ignore[import-not-found]
    from libp2p.crypto.secp256k1 import Secp256k1PublicKey  # type: ignore[import-not-found]
    from libp2p.crypto.serialization import (  # type: ignore[import-not-found]
        deserialize_public_key,
    )

    return {
        "secp256k1": Secp256k1PublicKey.from_bytes,
        "ed25519": Ed25519PublicKey.from_bytes,
        "ecdsa": lambda data: ECCPublicKey.from_bytes(data, "P-256"),
        "protobuf": deserialize_public_key,
    }


def _answer(parsers: dict[str, Callable[[bytes], Any]], id_of: Any, line: str) -> dict[str, str]:
    try:
        request = json.loads(line)
        key = parsers[request["type"]](bytes.fromhex(request["key"]))
        return {
            "peer_id": str(id_of(key).to_base58()),
            "protobuf": bytes(key.serialize()).hex(),
        }
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    parsers = _load()
    from libp2p.peer.id import ID  # type: ignore[import-not-found]

    for line in sys.stdin:
        if line.strip() == "quit":
            break
        if not line.strip():
            continue
        sys.stdout.write(json.dumps(_answer(parsers, ID.from_pubkey, line)) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
