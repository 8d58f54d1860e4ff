"""A complete building site built in code, for benchmarks and fleet tests.

* :func:`build_site_pki` — manufacturer root, one factory station CA, the site CA, the
  broker's server certificate, the registrar's own client certificate (CN
  ``registrar@site``) and fresh CRLs; :meth:`SitePki.factory_devices` — N software-key
  devices with IEEE 802.1AR factory certificates (what the factory line would have made).
* :func:`write_site` — the same site as files (every private key an encrypted PKCS#8
  keystore under :data:`PASSPHRASE`, the payload key HPKE-sealed to an encrypted transport
  key as the real registrar stores it, everything 0600 in a private directory) and the
  :class:`~registrar.broker.BrokerSettings` for it;
  :func:`load_site` reads it back (used by the registrar process of the benchmarks).
* :func:`build_commissioned_site` — a site home commissioned from a real HQ bundle (HQ root,
  an enrolled and entitled station whose CA key is in software, so the bench can make
  factory devices); :class:`RegistrarProcess` — ``registrar run`` on it, the one way
  registrations are served (benchmarks and fleet tests use nothing else).
* :class:`SiteRuntime` — a broker of either kind with the echo responder on it (the
  benchmarks' baseline: the registrar's own channel answering each request with its bytes).
* ``python bench/site_fixture.py serve DIR --broker KIND [--passphrase-file F]`` —
  :class:`SiteRuntime` as a separate process, driven by one-line commands on stdin
  (``echo``, ``stop-responder``, ``stats``, ``quit``), answering with one JSON line each.

Nothing here is for production: keys are generated in software and the passphrase is a
constant. Still, no private or AES key is ever written in plaintext, not even here (bench/
ships): keys go to disk only encrypted, and into ``ssl`` only through
:func:`signers.software.load_ssl_identity`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.client import DeviceCredentials
from registrar.broker import REGISTRAR_IDENTITY, Broker, BrokerSettings, BrokerTls, Endpoint
from registrar.channel import MqttChannel, MqttChannelSettings, SiteTraffic
from registrar.payload_keys import PayloadKeyStore
from registrar.service import SiteAuthority
from registrar.site import SiteSecrets
from signers.software import SoftwareKey, load_ssl_identity
from trustcore.crl import build_crl
from trustcore.identity import DeviceId, SiteId, StationId
from trustcore.payload import PayloadKey
from trustcore.profiles import (
    issue_broker_certificate,
    issue_factory_certificate,
    issue_root_ca,
    issue_service_client_certificate,
    issue_site_ca,
    issue_station_ca,
)
from trustcore.registration import Admission, AdmissionRule
from trustcore.verify import ChainVerifier

__all__ = [
    "MANUFACTURER",
    "SITE_OPERATOR",
    "BenchSite",
    "BrokerKind",
    "FactoryDevice",
    "RegistrarProcess",
    "SiteFiles",
    "SitePki",
    "SiteProcess",
    "SiteRuntime",
    "build_commissioned_site",
    "build_site_pki",
    "client_context",
    "commissioned_runtime",
    "load_site",
    "make_broker",
    "process_cpu_seconds",
    "write_site",
]

MANUFACTURER = "Devtrust Bench Manufacturer"
SITE_OPERATOR = "Devtrust Bench Site"
PASSPHRASE = b"bench passphrase, not a secret"
DAY = timedelta(days=1)
PEM = serialization.Encoding.PEM
BrokerKind = Literal["embedded", "mosquitto"]

log = logging.getLogger("bench.site")


def _pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An encrypted PKCS#8 keystore under :data:`PASSPHRASE` (never plaintext)."""
    return SoftwareKey(key).to_encrypted_pem(PASSPHRASE)


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class FactoryDevice:
    """A device as it leaves the factory in software-key (load) mode."""

    device_id: DeviceId
    idevid: x509.Certificate
    factory_key: SoftwareKey
    station_ca: x509.Certificate
    root: x509.Certificate

    def credentials(self) -> DeviceCredentials:
        return DeviceCredentials(
            self.device_id, self.idevid, (self.station_ca,), self.factory_key, (self.root,)
        )


@dataclass(frozen=True)
class SitePki:
    now: datetime
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    station_id: StationId
    station_ca: x509.Certificate
    station_key: ec.EllipticCurvePrivateKey
    site_ca: x509.Certificate
    site_key: ec.EllipticCurvePrivateKey
    broker: x509.Certificate
    broker_key: ec.EllipticCurvePrivateKey
    registrar: x509.Certificate
    registrar_key: ec.EllipticCurvePrivateKey
    crls: tuple[x509.CertificateRevocationList, ...]
    payload_key: PayloadKey = field(repr=False)

    def issue_idevid(
        self, device_id: DeviceId, public_key: ec.EllipticCurvePublicKey
    ) -> x509.Certificate:
        """A factory certificate from the station CA (as the factory line would issue)."""
        return issue_factory_certificate(
            self.station_ca,
            self.station_key,
            public_key,
            device_id=device_id,
            manufacturer=MANUFACTURER,
            not_before=self.now - DAY,
        )

    def factory_device(self, device_id: DeviceId | str) -> FactoryDevice:
        device = DeviceId(device_id) if isinstance(device_id, str) else device_id
        key = SoftwareKey.generate()
        return FactoryDevice(
            device, self.issue_idevid(device, key.public_key()), key, self.station_ca, self.root
        )

    def factory_devices(
        self, count: int, *, prefix: str = "dev-", start: int = 0
    ) -> list[FactoryDevice]:
        return [self.factory_device(f"{prefix}{i:06d}") for i in range(start, start + count)]

    def admission(self) -> Admission:
        """Every device of the one station (an admission rule, as a site bundle may carry)."""
        return Admission(rules=(AdmissionRule(self.station_id),))

    def verifier(self) -> ChainVerifier:
        return ChainVerifier([self.root], (self.station_ca,), self.crls)

    def site_authority(self) -> SiteAuthority:
        return SiteAuthority(self.site_ca, SoftwareKey(self.site_key), SITE_OPERATOR)


def build_site_pki(
    now: datetime | None = None, *, payload_key: PayloadKey | None = None
) -> SitePki:
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    root_key, station_key, site_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    broker_key, registrar_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    root = issue_root_ca(
        root_key,
        common_name="Devtrust Bench Root CA",
        organization=MANUFACTURER,
        not_before=now - 365 * DAY,
        not_after=now + 10 * 365 * DAY,
    )
    station_id = StationId("station-01")
    station_ca = issue_station_ca(
        root,
        root_key,
        station_key.public_key(),
        station_id=station_id,
        organization=MANUFACTURER,
        not_before=now - 30 * DAY,
        not_after=now + 365 * DAY,
        max_not_after=now + 365 * DAY,
    )
    site_ca = issue_site_ca(
        root,
        root_key,
        site_key.public_key(),
        site_id=SiteId("site-bench"),
        organization=MANUFACTURER,
        not_before=now - 30 * DAY,
        not_after=now + 5 * 365 * DAY,
    )
    broker = issue_broker_certificate(
        site_ca,
        site_key,
        broker_key.public_key(),
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        organization=SITE_OPERATOR,
        not_before=now - DAY,
        not_after=now + 365 * DAY,
    )
    registrar = issue_service_client_certificate(
        site_ca,
        site_key,
        registrar_key.public_key(),
        service_name=REGISTRAR_IDENTITY,
        organization=SITE_OPERATOR,
        not_before=now - DAY,
        not_after=now + 365 * DAY,
    )
    crls = tuple(
        build_crl(
            issuer,
            key,
            revoked=[],
            crl_number=1,
            this_update=now - timedelta(hours=1),
            next_update=now + 7 * DAY,
        )
        for issuer, key in ((root, root_key), (station_ca, station_key), (site_ca, site_key))
    )
    return SitePki(
        now=now,
        root=root,
        root_key=root_key,
        station_id=station_id,
        station_ca=station_ca,
        station_key=station_key,
        site_ca=site_ca,
        site_key=site_key,
        broker=broker,
        broker_key=broker_key,
        registrar=registrar,
        registrar_key=registrar_key,
        crls=crls,
        payload_key=payload_key or PayloadKey.generate(),
    )


# --------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class SiteFiles:
    directory: Path
    broker: BrokerSettings
    root: Path
    registrar_cert: Path  # registrar client certificate + site CA
    registrar_key: Path
    database: Path


_FILES = {
    "root": "root.pem",
    "station": "station-ca.pem",
    "site": "site-ca.pem",
    "site_key": "site-ca.key.pem",
    "broker": "broker.pem",
    "broker_key": "broker.key.pem",
    "registrar": "registrar.pem",
    "registrar_key": "registrar.key.pem",
    "crls": "crls.pem",
    "registration_cas": "registration-cas.pem",
    "operational_cas": "operational-cas.pem",
    "transport_key": "transport.key.pem",
    "payload_keys": "payload-keys.cbor",
}


def _files(directory: Path) -> SiteFiles:
    d = directory
    settings = BrokerSettings(
        tls=BrokerTls(
            server_cert=d / _FILES["broker"],
            server_key=d / _FILES["broker_key"],
            server_key_passphrase=PASSPHRASE,
            registration_cas=d / _FILES["registration_cas"],
            operational_cas=d / _FILES["operational_cas"],
            crl_file=d / _FILES["crls"],
        ),
        workdir=d / "broker",
    )
    return SiteFiles(
        d,
        settings,
        d / _FILES["root"],
        d / _FILES["registrar"],
        d / _FILES["registrar_key"],
        d / "registrar.db",
    )


def write_site(pki: SitePki, directory: Path) -> SiteFiles:
    """Write the site into ``directory`` (created 0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    transport = SoftwareKey.generate()
    data = {
        "root": _pem(pki.root),
        "station": _pem(pki.station_ca),
        "site": _pem(pki.site_ca),
        "site_key": _key_pem(pki.site_key),
        "broker": _pem(pki.broker) + _pem(pki.site_ca),
        "broker_key": _key_pem(pki.broker_key),
        "registrar": _pem(pki.registrar) + _pem(pki.site_ca),
        "registrar_key": _key_pem(pki.registrar_key),
        "crls": b"".join(_pem(c) for c in pki.crls),
        "registration_cas": _pem(pki.root) + _pem(pki.station_ca),
        "operational_cas": _pem(pki.site_ca),
        "transport_key": transport.to_encrypted_pem(PASSPHRASE),
    }
    for name, content in data.items():
        _private(directory / _FILES[name], content)
    # The AES payload key, sealed to the transport key: the registrar's at-rest format.
    (directory / _FILES["payload_keys"]).unlink(missing_ok=True)
    PayloadKeyStore(directory / _FILES["payload_keys"], transport).add(pki.payload_key)
    return _files(directory)


def _load_crls(data: bytes) -> tuple[x509.CertificateRevocationList, ...]:
    marker = b"-----BEGIN X509 CRL-----"
    return tuple(
        x509.load_pem_x509_crl(marker + block) for block in data.split(marker) if block.strip()
    )


def load_site(directory: Path) -> tuple[SitePki, SiteFiles]:
    """Read a site written by :func:`write_site` (the root and station keys are not there:
    the registrar process never needs them; those fields hold the site key as filler)."""
    d = directory

    def cert(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((d / _FILES[name]).read_bytes())

    def key(name: str) -> SoftwareKey:
        return SoftwareKey.load(d / _FILES[name], PASSPHRASE)

    site_key = key("site_key").private_key()
    payload_key = PayloadKeyStore(d / _FILES["payload_keys"], key("transport_key")).load().current
    station = cert("station")
    pki = SitePki(
        now=datetime.now(UTC).replace(microsecond=0),
        root=cert("root"),
        root_key=site_key,
        station_id=StationId(
            str(station.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value)
        ),
        station_ca=station,
        station_key=site_key,
        site_ca=cert("site"),
        site_key=site_key,
        broker=cert("broker"),
        broker_key=key("broker_key").private_key(),
        registrar=cert("registrar"),
        registrar_key=key("registrar_key").private_key(),
        crls=_load_crls((d / _FILES["crls"]).read_bytes()),
        payload_key=payload_key,
    )
    return pki, _files(directory)


def client_context(
    root: x509.Certificate, cert_pem: bytes, key: ec.EllipticCurvePrivateKey
) -> ssl.SSLContext:
    """A TLS client context: trust ``root``, present ``cert_pem`` (leaf + issuer) with ``key``
    (handed to ``ssl`` encrypted, see :func:`signers.software.load_ssl_identity`)."""
    ctx = ssl.create_default_context(cadata=_pem(root).decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_ssl_identity(ctx, cert_pem, key)
    return ctx


# ------------------------------------------------------------------------------- runtime


def make_broker(kind: BrokerKind, settings: BrokerSettings) -> Broker:
    if kind == "embedded":
        from registrar.broker.embedded import EmbeddedBroker

        return EmbeddedBroker(settings)
    if kind == "mosquitto":
        from registrar.broker.mosquitto import MosquittoBroker

        return MosquittoBroker(settings)
    raise ValueError(f"unknown broker kind {kind!r}")


class SiteRuntime:
    """A started broker and, on demand, the echo responder on it: the benchmarks' baseline,
    served by the registrar's own channel (:class:`registrar.channel.MqttChannel`, same
    client, subscriptions and worker pool) with a handler that answers each request with
    its own bytes. Registrations are served by ``registrar run`` only
    (:class:`RegistrarProcess`)."""

    def __init__(
        self, broker: BrokerSettings, registrar_tls: ssl.SSLContext, kind: BrokerKind
    ) -> None:
        self.kind = kind
        self.broker = make_broker(kind, broker)
        self._tls = registrar_tls
        self._responder: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self.echoed = 0

    @classmethod
    def of_files(cls, pki: SitePki, files: SiteFiles, kind: BrokerKind) -> SiteRuntime:
        """The broker of a site written by :func:`write_site`."""
        tls = client_context(pki.root, files.registrar_cert.read_bytes(), pki.registrar_key)
        return cls(files.broker, tls, kind)

    @property
    def registration_endpoint(self) -> Endpoint:
        return self.broker.registration_endpoint

    @property
    def operational_endpoint(self) -> Endpoint:
        return self.broker.operational_endpoint

    async def start(self) -> None:
        await self.broker.start()

    async def start_echo(self) -> None:
        """The baseline: reply to each request with its own bytes, nothing else."""
        await self.stop_responder()

        async def echo(device: DeviceId, payload: bytes) -> bytes:
            self.echoed += 1
            return payload

        op = self.operational_endpoint
        channel = MqttChannel(
            MqttChannelSettings(
                endpoint=op,
                protocol="5" if self.kind == "mosquitto" else "3.1.1",
                shared_group="registrars" if self.kind == "mosquitto" else None,
            ),
            self._tls,
            SiteTraffic(register=echo, renew=echo),
        )
        self._stop = asyncio.Event()
        self._responder = asyncio.create_task(channel.run(self._stop))
        waiter = asyncio.create_task(channel.connected.wait())
        done, _ = await asyncio.wait(
            {waiter, self._responder}, timeout=15, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            if self._responder.done():
                self._responder.result()
            raise RuntimeError("the echo responder did not subscribe in time")

    async def stop_responder(self) -> None:
        if self._responder is not None and self._stop is not None:
            self._stop.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._responder, 10)
        self._responder = None

    async def stats(self) -> dict[str, object]:
        out: dict[str, object] = {"echoed": self.echoed, "cpu_s": round(time.process_time(), 3)}
        pid = getattr(self.broker, "pid", None)
        if isinstance(pid, int):
            with contextlib.suppress(OSError, ValueError, IndexError):
                out["broker_cpu_s"] = round(process_cpu_seconds(pid), 2)
        return out

    async def stop(self) -> None:
        await self.stop_responder()
        await self.broker.stop()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, pki: SitePki, files: SiteFiles, kind: BrokerKind
    ) -> AsyncIterator[SiteRuntime]:
        site = cls.of_files(pki, files, kind)
        await site.start()
        try:
            yield site
        finally:
            await site.stop()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (``/proc/<pid>/stat``; children excluded)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------- a commissioned site home


@dataclass(frozen=True)
class BenchSite:
    """A site home commissioned from a real HQ bundle (``registrar run`` serves it), and
    the station that makes its devices (software CA key: the bench's factory line)."""

    home: Path
    passphrase_file: Path
    root: x509.Certificate
    station_ca: x509.Certificate
    station_key: SoftwareKey
    id_prefix: str

    def secrets(self) -> SiteSecrets:
        return SiteSecrets(self.passphrase_file)

    def issue_idevid(
        self, device_id: DeviceId, public_key: ec.EllipticCurvePublicKey
    ) -> x509.Certificate:
        """A factory certificate from the station CA (as the factory line would issue)."""
        return issue_factory_certificate(
            self.station_ca,
            self.station_key.private_key(),
            public_key,
            device_id=device_id,
            manufacturer=MANUFACTURER,
            not_before=max(self.station_ca.not_valid_before_utc, datetime.now(UTC) - DAY),
        )

    def factory_device(self, device_id: DeviceId | str) -> FactoryDevice:
        device = DeviceId(device_id) if isinstance(device_id, str) else device_id
        key = SoftwareKey.generate()
        idevid = self.issue_idevid(device, key.public_key())
        return FactoryDevice(device, idevid, key, self.station_ca, self.root)

    def factory_devices(
        self, count: int, *, start: int = 0, prefix: str | None = None
    ) -> list[FactoryDevice]:
        """``count`` devices ``<prefix><number, 6 digits>`` (admitted: the site's prefix)."""
        prefix = self.id_prefix if prefix is None else prefix
        ids = (f"{prefix}{i:06d}" for i in range(start, start + count))
        return [self.factory_device(device_id) for device_id in ids]


def _secret_file(path: Path, value: str) -> Path:
    _private(path, value.encode() + b"\n")
    return path


def build_commissioned_site(base: Path, *, id_prefix: str = "dev-") -> BenchSite:
    """HQ (root CA), one enrolled and entitled station (product ``bench``, ids
    ``<id_prefix>000000``-``999999``), and an enrolled site commissioned from HQ's bundle,
    which admits every device of that station and product. About a second."""
    from hq.authority import enrol_station, init_hq
    from hq.entitlements import EntitlementRequest, issue_entitlement
    from hq.home import HqHome, HqSecrets
    from hq.site import SiteBundleRequest, build_site_bundle, enrol_site, record_station_crl
    from registrar.site import SiteHome, commission_site, init_site
    from trustcore.csr import build_csr
    from trustcore.entitlement import DeviceIdRule
    from trustcore.messages import StationEnrolment

    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    hq_secrets = HqSecrets(_secret_file(base / "hq.pass", "bench hq passphrase"))
    init_hq(base / "hq", organization=MANUFACTURER, secrets=hq_secrets)
    hq = HqHome.open(base / "hq")
    station = "station-bench"
    ca, transport = SoftwareKey.generate(), SoftwareKey.generate()
    csr = build_csr(ca, x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, station)]))
    enrol_station(
        hq, StationEnrolment.create(StationId(station), csr, ca, transport.public_key()).encode()
    )
    now = datetime.now(UTC)
    entitlement = issue_entitlement(
        hq,
        EntitlementRequest(
            station,
            "bench",
            1_000_000,
            1_000_000,
            "UTC",
            now - DAY,
            now + 30 * DAY,
            DeviceIdRule(id_prefix, 0, 999_999, 6),
        ),
        hq_secrets,
    )
    crl = build_crl(
        entitlement.station_ca_cert,
        ca.private_key(),
        revoked=[],
        crl_number=1,
        this_update=now - DAY,
        next_update=now + 7 * DAY,
    )
    record_station_crl(hq, station, crl.public_bytes(serialization.Encoding.DER))
    site_pass = _secret_file(base / "site.pass", "bench site passphrase")
    secrets = SiteSecrets(site_pass)
    root_pem = (hq.certs_dir / "root-ca.pem").read_bytes()
    enrolment = init_site(base / "site", site_id="site-bench", root_pem=root_pem, secrets=secrets)
    enrol_site(hq, enrolment.enrolment_path.read_bytes(), hq_secrets)
    bundle = build_site_bundle(
        hq,
        SiteBundleRequest(
            site_id="site-bench",
            devices=(),
            admit_stations=(station,),
            admit_products=("bench",),
            rotate_payload_key=False,
        ),
        hq_secrets,
    ).package
    commission_site(SiteHome.open(base / "site"), bundle, secrets)
    return BenchSite(
        base / "site",
        site_pass,
        x509.load_pem_x509_certificate(root_pem),
        entitlement.station_ca_cert,
        ca,
        id_prefix,
    )


def commissioned_runtime(home: Path, passphrase_file: Path, kind: BrokerKind) -> SiteRuntime:
    """The broker of a commissioned site (its own work directory) with the registrar's
    client certificate, for the echo baseline (no registrar runs meanwhile)."""
    from registrar.site import SiteHome, broker_settings, load_commissioned_site

    site_home, secrets = SiteHome.open(home), SiteSecrets(passphrase_file)
    site = load_commissioned_site(site_home, secrets)
    ctx = ssl.create_default_context(cadata=_pem(site.root).decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(site.client_cert, site.client_key, password=secrets.passphrase())
    settings = broker_settings(site_home, secrets, workdir=home / "run" / f"echo-{kind}")
    return SiteRuntime(settings, ctx, kind)


_RUNNING = re.compile(rb"registration (\S+):(\d+), operational (\S+):(\d+)")
_EST = re.compile(rb"EST (\S+):(\d+)")
_JOINED = re.compile(rb"serving on (\S+):(\d+)")


class RegistrarProcess:
    """One ``registrar run`` process: the production entry point, nothing else."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        registration: Endpoint,
        operational: Endpoint,
        est: Endpoint | None = None,
    ) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.registration_endpoint = registration
        self.operational_endpoint = operational
        #: ``--est-port``: the EST listener (None without it).
        self.est_endpoint = est

    @classmethod
    async def start(
        cls,
        site: BenchSite,
        args: Sequence[str],
        *,
        log_file: Path,
        timeout: float = 60.0,
    ) -> RegistrarProcess:
        """``registrar run --home … --passphrase-file … ARGS``; returns once it serves."""
        entry = "import sys; from registrar.cli import main; sys.exit(main())"
        profile = os.environ.get("DEVTRUST_BENCH_PROFILE")  # a directory: cProfile each one
        if profile:
            target = Path(profile) / f"{log_file.stem}.prof"
            entry = (
                "import cProfile; from registrar.cli import main; "
                f"cProfile.run('main()', {str(target)!r})"
            )
        with log_file.open("ab") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                entry,
                "run",
                "--home",
                str(site.home),
                "--passphrase-file",
                str(site.passphrase_file),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        try:
            return await cls._serving(proc, log_file, timeout)
        except BaseException:  # did not start, or the caller gave up: no process left over
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise

    @classmethod
    async def _serving(
        cls, proc: asyncio.subprocess.Process, log_file: Path, timeout: float
    ) -> RegistrarProcess:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            line = await asyncio.wait_for(proc.stdout.readline(), max(left, 0.01))
            if not line:
                await proc.wait()
                tail = log_file.read_text(errors="replace").splitlines()[-5:]
                raise RuntimeError(f"registrar run exited ({proc.returncode}): {tail}")
            if (match := _RUNNING.search(line)) is not None:
                reg = Endpoint(match.group(1).decode(), int(match.group(2)))
                op = Endpoint(match.group(3).decode(), int(match.group(4)))
                est_match = _EST.search(line)
                est = (
                    None
                    if est_match is None
                    else Endpoint(est_match.group(1).decode(), int(est_match.group(2)))
                )
                return cls(proc, reg, op, est)
            if (match := _JOINED.search(line)) is not None:  # --join: no listener of its own
                op = Endpoint(match.group(1).decode(), int(match.group(2)))
                return cls(proc, op, op)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing cleaned up."""
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful stop), SIGKILL after ``timeout``; the exit code."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), timeout)
            except TimeoutError:
                self.kill()
                await self._proc.wait()
        return self._proc.returncode if self._proc.returncode is not None else -1


# ------------------------------------------------------------------- the site as a process


class SiteProcess:
    """``serve`` in a child process, driven over its stdin/stdout (one JSON line each)."""

    def __init__(self, proc: asyncio.subprocess.Process, endpoints: dict[str, list[Any]]) -> None:
        self._proc = proc
        reg, op = endpoints["registration"], endpoints["operational"]
        self.registration_endpoint = Endpoint(str(reg[0]), int(reg[1]))
        self.operational_endpoint = Endpoint(str(op[0]), int(op[1]))
        self.pid = proc.pid

    @classmethod
    async def start(
        cls, directory: Path, kind: BrokerKind, *, extra: Sequence[str] = ()
    ) -> SiteProcess:
        profile = os.environ.get("DEVTRUST_BENCH_PROFILE")  # a directory: cProfile it
        wrap = ["-m", "cProfile", "-o", str(Path(profile) / "site.prof")] if profile else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *wrap,
            str(Path(__file__).resolve()),
            "serve",
            str(directory),
            "--broker",
            kind,
            *extra,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError("the site process died during start-up")
        return cls(proc, json.loads(line))

    async def command(self, command: str, timeout: float = 120) -> dict[str, object]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command.encode() + b"\n")
        await self._proc.stdin.drain()
        line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the site process died on {command!r}")
        answer: dict[str, object] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"site process: {answer['error']}")
        return answer

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.command("quit", timeout=30)
        try:
            await asyncio.wait_for(self._proc.wait(), 30)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


async def _serve(directory: Path, kind: BrokerKind, passphrase_file: Path | None) -> None:
    if passphrase_file is None:
        pki, files = load_site(directory)
        site = SiteRuntime.of_files(pki, files, kind)
    else:
        site = commissioned_runtime(directory, passphrase_file, kind)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    await site.start()
    try:
        reg, op = site.registration_endpoint, site.operational_endpoint
        answer(
            {
                "registration": [reg.host, reg.port],
                "operational": [op.host, op.port],
                "pid": os.getpid(),
            }
        )
        while True:
            line = (await reader.readline()).decode().strip()
            try:
                if line in ("", "quit"):
                    answer({"ok": True})
                    return
                if line == "echo":
                    await site.start_echo()
                elif line == "stop-responder":
                    await site.stop_responder()
                elif line != "stats":
                    raise ValueError(f"unknown command {line!r}")
                answer({"ok": True, **(await site.stats())})
            except Exception as exc:  # report, keep serving
                answer({"error": repr(exc)})
    finally:
        await site.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a bench site's broker (+ echo responder).")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("directory", type=Path)
    serve.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    serve.add_argument(
        "--passphrase-file",
        type=Path,
        help="DIRECTORY is a commissioned site home (build_commissioned_site), not write_site's",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # paho: "pending publish calls"
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    asyncio.run(_serve(args.directory, args.broker, args.passphrase_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
