"""``hq``: the manufacturer's headquarters."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from hq.errors import ExportRefusedError, HqError
from hq.home import HqHome, HqSecrets, Pkcs11Location
from trustcore.logformat import LOG_FORMATS, LOG_LEVELS, LogFormat, configure_logging

F = TypeVar("F", bound=Callable[..., Any])

#: ``hq ingest-audit`` exit codes.
EXIT_CLEAN = 0
EXIT_VIOLATIONS = 1
EXIT_REFUSED = 2
EXIT_ERROR = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: log records and this command's diagnostics as one JSON object per line "
    "on stderr (docs/operations.md).",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def main(log_format: LogFormat, log_level: str) -> None:
    """Headquarters: the manufacturer root CA, entitlements for factory stations, the
    payload-key KMS, audit reconciliation, counterfeit detection and revocation.

    HQ works offline: what it sends and receives are signed files that can travel on a
    USB stick (entitlements, site bundles, revocation lists; audit exports and site
    reports coming back).

    Secrets never go on the command line: the keystore passphrase comes from
    DEVTRUST_HQ_PASSPHRASE or --passphrase-file, a token PIN from DEVTRUST_HQ_PIN or
    --pin-file. See docs/hq.md.
    """
    configure_logging(log_level, log_format, command="hq")


def _home_option(f: F) -> F:
    return click.option(
        "--home",
        "home",
        required=True,
        type=click.Path(path_type=Path, file_okay=False),
        help="HQ directory.",
    )(f)


def _secret_options(f: F) -> F:
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


def _approvals_option(f: F) -> F:
    return click.option(
        "--approvals",
        "approval_files",
        multiple=True,
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="Quorum evidence: an approval bundle, or the request and its approval files "
        "(repeat). See docs/quorum.md.",
    )(f)


def _read_approvals(paths: tuple[Path, ...]) -> list[bytes]:
    from hq.approvals import read_file
    from trustcore.quorum import MAX_EVIDENCE_SIZE

    return [read_file(p, MAX_EVIDENCE_SIZE) for p in paths]


def _fail(exc: HqError, code: int = 1) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


# -------------------------------------------------------------------------------- init


@main.command("init")
@_home_option
@click.option("--org", "organization", required=True, help="Manufacturer (organisation) name.")
@click.option("--root-pkcs11-module", help="PKCS#11 module holding the root key.")
@click.option("--root-pkcs11-token", help="Token label.")
@click.option("--root-pkcs11-key", help="Key label (generated in the token if absent).")
@click.option(
    "--store",
    metavar="URL",
    help="HQ database: postgresql://user@host:port/db (an empty database; no password in "
    "the URL, use ~/.pgpass). Recorded in hq.json: every later command uses it. "
    "Default: hq.sqlite in the HQ directory.",
)
@_secret_options
def init_command(
    home: Path,
    organization: str,
    root_pkcs11_module: str | None,
    root_pkcs11_token: str | None,
    root_pkcs11_key: str | None,
    store: str | None,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Create the root CA and the HQ role keys and certificates (never overwrites)."""
    from hq.authority import init_hq

    given = [root_pkcs11_module, root_pkcs11_token, root_pkcs11_key]
    location = None
    if any(given):
        if not all(given):
            raise click.UsageError(
                "--root-pkcs11-module, --root-pkcs11-token and --root-pkcs11-key go together"
            )
        location = Pkcs11Location(*given)  # type: ignore[arg-type]
    try:
        result = init_hq(
            home,
            organization=organization,
            secrets=HqSecrets(passphrase_file, pin_file),
            root_pkcs11=location,
            store=store,
        )
    except HqError as exc:
        _fail(exc)
    console = Console(highlight=False)
    where = "software keystore (encrypted)"
    if location is not None:
        state = "generated in" if result.root_key_generated else "taken from"
        where = f"PKCS#11 token {location.token!r}, key {location.label!r} ({state} the token)"
    console.print(f"HQ initialised in {result.home}")
    console.print(f"  root CA     {result.root_cert.subject.rfc4514_string()}  ({where})")
    for role, cert in result.role_certs.items():
        console.print(f"  {role.value:<19} serial {cert.serial_number:x}")


# ------------------------------------------------------------------------- enrol-station


@main.command("enrol-station")
@_home_option
@click.option("--replace", is_flag=True, help="Re-enrol a station id with a new key.")
@click.argument("enrolment_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def enrol_command(home: Path, replace: bool, enrolment_file: Path) -> None:
    """Verify a station's enrolment request and record the station."""
    from hq.authority import enrol_station

    try:
        result = enrol_station(HqHome.open(home), enrolment_file.read_bytes(), replace=replace)
    except HqError as exc:
        _fail(exc)
    Console().print(
        f"station {result.station_id}: {result.status.replace('_', ' ')}\n"
        f"  CA key        {result.ca_key_id}\n  transport key {result.transport_key_id}"
    )


# ------------------------------------------------------------------------- renew-station


@main.command("renew-station")
@_home_option
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
@_approvals_option
@_secret_options
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
    from hq.authority import write_package
    from hq.station_ca import renew_station_ca
    from trustcore.station_ca_request import MAX_REQUEST_SIZE

    if request_file.stat().st_size > MAX_REQUEST_SIZE:
        _fail(HqError(f"{request_file} is too large for a request", reason="malformed"), 2)
    end = None if not_after is None else _parse_time(not_after, "--not-after")
    try:
        result = renew_station_ca(
            HqHome.open(home),
            request_file.read_bytes(),
            HqSecrets(passphrase_file, pin_file),
            not_after=end,
            approvals=_read_approvals(approval_files),
        )
        write_package(out, result.pem())
    except HqError as exc:
        _fail(exc, 2)
    cert = result.certificate
    Console(highlight=False).print(
        f"station {result.station_id}: {result.kind} issued, serial {cert.serial_number:x} "
        f"(previous {result.previous_serial})\n  CA key      {result.key_id}\n"
        f"  valid until {cert.not_valid_after_utc.isoformat()}\n  written to  {out}"
    )


@main.command("station-cas")
@_home_option
@click.option("--station", "station_id", required=True)
@click.option("--json", "as_json", is_flag=True)
def station_cas_command(home: Path, station_id: str, as_json: bool) -> None:
    """Every CA certificate HQ issued to a station (entitlements, renewals, re-keys)."""
    from hq.station_ca import station_ca_history

    try:
        rows = station_ca_history(HqHome.open(home), station_id)
    except HqError as exc:
        _fail(exc, 2)
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
        raise click.BadParameter(str(exc), param_hint="--quorum") from exc


@main.command("entitle")
@_home_option
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
@_approvals_option
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output file."
)
@_secret_options
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
    approval_files: tuple[Path, ...],
    out: Path,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Issue the next entitlement to an enrolled station (sealed to that station)."""
    from hq.authority import EntitlementRequest, issue_entitlement, write_package
    from trustcore.entitlement import DeviceIdRule
    from trustcore.errors import InvalidValueError

    if out.exists():
        raise click.BadParameter(f"{out} exists; refusing to overwrite it", param_hint="--out")
    secrets_map: dict[str, bytes] = {}
    for spec in secret_specs:
        name, value = _parse_secret(spec)
        if name in secrets_map:
            raise click.BadParameter(f"secret {name!r} given twice", param_hint="--secret")
        secrets_map[name] = value
    try:
        rule = DeviceIdRule(id_prefix, id_first, id_last, id_digits)
    except InvalidValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--id-*") from exc
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
    )
    try:
        result = issue_entitlement(
            HqHome.open(home),
            request,
            HqSecrets(passphrase_file, pin_file),
            approvals=_read_approvals(approval_files),
        )
        write_package(out, result.package)
    except HqError as exc:
        _fail(exc)
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


# -------------------------------------------------------------------------- ingest-audit


@main.command("ingest-audit")
@_home_option
@click.argument("export_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_secret_options
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
        _fail(exc, EXIT_ERROR)
    except OSError as exc:
        _fail(HqError(f"cannot read {export_file}: {exc}", reason="io_error"), EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(report.to_map(), sort_keys=True))
    else:
        render_ingest(report, console)
    sys.exit(EXIT_CLEAN if report.clean else EXIT_VIOLATIONS)


# ---------------------------------------------------------------------------------- sites


@main.command("init-kms")
@_home_option
@_secret_options
def init_kms_command(home: Path, passphrase_file: Path | None, pin_file: Path | None) -> None:
    """Create the payload-key KMS key of an HQ initialised before sites existed."""
    from hq.kms import init_kms

    try:
        created = init_kms(HqHome.open(home), HqSecrets(passphrase_file, pin_file))
    except HqError as exc:
        _fail(exc)
    Console().print("KMS key created" if created else "this HQ already has a KMS key")


@main.command("time-statement")
@_home_option
@click.option("--station", "station_id", required=True)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output file."
)
@_secret_options
def time_statement_command(
    home: Path, station_id: str, out: Path, passphrase_file: Path | None, pin_file: Path | None
) -> None:
    """HQ vouches for the current time to a station (docs/factory.md "Time"): for a station
    that was off longer than its clock tolerance, or that must trust a new date."""
    from hq.authority import write_package
    from hq.station_time import issue_time_statement

    if out.exists():
        raise click.BadParameter(f"{out} exists; refusing to overwrite it", param_hint="--out")
    try:
        package, moment = issue_time_statement(
            HqHome.open(home), station_id, HqSecrets(passphrase_file, pin_file)
        )
        write_package(out, package)
    except HqError as exc:
        _fail(exc)
    Console(highlight=False).print(
        f"time statement for {station_id}: {datetime.fromtimestamp(moment, UTC).isoformat()} "
        f"written to {out}"
    )


@main.command("station-crl")
@_home_option
@click.option("--station", "station_id", required=True)
@click.argument("crl_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def station_crl_command(home: Path, station_id: str, crl_file: Path) -> None:
    """Record a station's CRL (signed by the station CA in its TPM) for the site bundles."""
    from hq.site import record_station_crl

    try:
        result = record_station_crl(HqHome.open(home), station_id, crl_file.read_bytes())
    except HqError as exc:
        _fail(exc)
    Console(highlight=False).print(
        f"station {result.station_id}: CRL number {result.crl_number} {result.status} "
        f"(next update {result.next_update.isoformat()})"
    )


@main.group("site")
def site_group() -> None:
    """Buildings: enrol a site registrar and write its site bundle (docs/site.md)."""


@site_group.command("enrol")
@_home_option
@click.option("--replace", is_flag=True, help="Re-enrol a site id with new keys.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the site CA certificate (PEM) here.",
)
@click.argument("request_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_secret_options
def site_enrol_command(
    home: Path,
    replace: bool,
    out: Path | None,
    request_file: Path,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Verify a site enrolment request, record the site and issue its site CA certificate."""
    from cryptography.hazmat.primitives import serialization

    from hq.authority import write_package
    from hq.site import enrol_site

    try:
        result = enrol_site(
            HqHome.open(home),
            request_file.read_bytes(),
            HqSecrets(passphrase_file, pin_file),
            replace=replace,
        )
        if out is not None:
            write_package(out, result.site_ca_cert.public_bytes(serialization.Encoding.PEM))
    except HqError as exc:
        _fail(exc)
    cert = result.site_ca_cert
    Console(highlight=False).print(
        f"site {result.site_id}: {result.status.replace('_', ' ')}\n"
        f"  site CA       serial {cert.serial_number:x}, valid until "
        f"{cert.not_valid_after_utc.isoformat()}\n"
        f"  CA key        {result.ca_key_id}\n  transport key {result.transport_key_id}"
    )


@site_group.command("rollover")
@_home_option
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the new site CA certificate (PEM) here.",
)
@click.argument("request_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_secret_options
def site_rollover_command(
    home: Path,
    out: Path | None,
    request_file: Path,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Issue a site's next CA certificate from its rollover request (`registrar rollover-ca`);
    the next `hq site bundle` carries it to the site."""
    from cryptography.hazmat.primitives import serialization

    from hq.authority import write_package
    from hq.site import rollover_site_ca

    try:
        result = rollover_site_ca(
            HqHome.open(home), request_file.read_bytes(), HqSecrets(passphrase_file, pin_file)
        )
        if out is not None:
            write_package(out, result.site_ca_cert.public_bytes(serialization.Encoding.PEM))
    except HqError as exc:
        _fail(exc)
    cert = result.site_ca_cert
    Console(highlight=False).print(
        f"site {result.site_id}: {result.status.replace('_', ' ')}\n"
        f"  new site CA   {cert.subject.rfc4514_string()}\n"
        f"                serial {cert.serial_number:x}, valid until "
        f"{cert.not_valid_after_utc.isoformat()}\n"
        f"  CA key        {result.ca_key_id}\n"
        f"next: `hq site bundle --site {result.site_id} ...` and `registrar commission` at the site"
    )


@site_group.command("bundle")
@_home_option
@click.option("--site", "site_id", required=True, help="Enrolled site id.")
@click.option("--device", "devices", multiple=True, help="Device id destined for the site.")
@click.option(
    "--devices-from-station", "from_stations", multiple=True, help="All devices of a station."
)
@click.option(
    "--admit-station", "admit_stations", multiple=True, help="Admit a station without listing."
)
@click.option(
    "--admit-product",
    "admit_products",
    multiple=True,
    help="Limit --admit-station to products (their device-id prefixes).",
)
@click.option("--rotate-payload-key", is_flag=True, help="Generate a new current payload key.")
@click.option(
    "--max-offline-days",
    type=int,
    default=30,
    show_default=True,
    help="Days the site may go without fresh HQ revocation data before it refuses new "
    "registrations (1..180).",
)
@_approvals_option
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output file."
)
@_secret_options
def site_bundle_command(
    home: Path,
    site_id: str,
    devices: tuple[str, ...],
    from_stations: tuple[str, ...],
    admit_stations: tuple[str, ...],
    admit_products: tuple[str, ...],
    rotate_payload_key: bool,
    max_offline_days: int,
    approval_files: tuple[Path, ...],
    out: Path,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Write the site's next bundle (sealed to the site): trust anchors, CRLs, the HQ
    revocation list, manifest and admission rules, and the site's payload keys."""
    from hq.authority import write_package
    from hq.site import SiteBundleRequest, build_site_bundle

    if out.exists():
        raise click.BadParameter(f"{out} exists; refusing to overwrite it", param_hint="--out")
    request = SiteBundleRequest(
        site_id=site_id,
        devices=devices,
        devices_from_stations=from_stations,
        admit_stations=admit_stations,
        admit_products=admit_products,
        rotate_payload_key=rotate_payload_key,
        max_offline_days=max_offline_days,
    )
    try:
        result = build_site_bundle(
            HqHome.open(home),
            request,
            HqSecrets(passphrase_file, pin_file),
            approvals=_read_approvals(approval_files),
        )
        write_package(out, result.package)
    except HqError as exc:
        _fail(exc)
    console = Console(highlight=False)
    rules = ", ".join(f"{a.station_id}:{a.product or '*'}" for a in result.admission) or "-"
    console.print(
        f"site bundle {result.sequence} for site {result.site_id}\n"
        f"  manifest        {len(result.manifest)} device(s)\n"
        f"  admission       {rules}\n"
        f"  station CAs     {', '.join(result.station_ids) or '-'}\n"
        f"  station CRLs    {', '.join(result.station_crls) or '-'}\n"
        f"  root CRL        next update {result.root_crl_next_update.isoformat()}\n"
        f"  revocation list sequence {result.revocation_list_sequence}\n"
        f"  offline limit   {result.max_offline_days} days\n"
        f"  payload keys    {len(result.payload_key_ids)} (current {result.current_payload_key})\n"
        f"  written to      {out} (sha256 {result.package_sha256})"
    )
    if result.stations_without_crl:
        console.print(
            f"[yellow]warning:[/] no CRL held for station(s) "
            f"{', '.join(result.stations_without_crl)}: brokers that check revocation along "
            "the whole chain refuse their devices until one is recorded (hq station-crl)"
        )
    if not result.manifest and not result.admission:
        console.print("[yellow]warning:[/] this bundle admits no device")
    if result.warning:
        console.print(f"[yellow]warning:[/] {result.warning}")


# ------------------------------------------------------------------------------ approvals

from hq.approval_cli import approval_group  # noqa: E402 (the group registers below)

main.add_command(approval_group)


# ------------------------------------------------------------- counterfeits and revocation

from trustcore.revocation import REVOCATION_REASONS  # noqa: E402


@main.command("ingest-report")
@_home_option
@click.argument("report_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def ingest_report_command(home: Path, report_file: Path, as_json: bool) -> None:
    """Verify a site report, store what the site saw, and cross-check it with the audit
    logs: counterfeit (in no audit log), over-production, clones.

    Exit 0: clean. 1: findings (listed with evidence). 2: report refused. 3: error.
    """
    from rich.table import Table

    from hq.counterfeit import ReportRefusedError, ingest_site_report

    try:
        result = ingest_site_report(HqHome.open(home), report_file.read_bytes())
    except ReportRefusedError as exc:
        if as_json:
            click.echo(json.dumps({"status": "refused", "reason": exc.reason, "message": str(exc)}))
        else:
            click.echo(f"REFUSED ({exc.reason}): {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except HqError as exc:
        _fail(exc, EXIT_ERROR)
    except OSError as exc:
        _fail(HqError(f"cannot read {report_file}: {exc}", reason="io_error"), EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(result.to_map(), sort_keys=True))
    else:
        console = Console(highlight=False)
        console.print(
            f"site report {result.sequence} of site {result.site_id}: {result.seen} factory "
            f"certificate(s) seen, {result.registrations} registration(s), "
            f"{result.audited_clean} match the audit logs"
        )
        if result.findings:
            table = Table("kind", "device", "station", "serial", "site", "first seen", "reason")
            for f in result.findings:
                table.add_row(
                    f.kind,
                    f.device_id,
                    f.station_id,
                    f.serial,
                    f.site_id,
                    datetime.fromtimestamp(f.first_seen).isoformat(),
                    f.detail,
                )
            console.print(table)
    sys.exit(EXIT_CLEAN if result.clean else EXIT_VIOLATIONS)


@main.command("revoke")
@_home_option
@click.option("--device", "devices", multiple=True, help="Device id (every certificate of it).")
@click.option("--serial", "serials", multiple=True, help="STATION:SERIAL (hex) of one certificate.")
@click.option(
    "--from-report",
    "findings_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="JSON output of `hq ingest-report --json`: revoke every finding.",
)
@click.option("--station-ca", help="Revoke a whole station CA (needs the HQ quorum).")
@click.option(
    "--reason", type=click.Choice(sorted(REVOCATION_REASONS)), help="Override the reason."
)
@_approvals_option
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_secret_options
def revoke_command(
    home: Path,
    devices: tuple[str, ...],
    serials: tuple[str, ...],
    findings_file: Path | None,
    station_ca: str | None,
    reason: str | None,
    approval_files: tuple[Path, ...],
    out: Path,
    as_json: bool,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Append to the HQ revocation list (next sequence, signed by the revocation signer)
    and write it to --out for `registrar import-revocations` at every site."""
    from hq.approvals import QuorumRefused
    from hq.authority import write_package
    from hq.counterfeit import read_findings, revoke

    if out.exists():
        raise click.BadParameter(f"{out} exists; refusing to overwrite it", param_hint="--out")
    try:
        findings = read_findings(findings_file) if findings_file is not None else []
        result, package = revoke(
            HqHome.open(home),
            HqSecrets(passphrase_file, pin_file),
            devices=devices,
            serials=serials,
            findings=findings,
            station_ca=station_ca,
            reason=reason,
            approvals=_read_approvals(approval_files),
        )
        write_package(out, package)
    except HqError as exc:
        _fail(exc, EXIT_REFUSED if isinstance(exc, QuorumRefused) else 1)
    if as_json:
        click.echo(json.dumps({**result.to_map(), "out": str(out)}, sort_keys=True))
        return
    click.echo(
        f"revocation list {result.sequence}: {len(result.added)} device(s) added, "
        f"{result.already_listed} already listed; written to {out}"
    )
    for e in result.added:
        click.echo(f"  revoked {e.station_id}:{e.serial.hex} {e.device_id} ({e.reason})")
    for serial in result.station_ca_serials:
        click.echo(f"  station CA {station_ca} serial {serial} on the root CRL (next site bundle)")


# --------------------------------------------------------------------------- renew-roles


@main.command("renew-roles")
@_home_option
@click.option("--force", is_flag=True, help="Renew every role certificate, due or not.")
@_secret_options
def renew_roles_command(
    home: Path, force: bool, passphrase_file: Path | None, pin_file: Path | None
) -> None:
    """Root ceremony: re-issue (same keys) the HQ role certificates that end within a year,
    so HQ keeps signing bundles, entitlements and revocation lists for the devices' whole
    life (docs/lifecycle.md)."""
    from hq.roles import renew_role_certificates

    try:
        done = renew_role_certificates(
            HqHome.open(home), HqSecrets(passphrase_file, pin_file), force=force
        )
    except HqError as exc:
        _fail(exc)
    for r in done:
        state = "renewed" if r.renewed else "current"
        click.echo(f"{r.role}: {state}, valid until {r.not_after.isoformat()}")
# ------------------------------------------------------- root ceremony, revocation data


@main.command("root-crl")
@_home_option
@_secret_options
def root_crl_command(home: Path, passphrase_file: Path | None, pin_file: Path | None) -> None:
    """Root ceremony: re-sign the root CRL (valid one year) and create or renew the
    delegated CRL signer certificate. The only routine use of the root key."""
    from hq.authority import now_utc
    from hq.revocation_data import root_ceremony

    try:
        result = root_ceremony(
            HqHome.open(home), HqSecrets(passphrase_file, pin_file), now=now_utc(None)
        )
    except HqError as exc:
        _fail(exc)
    click.echo(
        f"root CRL {result.root_crl_number}: next update "
        f"{result.root_crl_next_update.isoformat()}\n"
        f"CRL signer: {'issued now' if result.crl_signer_issued else 'kept'}, valid until "
        f"{result.crl_signer_not_after.isoformat()}"
    )


@main.command("publish-revocations")
@_home_option
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@_secret_options
def publish_revocations_command(
    home: Path, out: Path, passphrase_file: Path | None, pin_file: Path | None
) -> None:
    """Write the next HQ revocation list with a fresh indirect CRL (no root key): what a
    site imports with `registrar import-revocations FILE` to stay within its offline
    limit between bundles."""
    from hq.authority import now_utc, write_package
    from hq.revocation_data import latest_root_crl, publish_revocations, root_crl_warning
    from hq.store import HqStore
    from trustcore.profiles import HqRole

    if out.exists():
        raise click.BadParameter(f"{out} exists; refusing to overwrite it", param_hint="--out")
    moment = now_utc(None)
    try:
        hq_home = HqHome.open(home)
        store = HqStore.open(hq_home.store_location)
        try:
            with store.transaction():
                revocations, package = publish_revocations(
                    hq_home, store, HqSecrets(passphrase_file, pin_file), moment
                )
            warning = root_crl_warning(
                latest_root_crl(store), moment, hq_home.role_certificate(HqRole.CRL_SIGNER)
            )
        finally:
            store.close()
        write_package(out, package)
    except HqError as exc:
        _fail(exc)
    click.echo(
        f"revocation list {revocations.sequence}: {len(revocations.entries)} entries, "
        f"issued {moment.isoformat()}, written to {out}"
    )
    if warning:
        click.echo(f"warning: {warning}", err=True)
