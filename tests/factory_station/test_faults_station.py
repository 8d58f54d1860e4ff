"""The factory station when things die under it, driven through ``factory-station``:
two processes on one station directory, a corrupted ``station.db``, a full disk while it
writes its audit log (the database) and its audit export, and a swtpm (the device's or
the station's own) killed mid-provisioning. Afterwards the quota counter, the issuances
and the audit log agree: no unit consumed without a record, no record without a unit.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from device_sim.device import SimDevice
from device_sim.swtpm import Swtpm
from tests.faults_support import (
    Outcome,
    assert_one_line_error,
    command,
    run,
    run_on_full_directory,
    run_with_little_space,
    sqlite_intact,
)
from tests.fixtures.station import StationEnv
from trustcore.audit import decode_record

pytestmark = pytest.mark.tpm

EXIT_REFUSED = 2  # factory-station: a refusal or a station error


@pytest.fixture
def station_env(station_env: StationEnv) -> StationEnv:
    """The shared station (tests/fixtures/station.py), entitled to 10 devices a day."""
    with station_env.open() as station:
        station.import_entitlement(station_env.hq.entitlement(quota=10, daily=10))
    return station_env


def _station(env: StationEnv, *args: str) -> list[str]:
    return command(
        "factory-station", args[0], "--home", str(env.home), "--tcti", env.swtpm.tcti, *args[1:]
    )


def _provision(env: StationEnv, device: SimDevice, tpm: Swtpm) -> list[str]:
    """``device-sim provision``: the station provisions a device reached by its TPM's TCTI."""
    return command(
        "device-sim", "provision", "--station", str(env.home), "--tcti", env.swtpm.tcti,
        "--device-tcti", tpm.tcti, "--device-dir", str(device.directory), "--json",
    )  # fmt: skip


def _status(env: StationEnv) -> dict[str, int]:
    out = run(_station(env, "status", "--json"))
    assert out.code == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _ledger(env: StationEnv) -> dict[str, object]:
    """What the station holds, read straight from its files: the audit chain must be
    unbroken, and every consumed counter value must have exactly one record."""
    db = env.home / "station.db"
    sqlite_intact(db)
    conn = sqlite3.connect(db)
    try:
        audit = [bytes(r[0]) for r in conn.execute("SELECT record FROM audit ORDER BY seq")]
        rows = conn.execute("SELECT counter, status FROM issuance ORDER BY counter").fetchall()
        base = conn.execute("SELECT counter_base FROM entitlement ORDER BY sequence").fetchall()
    finally:
        conn.close()
    events = [decode_record(r) for r in audit]
    for before, after in itertools.pairwise(events):  # the chain is unbroken
        assert (after.seq, after.prev_hash) == (before.seq + 1, before.hash), after
    audited = sorted(
        int(e.fields["counter"])  # type: ignore[call-overload]
        for e in events
        if e.event in ("issued", "slot_burned")
    )
    consumed = sorted(c for c, s in rows if s in ("issued", "burned"))
    assert audited == consumed, (audited, rows)  # no unit without a record and vice versa
    assert not [c for c, s in rows if s == "pending"], rows
    return {
        "audit": len(audit),
        "issued": sum(1 for _, s in rows if s == "issued"),
        "burned": sum(1 for _, s in rows if s == "burned"),
        "consumed": consumed,
        "counter_base": base[-1][0],
    }


def _pending(env: StationEnv) -> list[int]:
    """Issuances a crash left between intent and record (the next start resolves them)."""
    conn = sqlite3.connect(env.home / "station.db")
    try:
        rows = conn.execute("SELECT counter FROM issuance WHERE status = 'pending'").fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------- two processes, one home


def test_second_station_process_is_refused(station_env: StationEnv) -> None:
    env = station_env
    before = _digest(env.home / "station.db")
    with env.open():  # the first process (this one) has the station open
        for args in (("status",), ("export-audit", "--out", str(env.home / "x.sealed"))):
            refused = run(_station(env, *args))
            assert_one_line_error(refused, EXIT_REFUSED, "another process has the station")
        assert not (env.home / "x.sealed").exists()
    assert _digest(env.home / "station.db") == before
    assert _status(env)["audit_records"] == 1  # the entitlement import, nothing else


# ---------------------------------------------------------------------------- corruption


def _corrupt_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:16] = b"not a database!\0"
    db.write_bytes(bytes(data))


def _corrupt_pages(db: Path) -> None:
    """Garbage over every page but the first (schema intact, tables unreadable)."""
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    rng = random.Random(3)
    for offset in range(page, len(data), page):
        data[offset : offset + 64] = rng.randbytes(64)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_corrupt_header, _corrupt_pages])
def test_corrupted_station_db_is_refused(
    station_env: StationEnv, corrupt: Callable[[Path], None]
) -> None:
    env = station_env
    db = env.home / "station.db"
    corrupt(db)
    damaged = _digest(db)
    for args in (("status",), ("export-audit", "--out", str(env.home / "x.sealed"))):
        refused = run(_station(env, *args))
        print(refused)
        assert_one_line_error(refused, EXIT_REFUSED, str(db))
    assert _digest(db) == damaged  # nothing overwritten
    assert not (env.home / "x.sealed").exists()


# ----------------------------------------------------------------------------- disk full


def _new_device(
    env: StationEnv, swtpm_factory: Callable[..., Swtpm], name: str
) -> tuple[SimDevice, Swtpm]:
    device = SimDevice.manufacture(env.devices_dir / name, template=env.vendor.template)
    return device, swtpm_factory(device.state_dir)


def test_disk_full_while_provisioning(
    station_env: StationEnv, swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    """The station's home on a full filesystem, with a little more room at each attempt
    (so the write that fails moves from opening the database, to recording the intent, to
    recording the issuance and its audit record), then with space again. Every attempt
    fails cleanly and releases nothing; a slot consumed by the TPM counter whose record
    could not be written is burned and audited at the next start, which says so."""
    env = station_env
    frees: list[int | None] = [*range(32768, 61441, 4096), None]
    devices, steps = [], []
    for n, free in enumerate(frees):
        device, tpm = _new_device(env, swtpm_factory, f"d{n}")
        devices.append(device)
        steps.append((free, _provision(env, device, tpm)))
    outcomes = run_with_little_space(env.home, tmp_path / "fs", steps, size_kib=1024)

    recovered: list[int] = []
    for device, out in zip(devices[:-1], outcomes[:-1], strict=True):
        assert out.code == EXIT_REFUSED and "Traceback" not in out.stderr, out
        *notes, error = out.stderr.strip().splitlines()
        assert error.startswith("Error: station_state: ") and "station.db" in error, error
        recovered += [int(n.split("recovered: issuance ")[1].split()[0]) for n in notes]
        assert device.certificate() is None  # nothing released
    last = outcomes[-1]
    assert last.code == 0, last
    assert devices[-1].certificate() is not None
    recovered += [
        int(n.split("recovered: issuance ")[1].split()[0]) for n in last.stderr.strip().splitlines()
    ]

    ledger = _ledger(env)  # chain unbroken, every consumed unit has exactly one record
    assert (ledger["issued"], ledger["burned"]) == (1, len(recovered)), (ledger, recovered)
    assert recovered, "no attempt failed after the counter moved: widen the sweep"
    status = _status(env)
    assert status["counter"] - status["entitlement"]["counter_base"] == 1 + len(recovered)
    assert status["issued_total"] == 1 + len(recovered)
    assert status["remaining"] == 10 - status["issued_total"]


def test_audit_export_to_a_full_disk(station_env: StationEnv, tmp_path: Path) -> None:
    env = station_env
    usb = tmp_path / "usb"
    runs = run_on_full_directory(
        usb, tmp_path / "logs", _station(env, "export-audit", "--out", str(usb / "audit.sealed"))
    )
    assert_one_line_error(runs.full, EXIT_REFUSED, "No space left on device", "audit.sealed")
    assert runs.files_when_full == []  # no half-written export, no temporary file
    assert runs.freed.code == 0, runs.freed
    assert "audit export 1 written" in runs.freed.stdout
    assert runs.files_when_freed == ["audit.sealed"]
    assert _status(env)["last_export"] == 1  # recorded once


# ------------------------------------------------------------------ swtpm killed mid-run


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _kill_when(proc: subprocess.Popen[str], trigger: Callable[[], bool], pid: int) -> bool:
    """Poll ``trigger`` (every millisecond) while ``proc`` runs; SIGKILL ``pid`` once it
    holds. False if the run ended first."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if trigger():
            os.kill(pid, signal.SIGKILL)
            return True
        time.sleep(0.001)
    return False


def _trigger(
    when: str, wal: Path, wal_before: int, device_dir: Path, delay: float
) -> Callable[[], bool]:
    """When to kill, read from outside the station: its first or second database write
    (a WAL frame is a 4 KiB page and a 24-byte header), the device's key file, a time."""
    began = time.monotonic()
    return {
        "db-write": lambda: _size(wal) > wal_before,
        "db-write-2": lambda: _size(wal) > wal_before + 4096 + 24,
        "device-key": lambda: (device_dir / "device-key.tss.pem").exists(),
        "random": lambda: time.monotonic() - began > delay,
    }[when]


@pytest.mark.parametrize("victim", ["device", "station"])
def test_swtpm_killed_mid_provisioning(
    station_env: StationEnv, swtpm_factory: Callable[..., Swtpm], victim: str
) -> None:
    """The device's TPM, or the station's own, is SIGKILLed during a ``provision`` run and
    powered up again, at moments read from outside: when the station's database is first
    written (the intent, before the TPM counter moves), when the device's key file appears
    (key made, attestation and issuance ahead), and at random times. Each run ends in a
    release or a clean refusal; afterwards every consumed counter value has one audit
    record (issued or slot_burned), the quota arithmetic holds and the station provisions
    again."""
    env = station_env
    rng = random.Random(f"swtpm-{victim}")
    device, tpm = _new_device(env, swtpm_factory, "timing")
    clean = run(_provision(env, device, tpm))
    assert clean.code == 0, clean
    wal = env.home / "station.db-wal"
    outcomes = []
    for n, when in enumerate(["db-write", "db-write-2", "device-key", "random", "random"]):
        device, tpm = _new_device(env, swtpm_factory, f"v{n}")
        target = tpm if victim == "device" else env.swtpm
        delay = rng.uniform(0.3, 0.9) * clean.seconds
        trigger = _trigger(when, wal, _size(wal), device.directory, delay)
        proc = subprocess.Popen(
            _provision(env, device, tpm), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        killed = _kill_when(proc, trigger, target.pid)
        out, err = proc.communicate(timeout=60)
        target.restart()
        outcome = Outcome(proc.returncode, out, err, 0.0)
        outcomes.append((when, killed, outcome))
        assert "Traceback" not in err, err
        if outcome.code == 0:
            assert device.certificate() is not None
        else:
            assert outcome.code == EXIT_REFUSED, outcome
            assert err.strip().splitlines()[-1].startswith("Error: "), err
        pending = _pending(env)
        shown = run(_station(env, "status", "--json"))  # the next start repairs and says so
        assert shown.code == 0, shown
        for counter in pending:
            assert f"recovered: issuance {counter} " in shown.stderr, shown.stderr
        status = json.loads(shown.stdout)
        ledger = _ledger(env)
        assert status["issued_total"] == ledger["issued"] + ledger["burned"]
        assert status["counter"] - status["entitlement"]["counter_base"] == status["issued_total"]
    for when, killed, o in outcomes:
        print(victim, when, killed, o.code, o.stderr.strip().splitlines()[-1:])
    assert any(o.code != 0 for _, _, o in outcomes), "no run was interrupted"
    device, tpm = _new_device(env, swtpm_factory, "after")
    again = run(_provision(env, device, tpm))
    assert again.code == 0, again
    assert device.certificate() is not None
