"""Key stores behind one ``Signer`` interface."""

from trustmesh.keystore.filestore import (
    PASSPHRASE_ENV,
    FileKeyStore,
    check_permissions,
    configured_passphrase,
    load_key_file,
    passphrase_from_env_or_tty,
    save_key_file,
    use_passphrase_file,
)
from trustmesh.keystore.pkcs8 import decode_private_key, encode_private_key
from trustmesh.keystore.signer import Signer

__all__ = [
    "PASSPHRASE_ENV",
    "FileKeyStore",
    "Signer",
    "check_permissions",
    "configured_passphrase",
    "decode_private_key",
    "encode_private_key",
    "load_key_file",
    "passphrase_from_env_or_tty",
    "save_key_file",
    "use_passphrase_file",
]
