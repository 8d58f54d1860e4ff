"""``device-sim``: simulated devices and fleets, and the factory line that provisions them.

The factory-line commands (``provision``, ``build-fleet``) open a real factory station
(:mod:`factory_station`) and hand it simulated devices: this module and
:mod:`device_sim.fleet_build` are the only ones of the package that import the station
(``tests/project/test_layering.py``); the device runtime (TPM, registration client, agent, fleet
onboarding) depends on ``trustcore`` and ``signers`` only.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from device_sim.device import DeviceStateError, SimDevice, create_fleet
from device_sim.swtpm import SwtpmError
from signers.private_files import private_umask
from trustcore.cli_net import guarded_group, log_options
from trustcore.logformat import LogFormat, configure_logging

if TYPE_CHECKING:
    from factory_station.provision import ProvisionResult
    from factory_station.station import FactoryStation

log = logging.getLogger(__name__)


@click.group(
    cls=guarded_group(1, {"provision": 2, "build-fleet": 2}),
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="devtrust")
@log_options
def main(log_format: LogFormat, log_level: str) -> None:
    """Simulated devices: each has its own TPM (one swtpm process and state directory per
    device) or, for large load tests, software keys. Devices are provisioned at a factory
    station (`provision`, `build-fleet`) and register at a building's registrar.
    """
    configure_logging(log_level, log_format, command="device-sim")
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


@main.command("secret-hmac")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--name", required=True, help="Product secret name.")
@click.option("--challenge", required=True, help="Challenge, hex (at most 1024 bytes).")
def secret_hmac(directory: Path, name: str, challenge: str) -> None:
    """Prove the device holds a product secret: print HMAC-SHA256(secret, challenge) in hex,
    computed inside the device's TPM (the secret itself never leaves it)."""
    from signers.errors import SignerError

    try:
        data = bytes.fromhex(challenge)
    except ValueError as exc:
        raise click.BadParameter("not hex", param_hint="--challenge") from exc
    try:
        with SimDevice(directory) as dev:
            mac = dev.endpoint.secret_hmac(name, data)
    except (DeviceStateError, SwtpmError, SignerError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(mac.hex())


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
def serve(directory: Path) -> None:
    """Power the device's TPM on and print its TCTI until interrupted (for
    ``device-sim provision --device-tcti``)."""
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


class Refused(click.ClickException):
    """A refusal by the factory station: exit code 2 with the reason first."""

    exit_code = 2


def _device_passphrase(passphrase_file: Path | None) -> bytes:
    """The devices' keystore passphrase: --passphrase-file or $DEVTRUST_DEVICE_PASSPHRASE,
    never the command line."""
    from device_sim.fleet import PASSPHRASE_ENV
    from signers.software import passphrase_from

    return passphrase_from(passphrase_file, PASSPHRASE_ENV)


# --------------------------------------------------------------- at a factory station

_STATION = click.option(
    "--station",
    "station_home",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="The factory station's directory (factory-station init).",
)
_STATION_TCTI = click.option(
    "--tcti", default=None, help="Override the station TPM TCTI (station.json)."
)
_APPROVALS = click.option(
    "--approvals",
    "approval_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Quorum evidence for an operation the entitlement gates (an approval bundle, or the "
    "request and its approvals; repeat). Verified, recorded and audited by the station "
    "before provisioning.",
)


@contextmanager
def _at_station(home: Path, tcti: str | None) -> Iterator[FactoryStation]:
    """The station at ``home``, opened for one command; its refusals (and core or signer
    errors) end the command as :class:`Refused` (exit 2, reason first)."""
    from factory_station.errors import FactoryStationError
    from factory_station.station import FactoryStation
    from signers.errors import SignerError
    from trustcore.errors import TrustCoreError

    try:
        with FactoryStation.open(home, tcti=tcti) as station:
            yield station
    except FactoryStationError as exc:
        raise Refused(str(exc)) from exc
    except (TrustCoreError, SignerError) as exc:
        raise Refused(f"{type(exc).__name__}: {exc}") from exc


def _accept_approvals(station: FactoryStation, files: tuple[Path, ...]) -> None:
    from trustcore.quorum import MAX_EVIDENCE_SIZE

    if not files:
        return
    blobs = []
    for path in files:
        if path.stat().st_size > MAX_EVIDENCE_SIZE:
            raise Refused(f"malformed: {path} is larger than {MAX_EVIDENCE_SIZE} bytes")
        blobs.append(path.read_bytes())
    grant = station.accept_approvals(blobs)
    what = f"{grant.extra} more on {grant.day}" if grant.day else f"device {grant.device_id}"
    click.echo(
        f"quorum approved: {grant.operation} ({what}) by {len(grant.approvers)} approvers, "
        f"request {grant.request_id.hex()}",
        err=True,
    )


def _print_result(res: ProvisionResult, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "device_id": res.device_id.value,
                    "serial": res.issued.serial_hex,
                    "counter": res.issued.counter,
                    "key_id": res.issued.key_id.hex(),
                    "secrets": list(res.secrets),
                }
            )
        )
    else:
        click.echo(
            f"provisioned {res.device_id} serial {res.issued.serial_hex} "
            f"(counter {res.issued.counter}, {res.seconds * 1000:.1f} ms)"
            + (f"; secrets in its TPM: {', '.join(res.secrets)}" if res.secrets else "")
        )


@main.command()
@_STATION
@_STATION_TCTI
@click.option(
    "--device-tcti", required=True, help="TCTI of the device's TPM (`device-sim serve`)."
)
@click.option("--device-id", default=None, help="Device id (default: next unused id).")
@click.option(
    "--device-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the device's files go (key blob, idevid.pem); default STATION/devices/<id>.",
)
@click.option(
    "--secret",
    "secret_names",
    multiple=True,
    help="Product secret to import into the device TPM (repeatable); default: every secret "
    "the entitlement's rules give this device. One outside its rule is refused.",
)
@click.option("--json", "as_json", is_flag=True)
@_APPROVALS
def provision(
    station_home: Path,
    tcti: str | None,
    device_tcti: str,
    device_id: str | None,
    device_dir: Path | None,
    secret_names: tuple[str, ...],
    as_json: bool,
    approval_files: tuple[Path, ...],
) -> None:
    """The station provisions one device reached through its TPM's TCTI (and imports the
    product secrets its entitlement rules give it into that TPM). Exit 2 on a refusal."""
    from device_sim.device import TpmDevice
    from factory_station.provision import provision_device
    from signers.errors import SignerError
    from signers.tpm import Tpm
    from trustcore.identity import DeviceId

    with _at_station(station_home, tcti) as station:
        _accept_approvals(station, approval_files)
        did = DeviceId(device_id) if device_id else station.allocate_device_id()
        directory = device_dir or station_home / "devices" / did.value
        directory.mkdir(parents=True, exist_ok=True)
        try:
            device_tpm = Tpm(device_tcti)
        except SignerError as exc:
            raise Refused(f"device_error: cannot reach the device TPM: {exc}") from exc
        try:
            res = provision_device(
                station,
                TpmDevice(device_tpm, directory),
                did,
                secrets=list(secret_names) if secret_names else None,
            )
        finally:
            try:
                device_tpm.close()
            except SignerError as exc:  # the outcome above stands; the TPM went away after
                log.warning("device TPM at %s did not close cleanly: %s", device_tcti, exc)
    _print_result(res, as_json)


@main.command("build-fleet")
@_STATION
@_STATION_TCTI
@click.option("--count", type=click.IntRange(1), required=True, help="Devices to make.")
@click.option(
    "--keys",
    type=click.Choice(["software", "tpm"]),
    required=True,
    help="software: load-test devices (encrypted software factory keys; the station must be "
    "--unsafe-csr-only); tpm: one swtpm per device, key made and attested in it.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The fleet directory (created; one sub-directory per device).",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="software: file holding the passphrase for the factory keys "
    "(default: $DEVTRUST_DEVICE_PASSPHRASE).",
)
@click.option(
    "--ek-template",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="tpm: copy this TPM state (with an EK certificate) for every device (fast).",
)
@click.option(
    "--ek-ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="tpm: TPM vendor CA directory: swtpm_setup makes each device its own EK certificate.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON summary line.")
@_APPROVALS
def build_fleet_cmd(
    station_home: Path,
    tcti: str | None,
    count: int,
    keys: str,
    out: Path,
    passphrase_file: Path | None,
    ek_template: Path | None,
    ek_ca_dir: Path | None,
    workers: int,
    as_json: bool,
    approval_files: tuple[Path, ...],
) -> None:
    """Make COUNT devices at a real factory station (its entitlement, NV counter, TPM
    signature and audit log apply to each) for `device-sim fleet`. Exit 2 if the station
    refused any device (quota, daily limit, window, ...)."""
    from device_sim.fleet import FleetError
    from device_sim.fleet_build import build_fleet
    from signers.errors import PassphraseError

    software = keys == "software"
    if software and (ek_template or ek_ca_dir):
        raise click.UsageError("--ek-template / --ek-ca-dir are for --keys tpm")
    if not software and passphrase_file is not None:
        raise click.UsageError("--passphrase-file is for --keys software")
    if not software and (ek_template is None) == (ek_ca_dir is None):
        raise click.UsageError("--keys tpm needs exactly one of --ek-template or --ek-ca-dir")
    try:
        passphrase = _device_passphrase(passphrase_file) if software else None
        if not as_json:
            click.echo(f"manufacturing and provisioning {count} {keys}-key devices ...", err=True)
        with _at_station(station_home, tcti) as station:
            _accept_approvals(station, approval_files)
            result = build_fleet(
                station, out, count, "software" if software else "tpm",
                passphrase=passphrase, ek_template=ek_template, ek_ca_dir=ek_ca_dir,
                workers=workers,
            )  # fmt: skip
    except (FleetError, PassphraseError, DeviceStateError, SwtpmError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    refusals = [str(err) for _, err in result.refused]
    summary = {
        "fleet": str(out),
        "keys": keys,
        "built": len(result.provisioned),
        "refused": refusals,
        "seconds": round(result.seconds, 3),
        "devices_per_s": round(result.devices_per_s, 1),
        "device_ids": sorted(r.device_id.value for r in result.provisioned),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(
            f"built {summary['built']} of {count} {keys}-key devices in {out} "
            f"({result.seconds:.2f} s, {result.devices_per_s:.1f} devices/s)"
        )
        for message in refusals:
            click.echo(f"refused: {message}", err=True)
    if result.refused:
        raise SystemExit(2)


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
    """Onboard a fleet through a registrar, all at once: software-key devices under
    DIRECTORY (one sub-directory per device: idevid.pem, chain.pem, factory.key.pem
    encrypted; `device-sim build-fleet --keys software`), or swtpm devices (`build-fleet
    --keys tpm`: each is powered on, and every key, TLS included, stays in its TPM). The
    software keys' passphrase is read from --passphrase-file or $DEVTRUST_DEVICE_PASSPHRASE,
    never from the command line."""
    import asyncio
    import contextlib

    from cryptography import x509

    from device_sim.fleet import FleetError, fleet_kind, load_fleet, onboard, tpm_fleet
    from signers.errors import PassphraseError
    from trustcore.endpoint import Endpoint

    with contextlib.ExitStack() as stack:
        try:
            roots = x509.load_pem_x509_certificates(root_file.read_bytes())
            if fleet_kind(directory) == "tpm":
                devices = stack.enter_context(tpm_fleet(directory, roots, count=count))
            else:
                passphrase = _device_passphrase(passphrase_file)
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
