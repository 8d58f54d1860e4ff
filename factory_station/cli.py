"""``factory-station``: the factory NUC signing station.

Station-only commands (init, entitlements, time statements, audit export, CA renewal, status,
plugins). Provisioning devices needs a device as well: ``device-sim provision`` and
``device-sim build-fleet`` drive this station with simulated devices, so this package never
imports the simulator (``tests/project/test_layering.py``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from factory_station.errors import FactoryStationError
from factory_station.station import DEFAULT_NV_INDEX, AttestationMode, FactoryStation
from signers.errors import SignerError
from signers.private_files import private_umask, write_private_file
from trustcore.cli_net import guarded_group, log_options
from trustcore.errors import InvalidValueError, TrustCoreError
from trustcore.identity import StationId
from trustcore.logformat import LogFormat, configure_logging
from trustcore.utctime import from_unix

_HOME = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Station directory.",
)
_TCTI = click.option(
    "--tcti", default=None, help="Override the station TPM TCTI (default: from station.json)."
)


class Refused(click.ClickException):
    """A refusal or a station error: exit code 2 with the reason first."""

    exit_code = 2


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except FactoryStationError as exc:
        raise Refused(str(exc)) from exc
    except (TrustCoreError, SignerError) as exc:
        raise Refused(f"{type(exc).__name__}: {exc}") from exc


@contextmanager
def _station(home: Path, tcti: str | None) -> Iterator[FactoryStation]:
    with _errors(), FactoryStation.open(home, tcti=tcti) as station:
        yield station


def _nv_index(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError as exc:
        raise click.BadParameter(f"not an integer: {value!r}") from exc


@click.group(cls=guarded_group(2), context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
@log_options
def main(log_format: LogFormat, log_level: str) -> None:
    """Factory signing station: keeps its CA key inside its TPM, enforces the entitlement
    HQ issued to it (quota, daily limit, key-use window, device-id range), has each
    device's own TPM create the device key, signs the factory certificate (IDevID) and
    keeps a hash-chained, signed audit log that it exports, encrypted, to HQ.
    """
    configure_logging(log_level, log_format, command="factory-station")
    private_umask()  # every file this command creates: 0600, directories 0700


@main.command()
@_HOME
@click.option("--station-id", required=True, help="This station's id (e.g. station-01).")
@click.option(
    "--tcti", required=True, help="Station TPM: swtpm:host=..,port=.. or device:/dev/tpmrm0"
)
@click.option(
    "--root",
    "root",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="Manufacturer root certificate (PEM) to pin.",
)
@click.option("--nv-index", default=f"0x{DEFAULT_NV_INDEX:08x}", callback=_nv_index)
@click.option(
    "--tpm-vendor-ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="PEM bundle of TPM-vendor CA certificates (root first) for device EK certificates.",
)
@click.option(
    "--unsafe-csr-only",
    is_flag=True,
    help="UNSAFE: accept a CSR signature as the only proof of a device key (no TPM attestation).",
)
@click.option(
    "--enrolment-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the enrolment request for HQ here.",
)
def init(
    home: Path,
    station_id: str,
    tcti: str,
    root: Path,
    nv_index: int,
    tpm_vendor_ca: Path | None,
    unsafe_csr_only: bool,
    enrolment_out: Path | None,
) -> None:
    """Create the station: CA and transport keys inside the TPM, the NV counter, the pinned
    root, and the enrolment request (CSR + transport key) for HQ."""
    if unsafe_csr_only:
        click.secho("WARNING: devices will not have to prove their key is in a TPM", fg="red")
    try:
        sid = StationId(station_id)
    except InvalidValueError as exc:
        raise click.BadParameter(exc.message, param_hint="--station-id") from exc
    with _errors():
        enrolment = FactoryStation.init(
            home,
            station_id=sid,
            tcti=tcti,
            root_pem=root.read_bytes(),
            nv_index=nv_index,
            vendor_ca_pem=tpm_vendor_ca.read_bytes() if tpm_vendor_ca else None,
            attestation=AttestationMode.UNSAFE_CSR_ONLY
            if unsafe_csr_only
            else AttestationMode.CERTIFY,
        )
    if enrolment_out is not None:
        enrolment_out.write_bytes(enrolment.encode())
    click.echo(f"station {sid} initialised in {home}")
    click.echo(f"enrolment request: {enrolment_out or home / 'enrolment.cbor'}")


@main.command("import-entitlement")
@_HOME
@_TCTI
@click.argument("package", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def import_entitlement(home: Path, tcti: str | None, package: Path) -> None:
    """Verify, decrypt (in the TPM) and store an entitlement from HQ."""
    with _station(home, tcti) as station:
        imported = station.import_entitlement(package.read_bytes())
    p = imported.policy
    click.echo(
        f"imported entitlement {p.entitlement_id} (sequence {p.sequence}): product {p.product}, "
        f"quota {p.total_quota}, daily limit {p.daily_limit} ({p.day_timezone}), "
        f"ids {p.id_rule.device_id(p.id_rule.first)}..{p.id_rule.device_id(p.id_rule.last)}"
    )


@main.command("import-time-statement")
@_HOME
@_TCTI
@click.argument("package", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def import_time_statement(home: Path, tcti: str | None, package: Path) -> None:
    """Re-anchor the station's trusted time on an HQ time statement (hq time-statement)."""
    with _station(home, tcti) as station:
        anchor = station.import_time_statement(package.read_bytes())
    click.echo(
        f"trusted time anchored at {from_unix(anchor.time).isoformat()} "
        f"({anchor.source})"
    )


@main.command("export-audit")
@_HOME
@_TCTI
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def export_audit(home: Path, tcti: str | None, out: Path) -> None:
    """Seal the audit records since the last export (+ checkpoint + manifest) to HQ."""
    with _station(home, tcti) as station:
        number = station.export_audit_to(out)
        status = station.status()
    click.echo(f"audit export {number} written to {out} ({status.audit_records} records in log)")


@main.command("renew-ca")
@_HOME
@_TCTI
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the signed request for HQ (hq renew-station).",
)
@click.option(
    "--rekey",
    is_flag=True,
    help="Create a new CA key in the TPM and ask HQ to certify it (signed by the new key and "
    "the current one); without it, ask for a new certificate for the current key.",
)
def renew_ca(home: Path, tcti: str | None, out: Path, rekey: bool) -> None:
    """Ask HQ for a new station CA certificate: renewal (same TPM key) or --rekey."""
    if out.exists():
        raise Refused(f"exists: {out} already exists; not overwriting it")
    with _station(home, tcti) as station:
        request = station.make_ca_request(rekey=rekey)
    try:
        write_private_file(out, request)
    except SignerError as exc:
        raise Refused(f"io_error: {exc.message}") from exc
    from trustcore.keys import key_id
    from trustcore.station_ca_request import StationCaRequest

    new_key = key_id(StationCaRequest.decode(request).verify().new_public).hex()
    what = "re-key (new CA key pending in the TPM)" if rekey else "renewal of the current CA key"
    click.echo(f"station CA request ({what}) written to {out}; take it to HQ")
    click.echo(f"  key to certify: {new_key}")


@main.command("import-ca")
@_HOME
@_TCTI
@click.option(
    "--rekey",
    is_flag=True,
    help="Expect a re-key (a certificate for the pending new key); refuse anything else. "
    "Without it, renewal or re-key is told from the certificate's key.",
)
@click.argument("certificate", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def import_ca(home: Path, tcti: str | None, rekey: bool, certificate: Path) -> None:
    """Import the station CA certificate HQ issued for a renew-ca request."""
    if certificate.stat().st_size > 64 * 1024:
        raise Refused(f"malformed: {certificate} is too large for a certificate")
    with _station(home, tcti) as station:
        result = station.import_ca_certificate(
            certificate.read_bytes(), expect_rekey=True if rekey else None
        )
    cert = result.certificate
    click.echo(
        f"station CA {result.kind}: {result.status.replace('_', ' ')}, serial "
        f"{cert.serial_number:x} (previous {result.previous_serial}), valid until "
        f"{cert.not_valid_after_utc.isoformat()}"
    )


@main.command()
@_HOME
@_TCTI
@click.option("--json", "as_json", is_flag=True)
def status(home: Path, tcti: str | None, as_json: bool) -> None:
    """Show the station's counter, entitlement and usage."""
    with _station(home, tcti) as station:
        st = station.status().to_map()
        st["station_ca"] = station.station_ca_summary()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    _print_map(st, click.echo)


def _print_map(m: dict[str, Any], echo: Callable[[str], None], indent: str = "") -> None:
    for key, value in m.items():
        if isinstance(value, dict):
            echo(f"{indent}{key}:")
            _print_map(value, echo, indent + "  ")
        else:
            echo(f"{indent}{key}: {value}")


# ------------------------------------------------------------------------------- plugins


@main.group("plugins")
def plugins_group() -> None:
    """Issuance plugins (entry-point group devtrust.station_checks), enabled in
    station.json in run order after the built-in checks. See docs/plugins.md."""


@contextmanager
def _station_config(home: Path) -> Iterator[tuple[Path, Any]]:
    """station.json under the station lock (no station process may have it open)."""
    import fcntl

    from factory_station.station import CONFIG_FILE, LOCK_FILE, StationConfig

    path = home / CONFIG_FILE
    with _errors():
        try:
            config = StationConfig.from_json(path.read_text())
        except OSError as exc:
            raise Refused(f"{home} is not a station directory: {exc}") from exc
    with (home / LOCK_FILE).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise Refused(f"station_state: another process has the station {home} open") from exc
        yield path, config


def _save_config(path: Path, config: Any) -> None:
    with _errors():
        write_private_file(path, config.to_json().encode(), overwrite=True)


@plugins_group.command("list")
@_HOME
@click.option("--json", "as_json", is_flag=True)
def plugins_list(home: Path, as_json: bool) -> None:
    """Installed plugins and the enabled ones (in run order, with their settings)."""
    from factory_station.plugins import installed_plugins, load_station_plugins

    with _station_config(home) as (_path, config):
        installed = installed_plugins()
        problems = load_station_plugins(config.plugins).problems
    enabled = [p.to_obj() for p in config.plugins]
    if as_json:
        doc = {"installed": sorted(installed), "enabled": enabled, "problems": list(problems)}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo("installed: " + (", ".join(sorted(installed)) or "(none)"))
    click.echo("enabled (run after the built-in checks, in this order):")
    for i, entry in enumerate(enabled, 1):
        click.echo(f"  {i}. {entry['name']} {json.dumps(entry['config'], sort_keys=True)}")
    if not enabled:
        click.echo("  (none)")
    for problem in problems:
        click.echo(f"PROBLEM: {problem} (every issuance is refused)", err=True)


@plugins_group.command("enable")
@_HOME
@click.argument("name")
@click.option("--config", "config_json", default="{}", show_default=True, help="JSON settings.")
def plugins_enable(home: Path, name: str, config_json: str) -> None:
    """Enable NAME (or replace its settings, keeping its place); it must be installed and
    accept the settings."""
    import dataclasses

    from factory_station.plugins import load_station_plugins
    from trustcore.policy_chain import PluginSetting

    try:
        setting = PluginSetting.create(name, json.loads(config_json))
    except (ValueError, TypeError, InvalidValueError) as exc:
        raise Refused(f"bad_config: {exc}") from exc
    problems = load_station_plugins([setting]).problems
    if problems:
        raise Refused("plugin_missing: " + "; ".join(problems))
    with _station_config(home) as (path, config):
        names = [p.name for p in config.plugins]
        plugins = list(config.plugins)
        if name in names:
            plugins[names.index(name)] = setting
        else:
            plugins.append(setting)
        _save_config(path, dataclasses.replace(config, plugins=tuple(plugins)))
    click.echo(f"plugin {name} enabled: {setting.config_json}")


@plugins_group.command("disable")
@_HOME
@click.argument("name")
def plugins_disable(home: Path, name: str) -> None:
    """Disable NAME (the built-in checks always stay)."""
    import dataclasses

    with _station_config(home) as (path, config):
        if name not in {p.name for p in config.plugins}:
            raise Refused(f"not_enabled: plugin {name} is not enabled")
        plugins = tuple(p for p in config.plugins if p.name != name)
        _save_config(path, dataclasses.replace(config, plugins=plugins))
    click.echo(f"plugin {name} disabled")
