"""The net under every CLI (trustcore/cli_net.py): what a command did not map ends as one
line ``error: reason: message`` and the command's documented error exit code."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from trustcore.cli_net import guarded_group
from trustcore.errors import CsrError, EncodingError


@click.group(cls=guarded_group(1, {"ingest": 3}))
def cli() -> None:
    pass


@cli.command("ingest")
@click.argument("what")
def ingest(what: str) -> None:
    _raise(what)


@cli.command("enrol")
@click.argument("what")
def enrol(what: str) -> None:
    _raise(what)


@cli.command("usage")
def usage() -> None:
    raise click.UsageError("bad usage")


def _raise(what: str) -> None:
    if what == "value":
        raise ValueError("error parsing asn1 value:\n  ParseError { kind: InvalidValue }")
    if what == "oserror":
        raise FileNotFoundError(2, "No such file or directory", "/nowhere")
    if what == "reasoned":
        raise CsrError(f"CSR does not parse: {EncodingError('x').message}", reason="malformed")
    click.echo("ok")


@pytest.mark.parametrize(
    ("command", "what", "code", "line"),
    [
        ("ingest", "value", 3, "error: internal_error: unexpected ValueError: error parsing asn1 "
         "value: ParseError { kind: InvalidValue }"),
        ("enrol", "value", 1, "error: internal_error: unexpected ValueError: error parsing asn1 "
         "value: ParseError { kind: InvalidValue }"),
        ("ingest", "oserror", 3,
         "error: io_error: [Errno 2] No such file or directory: '/nowhere'"),
        ("enrol", "reasoned", 1, "error: malformed: CSR does not parse: x"),
    ],
)  # fmt: skip
def test_what_escapes_a_command_is_one_line(command: str, what: str, code: int, line: str) -> None:
    r = CliRunner().invoke(cli, [command, what])
    assert r.exit_code == code, r.output
    assert isinstance(r.exception, SystemExit)
    assert r.output.strip() == line


def test_usage_errors_and_success_are_untouched() -> None:
    r = CliRunner().invoke(cli, ["usage"])
    assert r.exit_code == 2 and "bad usage" in r.output
    r = CliRunner().invoke(cli, ["enrol", "fine"])
    assert (r.exit_code, r.output) == (0, "ok\n")


def test_a_reason_is_never_repeated() -> None:
    """A wrapper that passed ``str(inner)`` on (reason included) still prints it once."""
    inner = EncodingError("bad thing")
    assert str(CsrError(str(inner), reason="malformed")) == "malformed: bad thing"
    assert str(CsrError(f"CSR: {inner.message}", reason="malformed")) == "malformed: CSR: bad thing"
