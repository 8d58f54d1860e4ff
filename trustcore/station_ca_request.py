"""A factory station asks HQ for a new CA certificate: renewal (same TPM key) or re-key (a
new TPM key). Pure: encode, decode, verify; no I/O.

The request is a plain file (no network between HQ and the factory), self-authenticating:

* ``csr``: a PKCS#10 request for the key to be certified (CN = station id), signed by that
  key, so HQ sees proof of possession of the key it certifies;
* ``current_cert``: the station CA certificate the station uses now; HQ checks that it
  issued exactly this certificate to this station and that it is not revoked;
* ``sig_current``: the *current* CA key's signature over the request body, so HQ sees
  continuity: only the holder of the key HQ already trusts for this station can ask;
* ``sig_new`` (re-key only): the *new* key's signature over the same body, binding the new
  key to this one request (the CSR self-signature alone does not name the current key).

Signed body: the deterministic CBOR array
``["devtrust/station-ca-request/v1", station_id, kind, request_id, created, csr,
current_cert]``. File: the CBOR map ``{"type", "station_id", "kind", "request_id",
"created", "csr", "current_cert", "sig_current", "sig_new"?}``.

``request_id`` (16 random bytes) makes every request single-use: HQ records it and refuses
a replay. ``created`` bounds how old a request may be when HQ sees it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.csr import ValidatedCsr, validate_csr
from trustcore.errors import CsrError, EncodingError, InvalidValueError, TrustCoreError
from trustcore.identity import StationId
from trustcore.keys import Signer, spki_der

__all__ = [
    "KIND_REKEY",
    "KIND_RENEW",
    "MAX_REQUEST_SIZE",
    "StationCaRequest",
    "StationCaRequestError",
    "VerifiedStationCaRequest",
]

KIND_RENEW: Final = "renew"
KIND_REKEY: Final = "rekey"
_KINDS: Final = frozenset({KIND_RENEW, KIND_REKEY})
_DOMAIN: Final = "devtrust/station-ca-request/v1"
MAX_REQUEST_SIZE: Final = 64 * 1024


class StationCaRequestError(TrustCoreError):
    """A station CA request was refused. Reasons: ``malformed``, ``bad_signature``,
    ``key_mismatch`` (renewal CSR for another key, re-key CSR for the same key), ``wrong_name``
    and the CSR's own reasons."""

    reason = "malformed"


def _body(
    station_id: str, kind: str, request_id: bytes, created: int, csr: bytes, current: bytes
) -> bytes:
    return cbor.encode([_DOMAIN, station_id, kind, request_id, created, csr, current])


@dataclass(frozen=True)
class VerifiedStationCaRequest:
    """A request whose signatures and CSR verified. The caller (HQ) still decides whether
    ``current_cert`` is one it issued to this station and whether it is revoked."""

    request: StationCaRequest
    csr: ValidatedCsr
    current_cert: x509.Certificate
    new_public: ec.EllipticCurvePublicKey

    @property
    def rekey(self) -> bool:
        return self.request.kind == KIND_REKEY


@dataclass(frozen=True)
class StationCaRequest:
    station_id: StationId
    kind: str
    request_id: bytes
    created: int
    csr_der: bytes
    current_cert_der: bytes
    sig_current: bytes
    sig_new: bytes | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidValueError(f"unknown station CA request kind {self.kind!r}")
        if len(self.request_id) != 16:
            raise InvalidValueError("request_id must be 16 bytes")
        if (self.kind == KIND_REKEY) != (self.sig_new is not None):
            raise InvalidValueError("a re-key request carries sig_new, a renewal does not")

    # -- making one (station) ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        station_id: StationId,
        csr_der: bytes,
        current_cert_der: bytes,
        current_key: Signer,
        new_key: Signer | None,
        created: int,
        request_id: bytes | None = None,
    ) -> StationCaRequest:
        """Renewal when ``new_key`` is None (the CSR is for ``current_key``), else re-key."""
        kind = KIND_RENEW if new_key is None else KIND_REKEY
        rid = secrets.token_bytes(16) if request_id is None else request_id
        body = _body(station_id.value, kind, rid, created, csr_der, current_cert_der)
        return cls(
            station_id,
            kind,
            rid,
            created,
            csr_der,
            current_cert_der,
            current_key.sign(body),
            None if new_key is None else new_key.sign(body),
        )

    def body(self) -> bytes:
        return _body(
            self.station_id.value,
            self.kind,
            self.request_id,
            self.created,
            self.csr_der,
            self.current_cert_der,
        )

    # -- the file ------------------------------------------------------------------------

    def encode(self) -> bytes:
        m: dict[str, object] = {
            "type": _DOMAIN,
            "station_id": self.station_id.value,
            "kind": self.kind,
            "request_id": self.request_id,
            "created": self.created,
            "csr": self.csr_der,
            "current_cert": self.current_cert_der,
            "sig_current": self.sig_current,
        }
        if self.sig_new is not None:
            m["sig_new"] = self.sig_new
        return cbor.encode(m)

    @classmethod
    def decode(cls, data: bytes) -> StationCaRequest:
        if len(data) > MAX_REQUEST_SIZE:
            raise StationCaRequestError("station CA request is too large", reason="malformed")
        try:
            m = cbor.map_of(cbor.decode(data, max_size=MAX_REQUEST_SIZE), "station CA request")
            cbor.expect_keys(
                m,
                {"type", "station_id", "kind", "request_id", "created", "csr", "current_cert",
                 "sig_current"},
                {"sig_new"},
                what="station CA request",
            )  # fmt: skip
            if m["type"] != _DOMAIN:
                raise EncodingError("not a station CA request")
            return cls(
                StationId(cbor.field(m, "station_id", str)),
                cbor.field(m, "kind", str),
                cbor.field(m, "request_id", bytes),
                cbor.field(m, "created", int),
                cbor.field(m, "csr", bytes),
                cbor.field(m, "current_cert", bytes),
                cbor.field(m, "sig_current", bytes),
                cbor.optional_field(m, "sig_new", bytes),
            )
        except (EncodingError, InvalidValueError) as exc:
            raise StationCaRequestError(
                f"station CA request does not decode: {exc.message}", reason="malformed"
            ) from exc

    # -- checking one (HQ) ---------------------------------------------------------------

    def verify(self) -> VerifiedStationCaRequest:
        """The CSR (self-signature, P-256, CN = station id), the current key's signature
        (made with the key of ``current_cert``) and, for a re-key, the new key's signature;
        a renewal must certify the current key again, a re-key a different one."""
        try:
            csr = validate_csr(self.csr_der)
        except CsrError as exc:
            raise StationCaRequestError(f"request CSR: {exc.message}", reason=exc.reason) from exc
        if csr.common_name != self.station_id.value:
            raise StationCaRequestError("request CSR CN is not the station id", reason="wrong_name")
        try:
            current = x509.load_der_x509_certificate(self.current_cert_der)
            current_public = current.public_key()
        except ValueError as exc:
            raise StationCaRequestError(
                "current certificate does not parse", reason="malformed"
            ) from exc
        if not isinstance(current_public, ec.EllipticCurvePublicKey):
            raise StationCaRequestError("current certificate is not P-256", reason="malformed")
        body = self.body()
        _verify(current_public, self.sig_current, body, "current CA key")
        same_key = spki_der(csr.public_key) == spki_der(current_public)
        if self.kind == KIND_RENEW and not same_key:
            raise StationCaRequestError(
                "a renewal must certify the current CA key (use a re-key request for a new key)",
                reason="key_mismatch",
            )
        if self.kind == KIND_REKEY:
            if same_key:
                raise StationCaRequestError(
                    "a re-key request must certify a new key", reason="key_mismatch"
                )
            assert self.sig_new is not None  # __post_init__
            _verify(csr.public_key, self.sig_new, body, "new CA key")
        return VerifiedStationCaRequest(self, csr, current, csr.public_key)


def _verify(key: ec.EllipticCurvePublicKey, sig: bytes, body: bytes, what: str) -> None:
    try:
        key.verify(sig, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise StationCaRequestError(
            f"the request is not signed by the {what}", reason="bad_signature"
        ) from exc
