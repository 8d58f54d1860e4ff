"""``registrar report``: the signed site report for HQ (format: :mod:`trustcore.site_report`).

Reads the registrar database directly (SQLite in WAL mode: a running registrar keeps
writing while the report reads a consistent snapshot), signs with the site CA key, and
advances the site's report sequence in ``report.seq``. The sequence file is written before
the report file (atomically, fsynced, under a lock), so a crash can skip a number but never
reuse one: HQ refuses any report not newer than the last it accepted.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from registrar.app import store_path
from registrar.errors import ConfigError, RegistrarError
from registrar.site import SiteHome, SiteSecrets, issuing_ca_key
from trustcore.errors import InvalidValueError
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.site_report import SeenCertificate, SiteRegistration, SiteReport, seal_site_report

__all__ = ["ReportResult", "build_site_report", "write_site_report"]


@dataclass(frozen=True)
class ReportResult:
    sequence: int
    seen: int
    registered: int
    out: Path


def _sequence_path(home: SiteHome) -> Path:
    return home.path / "report.seq"


@contextmanager
def _locked(home: SiteHome) -> Iterator[None]:
    fd = os.open(home.path / "report.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_db(home: SiteHome) -> tuple[list[Any], list[Any]]:
    path = store_path(home)
    if not path.exists():
        return [], []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open {path}: {exc}", reason="store_failed") from exc
    try:
        try:
            seen = conn.execute(
                "SELECT station_id, serial, device_id, der, first_seen FROM factory_certs "
                "ORDER BY first_seen, station_id, serial"
            ).fetchall()
        except sqlite3.OperationalError:  # a database from before sightings were recorded
            seen = []
        devices = conn.execute(
            "SELECT device_id, station_id, idevid_serial, ldevid_serial, registered_at, "
            "registrations, status FROM devices ORDER BY device_id"
        ).fetchall()
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read {path}: {exc}", reason="store_failed") from exc
    finally:
        conn.close()
    return seen, devices


def build_site_report(home: SiteHome, *, sequence: int, now: int) -> SiteReport:
    """The report of everything the registrar database holds (pure read)."""
    seen_rows, device_rows = _read_db(home)
    registered = {(row[1], row[2]) for row in device_rows}  # (station, idevid serial)
    try:
        seen = tuple(
            SeenCertificate(
                StationId(station),
                CertSerial.from_hex(serial),
                DeviceId(device),
                int(first),
                (station, serial) in registered,
                bytes(der),
            )
            for station, serial, device, der, first in seen_rows
        )
        regs = tuple(
            SiteRegistration(
                DeviceId(dev),
                None if station is None else StationId(station),
                CertSerial.from_hex(idevid),
                CertSerial.from_hex(ldevid),
                int(at),
                int(count),
                str(status),
            )
            for dev, station, idevid, ldevid, at, count, status in device_rows
        )
        return SiteReport(home.site_id, sequence, now, seen, regs)
    except InvalidValueError as exc:
        raise RegistrarError(f"registrar database holds a bad value: {exc}") from exc


def write_site_report(
    home: SiteHome, secrets: SiteSecrets, out: Path, *, now: int | None = None
) -> ReportResult:
    """Build, sign (site CA) and write the next report to ``out`` (never overwritten)."""
    if out.exists():
        raise RegistrarError(f"{out} exists; refusing to overwrite it", reason="io_error")
    if not home.commissioned:
        raise ConfigError("the site is not commissioned: run `registrar commission` first")
    moment = int(time.time()) if now is None else now
    key = issuing_ca_key(home, secrets)
    try:
        cert = x509.load_pem_x509_certificate((home.current / "site-ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the site CA certificate: {exc}") from exc
    with _locked(home):
        seq_path = _sequence_path(home)
        try:
            last = int(seq_path.read_text()) if seq_path.exists() else 0
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {seq_path}: {exc}") from exc
        report = build_site_report(home, sequence=last + 1, now=moment)
        package = seal_site_report(report, site_ca_key=key, site_ca_cert=cert)
        try:
            _atomic_write(seq_path, str(report.sequence).encode())
            _atomic_write(out, package)
        except OSError as exc:
            raise RegistrarError(f"cannot write the report: {exc}", reason="io_error") from exc
    return ReportResult(report.sequence, len(report.seen), len(report.registrations), out)
