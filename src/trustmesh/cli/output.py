"""How commands report: JSON or short human-readable lines.

``--json`` prints one JSON document for the command; ``--jsonl`` (commands that stream
events, and listings) one JSON object per line. Human output never shows Python reprs:
lists are joined with ", ", mappings are ``k=v`` pairs or nested lines, None is "-",
booleans are yes/no, tables have a header row, and certificate serials are printed as
``openssl x509 -serial`` prints them (:func:`serial_text`), so they can be grepped
across tools. JSON keeps its own forms (serials as lowercase hex).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import click

# Keys whose values are certificate serials (hex text or int), in human output.
SERIAL_KEYS = frozenset({"serial", "replaces", "replaced_by", "current_cert_serial"})

F = TypeVar("F", bound=Callable[..., Any])


def emit(
    data: Mapping[str, Any],
    *,
    as_json: bool,
    human: str | None = None,
    serials: Collection[str] = SERIAL_KEYS,
) -> None:
    """Print ``data`` as one JSON line, or ``human`` (default: aligned ``key  value``
    lines, :func:`key_values`, with the values of ``serials`` keys as openssl's)."""
    if as_json:
        sys.stdout.write(json.dumps(data, separators=(",", ":"), sort_keys=False) + "\n")
    elif human is not None:
        sys.stdout.write(human.rstrip("\n") + "\n")
    elif data:
        sys.stdout.write(key_values(data, serials=serials) + "\n")
    sys.stdout.flush()


def emit_lines(rows: Iterable[Mapping[str, Any]]) -> None:
    """``--jsonl``: each row as one JSON object on its own line."""
    for row in rows:
        emit(row, as_json=True)


def serial_text(serial: int | str | None) -> str:
    """A certificate serial as ``openssl x509 -serial -noout`` prints it: hex, uppercase,
    an even number of digits (a leading zero kept), e.g. ``0A1B2C``. ``serial`` is an
    int or hex text (``"a1b2c"``, ``0x``/colons allowed); None or "" is "-"."""
    if serial is None or serial == "":
        return "-"
    number = (
        serial if isinstance(serial, int) else int(serial.removeprefix("0x").replace(":", ""), 16)
    )
    if number < 0:
        return "-" + serial_text(-number)
    digits = format(number, "X")
    return "0" * (len(digits) % 2) + digits


def human_value(value: object, *, serial: bool = False) -> str:
    """One value for people: None "-", booleans yes/no, lists joined with ", " ("none"
    when empty), mappings as ``k=v`` pairs; a ``serial`` as :func:`serial_text`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return " ".join(_pairs(value)) or "none"
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(human_value(v, serial=serial) for v in value) or "none"
    if serial and isinstance(value, int | str):
        return serial_text(value)
    return str(value)


def _pairs(mapping: Mapping[Any, Any], prefix: str = "") -> list[str]:
    """``k=v`` for each entry; a nested mapping's entries as ``k.sub=v``."""
    pairs: list[str] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            pairs.extend(_pairs(value, prefix=f"{name}."))
        else:
            pairs.append(f"{name}={human_value(value, serial=str(key) in SERIAL_KEYS)}")
    return pairs


def key_values(
    data: Mapping[str, Any], *, serials: Collection[str] = SERIAL_KEYS, indent: str = ""
) -> str:
    """Aligned ``key  value`` lines; a non-empty mapping value as its own key's nested
    lines, indented under it."""
    width = max((len(str(k)) for k in data), default=0)
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            lines.append(f"{indent}{key}")
            lines.append(key_values(value, serials=serials, indent=indent + "  "))
        else:
            text = human_value(value, serial=key in serials)
            lines.append(f"{indent}{str(key).ljust(width)}  {text}".rstrip())
    return "\n".join(lines)


def table(
    header: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[int] = ()
) -> str:
    """A table for people: a header row, then one row each, columns aligned (two spaces
    between them; the columns numbered in ``right`` right-aligned). Cells are shown with
    :func:`human_value` (give serials as :func:`serial_text` already)."""
    cells = [list(header)] + [[human_value(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


def jsonl_option(
    help_text: str = "One JSON object per line (each row or event).",
) -> Callable[[F], F]:
    """``--jsonl`` (``as_jsonl``): one JSON object per line, for listings and streams."""
    return click.option("--jsonl", "as_jsonl", is_flag=True, help=help_text)


# For commands whose stdout is always JSON lines (events): --jsonl says so, and changes
# nothing.
jsonl_stream_option = click.option(
    "--jsonl",
    is_flag=True,
    expose_value=False,
    help="JSON lines on stdout, one object per event (the only format; the flag may be given).",
)


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[bytes | None]:
    """Lines of stdin (None at its end), read by a daemon thread with ``os.read``. Not
    through ``sys.stdin``: a thread blocked reading its buffer holds the buffer's lock,
    and the interpreter's shutdown then aborts (``_enter_buffered_busy``) when connect
    exits while stdin is still open (the channel closed, or --once is done)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put(item: bytes | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads any more
            return False
        return True

    def pump() -> None:
        pending = b""
        try:
            while chunk := os.read(0, 65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not put(line.rstrip(b"\r")):
                        return
        except OSError:
            pass  # stdin closed or unreadable: its end
        if pending:
            put(pending.rstrip(b"\r"))
        put(None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return queue
