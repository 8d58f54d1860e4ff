"""The last line of defence of every command-line tool (``hq``, ``factory-station``,
``registrar``): whatever a command did not map itself ends as one line
``error: reason: message`` on stderr and the command's documented error exit code —
never a Python traceback, and never an exit code that means something else (for
``hq ingest-audit``, 1 means "accepted with findings").

Commands still map their own refusals first; this net only catches what escaped them: an
error of the package's own root raised outside a command's ``try`` keeps its reason, an
``OSError`` becomes ``io_error``, anything else (a bug reached by hostile input)
``internal_error``. The fuzz targets (``tests/fuzz``) call the functions behind the
commands, so the net hides nothing from them.

:func:`log_options` is the one definition of the logging options of these tools
(``--log-format``, ``--log-level``; the values of :mod:`trustcore.logformat`, which the
command hands to :func:`trustcore.logformat.configure_logging`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar

import click

from trustcore.errors import ReasonedError
from trustcore.logformat import LOG_FORMATS, LOG_LEVELS

__all__ = ["guarded_group", "log_options", "one_line_error"]

F = TypeVar("F", bound=Callable[..., Any])


def one_line_error(reason: str, message: str, code: int) -> NoReturn:
    """Print ``error: reason: message`` on one line (whatever the message holds) and exit."""
    text = " ".join(f"{reason}: {message}".split())
    click.echo(f"error: {text}", err=True)
    sys.exit(code)


def guarded_group(default_exit: int, exits: Mapping[str, int] | None = None) -> type[click.Group]:
    """A ``click.Group`` class whose commands cannot end in a traceback. ``exits``: the
    error exit code of the commands whose code differs from ``default_exit``."""
    codes = dict(exits or {})

    class GuardedGroup(click.Group):
        def resolve_command(
            self, ctx: click.Context, args: list[str]
        ) -> tuple[str | None, click.Command | None, list[str]]:
            name, command, rest = super().resolve_command(ctx, args)
            ctx.meta.setdefault("cli_net.command", name)
            return name, command, rest

        def invoke(self, ctx: click.Context) -> Any:
            try:
                return super().invoke(ctx)
            except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
                raise
            except Exception as exc:  # the net: see the module docstring
                code = codes.get(str(ctx.meta.get("cli_net.command")), default_exit)
                if isinstance(exc, ReasonedError):
                    one_line_error(exc.reason, exc.message, code)
                if isinstance(exc, OSError):
                    one_line_error("io_error", str(exc), code)
                one_line_error("internal_error", f"unexpected {type(exc).__name__}: {exc}", code)

    return GuardedGroup


def log_options(f: F) -> F:
    """``--log-format`` (text, json) and ``--log-level`` for a command or group: the
    function receives ``log_format`` and ``log_level`` and passes them to
    :func:`trustcore.logformat.configure_logging`."""
    f = click.option(
        "--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True
    )(f)
    return click.option(
        "--log-format",
        type=click.Choice(LOG_FORMATS),
        default="text",
        show_default=True,
        help="json: log records and this command's diagnostics as one JSON object per line "
        "on stderr (docs/operations.md).",
    )(f)
