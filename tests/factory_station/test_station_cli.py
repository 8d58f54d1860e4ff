"""The ``factory-station`` commands end to end on swtpm: init (enrolment written),
import-entitlement (and a refused replay, exit 2), devices provisioned at it (``device-sim
build-fleet --keys tpm`` and ``device-sim provision``), status, export-audit; ``device-sim
show`` then sees the factory certificate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding

from device_sim.cli import main as device_main
from device_sim.device import SimDevice
from device_sim.swtpm import Swtpm
from factory_station.cli import main
from tests.fixtures.pki import Pki
from tests.fixtures.station import SoftHq, Vendor
from trustcore.messages import StationEnrolment
from trustcore.sealed import peek

pytestmark = pytest.mark.tpm


def test_cli_init_import_provision_status_export(
    pki: Pki, vendor: Vendor, tmp_path: Path, swtpm_factory: Callable[..., Swtpm]
) -> None:
    runner = CliRunner()
    tpm = swtpm_factory(tmp_path / "station-tpm")
    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(Encoding.PEM))
    vendor_pem = tmp_path / "vendor.pem"
    vendor_pem.write_bytes(vendor.ca_pem)
    home = tmp_path / "station"
    enrol = tmp_path / "enrolment.cbor"

    def run(*args: str, code: int = 0) -> str:
        out = runner.invoke(main, [*args])
        assert out.exit_code == code, out.output
        return out.output

    def device(*args: str, code: int = 0) -> str:
        out = runner.invoke(device_main, [*args])
        assert out.exit_code == code, out.output
        return out.output

    run(
        "init",
        "--home",
        str(home),
        "--station-id",
        "station-t1",
        "--tcti",
        tpm.tcti,
        "--root",
        str(root),
        "--tpm-vendor-ca",
        str(vendor_pem),
        "--enrolment-out",
        str(enrol),
    )
    enrolment = StationEnrolment.decode(enrol.read_bytes())
    enrolment.verify()
    assert enrolment.station_id.value == "station-t1"
    assert "already" in run(
        "init",
        "--home",
        str(home),
        "--station-id",
        "station-t1",
        "--tcti",
        tpm.tcti,
        "--root",
        str(root),
        "--unsafe-csr-only",
        code=2,
    )

    package = tmp_path / "ent.sealed"
    package.write_bytes(SoftHq(pki, enrolment).entitlement(quota=5, daily=5))
    assert "quota 5" in run("import-entitlement", "--home", str(home), str(package))
    replay = run("import-entitlement", "--home", str(home), str(package), code=2)
    assert "replayed" in replay

    out = device(
        "build-fleet",
        "--station",
        str(home),
        "--count",
        "3",
        "--keys",
        "tpm",
        "--out",
        str(tmp_path / "fleet"),
        "--ek-template",
        str(vendor.template),
        "--workers",
        "2",
    )
    assert "built 3 of 3 tpm-key devices" in out

    dev = SimDevice.manufacture(tmp_path / "single", template=vendor.template)
    dev_tpm = swtpm_factory(dev.state_dir)
    line = device(
        "provision",
        "--station",
        str(home),
        "--device-tcti",
        dev_tpm.tcti,
        "--device-id",
        "dev-000100",
        "--device-dir",
        str(dev.directory),
        "--json",
    )
    assert json.loads(line)["device_id"] == "dev-000100"
    shown = runner.invoke(device_main, ["show", "--json", str(dev.directory)])
    info = json.loads(shown.output)
    assert info["provisioned"] is True and info["device_id"] == "dev-000100"

    refused = device(
        "provision",
        "--station",
        str(home),
        "--device-tcti",
        dev_tpm.tcti,
        "--device-id",
        "dev-000100",
        code=2,
    )
    assert "duplicate_device" in refused

    st = json.loads(run("status", "--home", str(home), "--json"))
    assert (st["issued_total"], st["remaining"], st["burned"]) == (4, 1, 0)

    out_file = tmp_path / "audit-1.sealed"
    assert "audit export 1" in run("export-audit", "--home", str(home), "--out", str(out_file))
    header = peek(out_file.read_bytes())
    assert header.sequence == 1 and header.content_type == "devtrust/audit-export/v1"
    assert "audit export 2" in run("export-audit", "--home", str(home), "--out", str(out_file))
