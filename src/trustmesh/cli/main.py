"""The ``trustmesh`` command line.

Exit codes: 0 success, 1 failure, 2 usage error. A failure prints one line to stderr
and no traceback, unless ``--debug`` (or ``TRUSTMESH_DEBUG=1``) asks for it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click

from trustmesh import __version__
from trustmesh.errors import ProtocolError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


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
        return command


class _State:
    debug = False  # set per run by main() from TRUSTMESH_DEBUG, and by --debug


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", "-V", prog_name="trustmesh")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs on failure.")
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
    try:
        result = cli.main(args=argv, prog_name="trustmesh", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("trustmesh: aborted", err=True)
        sys.exit(EXIT_FAILURE)
    except click.ClickException as exc:  # usage errors and bad parameters
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("trustmesh: interrupted", err=True)
        sys.exit(130)
    except (ProtocolError, OSError, ValueError) as exc:
        _fail(exc)
    except Exception as exc:  # a bug: still one line unless --debug
        _fail(exc, prefix="internal error: ")
    sys.exit(result if isinstance(result, int) else EXIT_OK)


def _fail(exc: BaseException, prefix: str = "") -> None:
    if _State.debug:
        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) or type(exc).__name__
    click.echo(f"trustmesh: error: {prefix}{message}", err=True)
    sys.exit(EXIT_FAILURE)
