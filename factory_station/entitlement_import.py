"""Importing what HQ sends a station: entitlements and time statements.

This module owns the checks on a sealed package from HQ before anything is stored: the
sender is an HQ entitlement signer under the pinned root, the package is for this station
and newer than the last one (no replay, no rollback), and an entitlement's station CA
certificate certifies this station's TPM key; its product secrets are sealed again to the
station's own TPM key before they reach the database (``factory_station.product_secrets``).
Either import re-anchors trusted time at the time HQ signed (``trustcore.stationtime``).
Refusals raise :class:`~factory_station.errors.EntitlementImportError` and change nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from factory_station import product_secrets
from factory_station.core import StationCore, check_station_ca, spki, time_meta
from factory_station.errors import EntitlementImportError, StationStateError
from signers.errors import TpmError
from trustcore import cbor
from trustcore.audit import FieldValue
from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import (
    EncodingError,
    InvalidValueError,
    ReplayError,
    SealedPackageError,
    VerificationError,
)
from trustcore.messages import (
    CT_ENTITLEMENT,
    CT_TIME_STATEMENT,
    MAX_ENTITLEMENT_SIZE,
    EntitlementPayload,
    TimeStatement,
)
from trustcore.profiles import HqRole
from trustcore.sealed import PackageHeader, open_package, peek
from trustcore.stationtime import TimeAnchor
from trustcore.utctime import from_unix
from trustcore.verify import ChainVerifier

__all__ = [
    "MAX_ENTITLEMENT_PACKAGE",
    "MAX_TIME_STATEMENT_PACKAGE",
    "ImportedEntitlement",
    "import_entitlement",
    "import_time_statement",
]

#: A sealed entitlement package: the payload limit plus room for header and certificate.
MAX_ENTITLEMENT_PACKAGE: Final = MAX_ENTITLEMENT_SIZE + 64 * 1024
#: A time statement: a few bytes of payload, the header and the signer's certificate.
MAX_TIME_STATEMENT_PACKAGE: Final = 64 * 1024

#: ``SealedPackageError`` reasons -> the import refusal reason an operator sees.
_SEALED_REASONS: Final = {
    "wrong_receiver": "foreign_station",
    "malformed": "malformed",
    "oversized": "malformed",
    "wrong_content_type": "malformed",
    "not_encrypted": "malformed",
    "bad_signature": "tampered",
    "wrong_sender": "tampered",
    "decrypt_failed": "tampered",
}


def _package_refused(exc: SealedPackageError) -> EntitlementImportError:
    """A package HQ sealed that did not open, with the station's reason for it."""
    return EntitlementImportError(
        f"{exc.message}", reason=_SEALED_REASONS.get(exc.reason, "tampered")
    )


@dataclass(frozen=True)
class ImportedEntitlement:
    policy: EntitlementPolicy
    counter_base: int


def import_entitlement(core: StationCore, package: bytes) -> ImportedEntitlement:
    """Verify, decrypt (ECDH in the TPM) and store an entitlement; refuse anything
    doubtful with :class:`EntitlementImportError` and change nothing on refusal."""
    with core.lock:
        core.require_healthy()
        now = core.now()
        header, sender = _peek_sender(core, package, MAX_ENTITLEMENT_PACKAGE, now)
        try:
            opened = open_package(
                package,
                receiver=core.transport_key,
                expected_content_type=CT_ENTITLEMENT,
                trusted_sender_public=sender,
                last_sequence=core.store.last_entitlement_sequence(),
                max_size=MAX_ENTITLEMENT_PACKAGE,
            )
        except ReplayError as exc:
            raise EntitlementImportError(
                f"entitlement sequence {header.sequence} is not newer than the last "
                f"imported ({core.store.last_entitlement_sequence()}): replayed or rolled "
                "back",
                reason="replayed",
            ) from exc
        except SealedPackageError as exc:
            raise _package_refused(exc) from exc
        except TpmError as exc:
            raise StationStateError(f"TPM ECDH failed: {exc}") from exc
        try:
            payload = EntitlementPayload.decode(opened.payload)
        except (EncodingError, InvalidValueError) as exc:
            raise EntitlementImportError(
                f"entitlement payload does not decode: {exc.message}", reason="malformed"
            ) from exc
        policy = payload.policy
        _check_payload(core, payload, header.sequence, now)
        product_secrets.check_payload_secrets(policy, payload.product_secrets)
        meta: dict[str, object] = {}
        if payload.product_secrets:
            # Plaintext secrets never reach the database: sealed to our own TPM key.
            meta[product_secrets.meta_key(policy.sequence)] = product_secrets.seal_at_rest(
                core.transport_key.public_key(),
                core.station_id.value,
                policy.sequence,
                payload.product_secrets,
            )
        stored = dataclasses.replace(payload, product_secrets={}).encode()
        base = core.counter_value
        # HQ signed this package at header.created: the station's new time anchor.
        reading, ledger, anchor = core.anchor_to(
            header.created, now, f"entitlement {policy.sequence}"
        )
        fields: dict[str, FieldValue] = {
            "entitlement_id": policy.entitlement_id,
            "entitlement_seq": policy.sequence,
            "counter_base": base,
            "signed_time": header.created,
            "anchor_time": anchor.time,
        }
        fields.update(reading.audit_fields(full=True))
        record = core.next_record("entitlement_imported", fields, now)
        try:
            core.store.record_entitlement(
                sequence=policy.sequence,
                entitlement_id=policy.entitlement_id,
                policy_cbor=cbor.encode(policy.to_map()),
                package=stored,
                imported_at=now,
                counter_base=base,
                audit_records=[record],
                meta=time_meta(ledger, anchor) | meta,
            )
        except BaseException:
            core.reload_audit()
            raise
        core.ledger, core.anchor, core.reading = ledger, anchor, reading
        core.load_active()
        return ImportedEntitlement(policy=policy, counter_base=base)


def import_time_statement(core: StationCore, package: bytes) -> TimeAnchor:
    """Re-anchor trusted time on an HQ time statement (``hq time-statement``): signed by
    the HQ entitlement signer under the pinned root, for this station, newer than any
    statement imported before. Stored with its ``time_anchored`` audit record; refusals
    (``EntitlementImportError`` reasons ``malformed``, ``untrusted_sender``, ``tampered``,
    ``foreign_station``, ``replayed``) change nothing."""
    with core.lock:
        core.require_healthy()
        now = core.now()
        header, sender = _peek_sender(core, package, MAX_TIME_STATEMENT_PACKAGE, now)
        last = core.store.get_meta("last_time_statement")
        try:
            opened = open_package(
                package,
                receiver=None,
                expected_content_type=CT_TIME_STATEMENT,
                trusted_sender_public=sender,
                last_sequence=last if isinstance(last, int) else None,
                max_size=MAX_TIME_STATEMENT_PACKAGE,
            )
            statement = TimeStatement.decode(opened.payload)
        except ReplayError as exc:
            raise EntitlementImportError(
                f"time statement {header.sequence} is not newer than the last one ({last})",
                reason="replayed",
            ) from exc
        except SealedPackageError as exc:
            raise _package_refused(exc) from exc
        except (EncodingError, InvalidValueError) as exc:
            raise EntitlementImportError(
                f"time statement does not decode: {exc.message}", reason="malformed"
            ) from exc
        if statement.station_id != core.station_id.value:
            raise EntitlementImportError(
                f"the time statement is for station {statement.station_id!r}",
                reason="foreign_station",
            )
        if statement.time != header.created or header.sequence != header.created:
            raise EntitlementImportError(
                "the time statement's time differs from its signed header", reason="malformed"
            )
        reading, ledger, anchor = core.anchor_to(
            statement.time, now, f"time statement {statement.time}"
        )
        fields: dict[str, FieldValue] = {
            "signed_time": statement.time,
            "anchor_time": anchor.time,
        }
        fields.update(reading.audit_fields(full=True))
        record = core.next_record("time_anchored", fields, now)
        meta = time_meta(ledger, anchor)
        meta["last_time_statement"] = statement.time
        try:
            core.store.append_audit([record], meta=meta)
        except BaseException:
            core.reload_audit()
            raise
        core.ledger, core.anchor, core.reading = ledger, anchor, reading
        return anchor


def _peek_sender(
    core: StationCore, package: bytes, max_size: int, now: int
) -> tuple[PackageHeader, ec.EllipticCurvePublicKey]:
    """The package's unverified header and its sender's key, once the sender certificate
    it names is verified as an HQ entitlement signer under the pinned root."""
    try:
        header = peek(package, max_size=max_size)
    except SealedPackageError as exc:
        raise EntitlementImportError(exc.message, reason="malformed") from exc
    return header, _verify_sender(core, header.sender_certificate, now)


def _verify_sender(
    core: StationCore, certificate: Callable[[], x509.Certificate], now: int
) -> ec.EllipticCurvePublicKey:
    try:
        cert = certificate()
        ChainVerifier(
            [core.root], required_eku=HqRole.ENTITLEMENT_SIGNER.eku, require_crl=False
        ).verify(cert, now=from_unix(now))
    except (VerificationError, SealedPackageError, ValueError, UnsupportedAlgorithm) as exc:
        # ValueError / UnsupportedAlgorithm: cryptography parses some fields lazily (a
        # mangled issuer name or key OID is only noticed when read), and ChainVerifier
        # lets those through.
        raise EntitlementImportError(
            f"the sender is not an HQ entitlement signer under the pinned root: {exc}",
            reason="untrusted_sender",
        ) from exc
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # ChainVerifier: P-256 only
    return public


def _check_payload(
    core: StationCore, payload: EntitlementPayload, header_seq: int, now: int
) -> None:
    policy = payload.policy
    if policy.station_id != core.station_id.value:
        raise EntitlementImportError(
            f"the entitlement is for station {policy.station_id!r}, this is "
            f"{core.station_id.value!r}",
            reason="foreign_station",
        )
    if policy.sequence != header_seq:
        raise EntitlementImportError(
            f"policy sequence {policy.sequence} differs from the signed package sequence "
            f"{header_seq}",
            reason="malformed",
        )
    if now >= policy.not_after:
        raise EntitlementImportError(
            f"the entitlement's key-use window ended at {from_unix(policy.not_after).isoformat()}",
            reason="expired",
        )
    try:
        ca = x509.load_der_x509_certificate(payload.station_ca_cert_der)
    except ValueError as exc:
        raise EntitlementImportError(
            "station CA certificate does not parse", reason="wrong_station_ca"
        ) from exc
    ca_pub = ca.public_key()
    if not isinstance(ca_pub, ec.EllipticCurvePublicKey) or spki(ca_pub) != spki(
        core.ca_key.public_key()
    ):
        raise EntitlementImportError(
            "the station CA certificate does not certify this station's TPM key",
            reason="wrong_station_ca",
        )
    check_station_ca(ca, core.root, core.station_id, now)
    _check_hq_role(
        core, payload.audit_receiver_cert_der, HqRole.AUDIT_RECEIVER, now,
        "the audit receiver", "bad_audit_receiver",
    )  # fmt: skip
    if payload.crl_signer_cert_der is not None:
        _check_hq_role(
            core, payload.crl_signer_cert_der, HqRole.CRL_SIGNER, now,
            "the CRL signer", "bad_crl_signer",
        )  # fmt: skip


def _check_hq_role(
    core: StationCore, cert_der: bytes, role: HqRole, now: int, what: str, reason: str
) -> None:
    """``cert_der`` must be an HQ certificate for ``role`` valid under the pinned root now."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        ChainVerifier([core.root], required_eku=role.eku, require_crl=False).verify(
            cert, now=from_unix(now)
        )
    except (ValueError, VerificationError) as exc:
        raise EntitlementImportError(
            f"{what} certificate is not valid under the root: {exc}", reason=reason
        ) from exc
