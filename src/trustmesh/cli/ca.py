"""``trustmesh ca``: the mesh CA, run locally on its directory."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography.hazmat.primitives import serialization

from trustmesh.api.ratelimit import DEFAULT_BURST, DEFAULT_RATE, RateLimiter
from trustmesh.cli.backup import ca_backup
from trustmesh.cli.ca_config import CA_CONFIG_FILE, ConfiguredServe, write_ca_config
from trustmesh.cli.limits import limit_options, pop_policy
from trustmesh.cli.main import debug_requested
from trustmesh.cli.output import emit, emit_lines, human_value, jsonl_option, serial_text, table
from trustmesh.cli.params import Address, Duration
from trustmesh.cli.signals import stop_on_signals
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.keystore.filestore import passphrase_from_env_or_tty, save_key_file, write_durably
from trustmesh.pki.attestation import AttestationPolicy, installed_verifiers
from trustmesh.pki.ca import (
    MAX_ADMIN_TOKEN_TTL,
    MAX_ADMIN_VALIDITY,
    MAX_NODE_VALIDITY,
    MAX_TOKEN_TTL,
    MIN_ADMIN_TOKEN_TTL,
    MIN_ADMIN_VALIDITY,
    MIN_NODE_VALIDITY,
    MIN_TOKEN_TTL,
    REASONS,
    CertificateAuthority,
    check_node_id,
    parse_serial,
    token_hash,
)
from trustmesh.pki.challenge import Challenges
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.errors import PkiError
from trustmesh.pki.store import SqliteStore, admin_token_id
from trustmesh.pki.stores import (
    DB_ENV,
    POSTGRES_SCHEMES,
    mark_moved_to_postgresql,
    open_store,
)
from trustmesh.pki.tpm_verifier import TPM_QUOTE, TpmQuoteVerifier
from trustmesh.tpm.policy import load_policy

if TYPE_CHECKING:
    from trustmesh.api.ca_server import CaServer as CaServerType

LOG_LEVELS = ("debug", "info", "warning")  # as `node run --log-level` takes them

DIR_OPTION = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The CA directory (ca.crt, the encrypted keys, ca.db).",
)


def _remember_db(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta["ca_db"] = value or None


DB_OPTION = click.option(
    "--db",
    envvar=DB_ENV,
    show_envvar=True,
    metavar="URI",
    expose_value=False,
    callback=_remember_db,
    help="Keep the CA's records in this PostgreSQL database (postgresql://...) instead of"
    " D/ca.db, so that several `ca serve` replicas share them. Put the password in"
    " PGPASSFILE (~/.pgpass), not in the URI; or give the whole URI in the environment.",
)


def _db() -> str | None:
    """The ``--db`` of the command being run (None: D/ca.db)."""
    value = click.get_current_context().meta.get("ca_db")
    return value if isinstance(value, str) else None


def _open(directory: Path, passphrase: bytes | None = None) -> CertificateAuthority:
    if passphrase is None:
        passphrase = passphrase_from_env_or_tty(directory, confirm=False)
    ca = CertificateAuthority(directory, passphrase, db=_db())
    for warning in ca.expiry_warnings():  # loudly, on every command
        click.echo(f"trustmesh: WARNING: {warning}", err=True)
    return ca


def check_node_id_option(node_id: str) -> None:
    try:
        check_node_id(node_id)
    except PkiError as exc:
        raise click.BadParameter(str(exc), param_hint="'--node-id'") from None


@click.group()
def ca() -> None:
    """The mesh CA: a root and an issuing CA, node certificates, revocation.

    The CA keys are encrypted with the passphrase from $TRUSTMESH_PASSPHRASE (or the
    terminal). Give nodes D/ca.crt, the root they trust.
    """


ca.add_command(ca_backup)


@ca.command()
@DIR_OPTION
@DB_OPTION
@click.option("--name", default="trustmesh mesh CA", show_default=True, help="CA name (its CN).")
@click.option(
    "--root-key-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the root key here instead of D/root.key (outside D, e.g. removable media),"
    " to keep it offline: the CA serves, issues, rotates, revokes and signs CRLs without it;"
    " only `ca renew` needs it (docs/operations.md).",
)
@click.option(
    "--issuing-key",
    metavar="PKCS11_URI",
    help="Make the issuing key on a PKCS#11 token (an HSM; SoftHSM2), where it stays:"
    " pkcs11:token=T;object=LABEL?pin-source=file:PIN_FILE[&module-path=LIB]. D holds"
    " only its URI (issuing-key.uri); every replica that reaches the token signs with it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def init(
    directory: Path, name: str, root_key_out: Path | None, issuing_key: str | None, as_json: bool
) -> None:
    """Create a root and an issuing CA (P-256) in an empty directory.

    Both keys are encrypted with the passphrase, unless --issuing-key puts the issuing
    key on a PKCS#11 token. For a root kept offline, run this on an offline machine
    with --root-key-out, move that file to offline storage, and copy D (without any
    root key) to the CA server.

    It also writes D/ca.toml: the settings of `ca serve`, every one at its default, for
    you to edit (docs/config.md).
    """
    passphrase = passphrase_from_env_or_tty(directory, confirm=True)
    with CertificateAuthority.init(
        directory,
        passphrase,
        name=name,
        root_key_out=root_key_out,
        db=_db(),
        issuing_key=issuing_key,
    ) as authority:
        write_ca_config(directory, serve)  # ca serve's settings, at their defaults
        root, issuing = authority.root_cert, authority.issuing_cert
        emit(
            {
                "dir": str(directory),
                "ca_cert": str(directory / "ca.crt"),
                "config": str(directory / CA_CONFIG_FILE),
                "root_key": str(directory / "root.key" if root_key_out is None else root_key_out),
                "issuing_key": issuing_key or str(directory / "issuing.key"),
                "root_expires": root.not_valid_after_utc.isoformat(),
                "issuing_expires": issuing.not_valid_after_utc.isoformat(),
            },
            as_json=as_json,
        )


@ca.command(name="list")
@DIR_OPTION
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"certificates": [...]}.')
@jsonl_option("One JSON object per certificate, one a line.")
def list_certificates(directory: Path, as_json: bool, as_jsonl: bool) -> None:
    """Every certificate the CA issued: node, admin or server, and its state (valid,
    expired, revoked), with its lineage: the serial it replaced at a rotation
    (``replaces``) and the one that replaced it (``replaced_by``).

    Serials are shown as openssl shows them (uppercase hex); --jsonl keeps lowercase hex.
    """
    with _open(directory) as authority:
        now = datetime.now(UTC)
        issued = authority.store.all()
        successors = {c.replaces: c.serial_hex for c in issued if c.replaces is not None}
        rows: list[dict[str, Any]] = []
        for cert in issued:
            state = "revoked" if cert.revoked_at else "expired" if cert.not_after < now else "valid"
            row = {
                "serial": cert.serial_hex,
                "node_id": cert.node_id,
                "role": cert.role,
                "not_before": cert.not_before.isoformat(),
                "not_after": cert.not_after.isoformat(),
                "state": state,
                "reason": cert.reason,
                "replaces": cert.replaces_hex,
                "replaced_by": successors.get(cert.serial),
            }
            rows.append(row)
    if _emitted_as_json(rows, "certificates", as_json, as_jsonl):
        return
    header = ("SERIAL", "NODE_ID", "ROLE", "STATE", "NOT_AFTER", "REPLACES", "REPLACED_BY")
    shown = [
        (
            serial_text(r["serial"]),
            r["node_id"],
            r["role"],
            r["state"],
            r["not_after"],
            serial_text(r["replaces"]),
            serial_text(r["replaced_by"]),
        )
        for r in rows
    ]
    emit({}, as_json=False, human=table(header, shown) if rows else "no certificates")


@ca.command()
@DIR_OPTION
@DB_OPTION
@click.option("--serial", help="Revoke this certificate (hex serial, as `ca list` shows it).")
@click.option("--node-id", help="Revoke every certificate of this node.")
@click.option(
    "--reason",
    type=click.Choice(sorted(REASONS)),
    default="unspecified",
    show_default=True,
    help="RFC 5280 reason.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def revoke(
    directory: Path, serial: str | None, node_id: str | None, reason: str, as_json: bool
) -> None:
    """Revoke by --serial or by --node-id; the next CRL lists it."""
    if (serial is None) == (node_id is None):
        raise click.UsageError("give --serial or --node-id (one of them)")
    number = None
    if serial is not None:
        try:
            number = parse_serial(serial)
        except PkiError:
            raise click.BadParameter("not a hex serial", param_hint="'--serial'") from None
    with _open(directory) as authority:
        revoked = authority.revoke(serial=number, node_id=node_id, reason=reason)
        if number is not None:
            mine = [r for r in [authority.store.get(number)] if r is not None]
        else:
            assert node_id is not None
            mine = authority.store.by_node(node_id)
        # Revoking again is not an error, but it must not look like news.
        before = [r for r in mine if r.revoked_at is not None and r.serial not in revoked]
        result: dict[str, object] = {
            "revoked": [format(s, "x") for s in revoked],
            "reason": reason,
            "already_revoked": [r.serial_hex for r in before],
        }
        if revoked:
            human = f"revoked {', '.join(serial_text(s) for s in revoked)} ({reason})"
            if before:
                human += f"; already revoked: {', '.join(serial_text(r.serial) for r in before)}"
        else:
            # The serial as given (the openssl form follows, after "already revoked:").
            whom = (
                f"certificate {serial}" if number is not None else f"every certificate of {node_id}"
            )
            earlier = "; ".join(
                f"{serial_text(r.serial)} on {r.revoked_at:%Y-%m-%d %H:%M} UTC ({r.reason})"
                for r in before
                if r.revoked_at is not None
            )
            human = f"{whom} was already revoked: {earlier}" if before else "nothing to revoke"
        emit(result, as_json=as_json, human=human)


@ca.command()
@DIR_OPTION
@DB_OPTION
@click.option("--force", is_flag=True, help="Renew even when more than 30 days are left.")
@click.option(
    "--root-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The root key, when it is kept offline (`ca init --root-key-out`); default D/root.key.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def renew(directory: Path, force: bool, root_key: Path | None, as_json: bool) -> None:
    """Certify the root and issuing CA again (same keys) before they expire.

    This needs the root key: D/root.key, or --root-key PATH where a root kept offline is
    brought back for the renewal. Everything issued so far keeps chaining. Restart
    `ca serve` afterwards, and hand nodes the new D/ca.crt before the old one expires.
    """
    passphrase = passphrase_from_env_or_tty(directory, confirm=False)
    with _open(directory, passphrase) as authority:
        renewed = authority.renew(passphrase, force=force, root_key=root_key)
        emit(
            {
                "renewed": renewed,
                "root_expires": authority.root_cert.not_valid_after_utc.isoformat(),
                "issuing_expires": authority.issuing_cert.not_valid_after_utc.isoformat(),
            },
            as_json=as_json,
        )


@ca.group()
def token() -> None:
    """Enrollment tokens: single-use, short-lived, bound to one node_id."""


@token.command(name="create")
@DIR_OPTION
@DB_OPTION
@click.option("--node-id", required=True, help="The node this token may enroll (a DNS name).")
@click.option(
    "--ttl",
    type=Duration(),
    default="1h",
    show_default=True,
    help="How long the token stays usable (1m to 30d).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def token_create(directory: Path, node_id: str, ttl: timedelta, as_json: bool) -> None:
    """Make an enrollment token and print it (only its hash is kept).

    Hand it to the node over a safe channel; `trustmesh enroll --token` spends it.
    """
    if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
        raise click.BadParameter("between 1m and 30d", param_hint="'--ttl'")
    check_node_id_option(node_id)
    with _open(directory) as authority:
        now = datetime.now(UTC)
        secret = authority.create_token(node_id, ttl=ttl, now=now)
        data = {"token": secret, "node_id": node_id, "expires_at": (now + ttl).isoformat()}
        emit(data, as_json=as_json, human=secret)


@ca.group(name="admin-token")
def admin_token() -> None:
    """Bearer tokens for the admin API (POST /v1/revoke): they expire, and can be
    listed and revoked by id."""


@admin_token.command(name="create")
@DIR_OPTION
@DB_OPTION
@click.option("--label", default="admin", show_default=True, help="Who holds it (audit log).")
@click.option(
    "--ttl",
    type=Duration(),
    default="24h",
    show_default=True,
    help="How long the token is valid (1s to 90d): 2s, 10m, 24h, 7d.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def admin_token_create(directory: Path, label: str, ttl: timedelta, as_json: bool) -> None:
    """Make an admin bearer token and print it (only its hash is kept).

    Use it as `Authorization: Bearer TOKEN` on POST /v1/revoke. Once it expires (or is
    revoked with `ca admin-token revoke ID`) the API answers it with 401.
    """
    if not MIN_ADMIN_TOKEN_TTL <= ttl <= MAX_ADMIN_TOKEN_TTL:
        raise click.BadParameter("between 1s and 90d", param_hint="'--ttl'")
    with _open(directory) as authority:
        now = datetime.now(UTC)
        secret = authority.create_admin_token(label, ttl=ttl, now=now)
        data = {
            "token": secret,
            "id": admin_token_id(token_hash(secret)),
            "label": label,
            "expires_at": (now + ttl).replace(microsecond=0).isoformat(),
        }
        emit(data, as_json=as_json, human=secret)


@admin_token.command(name="list")
@DIR_OPTION
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"admin_tokens": [...]}.')
@jsonl_option("One JSON object per token, one a line.")
def admin_token_list(directory: Path, as_json: bool, as_jsonl: bool) -> None:
    """Every admin token: its id, label, expiry and state (valid, expired, revoked).
    The tokens themselves are not kept, so they cannot be shown."""
    rows: list[dict[str, Any]] = []
    with _open(directory) as authority:
        now = datetime.now(UTC)
        for known in authority.store.admin_tokens():
            row = {
                "id": known.id,
                "label": known.label,
                "created_at": known.created_at.isoformat(),
                "expires_at": known.expires_at.isoformat(),
                "revoked": known.revoked_at is not None,
                "revoked_at": None if known.revoked_at is None else known.revoked_at.isoformat(),
                "state": known.state(now),
            }
            rows.append(row)
    if _emitted_as_json(rows, "admin_tokens", as_json, as_jsonl):
        return
    header = ("ID", "LABEL", "STATE", "CREATED_AT", "EXPIRES_AT", "REVOKED_AT")
    shown = [
        (r["id"], r["label"], r["state"], r["created_at"], r["expires_at"], r["revoked_at"])
        for r in rows
    ]
    emit({}, as_json=False, human=table(header, shown) if rows else "no admin tokens")


@admin_token.command(name="revoke")
@DIR_OPTION
@DB_OPTION
@click.argument("token_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def admin_token_revoke(directory: Path, token_id: str, as_json: bool) -> None:
    """Revoke the admin token with this ID (as `ca admin-token list` shows it)."""
    with _open(directory) as authority:
        newly = authority.revoke_admin_token(token_id)
        emit(
            {"id": token_id, "revoked": True, "already": not newly},
            as_json=as_json,
            human=f"revoked {token_id}" if newly else f"{token_id} was already revoked",
        )


@ca.command(name="admin-cert")
@DIR_OPTION
@DB_OPTION
@click.option("--name", required=True, help="The administrator's name (a DNS-style label).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where to write admin.key, admin.crt and ca.crt.",
)
@click.option(
    "--ttl",
    type=Duration(),
    default="90d",
    show_default=True,
    help="How long the certificate is valid (1s to 365d).",
)
@click.option("--no-encrypt", is_flag=True, help="Leave admin.key unencrypted.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def admin_cert(
    directory: Path, name: str, out: Path, ttl: timedelta, no_encrypt: bool, as_json: bool
) -> None:
    """Issue an admin client certificate (90 days unless --ttl) for the admin API.

    The key is made here and encrypted with $TRUSTMESH_PASSPHRASE unless --no-encrypt.
    Use it as `curl --cert admin.crt --key admin.key`. Once it expires, or is revoked
    (`ca revoke --serial`), the API answers it with 401.
    """
    if not MIN_ADMIN_VALIDITY <= ttl <= MAX_ADMIN_VALIDITY:
        raise click.BadParameter("between 1s and 365d", param_hint="'--ttl'")
    with _open(directory) as authority:
        out.mkdir(parents=True, exist_ok=True)
        key = PrivateKey.generate(KeyKind.P256)
        cert = authority.issue_admin(name, key.to_cryptography().public_key(), validity=ttl)
        passphrase = None if no_encrypt else passphrase_from_env_or_tty(out, confirm=True)
        save_key_file(key, out / "admin.key", passphrase)
        chain = [cert, authority.issuing_cert]
        write_durably(
            out / "admin.crt", b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        )
        write_durably(out / "ca.crt", authority.root_cert.public_bytes(serialization.Encoding.PEM))
        data = {
            "name": name,
            "serial": format(cert.serial_number, "x"),
            "cert": str(out / "admin.crt"),
            "key": str(out / "admin.key"),
            "not_after": cert.not_valid_after_utc.isoformat(),
        }
        emit(data, as_json=as_json)


@ca.command()
@DIR_OPTION
@DB_OPTION
@click.option("--pem", is_flag=True, help="PEM instead of DER.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write it here (default: stdout).",
)
def crl(directory: Path, pem: bool, out: Path | None) -> None:
    """Sign the current CRL (valid 24 h), for nodes that cannot reach the API."""
    with _open(directory) as authority:
        signed = authority.crl()
        data = signed.public_bytes(
            serialization.Encoding.PEM if pem else serialization.Encoding.DER
        )
        if out is None:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            out.write_bytes(data)


@ca.command()
@click.option(
    "--from",
    "source",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="The SQLite CA database to copy (D/ca.db). Stop `ca serve` on it first.",
)
@click.option(
    "--to",
    "target",
    envvar=DB_ENV,
    show_envvar=True,
    metavar="URI",
    required=True,
    help="The PostgreSQL database to copy it into (postgresql://...; it must hold no CA's"
    " records). The password from PGPASSFILE, or the whole URI from the environment.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def migrate(source: Path, target: str, as_json: bool) -> None:
    """Move a CA's records from SQLite to PostgreSQL, for CA replicas (docs/operations.md
    section 8): every certificate, token, admin token and audit entry, in one transaction.

    It then checks the copy: the same records on both sides (certificates, tokens, admin
    tokens, the audit, the revocation epoch) and the same CRL entries (serial, time,
    reason). It exits 1 if anything differs. Run the CA with `--db URI` afterwards, and
    keep ca.db as the backup it now is.

    \b
      trustmesh ca migrate --from ca/ca.db --to postgresql://ca@db.example.net/meshca
    """
    if not target.startswith(POSTGRES_SCHEMES):
        raise click.BadParameter("takes a PostgreSQL URI (postgresql://...)", param_hint="'--to'")
    postgres = open_store(source.parent, target)  # psycopg is an extra: imported only here
    from trustmesh.pki.pgstore import PostgresStore, compare_stores

    assert isinstance(postgres, PostgresStore)
    sqlite = SqliteStore(source)
    try:
        copied = postgres.import_records(sqlite)
        differences = compare_stores(sqlite, postgres)
    finally:
        sqlite.close()
        postgres.close()
    if differences:
        raise PkiError("the copy differs from the source: " + "; ".join(differences))
    mark_moved_to_postgresql(source.parent)
    emit(
        {"from": str(source), "copied": copied, "crl": "identical"},
        as_json=as_json,
    )


@ca.command()
@DIR_OPTION
@DB_OPTION
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help='One JSON document: {"entries": [...]}.')
@jsonl_option("One JSON object per entry, one a line, with its whole detail.")
def audit(directory: Path, limit: int, as_json: bool, as_jsonl: bool) -> None:
    """The audit log, newest first: issuance, enrollment, rotation, revocation, tokens,
    refused enrollments. The table shows each entry's detail in short (an attestation by
    its type); --jsonl shows it whole."""
    rows: list[dict[str, Any]] = []
    with _open(directory) as authority:
        for entry in authority.store.audit(limit):
            row = {
                "at": entry.at.isoformat(),
                "event": entry.event,
                "node_id": entry.node_id,
                "serial": entry.serial,
                "actor": entry.actor,
                "detail": entry.detail,
            }
            rows.append(row)
    if _emitted_as_json(rows, "entries", as_json, as_jsonl):
        return
    header = ("AT", "EVENT", "NODE_ID", "SERIAL", "ACTOR", "DETAIL")
    shown = [
        (
            r["at"],
            r["event"],
            r["node_id"],
            serial_text(r["serial"]),
            r["actor"],
            _short(r["detail"]),
        )
        for r in rows
    ]
    emit({}, as_json=False, human=table(header, shown) if rows else "no audit entries")


def _short(detail: dict[str, Any] | None) -> str:
    """An audit entry's detail for the table: ``k=v`` pairs, a nested value (an
    attestation and its evidence) by its type alone."""
    flat = {
        k: v.get("type", "...") if isinstance(v, dict) else v for k, v in (detail or {}).items()
    }
    return human_value(flat) if flat else "-"


@ca.command(cls=ConfiguredServe)
@DIR_OPTION
@DB_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8443, show_default=True)
@click.option(
    "--san",
    multiple=True,
    metavar="NAME",
    help="A DNS name or address clients use to reach this server, for its certificate "
    "(repeatable; default: --host; required with --host 0.0.0.0).",
)
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="PATTERN",
    help="Only node_ids matching one of these shell patterns may enroll (repeatable).",
)
@click.option("--max-nodes", type=click.IntRange(1), help="Cap on nodes with a valid certificate.")
@click.option(
    "--attestation",
    type=click.Choice(["none", "required"]),
    default="none",
    show_default=True,
    help="Whether nodes must send an attestation that a verifier accepts, at enrollment"
    " and at every renewal.",
)
@click.option(
    "--attestation-policy",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A TPM attestation policy (TOML: the PCRs to quote, the allowed values per device"
    " class, the EK CAs; docs/protocols/attestation.md). Enables the tpm_quote verifier.",
)
@click.option(
    "--validity",
    type=Duration(),
    default="72h",
    show_default=True,
    help="Node certificate lifetime (1h to 7d).",
)
@click.option(
    "--bootstrap",
    multiple=True,
    metavar="HOST:PORT",
    help="A bootstrap peer told to enrolled nodes (repeatable).",
)
@click.option("--gossip-fanout", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--crl-url", help="The CRL URL told to nodes (default: this server's /v1/crl).")
@click.option(
    "--rate",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_RATE,
    show_default=True,
    help="Requests per second per client on enroll, rotate and revoke.",
)
@click.option("--burst", type=click.IntRange(1), default=DEFAULT_BURST, show_default=True)
@click.option(
    "--metrics",
    "metrics",
    type=Address(any_port=True),
    help="Also serve Prometheus GET /metrics on this plain-HTTP HOST:PORT, for a local"
    " scraper (the API's own /metrics wants an admin; docs/metrics.md).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="The least level logged on stderr (--debug: debug).",
)
@click.option(
    "--jsonl", "--json", "as_json", is_flag=True, help="JSON lines on stdout (--json: the same)."
)
@limit_options
def serve(
    directory: Path,
    host: str,
    port: int,
    san: tuple[str, ...],
    allow: tuple[str, ...],
    max_nodes: int | None,
    attestation: str,
    attestation_policy: Path | None,
    validity: timedelta,
    bootstrap: tuple[str, ...],
    gossip_fanout: int,
    crl_url: str | None,
    rate: float,
    burst: int,
    metrics: str | None,
    log_level: str,
    as_json: bool,
    **limits: Any,
) -> None:
    """Serve the CA API over HTTPS until SIGINT or SIGTERM.

    \b
    POST /v1/enroll   token + CSR -> certificate, CA chain, mesh config
    POST /v1/enroll/challenge  a nonce for a TPM-attested enroll or rotate
    POST /v1/rotate   mTLS with the current certificate + CSR -> new certificate
    GET  /v1/crl      the signed CRL (DER; ?format=pem for PEM)
    POST /v1/revoke   admin: {serial | node_id, reason} -> 204
    GET  /v1/health   CA state and expiry warnings
    GET  /v1/openapi.json
    GET  /metrics     admin: Prometheus metrics (also on --metrics HOST:PORT, plain HTTP)

    Every request is logged on stderr as one JSON line (method, route, status, client
    identity, remote address, latency), with the CA's other log lines.

    The server's certificate is issued by this CA for --host, so
    `curl --cacert D/ca.crt https://HOST:PORT/v1/health` verifies.

    With --attestation-policy FILE, nodes may (or, with --attestation required, must)
    prove their TPM's state with a quote at enrollment and at every renewal:

    \b
      trustmesh ca serve --dir ca --attestation required --attestation-policy tpm.toml
      trustmesh node init ... --attest tpm:device:/dev/tpmrm0

    The --max-*, --*-timeout and rate flags bound what clients may cost: connections in
    total and per address, deadlines for TLS, request heads and bodies, keep-alive
    (docs/limits.md).

    D/ca.toml (written by `ca init`) keeps these settings with the CA: every option but
    --dir and --json is a key there ([limits] for the limits), and a flag given here
    overrides the file's value (docs/config.md).
    """
    resources = pop_policy(limits)
    if not MIN_NODE_VALIDITY <= validity <= MAX_NODE_VALIDITY:
        raise click.BadParameter("between 1h and 7d", param_hint="'--validity'")
    if not san and host in ("0.0.0.0", "::"):  # noqa: S104 (a check, not a bind)
        raise click.UsageError(f"serving on {host}: give the names clients use with --san")
    # Imported here: aiohttp costs every other `ca` command a quarter second otherwise.
    from trustmesh.api.ca_server import CaServer
    from trustmesh.mesh.link import split_address
    from trustmesh.node.logs import use_json_logs

    # The access log and the rest, one JSON object per line on stderr. This replaces the
    # logging the root group set up, so --debug (or TRUSTMESH_DEBUG) must be applied again.
    use_json_logs(logging.DEBUG if debug_requested() else getattr(logging, log_level.upper()))

    passphrase = passphrase_from_env_or_tty(directory, confirm=False)
    tpm_policy = None if attestation_policy is None else load_policy(attestation_policy)
    with _open(directory, passphrase) as authority:
        challenges = Challenges.for_directory(directory)
        verifiers = installed_verifiers()
        if tpm_policy is not None:
            verifiers[TPM_QUOTE] = TpmQuoteVerifier(tpm_policy, challenges, authority.clock)
        if attestation == "required" and not verifiers:
            raise click.UsageError(
                "--attestation required needs a verifier: give --attestation-policy FILE"
            )
        policy = EnrollmentPolicy(
            allow=allow,
            max_nodes=max_nodes,
            attestation=AttestationPolicy(
                mode="required" if attestation == "required" else "none",
                verifiers=verifiers,
            ),
            validity=validity,
        )
        settings = MeshSettings(bootstrap, gossip_fanout, crl_url)
        registrar = Registrar(authority, policy, settings, challenges=challenges)
        server = CaServer(
            registrar,
            passphrase,
            host,
            port,
            limiter=RateLimiter(rate, burst),
            names=san,
            policy=resources,
            metrics=None if metrics is None else split_address(metrics, any_port=True),
        )
        asyncio.run(_serve(server, as_json))


async def _serve(server: CaServerType, as_json: bool) -> None:
    stop = stop_on_signals()
    await server.start()
    try:
        registrar = server.registrar
        if registrar.settings.crl_url is None:  # now that the port is known
            registrar.settings = replace(registrar.settings, crl_url=f"{server.url}/v1/crl")
        directory = registrar.ca.directory
        started: dict[str, object] = {
            "listening": server.url,
            "ca_cert": str(directory / "ca.crt"),
            "warnings": registrar.ca.expiry_warnings(),
        }
        human = f"CA API on {server.url} (trust {directory / 'ca.crt'})"
        if server.metrics_server is not None:
            started["metrics"] = server.metrics_server.url
            human += f"; metrics on {server.metrics_server.url}"
        emit(started, as_json=as_json, human=human)
        await stop.wait()
    finally:
        await server.stop()
    emit({"stopped": server.url}, as_json=as_json, human="stopped")


def _emitted_as_json(
    rows: list[dict[str, object]], key: str, as_json: bool, as_jsonl: bool
) -> bool:
    """A listing in JSON: one document (``{key: rows}``) for --json, a line a row for
    --jsonl; False when neither was asked (the caller prints its table)."""
    if as_jsonl:
        emit_lines(rows)
    elif as_json:
        emit({key: rows}, as_json=True)
    return as_json or as_jsonl
