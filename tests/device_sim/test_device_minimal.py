"""The minimal device of ``docs/device-minimal.md`` (paho-mqtt + cryptography + cbor2, no
project code), extracted from the document and run as its own process against a real
``registrar run`` (embedded broker and Mosquitto, SQLite) on a site commissioned from an HQ
bundle: it must end registered, with an LDevID that ``openssl verify`` accepts and the
site's payload key, and its telemetry must reach the operational listener."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.site_fixture import build_commissioned_site
from device_sim.fleet import write_load_device
from registrar.app import AppSettings, running
from registrar.payload_keys import PayloadKeyring
from registrar.site import SiteHome
from registrar.store import DeviceRecord
from trustcore.identity import DeviceId
from trustcore.payload import open_payload

DOC = Path(__file__).resolve().parents[2] / "docs" / "device-minimal.md"
PASSPHRASE = b"minimal device test passphrase"
PEM = serialization.Encoding.PEM


def minimal_device_source() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- minimal-device -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the minimal device code block is missing from docs/device-minimal.md"
    return match.group(1)


def test_minimal_device_imports_no_project_code() -> None:
    allowed = {"cbor2", "paho", "cryptography"}
    stdlib = set(sys.stdlib_module_names)
    tree = ast.parse(minimal_device_source())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top in allowed or top in stdlib, f"the minimal device imports {name}"


@dataclass(frozen=True)
class Run:
    returncode: int | None
    out: bytes
    err: bytes
    directory: Path
    root_pem: Path
    keyring: PayloadKeyring
    site_ca: x509.Certificate
    record: DeviceRecord | None


async def run_minimal_device(
    tmp_path: Path, device_id: str, broker: Literal["embedded", "mosquitto"] = "embedded"
) -> Run:
    """A site admitting "dev-…" devices, ``registrar run`` on it, and the minimal device
    (a software-key load device as ``device-sim build-fleet`` writes one) run against it."""
    site = build_commissioned_site(tmp_path / "world", id_prefix="dev-")
    device = site.factory_device(device_id)
    directory = write_load_device(
        tmp_path / "fleet",
        device.idevid,
        (device.station_ca,),
        device.factory_key.private_key(),
        passphrase=PASSPHRASE,
    )
    script = tmp_path / "minimal_device.py"
    script.write_text(minimal_device_source(), encoding="utf-8")
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(site.root.public_bytes(PEM))
    pass_file = tmp_path / "device.pass"
    pass_file.write_bytes(PASSPHRASE + b"\n")
    pass_file.chmod(0o600)
    settings = AppSettings(broker=broker, registration_port=0, operational_port=0)
    async with running(SiteHome.open(site.home), site.secrets(), settings) as app:
        reg, op = app.registration_endpoint, app.operational_endpoint
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            str(directory),
            *("--root", str(root_pem), "--host", reg.host),
            *("--registration-port", str(reg.port), "--operational-port", str(op.port)),
            *("--passphrase-file", str(pass_file)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
        assert app.keyring is not None and app.store is not None and app.site is not None
        record = await app.store.device(DeviceId(device_id))
        return Run(
            proc.returncode,
            out,
            err,
            directory,
            root_pem,
            app.keyring,
            app.site.site_ca_cert,
            record,
        )


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
async def test_minimal_device_registers_against_a_real_registrar(
    tmp_path: Path, broker: Literal["embedded", "mosquitto"]
) -> None:
    run = await run_minimal_device(tmp_path, "dev-min-000001", broker)
    assert run.returncode == 0, run.err.decode()
    assert b"Traceback" not in run.err
    result = json.loads(run.out.decode().strip().splitlines()[-1])
    assert result["device_id"] == "dev-min-000001"
    assert run.record is not None and run.record.status == "registered"
    # the payload key: the device sealed telemetry with it, the registrar's key opens it
    current = run.keyring.current
    assert bytes.fromhex(result["payload_key_id"]) == current.key_id
    plaintext = open_payload(
        {current.key_id: current},
        "devices/dev-min-000001/telemetry",
        bytes.fromhex(result["telemetry"]),
    )
    assert plaintext == b"hello"

    ldevid_pem = run.directory / "ldevid.pem"
    ldevid = x509.load_pem_x509_certificate(ldevid_pem.read_bytes())
    assert format(ldevid.serial_number, "x") == result["ldevid_serial"]
    site_ca_pem = tmp_path / "site-ca.pem"
    site_ca_pem.write_bytes(run.site_ca.public_bytes(PEM))
    verify = subprocess.run(
        [
            *("openssl", "verify", "-x509_strict", "-purpose", "sslclient"),
            *("-CAfile", str(run.root_pem), "-untrusted", str(site_ca_pem), str(ldevid_pem)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.strip().endswith(": OK")


async def test_minimal_device_reports_a_refusal_in_one_line(tmp_path: Path) -> None:
    """A device the site does not admit gets the signed refusal: exit 2, reason on stderr."""
    run = await run_minimal_device(tmp_path, "zz-min-000001")  # the site admits only dev-
    assert run.returncode == 2, run.err.decode()
    assert run.err.decode().strip() == (
        "refused: not_in_manifest: device is not admitted at this site (retry: False)"
    )
    assert run.out == b""
    assert run.record is None
    assert not (run.directory / "ldevid.pem").exists()
