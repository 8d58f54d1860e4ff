"""Counters that cannot be cheated: a station killed (SIGKILL) between the TPM counter
increment and the certificate release burns that slot on its next start (audited) and never
exceeds its quota; a station whose files are restored from an older copy refuses to run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from device_sim.device import SimDevice
from device_sim.swtpm import Swtpm
from factory_station.errors import IssuanceRefused, StationStateError
from factory_station.provision import provision_device
from tests.fixtures.station import (
    StationEnv,
)
from trustcore.audit import decode_record

pytestmark = pytest.mark.tpm


# The composition root of a station process, with the counter wrapped so that the process
# is SIGKILLed right after the TPM counter moved (nothing in the package knows about it).
CRASHING_STATION = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    from device_sim.device import TpmDevice
    from factory_station.provision import provision_device
    from factory_station.station import FactoryStation
    from signers.tpm import Tpm

    class KillAfterIncrement:
        def __init__(self, inner):
            self.inner = inner

        def read(self):
            return self.inner.read()

        def increment(self):
            value = self.inner.increment()
            os.kill(os.getpid(), signal.SIGKILL)
            return value

    home, station_tcti, device_tcti, device_dir = sys.argv[1:5]
    station = FactoryStation.open(home, tcti=station_tcti, wrap_counter=KillAfterIncrement)
    provision_device(station, TpmDevice(Tpm(device_tcti), Path(device_dir)))
    print("released a certificate: the kill did not happen", flush=True)
    """
)


def test_kill_between_counter_and_release_burns_the_slot(
    station_env: StationEnv, tmp_path: Path, swtpm_factory: Callable[..., Swtpm]
) -> None:
    env = station_env
    with env.open() as station:
        station.import_entitlement(env.hq.entitlement(quota=2, daily=2))
        provision_device(station, env.device().endpoint)
        counter_before = station.status().counter

    victim = SimDevice.manufacture(tmp_path / "victim", template=env.vendor.template)
    victim_tpm = swtpm_factory(victim.state_dir)
    script = tmp_path / "crashing_station.py"
    script.write_text(CRASHING_STATION)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(env.home),
            env.swtpm.tcti,
            victim_tpm.tcti,
            str(victim.directory),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert victim.certificate() is None  # nothing was released

    with env.open() as station:
        status = station.status()
        assert status.counter == counter_before + 1  # the TPM counter did move
        assert (status.issued_total, status.burned, status.remaining) == (2, 1, 0)
        events = [decode_record(r) for _, r in station.store.audit_records(0)]
        burned = [e for e in events if e.event == "slot_burned"]
        assert len(burned) == 1
        assert burned[0].fields == {
            "counter": counter_before + 1,
            "device_id": "dev-000002",
            "entitlement_seq": 1,
        }
        assert len(station.store.issued_certificates()) == 1
        # Quota 2 = one certificate + one burned slot: the next device is refused.
        with pytest.raises(IssuanceRefused) as info:
            provision_device(station, env.device().endpoint)
        assert info.value.reason == "over_quota"
    # Recovery happens once: a second start finds a consistent state and audits nothing new.
    with env.open() as station:
        assert station.store.audit_count() == len(events) + 1


def test_restoring_older_station_files_is_refused(station_env: StationEnv, tmp_path: Path) -> None:
    env = station_env
    right_after_init = tmp_path / "copy-init"
    shutil.copytree(env.home, right_after_init)
    with env.open() as station:
        station.import_entitlement(env.hq.entitlement(quota=5, daily=5))
        provision_device(station, env.device().endpoint)
    backup = tmp_path / "copy-1"
    shutil.copytree(env.home, backup)
    with env.open() as station:
        provision_device(station, env.device().endpoint)
        provision_device(station, env.device().endpoint)
        assert station.status().remaining == 2

    for old in (backup, right_after_init):
        shutil.rmtree(env.home)
        shutil.copytree(old, env.home)
        with pytest.raises(StationStateError) as info:
            env.open()
        assert info.value.reason == "state_rollback", old
        assert "older than its TPM" in str(info.value)
