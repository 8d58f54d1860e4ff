"""The demo's last act: years later. The same site, registrar and devices, at a later date.

The registrar, its broker and the devices run on a simulated clock: libfaketime with one
timestamp file (``tests/fixtures/faketime.py``, the same harness as the ten-year test,
``docs/lifecycle.md``). Every process started here lives on it; nothing sleeps through time.

1. 13 months later HQ is heard from again (root ceremony, fresh site bundle): the devices'
   LDevIDs (one year) ran out while they were switched off, so each registers again with
   its factory certificate (``registered TH-000003 on 2028-01-07``).
2. 8½ months after that, each renews its LDevID over MQTT with a new TPM key
   (``renewed TH-000003 on 2028-09-22``); the old certificate is on the site CRL.

Run by ``scripts/demo.py`` (parent side: :func:`run_years_later`); the device side runs as
``python scripts/demo_later.py devices ...`` in a child on the simulated clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.faketime import FakeClock  # noqa: E402

BIN = Path(sys.executable).parent
REREGISTER_AFTER = timedelta(days=400)  # the one-year LDevIDs ran out meanwhile
RENEW_AFTER = timedelta(days=255)  # past 2/3 of the new one-year LDevIDs

Run = Callable[..., str]


def _secret_file(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return path


def run_years_later(work: Path, step: Callable[[str], None], summary: list[tuple[str, str, str]],
                    station_tcti: str, console: Any) -> None:  # fmt: skip
    """Parent side: move the clock, hear from HQ, run the registrar, drive the devices."""
    hq, site = work / "hq", work / "site"
    later = datetime.now(UTC) + REREGISTER_AFTER
    clock = FakeClock.create(later)
    # Secrets go to the children as files, never through the environment.
    hq_pass = _secret_file(work / "later-hq.pass", os.environ["DEVTRUST_HQ_PASSPHRASE"])
    site_pass = _secret_file(work / "later-site.pass", os.environ["DEVTRUST_SITE_PASSPHRASE"])
    env = clock.env()

    def cli(*args: object, quiet: bool = False) -> str:
        argv = [str(a) for a in args]
        shown = " ".join(a.replace(str(work) + "/", "") for a in argv)
        console.print(f"[dim]$ {shown}   # on {clock.now().date()}[/dim]")
        done = subprocess.run(  # noqa: S603 - our own commands, argv list, no shell
            [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env,
            cwd=work, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            console.print(done.stdout, done.stderr, style="red")
            raise SystemExit(f"demo step failed: {shown} (exit {done.returncode})")
        if not quiet and done.stdout.strip():
            console.print(done.stdout.rstrip())
        return done.stdout

    step(f"14. Years later ({later.date()}): HQ is heard from again; the devices come back")
    try:
        if _has("hq", "root-crl"):
            cli("hq", "root-crl", "--home", hq, "--passphrase-file", hq_pass)
        cli("hq", "site", "bundle", "--home", hq, "--site", "site-01",
            "--admit-station", "station-01", "--out", work / "site-bundle-later.sealed",
            "--passphrase-file", hq_pass, quiet=True)  # fmt: skip
        cli("registrar", "commission", "--home", site, work / "site-bundle-later.sealed",
            "--passphrase-file", site_pass)  # fmt: skip
        log = (work / "registrar-later.log").open("wb")
        proc = subprocess.Popen(  # noqa: S603 - our own command
            [str(BIN / "registrar"), "run", "--home", str(site), "--passphrase-file",
             str(site_pass), "--registration-port", "0", "--operational-port", "0",
             "--crl-check-interval", "0.5"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            status = _wait_status(site, proc)
            reg, op = status["listeners"]["registration"], status["listeners"]["operational"]
            out = work / "later.json"
            done = subprocess.run(  # noqa: S603 - our own script
                [sys.executable, str(Path(__file__)), "devices", "--work", str(work),
                 "--station-tcti", station_tcti, "--site-passphrase-file", str(site_pass),
                 "--registration", f"{reg['host']}:{reg['port']}",
                 "--operational", f"{op['host']}:{op['port']}", "--out", str(out)],
                env=env, capture_output=True, text=True, timeout=180, check=False,
            )  # fmt: skip
            console.print(done.stdout.rstrip())
            if done.returncode != 0:
                console.print(done.stderr[-3000:], style="red")
                raise SystemExit("demo failed: the devices did not come back years later")
            result = json.loads(out.read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            log.close()
    finally:
        clock.remove()
        for path in (hq_pass, site_pass):
            path.unlink(missing_ok=True)
    summary.append(
        (
            "years later: registered",
            f"{result['registered']}",
            f"LDevIDs had expired; IDevID still good on {result['registered_on']}",
        )
    )
    summary.append(
        (
            "years later: renewed",
            f"{result['renewed']}",
            f"new TPM keys over MQTT on {result['renewed_on']}; old ones on the site CRL",
        )
    )
    if result["renewed"] != result["registered"] or result["registered"] == 0:
        raise SystemExit("demo failed: not every device renewed years later")


def _has(*command: str) -> bool:
    done = subprocess.run(  # noqa: S603 - our own command
        [str(BIN / command[0]), *command[1:], "--help"], capture_output=True, check=False
    )
    return done.returncode == 0


def _wait_status(site: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    path = site / "run" / "status.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("demo failed: the registrar stopped (see .demo/registrar-later.log)")
        try:
            doc = json.loads(path.read_text())
            if doc.get("connected") and doc.get("pid") == proc.pid:
                return dict(doc)
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit("demo failed: the registrar did not come up years later")


# ---------------------------------------------------------------- device side (a child)


async def _devices(args: Any) -> dict[str, Any]:
    from cryptography import x509

    from device_sim.client import DeviceClient, DeviceCredentials, TpmKeys
    from device_sim.device import SimDevice
    from registrar.site import SiteHome, SiteSecrets, load_commissioned_site
    from signers.tpm import Tpm, TpmKey
    from trustcore.endpoint import Endpoint
    from trustcore.profiles import device_id_from_certificate

    clock = FakeClock.inherited()
    work = Path(args.work)
    host, port = args.registration.rsplit(":", 1)
    reg_ep = Endpoint(host, int(port))
    host, port = args.operational.rsplit(":", 1)
    op_ep = Endpoint(host, int(port))
    secrets_ = SiteSecrets(Path(args.site_passphrase_file))
    site = load_commissioned_site(SiteHome.open(work / "site"), secrets_)
    root = site.root
    devices = [SimDevice(d) for d in sorted((work / "devices").iterdir())]
    revoked = set(
        json.loads((work / "site" / "run" / "status.json").read_text())["revoked_devices"]
    )
    devices = [
        d
        for d in devices
        if (c := d.certificate()) is not None and device_id_from_certificate(c).value not in revoked
    ]
    for d in devices:
        d.power_on()
    tpms = [Tpm(d.tcti) for d in devices]
    clients = []
    try:
        for dev, tpm in zip(devices, tpms, strict=True):
            cert = dev.certificate()
            assert cert is not None
            chain = (x509.load_pem_x509_certificate((dev.directory / "chain.pem").read_bytes()),)
            key = TpmKey.load(tpm, dev.directory / "device-key.tss.pem")
            device_id = device_id_from_certificate(cert)
            creds = DeviceCredentials(device_id, cert, chain, key, (root,))
            clients.append(DeviceClient(creds, TpmKeys(tpm)))  # TLS keys: in the TPM
        registered_on = clock.now().date().isoformat()
        for c in clients:  # nothing in memory: as after a power cycle with expired LDevIDs
            outcome = await c.keep_certified(reg_ep, op_ep)  # type: ignore[attr-defined]
            assert outcome == "registered", outcome
            print(f"registered {c.device_id} on {registered_on}", flush=True)
        clock.advance(RENEW_AFTER)
        renewed_on = clock.now().date().isoformat()
        await _site_crl_fresh(work / "site", clock)
        renewed = 0
        for c in clients:
            old = c.registered.ldevid  # type: ignore[union-attr]
            outcome = await c.keep_certified(reg_ep, op_ep)  # type: ignore[attr-defined]
            assert outcome == "renewed", outcome
            assert c.registered.ldevid.serial_number != old.serial_number  # type: ignore[union-attr]
            renewed += 1
            print(f"renewed {c.device_id} on {renewed_on}", flush=True)
    finally:
        for tpm in tpms:
            tpm.close()
        for d in devices:
            d.power_off()
    return {"registered": len(clients), "registered_on": registered_on,
            "renewed": renewed, "renewed_on": renewed_on}  # fmt: skip


async def _site_crl_fresh(site: Path, clock: FakeClock) -> None:
    """After the date moved, the registrar re-issues its site CRL on its next tick."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            doc = json.loads((site / "run" / "status.json").read_text())
            if datetime.fromisoformat(doc["site_crl_next_update"]) > clock.now():
                return
        except (OSError, ValueError, KeyError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the registrar did not refresh its site CRL")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("devices")
    for name in ("--work", "--station-tcti", "--site-passphrase-file", "--registration",
                 "--operational", "--out"):  # fmt: skip
        dev.add_argument(name, required=True)
    args = parser.parse_args()
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    result = asyncio.run(_devices(args))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
