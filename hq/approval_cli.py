"""``hq approval``: quorum approvals (docs/quorum.md).

HQ writes requests, collects approvals (files, or online through ``serve``) and enforces
them. Approvers run ``approver init`` and ``sign`` on their own machines with their own key;
those two commands need no HQ directory.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.table import Table

from hq.approval_server import make_server
from hq.approvals import (
    add_approver,
    approvers,
    bundle_from_db,
    create_request,
    pending_requests,
    read_file,
    request_summary,
)
from hq.approver_tools import (
    APPROVER_PASSPHRASE_ENV,
    APPROVER_PIN_ENV,
    ApproverKeySource,
    approver_signer,
    init_approver_key,
    sign_request,
)
from hq.cli_options import home_option
from hq.errors import HqError
from hq.home import HqHome
from trustcore.errors import EncodingError
from trustcore.keys import key_id
from trustcore.quorum import (
    MAX_EVIDENCE_SIZE,
    MAX_REQUEST_SIZE,
    ApprovalRequest,
    encode_bundle,
    parse_evidence,
)

_INT = re.compile(r"-?[0-9]{1,18}")


def _fail(exc: HqError, code: int = 1) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def _key_source_options(f: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--keystore",
                type=click.Path(path_type=Path, dir_okay=False),
                help="Approver key in an encrypted keystore file.",
            ),
            click.option(
                "--passphrase-file",
                type=click.Path(path_type=Path, dir_okay=False, exists=True),
                help=f"Keystore passphrase file (default: ${APPROVER_PASSPHRASE_ENV}).",
            ),
            click.option("--pkcs11-module", help="PKCS#11 module holding the approver key."),
            click.option("--pkcs11-token", help="Token label."),
            click.option("--pkcs11-key", help="Key label."),
            click.option(
                "--pin-file",
                type=click.Path(path_type=Path, dir_okay=False, exists=True),
                help=f"Token PIN file (default: ${APPROVER_PIN_ENV}).",
            ),
        ]
    ):
        f = option(f)
    return f


def _source(kw: dict[str, Any]) -> ApproverKeySource:
    return ApproverKeySource(
        keystore=kw.pop("keystore"),
        passphrase_file=kw.pop("passphrase_file"),
        pkcs11_module=kw.pop("pkcs11_module"),
        pkcs11_token=kw.pop("pkcs11_token"),
        pkcs11_key=kw.pop("pkcs11_key"),
        pin_file=kw.pop("pin_file"),
    )


def _time(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def render_request(request: ApprovalRequest, console: Console) -> None:
    """The review table an approver reads before signing: every parameter, in full."""
    table = Table(title=f"Approval request {request.request_id.hex()}", show_lines=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("operation", request.operation)
    for name, value in sorted(request.params.items()):
        shown = value.hex() if isinstance(value, bytes) else str(value)
        table.add_row(f"  {name}", shown)
    table.add_row("requested by", request.requested_by)
    table.add_row("created", _time(request.created))
    table.add_row("expires", _time(request.expires))
    table.add_row("quorum", f"{request.m} of {len(request.approvers)}")
    for a in request.approvers:
        table.add_row("  approver", a.hex())
    table.add_row("digest", request.digest.hex())
    console.print(table)


@click.group("approval")
def approval_group() -> None:
    """Quorum approvals: M-of-N approver signatures that authorise sensitive operations
    (HQ: large entitlements, station CA revocation, payload-key export, new approvers;
    station: exceeding the daily limit, re-issuing a certificate)."""


@approval_group.group("approver")
def approver_group() -> None:
    """Approver keys and the HQ approver set."""


@approver_group.command("init")
@_key_source_options
@click.option(
    "--public-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the public key (PEM) here, to give to HQ.",
)
def approver_init(public_out: Path | None, **kw: Any) -> None:
    """Create an approver key (encrypted keystore or PKCS#11 token) on the approver's own
    machine; prints its key id and public key."""
    try:
        public = init_approver_key(_source(kw))
    except HqError as exc:
        _fail(exc)
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public_out is not None:
        public_out.write_bytes(pem)
    click.echo(f"approver key id {key_id(public).hex()}")
    click.echo(pem.decode(), nl=False)


@approver_group.command("add")
@home_option
@click.option("--name", required=True, help="Who holds the key (unique).")
@click.option(
    "--public-key", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True)
)
@click.option(
    "--approvals",
    "approval_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Quorum of the current set (not needed for the first approver).",
)
def approver_add(home: Path, name: str, public_key: Path, approval_files: tuple[Path, ...]) -> None:
    """Add an approver to the HQ set (a quorum of the current set once it is non-empty)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        public = serialization.load_pem_public_key(public_key.read_bytes())
    except ValueError as exc:
        raise click.BadParameter(f"{public_key} is not a PEM public key") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise click.BadParameter(f"{public_key} is not an EC key")
    try:
        evidence = [read_file(p, MAX_EVIDENCE_SIZE) for p in approval_files]
        row = add_approver(HqHome.open(home), name, public, evidence)
    except HqError as exc:
        _fail(exc)
    click.echo(f"approver {row.name} added: {row.key_id.hex()}")


@approver_group.command("list")
@home_option
def approver_list(home: Path) -> None:
    """List the HQ approver set."""
    try:
        rows = approvers(HqHome.open(home))
    except HqError as exc:
        _fail(exc)
    for r in rows:
        click.echo(f"{r.key_id.hex()}  {r.name}  added {_time(r.added_at)}")
    if not rows:
        click.echo("the approver set is empty")


def _param(spec: str) -> tuple[str, Any]:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"expected NAME=VALUE, got {spec!r}", param_hint="--param")
    if value.startswith("hex:"):
        try:
            return name, bytes.fromhex(value[4:])
        except ValueError as exc:
            raise click.BadParameter(f"bad hex in {spec!r}", param_hint="--param") from exc
    if _INT.fullmatch(value):
        return name, int(value)
    return name, value


@approval_group.command("request")
@home_option
@click.option("--operation", required=True, help="e.g. issue_entitlement, exceed_daily_limit.")
@click.option(
    "--param",
    "params",
    multiple=True,
    help="NAME=VALUE (integers as digits, bytes as hex:...). Repeat.",
)
@click.option("--station", "station_id", help="For station operations: the station.")
@click.option("--requested-by", required=True, help="Who asks (shown to approvers).")
@click.option("--expires-in", type=click.IntRange(60, 30 * 86400), help="Seconds.")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
def request_command(
    home: Path,
    operation: str,
    params: tuple[str, ...],
    station_id: str | None,
    requested_by: str,
    expires_in: int | None,
    out: Path,
) -> None:
    """Write an approval request for an operation (stored at HQ, listed by `serve`)."""
    from hq.home import write_package

    values = dict(_param(p) for p in params)
    try:
        request = create_request(
            HqHome.open(home),
            operation,
            values,
            requested_by=requested_by,
            station_id=station_id,
            lifetime_s=expires_in,
        )
        write_package(out, request.encode())
    except HqError as exc:
        _fail(exc)
    render_request(request, Console(highlight=False))
    click.echo(f"request written to {out}")


@approval_group.command("sign")
@click.argument("request_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_key_source_options
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
def sign_command(request_file: Path, out: Path, yes: bool, **kw: Any) -> None:
    """Review a request and sign it with your approver key, writing an approval file."""
    from hq.home import write_package

    try:
        request = ApprovalRequest.decode(read_file(request_file, MAX_REQUEST_SIZE))
    except EncodingError as exc:
        raise click.BadParameter(f"{request_file}: {exc}") from exc
    except HqError as exc:
        _fail(exc)
    render_request(request, Console(highlight=False))
    if not yes:
        click.confirm("Approve exactly this operation?", abort=True)
    try:
        with approver_signer(_source(kw)) as signer:
            approval = sign_request(request, signer)
        write_package(out, approval.encode())
    except HqError as exc:
        _fail(exc)
    click.echo(f"approval by {approval.approver.hex()} written to {out}")


@approval_group.command("bundle")
@click.option("--home", type=click.Path(path_type=Path, file_okay=False), help="HQ directory.")
@click.option("--request-id", help="Bundle what HQ received online for this request (hex).")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
def bundle_command(
    home: Path | None, request_id: str | None, files: tuple[Path, ...], out: Path
) -> None:
    """Combine a request and its approvals into one bundle file: from files (REQUEST
    APPROVAL...), or from what the HQ endpoint received (--home --request-id)."""
    from hq.home import write_package

    try:
        if request_id is not None:
            if home is None or files:
                raise click.UsageError("--request-id goes with --home and no files")
            data = bundle_from_db(HqHome.open(home), bytes.fromhex(request_id))
        else:
            if not files:
                raise click.UsageError("give the request and approval files, or --request-id")
            try:
                bundle = parse_evidence([read_file(p, MAX_EVIDENCE_SIZE) for p in files])
            except Exception as exc:  # QuorumError is a TrustCoreError, not an HqError
                raise click.ClickException(str(exc)) from exc
            data = encode_bundle(bundle.request, bundle.approvals)
        write_package(out, data)
    except HqError as exc:
        _fail(exc)
    except ValueError as exc:
        raise click.BadParameter("request id must be hex", param_hint="--request-id") from exc
    click.echo(f"bundle written to {out}")


@approval_group.command("pending")
@home_option
def pending_command(home: Path) -> None:
    """List open requests and how many approvals each has."""
    try:
        rows = pending_requests(HqHome.open(home))
    except HqError as exc:
        _fail(exc)
    for request, count in rows:
        s = request_summary(request, count)
        click.echo(
            f"{s['request_id']}  {s['operation']}  {count}/{request.m} approvals, "
            f"expires {_time(request.expires)}"
        )


@approval_group.command("serve")
@home_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
def serve_command(home: Path, host: str, port: int) -> None:
    """Run the approval endpoint for online approvers (GET /requests, POST /approvals)."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        click.secho(
            f"warning: listening on {host}: put TLS in front (the endpoint speaks plain HTTP)",
            fg="yellow",
            err=True,
        )
    try:
        server = make_server(HqHome.open(home), host, port, verbose=True)
    except HqError as exc:
        _fail(exc)
    bound_host, bound_port = server.server_address[:2]
    click.echo(f"approval endpoint on http://{bound_host!s}:{bound_port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
