"""``hq`` commands for factory stations: enrolment, CA renewal and history, entitlements
(with the parsing of their policy options), trusted time statements, the station CRL, and
``ingest-audit`` (the audit export coming back; exit codes in :mod:`hq.cli_options`)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from hq.cli_options import (
    EXIT_CLEAN,
    EXIT_ERROR,
    EXIT_REFUSED,
    EXIT_VIOLATIONS,
    approvals_option,
    fail,
    home_option,
    read_approvals,
    refuse_existing_out,
    secret_options,
)
from hq.errors import ExportRefusedError, HqError
from hq.home import HqHome, HqSecrets

__all__ = [
    "enrol_command",
    "entitle_command",
    "ingest_command",
    "renew_station_command",
    "station_cas_command",
    "station_crl_command",
    "time_statement_command",
]


# ------------------------------------------------------------------------- enrol-station


@click.command("enrol-station")
@home_option
@click.option("--replace", is_flag=True, help="Re-enrol a station id with a new key.")
@click.argument("enrolment_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def enrol_command(home: Path, replace: bool, enrolment_file: Path) -> None:
    """Verify a station's enrolment request and record the station."""
    from hq.authority import enrol_station

    try:
        result = enrol_station(HqHome.open(home), enrolment_file.read_bytes(), replace=replace)
    except HqError as exc:
        fail(exc)
    Console().print(
        f"station {result.station_id}: {result.status.replace('_', ' ')}\n"
        f"  CA key        {result.ca_key_id}\n  transport key {result.transport_key_id}"
    )


# ------------------------------------------------------------------------- renew-station


@click.command("renew-station")
@home_option
@click.argument("request_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the new station CA certificate (PEM) for factory-station import-ca.",
)
@click.option(
    "--not-after",
    help="End of the new certificate's validity (ISO 8601 with zone; default: the root's end).",
)
@approvals_option
@secret_options
def renew_station_command(
    home: Path,
    request_file: Path,
    out: Path,
    not_after: str | None,
    approval_files: tuple[Path, ...],
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Issue a station's new CA certificate from its renew-ca request (renewal or re-key)."""
    from hq.home import write_package
    from hq.station_ca import renew_station_ca
    from trustcore.station_ca_request import MAX_REQUEST_SIZE

    if request_file.stat().st_size > MAX_REQUEST_SIZE:
        fail(HqError(f"{request_file} is too large for a request", reason="malformed"), 2)
    end = None if not_after is None else _parse_time(not_after, "--not-after")
    try:
        result = renew_station_ca(
            HqHome.open(home),
            request_file.read_bytes(),
            HqSecrets(passphrase_file, pin_file),
            not_after=end,
            approvals=read_approvals(approval_files),
        )
        write_package(out, result.pem())
    except HqError as exc:
        fail(exc, 2)
    cert = result.certificate
    Console(highlight=False).print(
        f"station {result.station_id}: {result.kind} issued, serial {cert.serial_number:x} "
        f"(previous {result.previous_serial})\n  CA key      {result.key_id}\n"
        f"  valid until {cert.not_valid_after_utc.isoformat()}\n  written to  {out}"
    )


@click.command("station-cas")
@home_option
@click.option("--station", "station_id", required=True)
@click.option("--json", "as_json", is_flag=True)
def station_cas_command(home: Path, station_id: str, as_json: bool) -> None:
    """Every CA certificate HQ issued to a station (entitlements, renewals, re-keys)."""
    from hq.station_ca import station_ca_history

    try:
        rows = station_ca_history(HqHome.open(home), station_id)
    except HqError as exc:
        fail(exc, 2)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        flags = [
            name
            for name, on in (
                ("current key", row["current_key"]),
                ("exports accepted", row["exports_accepted"]),
                ("REVOKED", row["revoked"]),
            )
            if on
        ]
        click.echo(
            f"{row['serial']}  key {str(row['key_id'])[:16]}  {row['not_before']} .. "
            f"{row['not_after']}  {', '.join(flags)}"
        )


# ------------------------------------------------------------------------------- entitle


def _parse_time(value: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}", param_hint=name) from exc
    if moment.tzinfo is None:
        raise click.BadParameter("give a time zone (e.g. Z or +08:00)", param_hint=name)
    return moment


def _parse_secret(spec: str) -> tuple[str, bytes]:
    name, sep, ref = spec.partition("=")
    if not sep or not name or not ref.startswith("@"):
        raise click.BadParameter(f"expected NAME=@file, got {spec!r}", param_hint="--secret")
    try:
        return name, Path(ref[1:]).read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {ref[1:]}: {exc}", param_hint="--secret") from exc


def _parse_secret_rule(spec: str, product: str) -> Any:
    from trustcore.entitlement import SecretRule
    from trustcore.errors import InvalidValueError

    name, _, rest = spec.partition(":")
    numbers, _, until = rest.partition(":")
    first, dash, last = numbers.partition("-")
    if not name or not dash or not first.isdigit() or not last.isdigit() or not until:
        raise click.BadParameter(
            f"expected NAME:FIRST-LAST:UNTIL, got {spec!r}", param_hint="--secret-rule"
        )
    moment = _parse_time(until, "--secret-rule")
    try:
        return SecretRule(name, (product,), int(first), int(last), int(moment.timestamp()))
    except InvalidValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--secret-rule") from exc


def _secrets_summary(policy: Any) -> str:
    if not policy.secrets:
        return "-"
    return ", ".join(
        f"{r.name} (devices {r.first}..{r.last} until "
        f"{datetime.fromtimestamp(r.not_after).astimezone().isoformat()})"
        for r in policy.secrets
    )


def _approver_key_id(path: Path) -> bytes:
    """Key id of an approver: a PEM/DER public key or certificate file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_der_public_key,
        load_pem_public_key,
    )

    from trustcore.keys import key_id

    data = path.read_bytes()
    public: object
    try:
        if b"CERTIFICATE" in data:
            public = x509.load_pem_x509_certificate(data).public_key()
        elif data.lstrip().startswith(b"-----"):
            public = load_pem_public_key(data)
        else:
            public = load_der_public_key(data)
    except ValueError as exc:
        raise click.BadParameter(f"{path} is not a public key or certificate") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise click.BadParameter(f"{path} is not an EC key", param_hint="--quorum")
    return key_id(public)


def _parse_quorum(spec: str) -> Any:
    from trustcore.entitlement import QuorumRule
    from trustcore.errors import InvalidValueError

    op, _, rest = spec.partition(":")
    m_text, _, files = rest.partition(":")
    if not op or not m_text.isdigit() or not files:
        raise click.BadParameter(
            f"expected OP:M:key-file,key-file,..., got {spec!r}", param_hint="--quorum"
        )
    try:
        approvers = tuple(_approver_key_id(Path(p)) for p in files.split(","))
    except OSError as exc:
        raise click.BadParameter(str(exc), param_hint="--quorum") from exc
    try:
        return QuorumRule(op, int(m_text), approvers)
    except InvalidValueError as exc:
        raise click.BadParameter(exc.message, param_hint="--quorum") from exc


@click.command("entitle")
@home_option
@click.option("--station", "station_id", required=True)
@click.option("--product", required=True)
@click.option("--quota", type=click.IntRange(min=0), required=True, help="Total quota.")
@click.option("--daily-limit", type=click.IntRange(min=0), required=True)
@click.option("--timezone", "day_timezone", required=True, help="IANA zone of the daily limit.")
@click.option("--not-before", required=True, help="Key-use window start, ISO 8601 with zone.")
@click.option("--not-after", required=True, help="Key-use window end, ISO 8601 with zone.")
@click.option("--id-prefix", required=True)
@click.option("--id-first", type=click.IntRange(min=0), required=True)
@click.option("--id-last", type=click.IntRange(min=0), required=True)
@click.option("--id-digits", type=click.IntRange(1, 18), required=True)
@click.option(
    "--secret",
    "secret_specs",
    multiple=True,
    help="NAME=@file product secret (16..64 bytes), provisioned into device TPMs.",
)
@click.option(
    "--secret-rule",
    "secret_rule_specs",
    multiple=True,
    help="NAME:FIRST-LAST:UNTIL: only device numbers FIRST..LAST get secret NAME, and only "
    "before UNTIL (ISO 8601 with zone). Default: every device of the entitlement until "
    "--not-after.",
)
@click.option("--quorum", "quorum_specs", multiple=True, help="OP:M:approver-key-file,...")
@click.option(
    "--allow-overlap",
    is_flag=True,
    help="Issue even if the device-id range overlaps another station's entitlement "
    "(recorded in HQ's database as an override).",
)
@approvals_option
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output file."
)
@secret_options
def entitle_command(
    home: Path,
    station_id: str,
    product: str,
    quota: int,
    daily_limit: int,
    day_timezone: str,
    not_before: str,
    not_after: str,
    id_prefix: str,
    id_first: int,
    id_last: int,
    id_digits: int,
    secret_specs: tuple[str, ...],
    secret_rule_specs: tuple[str, ...],
    quorum_specs: tuple[str, ...],
    allow_overlap: bool,
    approval_files: tuple[Path, ...],
    out: Path,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Issue the next entitlement to an enrolled station (sealed to that station).

    A device-id range that overlaps another station's entitlement is refused
    (``overlapping_range``) unless --allow-overlap, which is recorded."""
    from hq.entitlements import EntitlementRequest, issue_entitlement
    from hq.home import write_package
    from trustcore.entitlement import DeviceIdRule
    from trustcore.errors import InvalidValueError

    refuse_existing_out(out)
    secrets_map: dict[str, bytes] = {}
    for spec in secret_specs:
        name, value = _parse_secret(spec)
        if name in secrets_map:
            raise click.BadParameter(f"secret {name!r} given twice", param_hint="--secret")
        secrets_map[name] = value
    try:
        rule = DeviceIdRule(id_prefix, id_first, id_last, id_digits)
    except InvalidValueError as exc:
        raise click.BadParameter(exc.message, param_hint="--id-*") from exc
    request = EntitlementRequest(
        station_id=station_id,
        product=product,
        total_quota=quota,
        daily_limit=daily_limit,
        day_timezone=day_timezone,
        not_before=_parse_time(not_before, "--not-before"),
        not_after=_parse_time(not_after, "--not-after"),
        id_rule=rule,
        product_secrets=secrets_map,
        quorum=tuple(_parse_quorum(q) for q in quorum_specs),
        secret_rules=tuple(_parse_secret_rule(r, product) for r in secret_rule_specs),
        allow_overlap=allow_overlap,
    )
    try:
        result = issue_entitlement(
            HqHome.open(home),
            request,
            HqSecrets(passphrase_file, pin_file),
            approvals=read_approvals(approval_files),
        )
        write_package(out, result.package)
    except HqError as exc:
        fail(exc)
    p = result.policy
    first = p.id_rule.device_id(p.id_rule.first)
    last = p.id_rule.device_id(p.id_rule.last)
    quorum = ", ".join(f"{q.operation} {q.m}/{len(q.approvers)}" for q in p.quorum) or "-"
    Console().print(
        f"entitlement {p.entitlement_id} (sequence {p.sequence}) for station {p.station_id}\n"
        f"  product      {p.product}\n"
        f"  quota        {p.total_quota} total, {p.daily_limit} per day ({p.day_timezone})\n"
        f"  window       {datetime.fromtimestamp(p.not_before).astimezone().isoformat()} .. "
        f"{datetime.fromtimestamp(p.not_after).astimezone().isoformat()}\n"
        f"  device ids   {first} .. {last}\n"
        f"  secrets      {_secrets_summary(p)}\n"
        f"  quorum       {quorum}\n"
        f"  station CA   serial {result.station_ca_cert.serial_number:x}, valid until "
        f"{result.station_ca_cert.not_valid_after_utc.isoformat()}\n"
        f"  written to   {out} (sha256 {result.package_sha256})",
        highlight=False,
    )
    for overlap in result.overlaps:
        click.echo(f"warning: overlapping_range (overridden, recorded): {overlap}", err=True)


# -------------------------------------------------------------------------- ingest-audit


@click.command("ingest-audit")
@home_option
@click.argument("export_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@secret_options
def ingest_command(
    home: Path,
    export_file: Path,
    as_json: bool,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Verify a station's audit export, reconcile it and store it.

    Exit 0: clean. 1: accepted with policy violations. 2: refused (nothing stored; the
    reason names the attack). 3: HQ could not run the check (home, passphrase, file).
    """
    from hq.audit_ingest import ingest_audit
    from hq.report import RefusalReport, render_ingest, render_refusal

    console = Console()
    try:
        report = ingest_audit(
            HqHome.open(home), export_file.read_bytes(), HqSecrets(passphrase_file, pin_file)
        )
    except ExportRefusedError as exc:
        refusal = RefusalReport(exc.reason, str(exc.args[0]), str(export_file))
        if as_json:
            click.echo(json.dumps(refusal.to_map(), sort_keys=True))
        else:
            render_refusal(refusal, console)
        sys.exit(EXIT_REFUSED)
    except HqError as exc:
        fail(exc, EXIT_ERROR)
    except OSError as exc:
        fail(HqError(f"cannot read {export_file}: {exc}", reason="io_error"), EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(report.to_map(), sort_keys=True))
    else:
        render_ingest(report, console)
    sys.exit(EXIT_CLEAN if report.clean else EXIT_VIOLATIONS)


@click.command("time-statement")
@home_option
@click.option("--station", "station_id", required=True)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output file."
)
@secret_options
def time_statement_command(
    home: Path, station_id: str, out: Path, passphrase_file: Path | None, pin_file: Path | None
) -> None:
    """HQ vouches for the current time to a station (docs/factory.md "Time"): for a station
    that was off longer than its clock tolerance, or that must trust a new date."""
    from hq.home import write_package
    from hq.station_time import issue_time_statement

    refuse_existing_out(out)
    try:
        package, moment = issue_time_statement(
            HqHome.open(home), station_id, HqSecrets(passphrase_file, pin_file)
        )
        write_package(out, package)
    except HqError as exc:
        fail(exc)
    Console(highlight=False).print(
        f"time statement for {station_id}: {datetime.fromtimestamp(moment, UTC).isoformat()} "
        f"written to {out}"
    )


@click.command("station-crl")
@home_option
@click.option("--station", "station_id", required=True)
@click.argument("crl_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def station_crl_command(home: Path, station_id: str, crl_file: Path) -> None:
    """Record a station's CRL (signed by the station CA in its TPM) for the site bundles."""
    from hq.site import record_station_crl

    try:
        result = record_station_crl(HqHome.open(home), station_id, crl_file.read_bytes())
    except HqError as exc:
        fail(exc)
    Console(highlight=False).print(
        f"station {result.station_id}: CRL number {result.crl_number} {result.status} "
        f"(next update {result.next_update.isoformat()})"
    )
