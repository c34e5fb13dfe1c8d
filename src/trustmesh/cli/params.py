"""Parameter types shared by the CLI's commands."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import click


class HostPort(click.ParamType):  # type: ignore[type-arg]
    """HOST:PORT, [IPv6]:PORT, or HOST alone (the command's default port).

    A bare port (``20945``) is refused: it would otherwise be read as a host name (an
    IPv4 address in inet_aton's short form), and dial somewhere unexpected.
    """

    name = "HOST:PORT"

    def __init__(self, default_port: int) -> None:
        self.default_port = default_port

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value)
        if text.isdigit():
            self.fail(
                f"expected HOST:PORT, got a bare port {text!r} (for this machine:"
                f" 127.0.0.1:{text})",
                param,
                ctx,
            )
        host, sep, port = text.rpartition(":")
        if text.startswith("[") and "]" in text:
            host, _, rest = text[1:].partition("]")
            sep, port = (":", rest[1:]) if rest.startswith(":") else ("", "")
        elif not sep or ":" in host:  # no port, or a bare IPv6 address
            host, port = text, ""
        try:
            number = int(port) if port else self.default_port
        except ValueError:
            self.fail(f"bad port in {text!r}", param, ctx)
        if not host or not 0 < number < 65536:
            self.fail(f"expected HOST:PORT, got {text!r}", param, ctx)
        return host, number


def https_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the CA API's URL, or None: the API is HTTPS only, and an
    http:// URL would otherwise fail later as an obscure TLS or protocol error."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        return f"the CA API is HTTPS only: give https://HOST:PORT, not {url!r}"
    if not parts.hostname:
        return f"no host in {url!r}: give https://HOST:PORT"
    return None


class HttpsUrl(click.ParamType):  # type: ignore[type-arg]
    """An ``https://`` URL (the CA API's): any other scheme is a usage error."""

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        problem = https_url_problem(str(value))
        if problem is not None:
            self.fail(problem, param, ctx)
        return str(value)


class Duration(click.ParamType):  # type: ignore[type-arg]
    """A duration: a number with a unit, s, m, h or d (``90s``, ``30m``, ``72h``, ``7d``)."""

    name = "DURATION"
    UNITS: ClassVar[dict[str, int]] = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        unit = text[-1:] if text[-1:] in self.UNITS else ""
        number = text[: -len(unit)] if unit else text
        try:
            amount = float(number)
        except ValueError:
            self.fail(f"expected a duration like 30m, 1h or 7d, got {value!r}", param, ctx)
        if not unit:
            self.fail(f"give a unit (s, m, h or d) in {value!r}", param, ctx)
        if amount <= 0:
            self.fail(f"a duration must be positive, got {value!r}", param, ctx)
        return timedelta(seconds=amount * self.UNITS[unit])


class Seconds(Duration):
    """Seconds as a plain number (``60``), or a duration with a unit (``30s``, ``5m``)."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip().lower()
        if text[-1:] not in self.UNITS:
            text += "s"
        return super().convert(text, param, ctx).total_seconds()


class Address(click.ParamType):  # type: ignore[type-arg]
    """``HOST:PORT`` kept as text (``[::1]:7400`` for IPv6); port 0 only if ``any_port``."""

    name = "HOST:PORT"

    def __init__(self, *, any_port: bool = False) -> None:
        self.any_port = any_port

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from trustmesh.mesh.link import split_address

        try:
            split_address(str(value), any_port=self.any_port)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


# Options every `trustmesh node` command that works on a node directory shares.
node_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="The node directory (`trustmesh node init` wrote it).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
