"""Counterfeit detection (``hq ingest-report``) and HQ revocation (``hq revoke``).

A site report (:mod:`trustcore.site_report`) lists the factory certificates a site saw. HQ
verifies the report (the site is enrolled, the package is signed by the site CA key HQ
recorded at enrolment, its sequence is newer than the last accepted), stores the sightings,
then cross-checks every sighting:

* ``counterfeit``: the certificate chains to the root through a station CA HQ issued, but
  no audit log records it (station + serial unknown, or known with another key or device
  id). Only the station's key can make such a certificate: a stolen or abused station TPM
  issued it outside the station software.
* ``over_production``: the audit log records it, but the reconciliation flagged that
  issuance (over quota, outside the window, ...). Source: the violations HQ stored at
  ``hq ingest-audit`` (up to 100 per export are stored).
* ``cloned``: the same factory certificate is currently registered at two sites.
* ``invalid_evidence``: the reported certificate does not chain to the root (a site bug or a
  forgery the site should never have admitted).

``hq revoke`` appends to the HQ revocation list (a new, higher sequence, signed by the
revocation signer) and writes it for sites; revoking a whole station CA needs the HQ quorum
(:func:`hq.approvals.authorize_station_ca_revocation`) and puts the station CA on the root
CRL that the next site bundle carries.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hq.errors import HqError
from hq.home import HqHome, HqSecrets
from hq.revocation_data import current_revocations, publish_revocations
from hq.root_signing import issue_root_crl
from hq.store import HqStore
from trustcore.errors import ProfileError, TrustCoreError
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.keys import key_id
from trustcore.profiles import site_id_from_certificate, station_id_from_certificate
from trustcore.revocation import (
    RevocationListError,
    RevokedDevice,
)
from trustcore.site_report import SiteReport, SiteReportError, open_site_report, peek_site_report
from trustcore.utctime import now_unix
from trustcore.verify import ChainVerifier

__all__ = [
    "Finding",
    "IngestSiteReportResult",
    "ReportRefusedError",
    "RevokeRefusedError",
    "RevokeResult",
    "ingest_site_report",
    "revoke",
]

FINDING_REASON = {
    "counterfeit": "counterfeit",
    "over_production": "over_production",
    "cloned": "cloned",
    "invalid_evidence": "counterfeit",
}


class ReportRefusedError(HqError):
    """A site report was refused as a whole (nothing stored); ``reason`` says why."""

    reason = "report_refused"


class RevokeRefusedError(HqError):
    """``hq revoke`` could not do what was asked (nothing changed)."""

    reason = "revoke_refused"


@dataclass(frozen=True)
class Finding:
    """One suspicious device, with the evidence HQ holds."""

    kind: str  # counterfeit / over_production / cloned / invalid_evidence
    station_id: str
    serial: str
    device_id: str
    site_id: str
    first_seen: int
    registered: bool
    detail: str

    def to_map(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "station_id": self.station_id,
            "serial": self.serial,
            "device_id": self.device_id,
            "site_id": self.site_id,
            "first_seen": self.first_seen,
            "registered": self.registered,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class IngestSiteReportResult:
    site_id: str
    sequence: int
    seen: int
    registrations: int
    findings: tuple[Finding, ...]
    audited_clean: int  # sightings that match an audit record with no violation

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_map(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for f in self.findings:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        return {
            "status": "clean" if self.clean else "findings",
            "site_id": self.site_id,
            "sequence": self.sequence,
            "seen": self.seen,
            "registrations": self.registrations,
            "audited_clean": self.audited_clean,
            "finding_counts": counts,
            "findings": [f.to_map() for f in self.findings],
        }


def _violations(store: HqStore) -> dict[tuple[str, str], list[str]]:
    """(station, device id) -> violation kinds/details from every stored audit ingest."""
    out: dict[tuple[str, str], list[str]] = {}
    for station, text in store.ingest_violations():
        for v in json.loads(text).get("violations", []):
            out.setdefault((station, str(v["device_id"])), []).append(
                f"{v['kind']} (audit seq {v['seq']}): {v['detail']}"
            )
    return out


def _site_for(
    store: HqStore, cert: x509.Certificate, root: x509.Certificate
) -> tuple[SiteId, ec.EllipticCurvePublicKey]:
    """The enrolled site whose site CA signed (claims to have signed) this report.

    The key alone is not enough: a second HQ that enrolled the same site keys would accept
    this HQ's reports (and the reverse). The sender certificate must be the very site CA
    certificate this HQ issued to the site, signed by this HQ's root (``foreign_site``),
    as ``hq ingest-audit`` requires of a station (``foreign_station``)."""
    try:
        site_id = site_id_from_certificate(cert)
    except ProfileError as exc:
        raise ReportRefusedError(
            f"report sender is not a site CA: {exc.message}", reason="unknown_site"
        ) from exc
    row = store.site(site_id.value)
    if row is None:
        raise ReportRefusedError(f"site {site_id} is not enrolled at HQ", reason="unknown_site")
    enrolled = x509.load_der_x509_certificate(row.site_ca_der).public_key()
    if not isinstance(enrolled, ec.EllipticCurvePublicKey):
        raise ReportRefusedError(f"site {site_id} has no EC site CA key", reason="unknown_site")
    if key_id(enrolled) != key_id(cert.public_key()):  # type: ignore[arg-type]
        raise ReportRefusedError(
            f"report is signed by a key that is not site {site_id}'s enrolled site CA",
            reason="wrong_sender",
        )
    if cert.public_bytes(serialization.Encoding.DER) != row.site_ca_der:
        raise ReportRefusedError(
            f"report's site CA certificate (serial {cert.serial_number:x}) is not the one this "
            f"HQ issued to site {site_id}",
            reason="foreign_site",
        )
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ReportRefusedError(
            "report's site CA certificate is not issued by this HQ's root", reason="foreign_site"
        ) from exc
    return site_id, enrolled


def _chain_verifier(home: HqHome, store: HqStore) -> ChainVerifier:
    cas = [x509.load_der_x509_certificate(der) for _, der in store.station_ca_certificates()]
    # Authenticity only: whether a certificate was revoked is HQ's own decision here, so no
    # CRL is required (a counterfeit is usually not on its station's CRL).
    return ChainVerifier([home.root_certificate()], cas, require_crl=False)


def _check(
    report: SiteReport,
    store: HqStore,
    verifier: ChainVerifier,
) -> tuple[list[Finding], int]:
    # The audit records of exactly the reported certificates: one indexed join in the
    # database, whatever the size of the registry (never the registry in Python).
    audited = store.audited_certificates(
        ("" if s.station_id is None else s.station_id.value, s.serial.hex) for s in report.seen
    )
    violations = _violations(store)
    site = report.site_id.value
    findings: list[Finding] = []
    clean = 0
    for s in report.seen:
        station = "" if s.station_id is None else s.station_id.value

        def finding(kind: str, detail: str, s: Any = s, station: str = station) -> Finding:
            return Finding(
                kind,
                station,
                s.serial.hex,
                s.device_id.value,
                site,
                s.first_seen,
                s.registered,
                detail,
            )

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cert = s.certificate()
                identity = verifier.verify(
                    cert,
                    now=datetime.fromtimestamp(s.first_seen, UTC),
                    require_device_id=True,
                )
            cert_station = station_id_from_certificate(identity.issuer)
        except (TrustCoreError, ValueError) as exc:
            findings.append(finding("invalid_evidence", f"certificate does not verify: {exc}"))
            continue
        if (
            cert.serial_number != s.serial.value
            or identity.device_id != s.device_id
            or cert_station != s.station_id
        ):
            findings.append(
                finding("invalid_evidence", "the reported fields do not match the certificate")
            )
            continue
        records = audited.get((station, s.serial.hex))
        public = cert.public_key()
        if not records:
            findings.append(
                finding(
                    "counterfeit",
                    f"chain-valid certificate of station {station} that no audit log records",
                )
            )
            continue
        # The newest record of that certificate decides (as the registry's order did).
        recorded_device, recorded_key = records[-1]
        if recorded_device != s.device_id.value or recorded_key != key_id(public):  # type: ignore[arg-type]
            findings.append(
                finding(
                    "counterfeit",
                    f"audit log records serial {s.serial.hex} for {recorded_device} "
                    "with another key",
                )
            )
            continue
        flagged = violations.get((station, s.device_id.value))
        if flagged:
            findings.append(finding("over_production", "; ".join(flagged)))
            continue
        clean += 1
    # Clones: the same certificate currently registered at another site.
    registered = [s for s in report.seen if s.registered and s.station_id is not None]
    elsewhere = store.registered_elsewhere(
        site, ((s.station_id.value, s.serial.hex) for s in registered if s.station_id)
    )
    for s in registered:
        assert s.station_id is not None
        for other, first in elsewhere.get((s.station_id.value, s.serial.hex), ()):
            findings.append(
                Finding(
                    "cloned",
                    s.station_id.value,
                    s.serial.hex,
                    s.device_id.value,
                    site,
                    s.first_seen,
                    True,
                    f"also registered at site {other} (first seen there {first})",
                )
            )
    return findings, clean


def ingest_site_report(
    home: HqHome, package: bytes, *, now: int | None = None
) -> IngestSiteReportResult:
    """Verify, store and cross-check a site report. Refusals raise :class:`ReportRefusedError`
    and store nothing."""
    moment = now_unix(now)
    store = HqStore.open(home.store_location)
    try:
        try:
            cert = peek_site_report(package)
        except SiteReportError as exc:
            raise ReportRefusedError(exc.message, reason=exc.reason) from exc
        with store.transaction():
            site_id, public = _site_for(store, cert, home.root_certificate())
            try:
                report = open_site_report(
                    package,
                    site_id=site_id,
                    site_ca_public=public,
                    last_sequence=store.site_report_sequence(site_id.value),
                )
            except SiteReportError as exc:
                raise ReportRefusedError(exc.message, reason=exc.reason) from exc
            findings, clean = _check(report, store, _chain_verifier(home, store))
            store.put_site_report(
                site_id.value,
                report.sequence,
                moment,
                (
                    (
                        "" if s.station_id is None else s.station_id.value,
                        s.serial.hex,
                        s.device_id.value,
                        s.first_seen,
                        s.registered,
                        s.certificate_der,
                    )
                    for s in report.seen
                ),
            )
    finally:
        store.close()
    return IngestSiteReportResult(
        site_id.value,
        report.sequence,
        len(report.seen),
        len(report.registrations),
        tuple(findings),
        clean,
    )


# ------------------------------------------------------------------------------ revocation


@dataclass(frozen=True)
class RevokeResult:
    sequence: int
    added: tuple[RevokedDevice, ...]
    already_listed: int
    station_ca_serials: tuple[str, ...] = field(default=())
    out: Path | None = None

    def to_map(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "added": [e.to_map() for e in self.added],
            "already_listed": self.already_listed,
            "station_ca_serials": list(self.station_ca_serials),
            "out": None if self.out is None else str(self.out),
        }


def _targets(
    store: HqStore,
    *,
    devices: Sequence[str],
    serials: Sequence[str],
    findings: Sequence[dict[str, Any]],
    reason: str | None,
) -> list[tuple[str, str, str, str]]:
    """(station, serial, device, reason) to revoke; every one must be known to HQ (a typo
    or a doctored findings file cannot revoke an arbitrary serial). Known: audited by HQ or
    seen at a site, looked up item by item (the registry may hold tens of millions)."""
    out: list[tuple[str, str, str, str]] = []
    for device in devices:
        matches = store.known_certificates(device_ids=[device])
        if not matches:
            raise RevokeRefusedError(
                f"device {device} is unknown to HQ (no audit record, no sighting)"
            )
        out += [(s, n, d, reason or "unspecified") for s, n, d in matches]
    for spec in serials:
        station, sep, serial = spec.partition(":")
        if not sep:
            raise RevokeRefusedError(f"--serial {spec!r}: expected STATION:SERIAL")
        try:
            serial = CertSerial.from_hex(serial).hex
        except TrustCoreError as exc:
            raise RevokeRefusedError(f"--serial {spec!r}: {exc.message}") from exc
        matches = store.known_certificates(certificates=[(station, serial)])
        if not matches:
            raise RevokeRefusedError(f"certificate {station}:{serial} is unknown to HQ")
        out.append((station, serial, matches[0][2], reason or "unspecified"))
    for f in findings:
        try:
            key = (str(f["station_id"]), str(f["serial"]), str(f["device_id"]))
            kind = str(f["kind"])
        except (KeyError, TypeError) as exc:
            raise RevokeRefusedError(f"findings file: bad finding {f!r}") from exc
        if kind not in FINDING_REASON:
            raise RevokeRefusedError(f"findings file: unknown finding kind {kind!r}")
        if key not in store.known_certificates(certificates=[key[:2]]):
            raise RevokeRefusedError(f"findings file names {key[0]}:{key[1]}, unknown to HQ")
        out.append((*key, reason or FINDING_REASON[kind]))
    return out


def read_findings(path: Path) -> list[dict[str, Any]]:
    """The findings of an ``hq ingest-report --json`` output file."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RevokeRefusedError(f"cannot read findings {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("findings"), list):
        raise RevokeRefusedError(f"{path} is not the JSON output of `hq ingest-report`")
    return list(doc["findings"])


def revoke(
    home: HqHome,
    secrets: HqSecrets,
    *,
    devices: Sequence[str] = (),
    serials: Sequence[str] = (),
    findings: Sequence[dict[str, Any]] = (),
    station_ca: str | None = None,
    reason: str | None = None,
    approvals: Sequence[bytes] = (),
    now: int | None = None,
) -> tuple[RevokeResult, bytes]:
    """Append to the HQ revocation list and return (result, the new signed list).

    The new list's sequence is the last one's + 1 (never lower), so every site replaces the
    list it holds. ``station_ca`` is quorum-gated; its CA certificates go on the root CRL."""
    from hq.approvals import authorize_station_ca_revocation

    if not (devices or serials or findings or station_ca):
        raise RevokeRefusedError("nothing to revoke")
    moment = now_unix(now)
    store = HqStore.open(home.store_location)
    try:
        with store.transaction() as conn:
            ca_serials: list[str] = []
            if station_ca is not None:
                cas = store.station_ca_certificates(station_ca)
                if not cas:
                    raise RevokeRefusedError(f"HQ issued no CA certificate to station {station_ca}")
                authorize_station_ca_revocation(home, station_ca, approvals, conn=conn, now=moment)
                for _, der in cas:
                    cert = x509.load_der_x509_certificate(der)
                    serial = format(cert.serial_number, "x")
                    store.put_root_revocation(
                        serial, moment, "cACompromise", cert.subject.rfc4514_string()
                    )
                    ca_serials.append(serial)
            targets = _targets(
                store, devices=devices, serials=serials, findings=findings, reason=reason
            )
            latest = store.latest_revocation_list()
            at = datetime.fromtimestamp(moment, UTC)
            current = current_revocations(home, store, at)
            listed = {(e.station_id.value, e.serial.hex) for e in current.entries}
            added: list[RevokedDevice] = []
            already = 0
            for station, serial, device, why in targets:
                if (station, serial) in listed:
                    already += 1
                    continue
                listed.add((station, serial))
                try:
                    added.append(
                        RevokedDevice(
                            StationId(station),
                            CertSerial.from_hex(serial),
                            DeviceId(device),
                            why,
                            moment,
                        )
                    )
                except TrustCoreError as exc:
                    raise RevokeRefusedError(
                        f"cannot revoke {station}:{serial}: {exc.message}"
                    ) from exc
            if not added and latest is not None and not ca_serials:
                return RevokeResult(latest[0], (), already), latest[1]
            if ca_serials:
                # A CA certificate revoked: a root ceremony, the root CRL is re-signed now.
                issue_root_crl(home, store, secrets, at)
            # The new list carries a fresh indirect CRL (CRL signer key, never the root's).
            nxt, package = publish_revocations(home, store, secrets, at, added=tuple(added))
    except RevocationListError as exc:
        raise RevokeRefusedError(
            f"the held revocation list does not verify: {exc.message}"
        ) from exc
    finally:
        store.close()
    return RevokeResult(nxt.sequence, tuple(added), already, tuple(ca_serials)), package
