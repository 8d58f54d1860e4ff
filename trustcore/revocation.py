"""The HQ revocation list: factory certificates HQ has revoked, for every site to enforce.

Why a list of its own and not a CRL: a factory certificate is signed by a station CA whose
key lives in that station's TPM, so only the station can put it on a CRL. Counterfeits and
over-production are discovered at HQ (audit reconciliation, site reports), which holds no
station key. HQ therefore publishes its decisions in this list, signed by the HQ
**revocation signer** role key (EKU ``OID_EKU_REVOCATION_SIGNER``). A registrar enforces it at
the application level (a listed device is refused at registration) and in the broker
(the identity is blocked and its live sessions cut).

Wire format: a signed-only sealed package (:mod:`trustcore.sealed`, ``alg = "none"``: the
list is public, every site receives the same bytes) of content type
``devtrust/revocation-list/v1``; the package sequence is the list's monotonic sequence
number, and the payload repeats it, so a list cannot be re-sealed under another number::

    payload = {"v": 1, "seq": uint, "issued": uint,
               "entries": [{"station_id": tstr, "serial": tstr (lowercase hex),
                            "device_id": tstr, "reason": tstr, "time": uint}, ...],
               ? "hq_crl": bstr,       ; the HQ indirect CRL (DER) of the same entries
               ? "crl_signer": bstr,   ; the CRL signer's certificate (DER), root-issued
               ? "root_crl": bstr}     ; the newest root CRL (DER), signed at a ceremony

``issued`` is when HQ published this list: HQ re-publishes (next sequence, same entries,
fresh indirect CRL) at every site bundle and with ``hq publish-revocations``, so a site
measures how old its newest HQ revocation data is from it (docs/site.md, offline limit).

Each list is complete (not a delta): a site keeps only the newest one, and a list older than
the one it holds is refused (rollback would un-revoke devices).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.crl import load_crl, verify_crl
from trustcore.errors import (
    CrlError,
    EncodingError,
    InvalidValueError,
    SealedPackageError,
    TrustCoreError,
    VerificationError,
)
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.keys import Signer
from trustcore.profiles import OID_EKU_REVOCATION_SIGNER
from trustcore.sealed import open_package, peek, seal_package
from trustcore.utctime import from_unix
from trustcore.verify import ChainVerifier

__all__ = [
    "CRL_REASONS",
    "CT_REVOCATION_LIST",
    "MAX_REVOCATION_LIST_SIZE",
    "REVOCATION_REASONS",
    "RevocationList",
    "RevocationListError",
    "RevokedDevice",
    "indirect_crls_of",
    "open_revocation_list",
    "revoked_at_datetime",
    "seal_revocation_list",
]

CT_REVOCATION_LIST = "devtrust/revocation-list/v1"
_CRL_FIELDS = ("hq_crl", "crl_signer", "root_crl")
#: How far before the list's ``issued`` the indirect CRL's thisUpdate may lie.
_MAX_CRL_LAG_S = 3600
FORMAT_VERSION = 1
#: Room for about 200,000 entries.
MAX_REVOCATION_LIST_SIZE = 32 * 1024 * 1024
#: Why HQ revoked a device. A closed set: sites report and act on it, so free text would
#: be a lever for log injection and a source of ambiguity.
REVOCATION_REASONS = frozenset(
    {
        "counterfeit",  # seen at a site, absent from every audit log
        "over_production",  # issued beyond the entitlement's quota or window
        "key_compromise",
        "cloned",  # one identity seen in two places at once
        "decommissioned",
        "unspecified",
    }
)


#: The CRL reason code written for each HQ reason (indirect CRL, site CRL).
CRL_REASONS: dict[str, x509.ReasonFlags] = {
    "key_compromise": x509.ReasonFlags.key_compromise,
    "cloned": x509.ReasonFlags.key_compromise,
    "counterfeit": x509.ReasonFlags.privilege_withdrawn,
    "over_production": x509.ReasonFlags.privilege_withdrawn,
    "decommissioned": x509.ReasonFlags.cessation_of_operation,
    "unspecified": x509.ReasonFlags.unspecified,
}


class RevocationListError(TrustCoreError):
    """A revocation list was refused. ``reason``: ``malformed``, ``oversized``,
    ``untrusted_sender``, ``revoked_sender``, ``bad_signature``, ``wrong_sender``,
    ``wrong_content_type``, ``not_signed_only``, ``rollback``, ``sequence_mismatch``,
    ``bad_crl``."""

    reason = "malformed"


@dataclass(frozen=True, slots=True)
class RevokedDevice:
    """One factory certificate HQ revoked: which station issued it, its serial, the device
    it names, why, and when (unix seconds)."""

    station_id: StationId
    serial: CertSerial
    device_id: DeviceId
    reason: str
    revoked_at: int

    def __post_init__(self) -> None:
        if not isinstance(self.station_id, StationId) or not isinstance(self.device_id, DeviceId):
            raise InvalidValueError("station_id and device_id must be StationId and DeviceId")
        if not isinstance(self.serial, CertSerial):
            raise InvalidValueError("serial must be a CertSerial")
        if self.reason not in REVOCATION_REASONS:
            raise InvalidValueError(f"unknown revocation reason {self.reason!r}")
        cbor.uint63(self.revoked_at, "revoked_at")

    def to_map(self) -> dict[str, Any]:
        return {
            "station_id": self.station_id.value,
            "serial": self.serial.hex,
            "device_id": self.device_id.value,
            "reason": self.reason,
            "time": self.revoked_at,
        }

    @classmethod
    def from_map(cls, obj: object) -> RevokedDevice:
        m = cbor.map_of(obj, "revocation entry")
        cbor.expect_keys(
            m, {"station_id", "serial", "device_id", "reason", "time"}, what="revocation entry"
        )
        serial_text = cbor.field(m, "serial", str)
        try:
            serial = CertSerial.from_hex(serial_text)
            if serial.hex != serial_text:  # one spelling per serial: lowercase, no leading 0
                raise InvalidValueError(f"serial {serial_text!r} is not in canonical hex")
            return cls(
                StationId(cbor.field(m, "station_id", str)),
                serial,
                DeviceId(cbor.field(m, "device_id", str)),
                cbor.field(m, "reason", str),
                cbor.field(m, "time", int),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad revocation entry: {exc.message}") from exc


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A complete HQ revocation list. Each (station, serial) appears at most once."""

    sequence: int
    issued: int
    entries: tuple[RevokedDevice, ...] = ()
    #: DER of the HQ indirect CRL, the CRL signer certificate and the root CRL (optional:
    #: lists made before the delegated CRL signer existed carry none).
    hq_crl: bytes | None = None
    crl_signer: bytes | None = None
    root_crl: bytes | None = None

    def __post_init__(self) -> None:
        cbor.uint63(self.sequence, "sequence")
        cbor.uint63(self.issued, "issued")
        object.__setattr__(self, "entries", tuple(self.entries))
        seen: set[tuple[str, int]] = set()
        for entry in self.entries:
            if not isinstance(entry, RevokedDevice):
                raise InvalidValueError("entries must be RevokedDevice values")
            k = (entry.station_id.value, entry.serial.value)
            if k in seen:
                raise InvalidValueError(f"serial {entry.serial} of {entry.station_id} listed twice")
            seen.add(k)

    def with_entries(self, added: Iterable[RevokedDevice], *, issued: int) -> RevocationList:
        """The next list: this one plus ``added``, with the next sequence number (without
        CRLs: the publisher attaches fresh ones, :meth:`with_crls`)."""
        return RevocationList(self.sequence + 1, issued, self.entries + tuple(added))

    def with_crls(
        self, *, hq_crl: bytes | None, crl_signer: bytes | None, root_crl: bytes | None
    ) -> RevocationList:
        return RevocationList(
            self.sequence, self.issued, self.entries, hq_crl, crl_signer, root_crl
        )

    @property
    def device_ids(self) -> frozenset[DeviceId]:
        return frozenset(e.device_id for e in self.entries)

    def lookup(
        self,
        *,
        device_id: DeviceId | None = None,
        station_id: StationId | None = None,
        serial: CertSerial | int | None = None,
    ) -> RevokedDevice | None:
        """The entry revoking this certificate (station + serial) or this device id.

        A device id alone is enough to match: a counterfeit carries a genuine device's id
        under another serial, and HQ's decision covers the identity, not just one copy."""
        value = serial.value if isinstance(serial, CertSerial) else serial
        for entry in self.entries:
            if device_id is not None and entry.device_id == device_id:
                return entry
            if (
                value is not None
                and entry.serial.value == value
                and (station_id is None or entry.station_id == station_id)
            ):
                return entry
        return None

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "seq": self.sequence,
            "issued": self.issued,
            "entries": [e.to_map() for e in self.entries],
        }
        for name in _CRL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        return cbor.encode(doc)

    @classmethod
    def decode(cls, data: bytes) -> RevocationList:
        m = cbor.map_of(cbor.decode(data, max_size=MAX_REVOCATION_LIST_SIZE), "revocation list")
        cbor.expect_keys(
            m, {"v", "seq", "issued", "entries"}, set(_CRL_FIELDS), what="revocation list"
        )
        if cbor.field(m, "v", int) != FORMAT_VERSION:
            raise EncodingError(f"unsupported revocation list version {m['v']!r}")
        entries = tuple(RevokedDevice.from_map(e) for e in cbor.field(m, "entries", list))
        crls = {n: cbor.field(m, n, bytes) if n in m else None for n in _CRL_FIELDS}
        try:
            return cls(
                cbor.field(m, "seq", int),
                cbor.field(m, "issued", int),
                entries,
                crls["hq_crl"],
                crls["crl_signer"],
                crls["root_crl"],
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad revocation list: {exc.message}") from exc


def seal_revocation_list(
    revocations: RevocationList, *, signer: Signer, signer_cert: x509.Certificate
) -> bytes:
    """Sign ``revocations`` as a public (signed-only) package with the HQ revocation signer."""
    return seal_package(
        content_type=CT_REVOCATION_LIST,
        payload=revocations.encode(),
        sender=signer,
        sender_cert=signer_cert,
        receiver_public=None,
        sequence=revocations.sequence,
        created=revocations.issued,
    )


def open_revocation_list(
    package: bytes,
    *,
    root: x509.Certificate,
    now: datetime,
    root_crl: x509.CertificateRevocationList | None,
    not_older_than: int | None,
) -> RevocationList:
    """Verify a revocation list package and return its content.

    Checks, in order: well-formed signed-only package of the right content type; the
    embedded sender certificate chains to ``root`` with the revocation-signer EKU, valid at
    ``now`` and, when ``root_crl`` is given, not revoked by it (a stolen revocation key,
    once revoked, cannot un-revoke devices); the signature; payload sequence = package
    sequence; and the sequence is not below ``not_older_than`` (``rollback``). The same
    sequence again is accepted (a site may receive the list it holds in a newer bundle).
    """
    try:
        header = peek(package, max_size=MAX_REVOCATION_LIST_SIZE)
        cert = header.sender_certificate()
    except SealedPackageError as exc:
        raise RevocationListError(f"revocation list: {exc.message}", reason=exc.reason) from exc
    if header.content_type != CT_REVOCATION_LIST:
        raise RevocationListError(
            f"not a revocation list ({header.content_type!r})", reason="wrong_content_type"
        )
    if header.encrypted:
        raise RevocationListError("a revocation list is signed-only", reason="not_signed_only")
    verifier = ChainVerifier(
        [root],
        crls=() if root_crl is None else (root_crl,),
        required_eku=OID_EKU_REVOCATION_SIGNER,
        require_crl=root_crl is not None,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd encodings: the checks decide, not warnings
            verifier.verify(cert, now=now)
    except VerificationError as exc:
        reason = "revoked_sender" if exc.reason == "revoked" else "untrusted_sender"
        raise RevocationListError(
            f"revocation signer certificate: {exc.message}", reason=reason
        ) from exc
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # the verifier checked P-256
    try:
        opened = open_package(
            package,
            receiver=None,
            expected_content_type=CT_REVOCATION_LIST,
            trusted_sender_public=public,
            last_sequence=None,
            max_size=MAX_REVOCATION_LIST_SIZE,
        )
        revocations = RevocationList.decode(opened.payload)
    except SealedPackageError as exc:
        raise RevocationListError(f"revocation list: {exc.message}", reason=exc.reason) from exc
    except EncodingError as exc:
        raise RevocationListError(
            f"revocation list payload: {exc.message}", reason=exc.reason
        ) from exc
    if revocations.sequence != header.sequence:
        raise RevocationListError(
            f"payload sequence {revocations.sequence} != package sequence {header.sequence}",
            reason="sequence_mismatch",
        )
    _check_crls(revocations, root)
    if not_older_than is not None and revocations.sequence < not_older_than:
        raise RevocationListError(
            f"revocation list {revocations.sequence} is older than the one held "
            f"({not_older_than}); refusing to roll revocations back",
            reason="rollback",
        )
    return revocations


def indirect_crls_of(
    revocations: RevocationList,
) -> list[tuple[x509.CertificateRevocationList, x509.Certificate]]:
    """The (indirect CRL, CRL signer certificate) pair a list carries, for
    ``ChainVerifier(indirect_crls=...)`` (empty for a list without one)."""
    if revocations.hq_crl is None or revocations.crl_signer is None:
        return []
    return [(load_crl(revocations.hq_crl), x509.load_der_x509_certificate(revocations.crl_signer))]


def _check_crls(revocations: RevocationList, root: x509.Certificate) -> None:
    """The CRLs a list carries must verify: the root CRL against the root, the indirect CRL
    against a CRL-signer certificate under the root (``bad_crl``). Freshness is judged where
    they are used (a site's verifier, its offline limit)."""
    if revocations.hq_crl is not None and revocations.crl_signer is None:
        raise RevocationListError("the list has an HQ CRL but no CRL signer", reason="bad_crl")
    try:
        root_crls = []
        if revocations.root_crl is not None:
            root_crl = load_crl(revocations.root_crl)
            verify_crl(root_crl, root, now=None)
            root_crls.append(root_crl)
        indirect = indirect_crls_of(revocations)
        ChainVerifier([root], crls=root_crls, indirect_crls=indirect)
    except (CrlError, ValueError) as exc:
        raise RevocationListError(f"a CRL in the revocation list: {exc}", reason="bad_crl") from exc
    # HQ signs the indirect CRL when it publishes the list (thisUpdate = issued - 5 min), so
    # a site's bound on the list's age (``issued``) is a bound on the CRL's thisUpdate too.
    for crl, _ in indirect:
        lag = revocations.issued - crl.last_update_utc.timestamp()
        if not 0 <= lag <= _MAX_CRL_LAG_S:
            raise RevocationListError(
                "the HQ CRL's thisUpdate does not match the list's issue time", reason="bad_crl"
            )


def revoked_at_datetime(entry: RevokedDevice) -> datetime:
    """The revocation time as an aware datetime (for CRL entries and display)."""
    return from_unix(entry.revoked_at)
