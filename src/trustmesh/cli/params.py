"""Parameter types shared by the CLI's commands."""

from __future__ import annotations

from typing import Any

import click


class HostPort(click.ParamType):  # type: ignore[type-arg]
    """HOST:PORT, [IPv6]:PORT, or HOST alone (the command's default port)."""

    name = "HOST:PORT"

    def __init__(self, default_port: int) -> None:
        self.default_port = default_port

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value)
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
