"""``hq renew-station``: a new CA certificate for a factory station, for its current TPM key
(renewal) or for a new one (re-key), from the station's signed request file.

What HQ checks, in this order (the first refusal wins, nothing is stored on refusal):

1. the request decodes and verifies (``trustcore.station_ca_request``): CSR self-signature
   (possession of the key to certify), the *current* key's signature over the request,
   for a re-key the *new* key's signature too, renewal = same key, re-key = another key;
2. it is not stale (``created`` at most :data:`MAX_REQUEST_AGE` before HQ's clock, not in
   the future) and its ``request_id`` was never used (``replayed``);
3. the station is enrolled (``unknown_station``), HQ issued exactly ``current_cert`` to it
   (``foreign_station``), and the certificate's key is the station's *current* CA key:
   a key the station re-keyed away from can never ask again (``superseded_key``);
4. no certificate of the current key is on the root's revocation list (``station_revoked``):
   a station whose key HQ revoked cannot renew it nor re-key its way out of the revocation
   (it has to be enrolled again, which is an operator decision);
5. for a re-key, the new key is not one HQ already knows (``key_reuse``).

The new certificate follows the ``station_ca`` profile and is *not* bounded by any
entitlement: the entitlement bounds what the station may issue, and the station CA
certificate must outlive every device made under it (docs/pki.md). It runs until
``not_after`` (default: the root's end). It is recorded (``station_ca_certs``) with the
request id before it is returned; a re-key also makes the new key the station's current CA
key, keeping the audit head (the chain continues; exports signed by the old key still
verify). A renewal is never quorum-gated (same key, no new power); a re-key is when HQ's
policy says so (``hq.json`` ``quorum.station_rekey``, off by default): the approvers then
approve this station *and this new key* (``rekey_station_ca``); see docs/hq.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hq.errors import HqError
from hq.home import HqHome, HqSecrets
from hq.root_signing import BACKDATE, issue_root_crl, sign_station_ca
from hq.store import HqStore
from trustcore.keys import spki_der
from trustcore.station_ca_request import (
    KIND_REKEY,
    StationCaRequest,
    StationCaRequestError,
)
from trustcore.utctime import now_utc

__all__ = [
    "MAX_REQUEST_AGE",
    "StationCaError",
    "StationCaResult",
    "renew_station_ca",
    "station_ca_history",
]

#: How old a request may be when HQ sees it (it travels on a USB stick, not for months).
MAX_REQUEST_AGE: Final = timedelta(days=30)
#: How far a request may be ahead of HQ's clock.
MAX_CLOCK_AHEAD: Final = timedelta(minutes=10)


class StationCaError(HqError):
    """A station CA renewal or re-key request was refused (``reason``)."""

    reason = "station_ca_refused"


@dataclass(frozen=True)
class StationCaResult:
    station_id: str
    kind: str  # "renew" or "rekey"
    certificate: x509.Certificate
    previous_serial: str
    key_id: str  # hex SHA-256 of the certified key's SPKI

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def renew_station_ca(
    home: HqHome,
    request: bytes,
    secrets: HqSecrets,
    *,
    not_after: datetime | None = None,
    now: datetime | None = None,
    approvals: Sequence[bytes] = (),
) -> StationCaResult:
    """Verify a station's renewal or re-key request and issue its new CA certificate. A
    re-key needs ``approvals`` (``hq.approvals``, operation ``rekey_station_ca`` for this
    station and this new key) when HQ's quorum policy gates it (``station_rekey``)."""
    from hq.approvals import (
        REKEY_STATION_CA,
        QuorumRefused,
        authorize,
        precheck,
        rekey_station_ca_params,
    )

    moment = now_utc(now)
    try:
        verified = StationCaRequest.decode(request).verify()
    except StationCaRequestError as exc:
        raise StationCaError(
            f"station CA request refused: {exc.args[0]}", reason=exc.reason
        ) from exc
    req = verified.request
    station_id = req.station_id.value
    try:
        created = datetime.fromtimestamp(req.created, moment.tzinfo)
    except (OverflowError, ValueError, OSError) as exc:
        raise StationCaError("the request's time is out of range", reason="malformed") from exc
    if created > moment + MAX_CLOCK_AHEAD:
        raise StationCaError(
            f"the request is dated {created.isoformat()}, ahead of HQ's clock",
            reason="not_yet_valid",
        )
    if moment - created > MAX_REQUEST_AGE:
        raise StationCaError(
            f"the request was made {created.isoformat()}, more than "
            f"{MAX_REQUEST_AGE.days} days ago: ask the station for a new one",
            reason="stale_request",
        )
    root_cert = home.root_certificate()
    end = root_cert.not_valid_after_utc if not_after is None else not_after
    if end.tzinfo is None:
        raise StationCaError("not_after must carry a time zone", reason="bad_validity")
    if end <= moment or end > root_cert.not_valid_after_utc:
        raise StationCaError(
            f"the validity end {end.isoformat()} must be after now and no later than the "
            f"root's ({root_cert.not_valid_after_utc.isoformat()})",
            reason="bad_validity",
        )
    store = HqStore.open(home.store_location)
    try:
        if store.station_ca_request_used(req.request_id):
            raise StationCaError(
                f"request {req.request_id.hex()} was already answered", reason="replayed"
            )
        station = store.station(station_id)
        if station is None:
            raise StationCaError(
                f"station {station_id!r} is not enrolled at this HQ", reason="unknown_station"
            )
        current = verified.current_cert
        try:
            current.verify_directly_issued_by(root_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise StationCaError(
                "the current certificate is not signed by this HQ's root",
                reason="foreign_station",
            ) from exc
        if not store.station_ca_issued(station_id, req.current_cert_der):
            raise StationCaError(
                f"HQ has no record of issuing the current certificate to {station_id!r}",
                reason="foreign_station",
            )
        current_spki = spki_der(current.public_key())
        if current_spki != station.ca_public_der:
            raise StationCaError(
                f"the request is signed by a CA key {station_id!r} no longer uses "
                "(superseded by a re-key or a new enrolment)",
                reason="superseded_key",
            )
        revoked = {serial for serial, _, _ in store.root_revocations()}
        for _, der in store.station_ca_certificates(station_id):
            cert = x509.load_der_x509_certificate(der)
            if (
                spki_der(cert.public_key()) == current_spki
                and format(cert.serial_number, "x") in revoked
            ):
                raise StationCaError(
                    f"the root revoked a CA certificate of {station_id!r} for this key "
                    f"(serial {cert.serial_number:x}): it cannot be renewed or re-keyed",
                    reason="station_revoked",
                )
        new_spki = spki_der(verified.new_public)
        new_key_id = hashlib.sha256(new_spki).hexdigest()
        quorum = rekey_station_ca_params(station_id, new_key_id)
        if req.kind == KIND_REKEY:
            if _key_known(store, new_spki):
                raise StationCaError(
                    "the new key is already known to HQ (a station or site key)",
                    reason="key_reuse",
                )
            # Verified before the root signs anything; consumed with the record below.
            try:
                precheck(home, REKEY_STATION_CA, quorum, approvals, now=int(moment.timestamp()))
            except QuorumRefused as exc:
                raise StationCaError(
                    f"{exc.args[0]} (approvers approve: hq approval request --operation "
                    f"rekey_station_ca --param station_id={station_id} --param "
                    f"key_id={new_key_id})",
                    reason=exc.reason,
                ) from exc
        certificate = _issue(home, secrets, verified.new_public, station_id, moment, end, root_cert)
        der = certificate.public_bytes(serialization.Encoding.DER)
        with store.transaction() as conn:
            if req.kind == KIND_REKEY:
                authorize(
                    home, REKEY_STATION_CA, quorum, approvals, conn=conn,
                    now=int(moment.timestamp()),
                )  # fmt: skip
            # A CA certificate was issued: a root ceremony, so the root CRL is re-signed.
            issue_root_crl(home, store, secrets, moment)
            store.put_station_ca_cert(
                station_id=station_id,
                serial=format(certificate.serial_number, "x"),
                cert_der=der,
                ca_public_der=new_spki,
                previous_public_der=current_spki,
                kind=req.kind,
                request_id=req.request_id,
                issued_at=int(moment.timestamp()),
            )
    finally:
        store.close()
    return StationCaResult(
        station_id,
        req.kind,
        certificate,
        format(current.serial_number, "x"),
        new_key_id,
    )


def station_ca_history(home: HqHome, station_id: str) -> list[dict[str, object]]:
    """Every CA certificate HQ issued to ``station_id`` (entitlements, renewals, re-keys),
    oldest first: serial, key id, validity, whether its key is the current one, whether
    exports may still be signed by it, and whether the root revoked it."""
    store = HqStore.open(home.store_location)
    try:
        if store.station(station_id) is None:
            raise StationCaError(
                f"station {station_id!r} is not enrolled", reason="unknown_station"
            )
        keys = store.station_ca_keys(station_id)
        open_keys = store.station_export_keys(station_id)
        revoked = {serial for serial, _, _ in store.root_revocations()}
        out: list[dict[str, object]] = []
        for _, der in store.station_ca_certificates(station_id):
            cert = x509.load_der_x509_certificate(der)
            spki = spki_der(cert.public_key())
            out.append(
                {
                    "serial": format(cert.serial_number, "x"),
                    "key_id": hashlib.sha256(spki).hexdigest(),
                    "not_before": cert.not_valid_before_utc.isoformat(),
                    "not_after": cert.not_valid_after_utc.isoformat(),
                    "current_key": bool(keys) and spki == keys[0],
                    "exports_accepted": spki in open_keys,
                    "revoked": format(cert.serial_number, "x") in revoked,
                }
            )
        return out
    finally:
        store.close()


def _key_known(store: HqStore, spki: bytes) -> bool:
    for station in store.stations():
        if spki in (station.transport_public_der, *store.station_ca_keys(station.station_id)):
            return True
    return any(spki in (site.ca_public_der, site.transport_public_der) for site in store.sites())


def _issue(
    home: HqHome,
    secrets: HqSecrets,
    subject_key: ec.EllipticCurvePublicKey,
    station_id: str,
    moment: datetime,
    end: datetime,
    root_cert: x509.Certificate,
) -> x509.Certificate:
    start = max(moment - BACKDATE, root_cert.not_valid_before_utc)
    return sign_station_ca(
        home, secrets, root_cert, subject_key, station_id, (start, end), StationCaError
    )
