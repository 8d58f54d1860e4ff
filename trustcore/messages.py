"""The payloads that travel between HQ and a factory station, and their content types.

Each payload is a deterministic-CBOR map carried inside a sealed package
(:mod:`trustcore.sealed`), except the enrolment request, which the station makes before it
has any certificate and which is therefore self-authenticating (CSR self-signature plus a
binding signature over the transport key, both by the station CA key in its TPM).

============================  ======================  ===========================  ==========
content type                  sender (signing key)    receiver (encrypted to)      sequence
============================  ======================  ===========================  ==========
(file) station enrolment      station CA key (TPM)    — (plain, self-signed)       —
``devtrust/entitlement/v1``   HQ entitlement signer   station transport key (TPM)  policy seq
``devtrust/audit-export/v1``  station CA key (TPM)    HQ audit receiver            export no.
(file) site enrolment         site CA key             — (plain, self-signed)       —
``devtrust/site-bundle/v1``   HQ entitlement signer   site transport key           per site
============================  ======================  ===========================  ==========

The site bundle payload lives in :mod:`trustcore.site_bundle`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.csr import ValidatedCsr, validate_csr
from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import (
    X509_PARSE_ERRORS,
    CsrError,
    EncodingError,
    InvalidValueError,
    ProfileError,
)
from trustcore.identity import SiteId, StationId
from trustcore.keys import Signer, spki_der
from trustcore.profiles import require_p256_public_key

CT_ENTITLEMENT = "devtrust/entitlement/v1"
CT_AUDIT_EXPORT = "devtrust/audit-export/v1"

_ENROLMENT_DOMAIN = "devtrust/station-enrolment/v1"
_SITE_ENROLMENT_DOMAIN = "devtrust/site-enrolment/v1"
MAX_ENROLMENT_SIZE = 64 * 1024
MAX_ENTITLEMENT_SIZE = 4 * 1024 * 1024

_Id = TypeVar("_Id", StationId, SiteId)


def _load_public(der: bytes, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except X509_PARSE_ERRORS as exc:  # UnsupportedAlgorithm for an unknown curve OID
        raise EncodingError(f"{what} is not a DER public key") from exc
    try:
        return require_p256_public_key(key)
    except ProfileError as exc:
        raise EncodingError(f"{what} must be a P-256 key") from exc


# -- station and site enrolment ----------------------------------------------------------


def _binding_input(domain: str, subject_id: str, csr_der: bytes, transport_der: bytes) -> bytes:
    return cbor.encode([domain, subject_id, csr_der, transport_der])


class _Enrolment(abc.ABC):
    """The one construction of both enrolment requests (:class:`StationEnrolment`,
    :class:`SiteEnrolment`): a CSR for the CA key, the transport (ECDH) public key, and the
    CA key's binding signature over ``[domain, id, csr, transport key]``. Each subclass
    names its domain string (so one kind can never be taken for the other), the CBOR key
    of its id and what it is called in errors; it declares the fields, id first."""

    _DOMAIN: ClassVar[str]
    _ID_KEY: ClassVar[str]
    _WHAT: ClassVar[str]

    csr_der: bytes
    transport_public_der: bytes
    binding_signature: bytes

    @property
    @abc.abstractmethod
    def _subject_id(self) -> str: ...

    @classmethod
    def _bound(
        cls, subject_id: str, csr_der: bytes, ca_key: Signer, transport: ec.EllipticCurvePublicKey
    ) -> tuple[bytes, bytes]:
        """(transport key DER, binding signature by ``ca_key``)."""
        transport_der = spki_der(transport)
        return transport_der, ca_key.sign(
            _binding_input(cls._DOMAIN, subject_id, csr_der, transport_der)
        )

    @classmethod
    def _decoded(
        cls, data: bytes, id_type: Callable[[str], _Id]
    ) -> tuple[_Id, bytes, bytes, bytes]:
        """(id, CSR, transport key, binding signature) of an encoded request."""
        what = cls._WHAT
        m = cbor.map_of(cbor.decode(data, max_size=MAX_ENROLMENT_SIZE), what)
        cbor.expect_keys(m, {"type", cls._ID_KEY, "csr", "transport_key", "binding_sig"}, what=what)
        if m["type"] != cls._DOMAIN:
            raise EncodingError(f"not a {what} request")
        sid = cbor.field(m, cls._ID_KEY, str)
        csr = cbor.field(m, "csr", bytes)
        transport = cbor.field(m, "transport_key", bytes)
        sig = cbor.field(m, "binding_sig", bytes)
        try:
            subject = id_type(sid)
        except InvalidValueError as exc:
            raise EncodingError(f"bad {what.split()[0]} id: {exc.message}") from exc
        return subject, csr, transport, sig

    def encode(self) -> bytes:
        return cbor.encode(
            {"type": self._DOMAIN, self._ID_KEY: self._subject_id, "csr": self.csr_der,
             "transport_key": self.transport_public_der, "binding_sig": self.binding_signature}
        )  # fmt: skip

    def verify(self) -> tuple[ValidatedCsr, ec.EllipticCurvePublicKey]:
        """Check the CSR (self-signature, P-256, CN = the station or site id) and the
        binding signature by the CSR's key over the transport key; return the validated CSR
        and the transport public key."""
        kind = self._WHAT.split()[0]
        subject_id = self._subject_id
        csr = validate_csr(self.csr_der)
        if csr.common_name != subject_id:
            raise CsrError(f"{self._WHAT} CSR CN is not the {kind} id", reason="wrong_name")
        transport = _load_public(self.transport_public_der, "transport key")
        try:
            csr.public_key.verify(
                self.binding_signature,
                _binding_input(self._DOMAIN, subject_id, self.csr_der, self.transport_public_der),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature as exc:
            raise CsrError(
                f"transport key is not bound by the {kind} CA key", reason="bad_signature"
            ) from exc
        return csr, transport


@dataclass(frozen=True)
class StationEnrolment(_Enrolment):
    """A station asks HQ to enrol it: the CSR of its CA key, and the public half of its
    transport (ECDH) key, to which HQ will encrypt entitlements. The binding signature by
    the CA key stops anyone from swapping in their own transport key in transit."""

    _DOMAIN: ClassVar[str] = _ENROLMENT_DOMAIN
    _ID_KEY: ClassVar[str] = "station_id"
    _WHAT: ClassVar[str] = "station enrolment"

    station_id: StationId
    csr_der: bytes
    transport_public_der: bytes
    binding_signature: bytes

    @property
    def _subject_id(self) -> str:
        return self.station_id.value

    @classmethod
    def create(
        cls,
        station_id: StationId,
        csr_der: bytes,
        ca_key: Signer,
        transport_public: ec.EllipticCurvePublicKey,
    ) -> StationEnrolment:
        return cls(
            station_id, csr_der, *cls._bound(station_id.value, csr_der, ca_key, transport_public)
        )

    @classmethod
    def decode(cls, data: bytes) -> StationEnrolment:
        return cls(*cls._decoded(data, StationId))


@dataclass(frozen=True)
class SiteEnrolment(_Enrolment):
    """A building registrar asks HQ for its site CA certificate: the CSR of the site CA key
    (CN = site id) and the public half of the site transport (ECDH) key, to which HQ
    encrypts site bundles. Same construction as :class:`StationEnrolment`, with its own type
    and domain string, so a station request can never be taken for a site request (or the
    reverse) and a binding signature made for one cannot be replayed as the other."""

    _DOMAIN: ClassVar[str] = _SITE_ENROLMENT_DOMAIN
    _ID_KEY: ClassVar[str] = "site_id"
    _WHAT: ClassVar[str] = "site enrolment"

    site_id: SiteId
    csr_der: bytes
    transport_public_der: bytes
    binding_signature: bytes

    @property
    def _subject_id(self) -> str:
        return self.site_id.value

    @classmethod
    def create(
        cls,
        site_id: SiteId,
        csr_der: bytes,
        ca_key: Signer,
        transport_public: ec.EllipticCurvePublicKey,
    ) -> SiteEnrolment:
        return cls(site_id, csr_der, *cls._bound(site_id.value, csr_der, ca_key, transport_public))

    @classmethod
    def decode(cls, data: bytes) -> SiteEnrolment:
        return cls(*cls._decoded(data, SiteId))


# -- entitlement -------------------------------------------------------------------------


@dataclass(frozen=True)
class EntitlementPayload:
    """What an entitlement package carries: the policy, the station CA certificate HQ
    issued for this entitlement (valid until the root ends, docs/pki.md), the HQ audit
    receiver certificate (where audit exports go) and the product secrets to inject."""

    policy: EntitlementPolicy
    station_ca_cert_der: bytes
    audit_receiver_cert_der: bytes
    product_secrets: dict[str, bytes]
    #: The HQ CRL signer certificate (optional): the station names its subject as the
    #: cRLIssuer of every IDevID it signs, so HQ's indirect CRL covers them (docs/pki.md).
    crl_signer_cert_der: bytes | None = None

    def encode(self) -> bytes:
        doc: dict[str, object] = {
            "policy": self.policy.to_map(),
            "station_ca_cert": self.station_ca_cert_der,
            "audit_receiver_cert": self.audit_receiver_cert_der,
            "product_secrets": dict(self.product_secrets),
        }
        if self.crl_signer_cert_der is not None:
            doc["crl_signer_cert"] = self.crl_signer_cert_der
        return cbor.encode(doc)

    @classmethod
    def decode(cls, data: bytes) -> EntitlementPayload:
        m = cbor.map_of(cbor.decode(data, max_size=MAX_ENTITLEMENT_SIZE), "entitlement")
        cbor.expect_keys(
            m,
            {"policy", "station_ca_cert", "audit_receiver_cert", "product_secrets"},
            {"crl_signer_cert"},
            what="entitlement",
        )
        secrets = cbor.map_of(m["product_secrets"], "product_secrets")
        for name, value in secrets.items():
            if not isinstance(name, str) or not isinstance(value, bytes):
                raise EncodingError("product_secrets maps names to byte strings")
        return cls(
            policy=EntitlementPolicy.from_map(m["policy"]),
            station_ca_cert_der=cbor.field(m, "station_ca_cert", bytes),
            audit_receiver_cert_der=cbor.field(m, "audit_receiver_cert", bytes),
            product_secrets=dict(secrets),
            crl_signer_cert_der=(
                cbor.field(m, "crl_signer_cert", bytes) if "crl_signer_cert" in m else None
            ),
        )


# -- audit export ------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditExportPayload:
    """An audit export: the chained records since the previous export with a checkpoint
    signed in the station TPM (``trustcore.audit`` export bytes), and the manifest of the
    factory certificates issued in that span."""

    station_id: str
    entitlement_sequence: int
    export_number: int
    audit_export: bytes
    manifest: tuple[bytes, ...]
    #: The station CA's current CRL (DER, signed in the station TPM), so HQ can hand it to
    #: sites: brokers check revocation for every issuing CA and refuse a CA without a CRL.
    crl: bytes | None = None
    #: CRLs signed by the CA keys the station re-keyed away from (``factory-station
    #: import-ca``), so the devices made under an old key keep a current CRL at sites.
    #: Encoded only when present (an export without re-key keeps its bytes).
    retired_crls: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        m: dict[str, object] = {
            "station_id": self.station_id,
            "entitlement_seq": self.entitlement_sequence,
            "export_number": self.export_number,
            "audit": self.audit_export,
            "manifest": list(self.manifest),
            "crl": self.crl,
        }
        if self.retired_crls:
            m["retired_crls"] = list(self.retired_crls)
        return cbor.encode(m)

    @classmethod
    def decode(cls, data: bytes, *, max_size: int) -> AuditExportPayload:
        m = cbor.map_of(cbor.decode(data, max_size=max_size), "audit export")
        cbor.expect_keys(
            m,
            {"station_id", "entitlement_seq", "export_number", "audit", "manifest", "crl"},
            {"retired_crls"},
            what="audit export",
        )
        manifest = m["manifest"]
        if not isinstance(manifest, list) or not all(isinstance(c, bytes) for c in manifest):
            raise EncodingError("manifest must be a list of DER certificates")
        retired = m.get("retired_crls", [])
        if not isinstance(retired, list) or not all(isinstance(c, bytes) for c in retired):
            raise EncodingError("retired_crls must be a list of DER CRLs")
        return cls(
            station_id=cbor.field(m, "station_id", str),
            entitlement_sequence=cbor.field(m, "entitlement_seq", int),
            export_number=cbor.field(m, "export_number", int),
            audit_export=cbor.field(m, "audit", bytes),
            manifest=tuple(manifest),
            crl=cbor.optional_field(m, "crl", bytes),
            retired_crls=tuple(retired),
        )


CT_TIME_STATEMENT = "devtrust/time-statement/v1"


@dataclass(frozen=True)
class TimeStatement:
    """HQ vouches that it is at least ``time`` (unix seconds) for station ``station_id``.

    Travels as a signed, unencrypted sealed package (sender: the HQ entitlement signer;
    ``sequence`` and ``created`` both equal ``time``, so a station accepts only newer
    statements). A station re-anchors its trusted time with it (``trustcore.stationtime``),
    e.g. after it was switched off longer than its clock tolerance."""

    station_id: str
    time: int

    def encode(self) -> bytes:
        return cbor.encode({"station_id": self.station_id, "time": self.time})

    @classmethod
    def decode(cls, data: bytes) -> TimeStatement:
        m = cbor.map_of(cbor.decode(data, max_size=1024), "time statement")
        cbor.expect_keys(m, {"station_id", "time"}, what="time statement")
        statement = cls(cbor.field(m, "station_id", str), cbor.field(m, "time", int))
        if statement.time < 0:
            raise EncodingError("time statement time must be >= 0")
        return statement
