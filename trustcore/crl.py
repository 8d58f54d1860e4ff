"""Certificate revocation lists: build, parse, verify against the issuer, and a frozen view.

A CRL is only believed after :func:`verify_crl` checked that it names the issuing CA, that the
CA may sign CRLs, that the signature verifies with the CA key, and that it is fresh at
``now``. A CRL past its nextUpdate is refused with reason ``crl_stale`` (fail closed: an
attacker who blocks new CRLs must not freeze revocation at an old state), as is a CRL without
nextUpdate. Reasons carried by :class:`CrlError`: ``malformed``, ``crl_wrong_issuer``,
``crl_bad_signature``, ``crl_not_yet_valid``, ``crl_stale``, ``bad_crl``.

Indirect CRLs (RFC 5280 §5.2.5): HQ's delegated CRL signer (an end entity with cRLSign,
not a CA) lists factory certificates of every station CA in one CRL; its
IssuingDistributionPoint says ``indirectCRL`` and every entry names the CA that issued the
revoked certificate in a critical certificateIssuer entry extension.
:func:`build_indirect_crl` writes one, :func:`verify_indirect_crl` checks it against the
signer's certificate and returns an :class:`IndirectRevocationSet` keyed by (issuer, serial).
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore.errors import X509_PARSE_ERRORS, CrlError, ProfileError
from trustcore.identity import CertSerial
from trustcore.keys import spki_der
from trustcore.profiles import require_p256_public_key
from trustcore.utctime import whole_seconds
from trustcore.x509parse import parsed_crl

__all__ = [
    "MAX_CRL_SIZE",
    "IndirectEntry",
    "IndirectRevocationSet",
    "RevocationSet",
    "RevokedEntry",
    "build_crl",
    "build_indirect_crl",
    "crl_authority_key_id",
    "load_crl",
    "verify_crl",
    "verify_indirect_crl",
]

#: A site CRL lists at most a few hundred thousand serials; anything bigger is refused
#: before parsing so a hostile file cannot exhaust memory.
MAX_CRL_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One revocation: serial, when, and why (``unspecified`` is written without a reason)."""

    serial: CertSerial
    revoked_at: datetime
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified


def _issuer_may_sign_crls(issuer: x509.Certificate) -> bool:
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(ku.crl_sign and bc.ca)


def build_crl(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    revoked: Iterable[RevokedEntry],
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A CRL (v2, CRL number, AKI) signed with ECDSA-SHA256 by the issuing CA's key."""
    issuer_pub = _signing_key_of(issuer_cert, issuer_key, "issuer")
    if not _issuer_may_sign_crls(issuer_cert):
        raise CrlError("issuer is not a CA with cRLSign")
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_pub)
    builder = _crl_builder(issuer_cert, crl_number, this_update, next_update).add_extension(
        aki, critical=False
    )
    seen: set[int] = set()
    for entry in revoked:
        if entry.serial.value in seen:
            raise CrlError(f"serial {entry.serial} listed twice")
        seen.add(entry.serial.value)
        builder = builder.add_revoked_certificate(_revoked_certificate(entry))
    return builder.sign(issuer_key, hashes.SHA256())


def _signing_key_of(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, role: str
) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a CRL ``role`` (issuer or signer) certificate, checked to
    match the signing ``key``: a CRL is never signed by a key its certificate does not name."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CrlError("CRL signing key must be ECDSA P-256")
    try:
        public = require_p256_public_key(cert.public_key())
    except ProfileError as exc:
        raise CrlError(f"CRL {role} certificate key must be ECDSA P-256") from exc
    if spki_der(public) != spki_der(key.public_key()):
        raise CrlError(f"signing key does not match the CRL {role} certificate")
    return public


def _crl_builder(
    cert: x509.Certificate, crl_number: int, this_update: datetime, next_update: datetime
) -> x509.CertificateRevocationListBuilder:
    """The checked CRL number and window of a CRL that ``cert`` signs, in a new builder."""
    if not 0 <= crl_number < 1 << 159:
        raise CrlError("CRL number must be a non-negative integer below 2**159")
    start = whole_seconds("this_update", this_update, CrlError)
    end = whole_seconds("next_update", next_update, CrlError)
    if end <= start:
        raise CrlError("next_update must be later than this_update")
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(start)
        .next_update(end)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
    )


def _revoked_certificate(
    entry: RevokedEntry | IndirectEntry, issuer: x509.CertificateIssuer | None = None
) -> x509.RevokedCertificate:
    """One CRL entry: serial, date, the critical certificateIssuer if given, the reason."""
    rc = (
        x509.RevokedCertificateBuilder()
        .serial_number(entry.serial.value)
        .revocation_date(whole_seconds("revoked_at", entry.revoked_at, CrlError))
    )
    if issuer is not None:
        rc = rc.add_extension(issuer, critical=True)
    # RFC 5280 §5.3.1: the reason code should be absent rather than "unspecified".
    if entry.reason is not x509.ReasonFlags.unspecified:
        rc = rc.add_extension(x509.CRLReason(entry.reason), critical=False)
    return rc.build()


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """Parse a PEM or DER CRL, refusing oversized input and garbage with ``malformed``."""
    if not isinstance(data, bytes | bytearray):
        raise CrlError("CRL must be bytes", reason="malformed")
    if len(data) > MAX_CRL_SIZE:
        raise CrlError("CRL exceeds the size limit", reason="malformed")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return parsed_crl(x509.load_pem_x509_crl(bytes(data)))
        return parsed_crl(x509.load_der_x509_crl(bytes(data)))
    except X509_PARSE_ERRORS as exc:
        raise CrlError(f"CRL does not parse: {exc}", reason="malformed") from exc


@dataclass(frozen=True, slots=True, eq=False)
class _VerifiedCrl:
    """What a verified CRL of either kind holds besides its entries, and its freshness."""

    _KIND: ClassVar[str] = "CRL"

    issuer: x509.Name
    issuer_key_id: bytes
    crl_number: int
    this_update: datetime
    next_update: datetime

    def check_fresh(self, now: datetime) -> None:
        """Raise ``crl_stale`` if ``now`` is past nextUpdate, ``crl_not_yet_valid`` if it is
        before thisUpdate (a CRL from the future means a wrong clock or a forged CRL)."""
        moment = whole_seconds("now", now, CrlError)
        if moment >= self.next_update:
            raise CrlError(
                f"{self._KIND} of {self.issuer.rfc4514_string()} expired at "
                f"{self.next_update.isoformat()}",
                reason="crl_stale",
            )
        if moment < self.this_update:
            raise CrlError("CRL thisUpdate is in the future", reason="crl_not_yet_valid")


@dataclass(frozen=True, slots=True, eq=False)
class RevocationSet(_VerifiedCrl):
    """The verified content of one CRL: which serials its issuer revoked, and why.

    Immutable (``entries`` is a read-only mapping). Freshness is a function of time, so it is
    checked with :meth:`check_fresh` at each use, not frozen in at construction.
    """

    entries: Mapping[int, x509.ReasonFlags] = field(repr=False)

    def __contains__(self, serial: object) -> bool:
        value = serial.value if isinstance(serial, CertSerial) else serial
        return value in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[int]:
        return iter(self.entries)

    def reason_for(self, serial: CertSerial | int) -> x509.ReasonFlags | None:
        """The revocation reason, or ``None`` if the serial is not revoked."""
        value = serial.value if isinstance(serial, CertSerial) else serial
        return self.entries.get(value)


def _key_id(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(
            require_p256_public_key(cert.public_key())
        ).digest


def crl_authority_key_id(crl: x509.CertificateRevocationList) -> bytes | None:
    """The keyIdentifier of the CRL's AKI (None: no AKI, or one without it); ``malformed``
    if the CRL's extensions do not parse."""
    try:
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise CrlError("CRL extensions do not parse", reason="malformed") from exc
    return aki.key_identifier


def _signed_and_numbered(
    crl: x509.CertificateRevocationList, signer: x509.Certificate, role: str
) -> tuple[datetime, int]:
    """The checks every CRL passes, direct or indirect: P-256 key, ECDSA-SHA256 signature
    that verifies, a nextUpdate (absent = never fresh: fail closed) and a CRL number."""
    try:
        public = require_p256_public_key(signer.public_key())
    except ProfileError as exc:
        raise CrlError(f"CRL {role} key is not P-256", reason="crl_wrong_issuer") from exc
    if not isinstance(crl.signature_hash_algorithm, hashes.SHA256):
        raise CrlError("CRL is not signed with ECDSA-SHA256", reason="crl_bad_signature")
    if not crl.is_signature_valid(public):
        raise CrlError("CRL signature does not verify", reason="crl_bad_signature")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CrlError("CRL has no nextUpdate; it can never be judged fresh", reason="crl_stale")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound as exc:
        raise CrlError("CRL has no CRL number", reason="malformed") from exc
    return next_update, number


def _reason_of(revoked: x509.RevokedCertificate) -> x509.ReasonFlags:
    """An entry's reason code; an entry without one is ``unspecified`` (RFC 5280 §5.3.1)."""
    try:
        return revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return x509.ReasonFlags.unspecified


def verify_crl(
    crl: x509.CertificateRevocationList | bytes,
    issuer_cert: x509.Certificate,
    *,
    now: datetime | None,
) -> RevocationSet:
    """Verify ``crl`` against the CA that issued the certificates it covers.

    ``now=None`` checks everything but freshness; only :class:`ChainVerifier` does that,
    because it re-checks freshness at every verification.
    """
    if isinstance(crl, bytes | bytearray):
        crl = load_crl(bytes(crl))
    else:
        try:
            parsed_crl(crl)
        except ValueError as exc:
            raise CrlError(f"CRL does not parse: {exc}", reason="malformed") from exc
    if crl.issuer != issuer_cert.subject:
        raise CrlError("CRL issuer name does not match the CA", reason="crl_wrong_issuer")
    key_id = _key_id(issuer_cert)
    aki = crl_authority_key_id(crl)
    if aki is not None and aki != key_id:
        raise CrlError("CRL AKI does not match the CA key", reason="crl_wrong_issuer")
    if not _issuer_may_sign_crls(issuer_cert):
        raise CrlError("CA is not allowed to sign CRLs (no cRLSign)", reason="crl_wrong_issuer")
    next_update, number = _signed_and_numbered(crl, issuer_cert, "issuer")
    entries: dict[int, x509.ReasonFlags] = {}
    try:
        for revoked in crl:
            entries[revoked.serial_number] = _reason_of(revoked)
    except ValueError as exc:
        raise CrlError("CRL entry does not parse", reason="malformed") from exc
    return _verified(RevocationSet, crl, key_id, number, next_update, entries, now)


# ------------------------------------------------------------------------- indirect CRLs


@dataclass(frozen=True, slots=True)
class IndirectEntry:
    """One revocation in an indirect CRL: the CA that issued the certificate, its serial."""

    certificate_issuer: x509.Name
    serial: CertSerial
    revoked_at: datetime
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified


def _may_sign_crls_as_delegate(signer: x509.Certificate) -> bool:
    try:
        ku = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return bool(ku.crl_sign)


def build_indirect_crl(
    signer_cert: x509.Certificate,
    signer_key: ec.EllipticCurvePrivateKey,
    *,
    revoked: Iterable[IndirectEntry],
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """An indirect CRL signed by a delegated CRL signer (keyUsage cRLSign): IDP
    ``indirectCRL`` (critical); entries grouped by issuer, a critical certificateIssuer on
    the first entry of each group (the first entry always has one)."""
    _signing_key_of(signer_cert, signer_key, "signer")
    if not _may_sign_crls_as_delegate(signer_cert):
        raise CrlError("CRL signer certificate lacks keyUsage cRLSign")
    idp = x509.IssuingDistributionPoint(
        full_name=None,
        relative_name=None,
        only_contains_user_certs=False,
        only_contains_ca_certs=False,
        only_some_reasons=None,
        indirect_crl=True,
        only_contains_attribute_certs=False,
    )
    builder = (
        _crl_builder(signer_cert, crl_number, this_update, next_update)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                x509.SubjectKeyIdentifier(_key_id(signer_cert))
            ),
            critical=False,
        )
        .add_extension(idp, critical=True)
    )
    seen: set[tuple[bytes, int]] = set()
    previous: bytes | None = None
    # Grouped by issuer; certificateIssuer on the first entry of each group only, the
    # others inherit it (RFC 5280 §5.3.3; OpenSSL and verify_indirect_crl both apply it):
    # about 75 bytes an entry instead of 170, so 200,000 revocations fit MAX_CRL_SIZE.
    for entry in sorted(revoked, key=lambda e: e.certificate_issuer.public_bytes()):
        issuer_der = entry.certificate_issuer.public_bytes()
        key = (issuer_der, entry.serial.value)
        if key in seen:
            raise CrlError(f"serial {entry.serial} of one issuer listed twice")
        seen.add(key)
        first = issuer_der != previous
        previous = issuer_der
        builder = builder.add_revoked_certificate(
            _revoked_certificate(
                entry,
                x509.CertificateIssuer([x509.DirectoryName(entry.certificate_issuer)])
                if first
                else None,
            )
        )
    return builder.sign(signer_key, hashes.SHA256())


@dataclass(frozen=True, slots=True, eq=False)
class IndirectRevocationSet(_VerifiedCrl):
    """The verified content of an indirect CRL: (issuer name DER, serial) -> reason."""

    _KIND: ClassVar[str] = "indirect CRL"

    entries: Mapping[tuple[bytes, int], x509.ReasonFlags] = field(repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def reason_for(
        self, certificate_issuer: x509.Name, serial: CertSerial | int
    ) -> x509.ReasonFlags | None:
        return self.reason_for_der(certificate_issuer.public_bytes(), serial)

    def reason_for_der(
        self, certificate_issuer_der: bytes, serial: CertSerial | int
    ) -> x509.ReasonFlags | None:
        """:meth:`reason_for` with the issuer's name already in DER."""
        value = serial.value if isinstance(serial, CertSerial) else serial
        return self.entries.get((certificate_issuer_der, value))


_Verified = TypeVar("_Verified", RevocationSet, IndirectRevocationSet)


def _verified(
    kind: type[_Verified],
    crl: x509.CertificateRevocationList,
    key_id: bytes,
    number: int,
    next_update: datetime,
    entries: dict[Any, x509.ReasonFlags],
    now: datetime | None,
) -> _Verified:
    """The frozen view of a CRL whose signature and fields were checked; fresh at ``now``
    unless ``now`` is None."""
    result = kind(
        issuer=crl.issuer,
        issuer_key_id=key_id,
        crl_number=number,
        this_update=crl.last_update_utc,
        next_update=next_update,
        entries=types.MappingProxyType(entries),
    )
    if now is not None:
        result.check_fresh(now)
    return result


def verify_indirect_crl(
    crl: x509.CertificateRevocationList | bytes,
    signer_cert: x509.Certificate,
    *,
    now: datetime | None,
) -> IndirectRevocationSet:
    """Verify an indirect CRL against its signer's certificate (name, AKI, cRLSign,
    ECDSA-SHA256 signature, nextUpdate, CRL number, IDP ``indirectCRL``) and read its entries,
    applying RFC 5280 §5.3.3 certificateIssuer inheritance (the first entry defaults to the
    CRL issuer). Whether ``signer_cert`` itself is trusted is the caller's check (a role
    certificate under the root). Reasons as :func:`verify_crl`, plus ``bad_crl`` for a CRL
    that is not indirect."""
    if isinstance(crl, bytes | bytearray):
        crl = load_crl(bytes(crl))
    if crl.issuer != signer_cert.subject:
        raise CrlError("CRL issuer name does not match the CRL signer", reason="crl_wrong_issuer")
    key_id = _key_id(signer_cert)
    try:
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound as exc:
        raise CrlError(f"not an indirect CRL: {exc}", reason="bad_crl") from exc
    except ValueError as exc:
        raise CrlError("CRL extensions do not parse", reason="malformed") from exc
    if aki.key_identifier is not None and aki.key_identifier != key_id:
        raise CrlError("CRL AKI does not match the signer key", reason="crl_wrong_issuer")
    if not idp.indirect_crl:
        raise CrlError("the CRL's IssuingDistributionPoint is not indirectCRL", reason="bad_crl")
    if not _may_sign_crls_as_delegate(signer_cert):
        raise CrlError("CRL signer certificate lacks cRLSign", reason="crl_wrong_issuer")
    next_update, number = _signed_and_numbered(crl, signer_cert, "signer")
    entries: dict[tuple[bytes, int], x509.ReasonFlags] = {}
    current_issuer = crl.issuer
    try:
        for revoked in crl:
            try:
                names = revoked.extensions.get_extension_for_class(x509.CertificateIssuer).value
                dirs = names.get_values_for_type(x509.DirectoryName)
                if len(dirs) != 1:
                    raise CrlError(
                        "certificateIssuer must hold one directory name", reason="bad_crl"
                    )
                current_issuer = dirs[0]
            except x509.ExtensionNotFound:
                pass
            entries[(current_issuer.public_bytes(), revoked.serial_number)] = _reason_of(revoked)
    except ValueError as exc:
        raise CrlError("CRL entry does not parse", reason="malformed") from exc
    return _verified(IndirectRevocationSet, crl, key_id, number, next_update, entries, now)
