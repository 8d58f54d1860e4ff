"""``registrar report``: the signed site report for HQ (format: :mod:`trustcore.site_report`).

Reads the registrar store (either backend; a running registrar keeps writing while the
report reads a consistent view), signs with the site CA key, and
advances the site's report sequence in ``report.seq``. The sequence file is written before
the report file (atomically, fsynced, under a lock), so a crash can skip a number but never
reuse one: HQ refuses any report not newer than the last it accepted.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from registrar.errors import ConfigError, RegistrarError, StoreError
from registrar.run_dir import store_location
from registrar.site import SiteHome, SiteSecrets, exclusive_lock, issuing_ca_key
from registrar.store import DeviceRecord, FactorySighting, Store
from signers.errors import SignerError
from signers.private_files import write_private_file
from trustcore.errors import InvalidValueError
from trustcore.site_report import SeenCertificate, SiteRegistration, SiteReport, seal_site_report
from trustcore.utctime import now_unix

__all__ = [
    "ReportData",
    "ReportResult",
    "build_site_report",
    "read_report_data",
    "write_site_report",
]


@dataclass(frozen=True)
class ReportResult:
    sequence: int
    seen: int
    registered: int
    out: Path


def _sequence_path(home: SiteHome) -> Path:
    return home.path / "report.seq"


def _locked(home: SiteHome) -> AbstractContextManager[None]:
    return exclusive_lock(home.path / "report.lock")


@dataclass(frozen=True)
class ReportData:
    """What the report is made of, as read from the store."""

    seen: tuple[FactorySighting, ...]
    devices: tuple[DeviceRecord, ...]


async def read_report_data(store: Store) -> ReportData:
    """Sightings and registrations, read through the store (a running registrar keeps
    writing meanwhile: SQLite WAL and PostgreSQL both give consistent reads)."""
    return ReportData(tuple(await store.factory_sightings()), tuple(await store.devices()))


def _read_store(home: SiteHome, store: str | None) -> ReportData:
    location = store_location(home, store)
    if location.kind == "sqlite" and not location.path.exists():
        return ReportData((), ())

    async def read() -> ReportData:
        async with await Store.open(location) as opened:
            return await read_report_data(opened)

    try:
        return asyncio.run(read())
    except StoreError as exc:
        raise ConfigError(
            f"cannot read the registrar store: {exc.message}", reason="store_failed"
        ) from exc


def build_site_report(home: SiteHome, data: ReportData, *, sequence: int, now: int) -> SiteReport:
    """The report of everything the registrar store holds (pure)."""
    try:
        registered = {(d.station_id, d.idevid_serial) for d in data.devices}
        seen = tuple(
            SeenCertificate(
                s.station_id,
                s.serial,
                s.device_id,
                int(s.first_seen),
                (s.station_id, s.serial) in registered,
                bytes(s.der),
            )
            for s in data.seen
        )
        regs = tuple(
            SiteRegistration(
                d.device_id,
                d.station_id,
                d.idevid_serial,
                d.ldevid_serial,
                int(d.registered_at),
                int(d.registrations),
                str(d.status),
            )
            for d in data.devices
        )
        return SiteReport(home.site_id, sequence, now, seen, regs)
    except InvalidValueError as exc:
        raise RegistrarError(f"registrar database holds a bad value: {exc.message}") from exc


def write_site_report(
    home: SiteHome,
    secrets: SiteSecrets,
    out: Path,
    *,
    now: int | None = None,
    store: str | None = None,
) -> ReportResult:
    """Build, sign (site CA) and write the next report to ``out`` (never overwritten).
    ``store``: the ``--store`` URL (None: the site home's SQLite file)."""
    if out.exists():
        raise RegistrarError(f"{out} exists; refusing to overwrite it", reason="io_error")
    if not home.commissioned:
        raise ConfigError("the site is not commissioned: run `registrar commission` first")
    moment = now_unix(now)
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
        report = build_site_report(home, _read_store(home, store), sequence=last + 1, now=moment)
        package = seal_site_report(report, site_ca_key=key, site_ca_cert=cert)
        try:
            write_private_file(seq_path, str(report.sequence).encode(), overwrite=True)
            write_private_file(out, package, overwrite=True)
        except SignerError as exc:
            raise RegistrarError(
                f"cannot write the report: {exc.message}", reason="io_error"
            ) from exc
    return ReportResult(report.sequence, len(report.seen), len(report.registrations), out)
