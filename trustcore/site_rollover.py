"""Site CA rollover: the request a site sends HQ for its next CA, and the signed "renew now"
command a registrar sends devices whose LDevID still comes from the retiring CA.

Both are deterministic-CBOR maps; pure logic, no I/O (see ``docs/site.md``, "Site CA
rollover", and ``docs/formats.md``).

**Rollover request** (file, site → HQ)::

    {"type": "devtrust/site-ca-rollover/v1",
     "enrolment": bstr,          # a SiteEnrolment of the NEW CA key (CSR + transport binding)
     "previous_ca": bstr,        # DER SubjectPublicKeyInfo of the CURRENT site CA key
     "continuity_sig": bstr}     # ECDSA-SHA256 by the CURRENT site CA key over
                                 # CBOR([type, enrolment, previous_ca])

The enrolment proves possession of the new key (CSR self-signature, binding signature);
the continuity signature proves that whoever holds the site's current CA key asks for the
change. HQ accepts it only if ``previous_ca`` is the key it enrolled for that site, so a
stolen enrolment file or a fresh key alone cannot take a site over.

**Renew now** (MQTT ``devices/<id>/rollover``, registrar → device, retained)::

    {"v": 1, "device_id": tstr, "issued": uint, "issuing_ca": bstr}   # signed envelope

signed (domain ``devtrust/renew-now/v1``) by the site CA key that issued the device's
CURRENT LDevID, which is the one site CA the device already trusts. ``issuing_ca`` is the
key id (SHA-256 of the SPKI) of the new issuing CA: a device whose LDevID is already from
that CA ignores the command, so the retained message is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.csr import validate_csr
from trustcore.errors import EncodingError, TrustCoreError
from trustcore.identity import DeviceId
from trustcore.keys import Signer, key_id, spki_der
from trustcore.messages import SiteEnrolment

__all__ = [
    "RenewNow",
    "SiteCaRollover",
    "SiteRolloverError",
    "build_renew_now",
    "parse_renew_now",
    "renew_now_body",
    "site_ca_generation",
]

ROLLOVER_TYPE = "devtrust/site-ca-rollover/v1"
RENEW_DOMAIN = "devtrust/renew-now/v1"
MAX_ROLLOVER_SIZE = 64 * 1024
MAX_RENEW_SIZE = 4 * 1024
_VERSION = 1


class SiteRolloverError(TrustCoreError):
    """A rollover request or a renew command does not verify (``reason`` says why); in the
    ``TrustCoreError`` tree beside ``EncodingError``."""

    reason = "bad_rollover"


def _verify(public: ec.EllipticCurvePublicKey, sig: bytes, data: bytes) -> bool:
    try:
        public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# -------------------------------------------------------------------------- rollover request


def _continuity_input(enrolment: bytes, previous_ca: bytes) -> bytes:
    return cbor.encode([ROLLOVER_TYPE, enrolment, previous_ca])


@dataclass(frozen=True)
class SiteCaRollover:
    """A site asks HQ for the certificate of its next CA key (see the module docstring)."""

    enrolment: bytes
    previous_ca: bytes
    continuity_sig: bytes

    @classmethod
    def create(cls, enrolment: SiteEnrolment, current_ca_key: Signer) -> SiteCaRollover:
        body = enrolment.encode()
        previous = spki_der(current_ca_key.public_key())
        return cls(body, previous, current_ca_key.sign(_continuity_input(body, previous)))

    def encode(self) -> bytes:
        return cbor.encode(
            {
                "type": ROLLOVER_TYPE,
                "enrolment": self.enrolment,
                "previous_ca": self.previous_ca,
                "continuity_sig": self.continuity_sig,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> SiteCaRollover:
        m = cbor.map_of(cbor.decode(data, max_size=MAX_ROLLOVER_SIZE), "site CA rollover")
        cbor.expect_keys(
            m, {"type", "enrolment", "previous_ca", "continuity_sig"}, what="site CA rollover"
        )
        if m["type"] != ROLLOVER_TYPE:
            raise EncodingError("not a site CA rollover request")
        return cls(
            cbor.field(m, "enrolment", bytes),
            cbor.field(m, "previous_ca", bytes),
            cbor.field(m, "continuity_sig", bytes),
        )

    def site_enrolment(self) -> SiteEnrolment:
        return SiteEnrolment.decode(self.enrolment)

    def verify(self, enrolled_ca_spki: bytes) -> SiteEnrolment:
        """Check that ``previous_ca`` is the key HQ enrolled (``enrolled_ca_spki``), that it
        signed this request, and that the new key differs from it. The inner enrolment's
        own checks (CSR, binding) are the caller's (``SiteEnrolment.verify``)."""
        if self.previous_ca != enrolled_ca_spki:
            raise SiteRolloverError(
                "the request is not signed by the site CA key HQ enrolled", reason="wrong_site_key"
            )
        try:
            previous = serialization.load_der_public_key(self.previous_ca)
        except (ValueError, TypeError) as exc:
            raise SiteRolloverError("previous CA key is not a DER public key") from exc
        if not isinstance(previous, ec.EllipticCurvePublicKey) or not _verify(
            previous, self.continuity_sig, _continuity_input(self.enrolment, self.previous_ca)
        ):
            raise SiteRolloverError(
                "continuity signature by the current site CA key does not verify",
                reason="bad_signature",
            )
        enrolment = self.site_enrolment()
        if spki_der(validate_csr(enrolment.csr_der).public_key) == self.previous_ca:
            raise SiteRolloverError("the new site CA key is the current one", reason="key_reuse")
        return enrolment


def site_ca_generation(cert: x509.Certificate) -> int:
    """The generation of a site CA certificate: 1 for the first (CN ``Site CA <id>``), n for
    ``Site CA <id> G<n>`` (:func:`trustcore.profiles.issue_site_ca` with ``generation``)."""
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return 1
    last = names[0].value.rsplit(" ", 1)[-1]
    if len(last) > 1 and last[0] == "G" and last[1:].isdigit():
        return int(last[1:])
    return 1


# ------------------------------------------------------------------------------- renew now


@dataclass(frozen=True)
class RenewNow:
    device_id: DeviceId
    issued: int
    issuing_ca: bytes  # key id of the CA the device should move to


def _renew_input(body: bytes) -> bytes:
    return cbor.encode([RENEW_DOMAIN, body])


def renew_now_body(device_id: DeviceId, issued: int, issuing_ca_key_id: bytes) -> bytes:
    """The signed body of a renew command (deterministic CBOR; ``docs/formats.md``)."""
    if len(issuing_ca_key_id) != 32:
        raise SiteRolloverError("issuing_ca must be a 32-byte key id")
    return cbor.encode(
        {"v": _VERSION, "device_id": device_id.value, "issued": issued,
         "issuing_ca": issuing_ca_key_id}
    )  # fmt: skip


def build_renew_now(
    *, device_id: DeviceId, issued: int, issuing_ca: x509.Certificate, signer: Signer
) -> bytes:
    """``signer``: the key of the CA that issued the device's current LDevID."""
    new_ca = issuing_ca.public_key()
    if not isinstance(new_ca, ec.EllipticCurvePublicKey):
        raise SiteRolloverError("the issuing CA must have a P-256 key")
    body = renew_now_body(device_id, issued, key_id(new_ca))
    return cbor.encode({"body": body, "sig": signer.sign(_renew_input(body))})


def parse_renew_now(
    data: bytes, *, device_id: DeviceId, site_ca: x509.Certificate, newer_than: int = 0
) -> RenewNow:
    """The device side: verify a renew command with the site CA of its current LDevID.
    Raises :class:`SiteRolloverError` for anything that does not verify."""
    try:
        outer = cbor.map_of(cbor.decode(data, max_size=MAX_RENEW_SIZE), "renew command")
        cbor.expect_keys(outer, {"body", "sig"}, what="renew command")
        body = cbor.field(outer, "body", bytes)
        sig = cbor.field(outer, "sig", bytes)
        public = site_ca.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not _verify(
            public, sig, _renew_input(body)
        ):
            raise SiteRolloverError(
                "renew command signature does not verify", reason="bad_signature"
            )
        m = cbor.map_of(cbor.decode(body, max_size=MAX_RENEW_SIZE), "renew command body")
        cbor.expect_keys(m, {"v", "device_id", "issued", "issuing_ca"}, what="renew command")
        if cbor.field(m, "v", int) != _VERSION:
            raise SiteRolloverError("renew command version", reason="unsupported_version")
        if cbor.field(m, "device_id", str) != device_id.value:
            raise SiteRolloverError("renew command for another device", reason="device_mismatch")
        issued = cbor.field(m, "issued", int)
        target = cbor.field(m, "issuing_ca", bytes, size=32)
    except EncodingError as exc:
        raise SiteRolloverError(f"renew command: {exc.message}", reason="malformed") from exc
    if issued <= newer_than:
        raise SiteRolloverError("renew command is not newer than the last one", reason="replayed")
    return RenewNow(device_id, issued, target)
