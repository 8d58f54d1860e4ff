"""What every ``hq`` command group shares (:mod:`hq.cli` wires the groups): the ``--home``,
secret and ``--approvals`` options, reading quorum evidence, the exit codes of the two
ingest commands, the one-line error exit and the refusal of an ``--out`` that exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from hq.errors import HqError
from trustcore.cli_net import one_line_error

__all__ = [
    "EXIT_CLEAN",
    "EXIT_ERROR",
    "EXIT_REFUSED",
    "EXIT_VIOLATIONS",
    "approvals_option",
    "fail",
    "home_option",
    "read_approvals",
    "refuse_existing_out",
    "secret_options",
]

F = TypeVar("F", bound=Callable[..., Any])

#: ``hq ingest-audit`` exit codes.
EXIT_CLEAN = 0
EXIT_VIOLATIONS = 1
EXIT_REFUSED = 2
EXIT_ERROR = 3


def home_option(f: F) -> F:
    return click.option(
        "--home",
        "home",
        required=True,
        type=click.Path(path_type=Path, file_okay=False),
        help="HQ directory.",
    )(f)


def secret_options(f: F) -> F:
    f = click.option(
        "--pin-file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="File holding the token PIN (default: $DEVTRUST_HQ_PIN).",
    )(f)
    return click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="File holding the keystore passphrase (default: $DEVTRUST_HQ_PASSPHRASE).",
    )(f)


def approvals_option(f: F) -> F:
    return click.option(
        "--approvals",
        "approval_files",
        multiple=True,
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="Quorum evidence: an approval bundle, or the request and its approval files "
        "(repeat). See docs/quorum.md.",
    )(f)


def read_approvals(paths: tuple[Path, ...]) -> list[bytes]:
    from hq.approvals import read_file
    from trustcore.quorum import MAX_EVIDENCE_SIZE

    return [read_file(p, MAX_EVIDENCE_SIZE) for p in paths]


def refuse_existing_out(out: Path) -> None:
    """Refuse an ``--out`` file that exists, before anything is signed or recorded (the
    write itself never replaces a file either: :func:`hq.home.write_package`)."""
    if out.exists():
        raise click.BadParameter(f"{out} exists; refusing to overwrite it", param_hint="--out")


def fail(exc: HqError, code: int = 1) -> NoReturn:
    """Exit with ``code`` after one line naming the error (no traceback reaches a user)."""
    one_line_error(exc.reason, exc.message, code)
