"""``device-sim``: simulated devices and fleets."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click

from device_sim.device import DeviceStateError, SimDevice, create_fleet
from device_sim.swtpm import SwtpmError
from signers.private_files import private_umask


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
def main() -> None:
    """Simulated devices: each has its own TPM (one swtpm process and state directory per
    device) or, for large load tests, software keys. Devices are provisioned at a factory
    station and register at a building's registrar.
    """
    private_umask()  # every file this command creates: 0600, directories 0700


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="A device directory (with --count 1) or the fleet directory.",
)
@click.option("--count", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--ek-template",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Copy this TPM state (already holding an EK certificate) for every device.",
)
@click.option(
    "--ek-ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="TPM vendor CA directory: swtpm_setup makes each device its own EK certificate.",
)
def create(directory: Path, count: int, ek_template: Path | None, ek_ca_dir: Path | None) -> None:
    """Manufacture device TPMs (swtpm state with an EK certificate)."""
    if (ek_template is None) == (ek_ca_dir is None):
        raise click.UsageError("give exactly one of --ek-template or --ek-ca-dir")
    try:
        if count == 1:
            devices = [SimDevice.manufacture(directory, template=ek_template, ek_ca_dir=ek_ca_dir)]
        else:
            devices = create_fleet(directory, count, template=ek_template, ek_ca_dir=ek_ca_dir)
    except (DeviceStateError, SwtpmError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    for dev in devices:
        click.echo(str(dev.directory))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def show(directory: Path, as_json: bool) -> None:
    """Show a device: its id and factory certificate, once provisioned."""
    try:
        info = SimDevice(directory).info()
    except DeviceStateError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        click.echo(f"{key}: {value}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
def serve(directory: Path) -> None:
    """Power the device's TPM on and print its TCTI until interrupted (for
    ``factory-station provision --device-tcti``)."""
    try:
        dev = SimDevice(directory)
        dev.power_on()
    except (DeviceStateError, SwtpmError) as exc:
        raise click.ClickException(str(exc)) from exc
    # The station needs the (single-client) swtpm socket: release our own connection.
    if dev.tpm is not None:
        dev.tpm.close()
        dev.tpm = None
    click.echo(dev.tcti, nl=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        dev.power_off()


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Registration listener host.")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="Registration port.")
@click.option(
    "--root",
    "root_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="Manufacturer root certificate(s), PEM: what the devices trust.",
)
@click.option("--count", type=click.IntRange(1), help="Only the first N devices.")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="File holding the passphrase of the devices' factory keys "
    "(default: $DEVTRUST_DEVICE_PASSPHRASE).",
)
@click.option("--concurrency", type=click.IntRange(1), help="Devices in flight (default: all).")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Summary and per-device results as JSON.")
def fleet(
    directory: Path,
    host: str,
    port: int,
    root_file: Path,
    count: int | None,
    passphrase_file: Path | None,
    concurrency: int | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Onboard a load-test fleet (software-key devices under DIRECTORY, one sub-directory
    per device: idevid.pem, chain.pem, factory.key.pem encrypted) through a registrar, all
    at once. The key passphrase is read from --passphrase-file or
    $DEVTRUST_DEVICE_PASSPHRASE, never from the command line."""
    import asyncio

    from cryptography import x509

    from device_sim.fleet import PASSPHRASE_ENV, FleetError, load_fleet, onboard
    from registrar.broker import Endpoint
    from signers.errors import PassphraseError
    from signers.software import passphrase_from_env, passphrase_from_file

    try:
        passphrase = (
            passphrase_from_file(passphrase_file)
            if passphrase_file is not None
            else passphrase_from_env(PASSPHRASE_ENV)
        )
        roots = x509.load_pem_x509_certificates(root_file.read_bytes())
        devices = load_fleet(directory, roots, passphrase=passphrase, count=count)
    except (FleetError, PassphraseError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    report = asyncio.run(
        onboard(devices, Endpoint(host, port), concurrency=concurrency, timeout=timeout)
    )
    summary = report.summary()
    if as_json:
        summary["results"] = [
            {"device_id": r.device_id, "ok": r.ok, "reason": r.reason, "latency_ms": r.latency_ms}
            for r in report.results
        ]
        click.echo(json.dumps(summary))
    else:
        for key, value in summary.items():
            click.echo(f"{key}: {value}")
    if report.failures:
        raise SystemExit(1)
