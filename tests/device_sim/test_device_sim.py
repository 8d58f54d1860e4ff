"""Simulated devices: manufacture (EK template copy), power cycles that keep the TPM's keys,
fleets, and the ``device-sim create`` / ``show`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_sim.cli import main
from device_sim.device import DeviceStateError, SimDevice, create_fleet, power_off_all, power_on_all
from signers.attestation import TpmAttestor
from tests.fixtures.station import Vendor
from trustcore.identity import DeviceId

pytestmark = pytest.mark.tpm


def test_device_key_survives_a_power_cycle(vendor: Vendor, tmp_path: Path) -> None:
    dev = SimDevice.manufacture(tmp_path / "d", template=vendor.template)
    with dev:
        csr = dev.endpoint.prepare(DeviceId("dev-000042"))
        assert csr[:1] == b"\x30"
        public = dev.key().public_key()
        ek_cert = TpmAttestor(dev.endpoint.tpm).identity().ek_certificate
        assert ek_cert
    assert not dev.swtpm or not dev.swtpm.running
    with dev:  # power on again: same state dir, the wrapped key loads into the same TPM
        assert dev.key().public_key() == public
    assert (dev.directory / "device-key.tss.pem").exists()
    assert dev.info() == {"directory": str(dev.directory), "provisioned": False}


def test_manufacture_refuses_reuse_and_missing_tpm(vendor: Vendor, tmp_path: Path) -> None:
    SimDevice.manufacture(tmp_path / "d", template=vendor.template)
    with pytest.raises(DeviceStateError):
        SimDevice.manufacture(tmp_path / "d", template=vendor.template)
    with pytest.raises(DeviceStateError):
        SimDevice(tmp_path / "nothing")
    with pytest.raises(DeviceStateError):
        SimDevice.manufacture(tmp_path / "e")


def test_fleet_each_device_has_its_own_tpm_process(vendor: Vendor, tmp_path: Path) -> None:
    fleet = create_fleet(tmp_path / "fleet", 3, template=vendor.template)
    assert [d.directory.name for d in fleet] == ["dev-00000", "dev-00001", "dev-00002"]
    try:
        power_on_all(fleet)
        assert len({d.tcti for d in fleet}) == 3
        assert all(d.swtpm and d.swtpm.running for d in fleet)
    finally:
        power_off_all(fleet)
    assert not any(d.swtpm and d.swtpm.running for d in fleet)


def test_cli_create_and_show(vendor: Vendor, tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        main, ["create", "--dir", str(tmp_path / "one"), "--ek-template", str(vendor.template)]
    )
    assert out.exit_code == 0, out.output
    assert out.output.strip() == str(tmp_path / "one")
    out = runner.invoke(
        main,
        [
            "create",
            "--dir",
            str(tmp_path / "many"),
            "--count",
            "2",
            "--ek-template",
            str(vendor.template),
        ],
    )
    assert out.exit_code == 0, out.output
    assert len(out.output.split()) == 2
    shown = runner.invoke(main, ["show", "--json", str(tmp_path / "one")])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["provisioned"] is False
    bad = runner.invoke(main, ["create", "--dir", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "exactly one" in bad.output
