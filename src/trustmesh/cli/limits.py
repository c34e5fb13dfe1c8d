"""The resource-policy flags every listening command takes (``--max-connections`` ...),
one per limit in :class:`~trustmesh.io.limits.ResourcePolicy`; docs/limits.md lists them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import click

from trustmesh.io.limits import LIMIT_FIELDS, LIMIT_HELP, ResourcePolicy, policy_from

F = TypeVar("F", bound=Callable[..., Any])
_DEFAULTS = ResourcePolicy()
_INTS = {f.name for f in dataclasses.fields(ResourcePolicy) if f.type in ("int", int)}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def limit_options(command: F) -> F:
    """Add one option per limit; the command receives them in ``**limits`` keyword
    arguments named as the limits (None when not given)."""
    for name in reversed(LIMIT_FIELDS):
        command = click.option(
            flag_of(name),
            name,
            type=click.IntRange(min=1) if name in _INTS else click.FloatRange(min=0, min_open=True),
            default=None,
            metavar=_metavar(name),
            help=f"Limit: {LIMIT_HELP[name]} [default: {getattr(_DEFAULTS, name)}].",
        )(command)
    return command


def _metavar(name: str) -> str:
    if name in _INTS:
        return "N"
    return "PER_S" if name.endswith("_rate") else "SECONDS"


def pop_policy(options: dict[str, Any], base: ResourcePolicy | None = None) -> ResourcePolicy:
    """Take the limit options out of ``options``; the policy they make over ``base``."""
    given = {name: options.pop(name) for name in LIMIT_FIELDS if name in options}
    overrides = {name: value for name, value in given.items() if value is not None}
    try:
        policy = policy_from(overrides, base)
        policy.check_operator_values()
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    return policy
