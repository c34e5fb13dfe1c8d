"""The ``trustmesh`` command line.

Exit codes: 0 success, 1 failure, 2 usage error, 130 interrupted (Ctrl-C; a service
stopped by SIGTERM exits 0). A failure prints one line to stderr and no traceback, unless
``--debug`` (anywhere on the command line) or ``TRUSTMESH_DEBUG=1`` asks for it.

Key passphrases come from ``--passphrase-file FILE`` (anywhere on the command line, as
``--debug``), then ``$TRUSTMESH_PASSPHRASE``, then ``$CREDENTIALS_DIRECTORY/passphrase``
(systemd's ``LoadCredential=passphrase:...``), then the terminal.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from trustmesh import __version__
from trustmesh import eventloop as event_loop
from trustmesh.cli import signals
from trustmesh.errors import ProtocolError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


# Subcommands load on use: a command pays only for its own imports (aiohttp, cedarpy...).
COMMANDS = {
    "keys": "trustmesh.cli.keys:keys",
    "botd": "trustmesh.cli.botd:botd",
    "psec": "trustmesh.cli.psec:psec",
    "catalyst": "trustmesh.cli.catalyst:catalyst",
    "ca": "trustmesh.cli.ca:ca",
    "enroll": "trustmesh.cli.enroll:enroll",
    "rotate": "trustmesh.cli.enroll:rotate",
    "node": "trustmesh.cli.node:node",
    "brc103": "trustmesh.cli.brc103:brc103",
    "demo": "trustmesh.cli.demo:demo",
    "sim": "trustmesh.cli.sim:sim",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command)
        _accept_debug(command)
        _accept_passphrase_file(command)
        return command


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _State.debug = True
        logging.getLogger().setLevel(logging.DEBUG)  # the root group configured it already


def _debug_option() -> click.Option:
    return click.Option(
        ["--debug"],
        is_flag=True,
        expose_value=False,
        is_eager=True,  # before other options' checks, whose failures it should explain
        callback=_set_debug,
        help="Show tracebacks and debug logs on failure (anywhere on the command line).",
    )


def _accept_debug(command: click.Command) -> None:
    """Give ``command`` and every subcommand under it the global ``--debug`` flag, so
    ``trustmesh keys show x --debug`` means what ``trustmesh --debug keys show x`` does."""
    if not any(isinstance(p, click.Option) and "--debug" in p.opts for p in command.params):
        command.params.append(_debug_option())
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_debug(sub)


KEY_FILE_OPTION_HELP = (
    "Read key passphrases from this file (mode 0600; one trailing newline is dropped)."
    " Passphrases come from --passphrase-file, then $TRUSTMESH_PASSPHRASE, then"
    " $CREDENTIALS_DIRECTORY/passphrase (systemd LoadCredential=), then the terminal."
)


def _set_passphrase_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """A subcommand's ``--passphrase-file``: only when given (the root's, or an outer
    group's, stays otherwise)."""
    if value is not None:
        from trustmesh.keystore.filestore import use_passphrase_file

        use_passphrase_file(value)


def _set_root_passphrase_file(
    ctx: click.Context, param: click.Parameter, value: Path | None
) -> None:
    """The root's ``--passphrase-file``, set (or cleared) at the start of every run."""
    from trustmesh.keystore.filestore import use_passphrase_file

    use_passphrase_file(value)


def _passphrase_file_option(
    callback: Callable[[click.Context, click.Parameter, Path | None], None],
) -> click.Option:
    return click.Option(
        ["--passphrase-file"],
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="FILE",
        expose_value=False,
        callback=callback,
        help=KEY_FILE_OPTION_HELP,
    )


def _accept_passphrase_file(command: click.Command) -> None:
    """Give ``command`` and every subcommand under it the global ``--passphrase-file``,
    before or after the subcommand, as ``--debug``; read only when a passphrase is
    needed (trustmesh.keystore.filestore.configured_passphrase)."""
    if not any(
        isinstance(p, click.Option) and "--passphrase-file" in p.opts for p in command.params
    ):
        command.params.append(_passphrase_file_option(_set_passphrase_file))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_passphrase_file(sub)


class _State:
    debug = False  # set per run by main() from TRUSTMESH_DEBUG, and by --debug


def debug_requested() -> bool:
    """Whether this run asked for debug output (--debug anywhere, or TRUSTMESH_DEBUG=1):
    a command that sets up its own logging (``ca serve``) keeps the DEBUG level then."""
    return _State.debug


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", "-V", prog_name="trustmesh")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs on failure.")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    expose_value=False,
    callback=_set_root_passphrase_file,
    help=KEY_FILE_OPTION_HELP,
)
def cli(debug: bool) -> None:
    """trustmesh: zero-trust peer-to-peer security.

    Keys and peer IDs, authenticated channels (BOTD #2), mTLS peering (Catalyst),
    datagram security negotiation (PSEC), a mesh PKI and BRC-103 mutual authentication.

    Start with `trustmesh demo`, or `trustmesh keys generate --help`.
    """
    if debug:
        _State.debug = True
    logging.basicConfig(
        level=logging.DEBUG if _State.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and map every outcome to an exit code."""
    _State.debug = os.environ.get("TRUSTMESH_DEBUG", "") not in ("", "0")
    signals.reset()
    try:
        with event_loop.installed():  # uvloop when installed (trustmesh[fast])
            result = cli.main(args=argv, prog_name="trustmesh", standalone_mode=False)
    except click.exceptions.Abort as exc:
        # Click turns Ctrl-C (KeyboardInterrupt) into Abort; only a refused prompt or
        # an end of input is a plain abort.
        if isinstance(exc.__cause__, KeyboardInterrupt):
            click.echo("trustmesh: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        click.echo("trustmesh: aborted", err=True)
        sys.exit(EXIT_FAILURE)
    except click.ClickException as exc:  # usage errors and bad parameters
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("trustmesh: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except (ProtocolError, OSError, ValueError) as exc:
        _fail(exc)
    except Exception as exc:  # a bug: still one line unless --debug
        _fail(exc, prefix="internal error: ")
    if signals.interrupted():  # a long-running command stopped cleanly by Ctrl-C
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(result if isinstance(result, int) else EXIT_OK)


def _fail(exc: BaseException, prefix: str = "") -> None:
    if _State.debug:
        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) or type(exc).__name__
    click.echo(f"trustmesh: error: {prefix}{message}", err=True)
    sys.exit(EXIT_FAILURE)
