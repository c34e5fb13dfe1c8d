"""``D/ca.toml``: the settings ``trustmesh ca serve --dir D`` runs with, kept with the CA.

``ca init`` writes it with every ``ca serve`` policy and limit option at its default,
each under a comment; ``ca serve`` reads it when it exists. An option given on the
command line overrides the file's value (click's parameter source tells the two apart);
a key the file leaves out takes the option's default. Without the file (a CA directory
made before it existed) ``ca serve`` runs on its flags alone, as it always did. Every
key is in docs/config.md.
"""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path
from typing import Any

import click
import tomli_w
from click.core import ParameterSource

from trustmesh.cli.limits import flag_of
from trustmesh.io.limits import LIMIT_FIELDS, LIMIT_HELP, ResourcePolicy, policy_from
from trustmesh.keystore.filestore import write_durably
from trustmesh.pki.ca import MAX_NODE_VALIDITY, MIN_NODE_VALIDITY
from trustmesh.pki.errors import PkiError

CA_CONFIG_FILE = "ca.toml"
LIMITS_TABLE = "limits"

# Every `ca serve` option a ca.toml may set (its parameter name is the key), in the
# file's order, with what it means: the comment above its line in the file.
SERVE_KEYS: dict[str, str] = {
    "host": "The address to serve on.",
    "port": "The port to serve on (0: any free port).",
    "san": "DNS names or addresses clients use to reach this server, for its certificate"
    " (empty: host; required when host is 0.0.0.0 or ::).",
    "allow": "Only node_ids matching one of these shell patterns may enroll (empty: any).",
    "max_nodes": "Cap on nodes with a valid certificate (unset: no cap).",
    "attestation": "Whether nodes must send an attestation a verifier accepts, at enrollment"
    ' and at every renewal: "none" or "required".',
    "attestation_policy": "A TPM attestation policy file (docs/protocols/attestation.md),"
    " relative to this directory; it enables the tpm_quote verifier (unset: none).",
    "validity": 'Node certificate lifetime, 1h to 7d ("72h", "3d").',
    "bootstrap": "Bootstrap peers (HOST:PORT) told to enrolled nodes.",
    "gossip_fanout": "The gossip fanout told to enrolled nodes (1 to 64).",
    "crl_url": "The CRL URL told to nodes (unset: this server's /v1/crl).",
    "rate": "Requests per second per client on enroll, rotate and revoke.",
    "burst": "Requests per client in a burst on enroll, rotate and revoke.",
    "metrics": "Also serve Prometheus GET /metrics on this plain-HTTP HOST:PORT, for a local"
    " scraper (unset: only on the API, for admins; docs/metrics.md).",
    "log_level": 'The least level of the JSON log lines on stderr: "debug", "info" or'
    ' "warning" (--debug, or TRUSTMESH_DEBUG=1, makes it "debug").',
}
# What a key without a default shows, commented out.
EXAMPLES: dict[str, object] = {
    "max_nodes": 1000,
    "attestation_policy": "tpm.toml",
    "crl_url": "https://ca.example.net:8443/v1/crl",
    "metrics": "127.0.0.1:9465",
}

HEADER = """\
# trustmesh CA settings: what `trustmesh ca serve --dir D` runs with, D being the
# directory of this file. `trustmesh ca init` wrote it with every default; edit it to
# keep the CA's policy with the CA. A flag given to `ca serve` overrides the value here
# for that run (a list flag such as --san, given once, replaces the whole list); a key
# left out or commented out takes the flag's default. An unknown key is an error.
# Every key: docs/config.md.
"""


class CaConfigError(PkiError):
    """``ca.toml`` cannot be read, or holds an unknown key or a bad value; the message
    names the file and the key."""


def write_ca_config(directory: Path, serve: click.Command) -> Path | None:
    """Write ``directory/ca.toml`` with the defaults of ``serve``'s options; None (and
    nothing written) when the file exists already: it is the operator's."""
    path = directory / CA_CONFIG_FILE
    if path.exists():
        return None
    write_durably(path, ca_config_text(serve).encode(), mode=0o644)
    return path


def ca_config_text(serve: click.Command) -> str:
    """The file ``ca init`` writes: every key at its default, each under its meaning."""
    params = _options(serve)
    ctx = click.Context(serve)
    parts = [HEADER]
    for key, meaning in SERVE_KEYS.items():
        param = params[key]
        default = _default(ctx, param)
        line = tomli_w.dumps({key: EXAMPLES[key] if default is None else default})
        comment = _comment(f"{meaning} Flag: {param.opts[0]}.")
        parts.append(comment + ("# " + line if default is None else line))
    parts.append(
        f"[{LIMITS_TABLE}]\n"
        + _comment(
            "The resource policy of the API's listener: what clients may cost (docs/limits.md)."
        )
    )
    defaults = ResourcePolicy()
    for name in LIMIT_FIELDS:
        meaning = f"{LIMIT_HELP[name][:1].upper()}{LIMIT_HELP[name][1:]}"
        comment = _comment(f"{meaning}. Flag: {flag_of(name)}.")
        parts.append(comment + tomli_w.dumps({name: getattr(defaults, name)}))
    return "\n".join(parts)


def load_ca_config(directory: Path) -> dict[str, tuple[str, Any]] | None:
    """The values in ``directory/ca.toml`` by option name, each with its key as the file
    names it (``limits.max_connections``); None when there is no file."""
    path = directory / CA_CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CaConfigError(f"cannot read {path}: {exc}") from None
    found: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        if key == LIMITS_TABLE:
            if not isinstance(value, dict):
                raise CaConfigError(f"{path}: {LIMITS_TABLE} must be a table ([{LIMITS_TABLE}])")
            for name, limit in value.items():
                if name not in LIMIT_FIELDS:
                    raise CaConfigError(
                        f"{path}: unknown key '{LIMITS_TABLE}.{name}'"
                        f" (known: {', '.join(LIMIT_FIELDS)}; docs/limits.md)"
                    )
                found[name] = (f"{LIMITS_TABLE}.{name}", limit)
        elif key in SERVE_KEYS:
            found[key] = (key, value)
        else:
            known = ", ".join([*SERVE_KEYS, f"[{LIMITS_TABLE}]"])
            raise CaConfigError(f"{path}: unknown key {key!r} (known: {known}; docs/config.md)")
    return found


def apply_ca_config(ctx: click.Context, command: click.Command) -> None:
    """Set ``ctx.params`` from ``ca.toml`` in the ``directory`` parameter's directory,
    for every option not given on the command line."""
    directory: Path = ctx.params["directory"]
    values = load_ca_config(directory)
    if not values:
        return
    path = directory / CA_CONFIG_FILE
    params = _options(command)
    limits: dict[str, Any] = {}
    for name, (key, raw) in values.items():
        source = ctx.get_parameter_source(name)
        if source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue  # given on the command line: it wins
        param = params[name]
        if name in LIMIT_FIELDS:
            try:
                policy_from({name: raw})
            except (TypeError, ValueError) as exc:
                raise CaConfigError(f"{path}: {key}: {exc}") from None
            limits[name] = raw
        elif param.multiple:
            if not isinstance(raw, list):
                raise CaConfigError(f"{path}: {key} must be a list, like {key} = [...]")
        elif isinstance(raw, bool | list | dict):
            raise CaConfigError(f"{path}: {key} must be a string or a number, not {raw!r}")
        if name == "attestation_policy" and isinstance(raw, str):
            raw = str(directory / raw)  # relative to the CA directory; an absolute path stays
        try:
            value = param.type_cast_value(ctx, raw)
        except click.BadParameter as exc:
            raise CaConfigError(f"{path}: {key}: {exc.message}") from None
        if name == "validity" and not MIN_NODE_VALIDITY <= value <= MAX_NODE_VALIDITY:
            raise CaConfigError(f"{path}: validity must be between 1h and 7d, not {raw!r}")
        ctx.params[name] = value
    try:
        policy_from(limits).check_operator_values()
    except ValueError as exc:
        raise CaConfigError(f"{path}: [{LIMITS_TABLE}]: {exc}") from None


class ConfiguredServe(click.Command):
    """``ca serve``: its options' values from ``D/ca.toml`` where the command line
    gives none."""

    def invoke(self, ctx: click.Context) -> Any:
        apply_ca_config(ctx, self)
        return super().invoke(ctx)


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name}


def _default(ctx: click.Context, param: click.Option) -> object:
    """An option's default as TOML writes it (None: it has none)."""
    default = param.get_default(ctx, call=True)
    if param.multiple:
        return list(default) if isinstance(default, list | tuple) else []
    if not isinstance(default, str | int | float):
        return None  # None, or click's own "unset" marker
    return default


def _comment(text: str) -> str:
    lines = textwrap.wrap(text, width=88, break_long_words=False, break_on_hyphens=False)
    return "".join(f"# {line}\n" for line in lines)
