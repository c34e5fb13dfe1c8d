"""Long-running commands stop cleanly on SIGINT and SIGTERM.

A stop by SIGTERM is the ordinary way to end a service: exit 0. A stop by SIGINT is an
interrupt (Ctrl-C), and the shell convention for it is exit 130 (128 + SIGINT), which
:func:`trustmesh.cli.main.main` applies when :func:`interrupted` says so.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # main() imports this module: every command would pay for asyncio
    import asyncio


class _Received:
    sigint = False  # reset by main() on every run (tests run the CLI in-process)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (install it before anything can be interrupted)."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        _Received.sigint = True
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    return stop


def interrupted() -> bool:
    """Whether a handler of :func:`stop_on_signals` has seen SIGINT in this run."""
    return _Received.sigint


def reset() -> None:
    _Received.sigint = False
