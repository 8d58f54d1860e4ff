"""Test helpers for the HQ tests (no tests here): a software-key factory station that speaks
the HQ <-> station contract of ``trustcore.messages``, and a prepared HQ world.

The station side is simulated with software keys (``SoftwareKey``) so the audit tests stay
fast; the real TPM station is ``factory_station`` and the end-to-end test drives it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from psycopg import sql

from hq.cli import main as hq_main
from signers.software import SoftwareKey
from tests.fixtures.postgres import PgServer, create_database, drop_database
from trustcore.audit import AuditLog, ChainHead, encode_export
from trustcore.csr import build_csr
from trustcore.entitlement import EntitlementPolicy
from trustcore.identity import DeviceId, StationId
from trustcore.keys import key_id
from trustcore.messages import (
    CT_AUDIT_EXPORT,
    CT_ENTITLEMENT,
    AuditExportPayload,
    EntitlementPayload,
    StationEnrolment,
)
from trustcore.profiles import issue_factory_certificate
from trustcore.sealed import open_package, peek, seal_package

PASSPHRASE = "correct horse battery staple"
ENV = {"DEVTRUST_HQ_PASSPHRASE": PASSPHRASE}


def run_hq(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(hq_main, list(args), env=ENV if env is None else env)


def db_dump(home: Path) -> list[str]:
    """Every row of every table: compared before and after to prove nothing changed (the
    HQ's SQLite file, or its PostgreSQL database when ``hq.json`` names one)."""
    url = json.loads((home / "hq.json").read_text()).get("store")
    if url is not None:
        with psycopg.connect(url) as pg:
            tables = [
                r[0]
                for r in pg.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'public' ORDER BY table_name"
                )
            ]
            return [
                f"{table}: {row[0]}"
                for table in tables
                for row in pg.execute(
                    sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(sql.Identifier(table))
                )
            ]
    conn = sqlite3.connect(home / "hq.sqlite")
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def midnight_utc(days_ago: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


@dataclass
class SoftStation:
    """A station's identity: CA and transport keys; after import, its certificate and
    policy. Logs are separate (:class:`StationLog`) so one identity serves many tests."""

    station_id: str
    ca_key: SoftwareKey = field(default_factory=SoftwareKey.ephemeral)
    transport: SoftwareKey = field(default_factory=SoftwareKey.ephemeral)
    ca_cert: x509.Certificate | None = None
    policy: EntitlementPolicy | None = None
    audit_receiver: x509.Certificate | None = None

    def enrolment(self) -> bytes:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.station_id)])
        csr = build_csr(self.ca_key, subject)
        return StationEnrolment.create(
            StationId(self.station_id), csr, self.ca_key, self.transport.public_key()
        ).encode()

    def import_entitlement(self, package: bytes) -> EntitlementPayload:
        signer_cert = peek(package).sender_certificate()
        opened = open_package(
            package,
            receiver=self.transport,
            expected_content_type=CT_ENTITLEMENT,
            trusted_sender_public=signer_cert.public_key(),  # type: ignore[arg-type]
            last_sequence=None,
            max_size=1 << 22,
        )
        payload = EntitlementPayload.decode(opened.payload)
        self.ca_cert = x509.load_der_x509_certificate(payload.station_ca_cert_der)
        self.audit_receiver = x509.load_der_x509_certificate(payload.audit_receiver_cert_der)
        self.policy = payload.policy
        return payload

    def new_log(self) -> StationLog:
        return StationLog(self)


@dataclass
class StationLog:
    """One station's audit log as the station would write it, and its exports."""

    station: SoftStation
    log: AuditLog = field(init=False)
    pending: list[bytes] = field(default_factory=list)
    manifest: list[bytes] = field(default_factory=list)
    export_number: int = 0
    counter: int = 0

    def __post_init__(self) -> None:
        self.log = AuditLog(self.station.station_id)

    @property
    def policy(self) -> EntitlementPolicy:
        assert self.station.policy is not None
        return self.station.policy

    def record(self, event: str, fields: dict[str, object], when: int) -> bytes:
        raw = self.log.append(event, fields, when)  # type: ignore[arg-type]
        self.pending.append(raw)
        return raw

    def imported(self, when: int, extra: dict[str, object] | None = None) -> None:
        self.record(
            "entitlement_imported",
            {
                "entitlement_id": self.policy.entitlement_id,
                "entitlement_seq": self.policy.sequence,
                "counter_base": self.counter,
                **(extra or {}),
            },
            when,
        )

    def issue(
        self,
        device_id: str,
        when: int,
        *,
        key: SoftwareKey | None = None,
        in_manifest: bool = True,
        product: str | None = None,
        extra: dict[str, object] | None = None,
    ) -> x509.Certificate:
        st = self.station
        assert st.ca_cert is not None
        device_key = key or SoftwareKey.ephemeral()
        cert = issue_factory_certificate(
            st.ca_cert,
            st.ca_key.private_key(),
            device_key.public_key(),
            device_id=DeviceId(device_id),
            manufacturer="Acme",
            not_before=st.ca_cert.not_valid_before_utc,
        )
        self.counter += 1
        self.record(
            "issued",
            {
                "device_id": device_id,
                "serial": format(cert.serial_number, "x"),
                "key_id": key_id(device_key.public_key()),
                "product": product or self.policy.product,
                "entitlement_seq": self.policy.sequence,
                "counter": self.counter,
                **(extra or {}),
            },
            when,
        )
        if in_manifest:
            self.manifest.append(cert.public_bytes(serialization.Encoding.DER))
        return cert

    def burn(self, device_id: str, when: int) -> None:
        self.counter += 1
        self.record(
            "slot_burned",
            {
                "counter": self.counter,
                "device_id": device_id,
                "entitlement_seq": self.policy.sequence,
            },
            when,
        )

    def checkpoint(self, when: int, signer: SoftwareKey | None = None) -> bytes:
        return self.log.make_checkpoint(signer or self.station.ca_key, when)

    def export(
        self,
        when: int,
        *,
        records: list[bytes] | None = None,
        checkpoint: bytes | None = None,
        sender: SoftStation | None = None,
        claimed_station: str | None = None,
        export_number: int | None = None,
        crl: bytes | None = None,
    ) -> bytes:
        """Seal the pending records (or ``records``) as the next export, then clear them."""
        cp = checkpoint if checkpoint is not None else self.checkpoint(when)
        audit = encode_export(self.pending if records is None else records, cp)
        if export_number is None:
            self.export_number += 1
            export_number = self.export_number
        payload = AuditExportPayload(
            station_id=claimed_station or self.station.station_id,
            entitlement_sequence=self.policy.sequence,
            export_number=export_number,
            audit_export=audit,
            manifest=tuple(self.manifest),
            crl=crl,
        )
        signer = sender or self.station
        assert signer.ca_cert is not None and self.station.audit_receiver is not None
        package = seal_package(
            content_type=CT_AUDIT_EXPORT,
            payload=payload.encode(),
            sender=signer.ca_key,
            sender_cert=signer.ca_cert,
            receiver_public=self.station.audit_receiver.public_key(),  # type: ignore[arg-type]
            sequence=export_number,
            created=when,
        )
        self.pending = []
        self.manifest = []
        return package

    def fork_from(self, head: ChainHead) -> AuditLog:
        """A second log continuing from an earlier head (a fork)."""
        return AuditLog(self.station.station_id, head=head)


@dataclass
class World:
    """A prepared HQ (software root) with stations A and B enrolled and entitled."""

    home: Path
    a: SoftStation
    b: SoftStation
    t0: int  # a time inside the key-use window, 01:00 UTC on the window's first day
    store: str | None = None  # the PostgreSQL URL when the HQ runs on PostgreSQL
    copies: list[str] = field(default_factory=list)  # databases made by copy()

    def copy(self, dest: Path) -> Path:
        """A private HQ to change: the directory, and on PostgreSQL a new database made
        from the world's as a template (dropped by :meth:`drop_copies`)."""
        shutil.copytree(self.home, dest)
        if self.store is not None:
            base, _, template = self.store.rpartition("/")
            name = f"{template}_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                        sql.Identifier(name), sql.Identifier(template)
                    )
                )
            self.copies.append(name)
            config = json.loads((dest / "hq.json").read_text())
            config["store"] = f"{base}/{name}"
            (dest / "hq.json").write_text(json.dumps(config))
        return dest

    def drop_copies(self) -> None:
        if self.store is None:
            return
        base = self.store.rpartition("/")[0]
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            for name in self.copies:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.copies.clear()


def entitle_args(home: Path, station: str, out: Path, **overrides: str) -> list[str]:
    opts = {
        "--station": station,
        "--product": "thermo",
        "--quota": "20",
        "--daily-limit": "10",
        "--timezone": "UTC",
        "--not-before": midnight_utc(2).isoformat(),
        "--not-after": (midnight_utc(0) + timedelta(days=30)).isoformat(),
        "--id-prefix": "dev-",
        "--id-first": "1",
        "--id-last": "100",
        "--id-digits": "4",
        "--out": str(out),
    }
    opts.update(overrides)
    args = ["entitle", "--home", str(home)]
    for k, v in opts.items():
        args += [k, v]
    # Every station of these worlds gets the same id range on purpose (the cross-station
    # duplicate checks are tested on it): HQ refuses that unless overridden (and records it).
    return [*args, "--allow-overlap"]


def build_world(base: Path, store: str | None = None) -> World:
    """Stations A and B enrolled and entitled, on ``store`` (a PostgreSQL URL) or SQLite."""
    home = base / "hq"
    more = [] if store is None else ["--store", store]
    r = run_hq("init", "--home", str(home), "--org", "Acme", *more)
    assert r.exit_code == 0, r.output
    stations = []
    for sid in ("station-a", "station-b"):
        st = SoftStation(sid)
        req = base / f"{sid}.enrol"
        req.write_bytes(st.enrolment())
        r = run_hq("enrol-station", "--home", str(home), str(req))
        assert r.exit_code == 0, r.output
        out = base / f"{sid}.entitlement"
        r = run_hq(*entitle_args(home, sid, out))
        assert r.exit_code == 0, r.output
        st.import_entitlement(out.read_bytes())
        stations.append(st)
    return World(
        home, stations[0], stations[1], int(midnight_utc(2).timestamp()) + 3600, store=store
    )


def world_on_each_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, prefix: str
) -> Iterator[World]:
    """Body of a module's ``world`` fixture parametrized ``["sqlite", "postgres"]``: the
    same prepared HQ on either engine (on PostgreSQL in a fresh database, dropped after)."""
    if request.param == "sqlite":
        yield build_world(tmp_path_factory.mktemp(prefix))
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = create_database(server, "hq_world")
    world: World | None = None
    try:
        world = build_world(tmp_path_factory.mktemp(prefix), server.url_of(name))
        yield world
    finally:
        if world is not None:
            world.drop_copies()  # once per module: every DROP DATABASE waits for a checkpoint
        drop_database(server, name)


def home_copy(world: World, tmp_path: Path) -> Path:
    """Body of a module's ``home`` fixture: a private copy of the world for one test (its
    database, on PostgreSQL, is dropped with the world's)."""
    return world.copy(tmp_path / "hq")


def ingest(home: Path, package: bytes, tmp: Path, *, name: str | None = None) -> Result:
    path = tmp / (name or f"export-{os.urandom(4).hex()}.bin")
    path.write_bytes(package)
    return run_hq("ingest-audit", "--home", str(home), str(path), "--json")


def ingest_json(home: Path, package: bytes, tmp: Path) -> tuple[int, dict[str, Any]]:
    r = ingest(home, package, tmp)
    assert r.output.strip(), r.output
    return r.exit_code, json.loads(r.output.strip().splitlines()[-1])
