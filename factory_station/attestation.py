"""Station side of TPM key attestation: is the CSR's key really inside a genuine device TPM?

A CSR proves possession of a private key, not where it lives. Before signing a factory
certificate the station checks a chain of three TPM facts (the device side is
``signers.attestation``):

1. The **EK certificate** chains to a configured TPM-vendor CA. The EK public area is rebuilt
   here from the standard TCG template and the certificate's key, so the device cannot
   substitute a key of its choosing: an ECC NIST P-384 key means the high-range template H-3
   (the only TCG template for that curve; AES-256-CFB, SHA-384 name, TCG PolicyC authPolicy),
   an RSA-2048 key the low-range template L-1. ECC is the fast path: the credential is an
   ECDH seed (TPM2_ActivateCredential costs about 0.7 ms on swtpm against 5 to 10 ms for an
   RSA-2048 decryption). A P-256 EK could be L-2 or H-2, which the certificate does not tell
   apart, so it is refused rather than guessed.
2. **Credential activation**: a fresh secret is encrypted to that EK and bound to the AK's
   name (nameAlg || H(AK public area)). Only a TPM holding the EK private key *and* an object
   with that exact name can return it, so the AK is resident in the certified TPM. The AK's
   public area must be a restricted P-256 ECDSA-SHA256 signing key with fixedTPM,
   fixedParent and sensitiveDataOrigin, and without adminWithPolicy or an authPolicy:
   TPM2_ActivateCredential authorises the AK in the ADMIN role, which then needs its
   authValue, which a public-only copy loaded with TPM2_LoadExternal does not have.
3. **TPM2_Certify** by that AK over the station's nonce: the signature verifies, the
   TPMS_ATTEST is TPM-generated (magic), of type ATTEST_CERTIFY, carries our nonce (no
   replay), and names exactly the public area the device sent; that area is a P-256 signing
   key with fixedTPM, fixedParent and sensitiveDataOrigin (created in this TPM, never
   duplicable), without adminWithPolicy (same LoadExternal argument as for the AK), and its
   point is the CSR's public key.

Every refusal raises :class:`~factory_station.errors.AttestationError` with a ``reason`` from
:data:`ATTESTATION_REASONS`. The verifier is a one-shot state machine per device:
``begin`` → ``finish``; a second ``finish`` (or any call after a failure) is refused, so a
challenge can never be answered twice. This module does no I/O; EK-certificate checks use
``cryptography.x509.verification`` with the web-PKI CA policy for the vendor CAs and a
permissive leaf policy (EK certificates carry a critical directoryName SAN, TCG EKU and
subject-directory attributes), plus explicit leaf checks below.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import Enum
from functools import cache
from typing import Final, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ObjectIdentifier
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPMS_ATTEST, TPMT_PUBLIC
from tpm2_pytss.utils import NoSuchIndex, create_ek_template, make_credential

from factory_station.errors import AttestationError
from signers.attestation import CredentialChallenge
from signers.errors import TpmImportError
from signers.tpm_import import check_storage_public, tpm_name

__all__ = [
    "ATTESTATION_REASONS",
    "TCG_KP_EK_CERTIFICATE",
    "AttestationVerifier",
    "CredentialChallenge",
    "VerifiedStorageParent",
]

#: Stable reason strings of :class:`AttestationError` raised here.
ATTESTATION_REASONS: Final = frozenset(
    {
        "configuration",  # no vendor CA configured
        "protocol_state",  # begin/finish called out of order or twice
        "ek_cert_malformed",
        "ek_cert_untrusted",  # no valid path to a configured TPM-vendor CA
        "ek_cert_expired",  # outside its validity window (either side)
        "ek_cert_unsupported",  # a CA certificate, wrong EKU/key usage, or neither an
        #                         RSA-2048 nor an ECC P-384 key
        "ak_malformed",
        "ak_unacceptable",  # the AK is not a restricted, TPM-resident P-256 ECDSA-SHA256 key
        "credential_mismatch",  # the AK is not in the TPM that holds the certified EK
        "bad_signature",  # the attestation is not signed by the AK
        "attest_malformed",
        "not_tpm_generated",  # TPMS_ATTEST magic is not TPM_GENERATED_VALUE
        "wrong_attest_type",
        "nonce_mismatch",  # a replayed (or foreign) attestation
        "key_malformed",
        "name_mismatch",  # the certified public area is not the one the TPM attested
        "key_not_tpm_resident",  # lacks fixedTPM/fixedParent/sensitiveDataOrigin (or has
        #                          adminWithPolicy)
        "key_type",  # not a P-256 signing key with a SHA-256 name
        "key_mismatch",  # the attested key is not the CSR's key
        "parent_unacceptable",  # the storage parent is not a TPM-resident storage key
        "parent_mismatch",  # the certified key was not loaded under that storage parent
    }
)

#: tcg-kp-EKCertificate (TCG EK Credential Profile), the EKU an EK certificate may carry.
TCG_KP_EK_CERTIFICATE: Final = ObjectIdentifier("2.23.133.8.1")

TPM_GENERATED_VALUE: Final = 0xFF544347
_ECC_P384_EK_CERT_INDEX: Final = 0x01C00016  # TCG: high-range ECC NIST P-384 EK certificate
_TPM_RH_OWNER: Final = (0x40000001).to_bytes(4, "big")  # the owner hierarchy's name
_NONCE_SIZE = 32
_SECRET_SIZE = 32
_MAX_INPUT = 4096  # any TPM structure we accept is far smaller

_RESIDENT = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
_AK_REQUIRED = _RESIDENT | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT
_AK_FORBIDDEN = TPMA_OBJECT.DECRYPT | TPMA_OBJECT.ADMINWITHPOLICY


class VerifiedStorageParent(NamedTuple):
    """A device TPM's storage primary (marshalled TPMT_PUBLIC) that the attestation showed
    to be the parent of the certified device key, in the TPM that owns the certified EK:
    what the station may wrap product secrets to (only
    :meth:`AttestationVerifier.storage_parent` makes one)."""

    public_area: bytes
    name: bytes


class _State(Enum):
    NEW = "new"
    CHALLENGED = "challenged"
    DONE = "done"
    FAILED = "failed"


def _fail(reason: str, message: str) -> AttestationError:
    return AttestationError(message, reason=reason)


def _name_of(public_area: bytes) -> bytes:
    return int(TPM2_ALG.SHA256).to_bytes(2, "big") + hashlib.sha256(public_area).digest()


def _parse_public(data: bytes, reason: str, what: str) -> TPMT_PUBLIC:
    """Parse a marshalled TPMT_PUBLIC strictly: whole input, and it re-marshals to itself.

    The name is computed over the bytes received while checks run on the parsed structure,
    so the two must be the same thing: trailing or non-canonical bytes are refused.
    """
    if not isinstance(data, bytes) or not 0 < len(data) <= _MAX_INPUT:
        raise _fail(reason, f"{what} must be 1..{_MAX_INPUT} bytes")
    try:
        public, used = TPMT_PUBLIC.unmarshal(data)
        canonical = public.marshal()
    except Exception as exc:  # the TSS raises TSS2_Exception, TypeError or ValueError
        raise _fail(reason, f"{what} is not a TPMT_PUBLIC: {exc}") from exc
    if used != len(data) or canonical != data:
        raise _fail(reason, f"{what} has trailing or non-canonical bytes")
    return public


def _ecc_p256_point(public: TPMT_PUBLIC) -> tuple[int, int]:
    point = public.unique.ecc
    return int.from_bytes(bytes(point.x), "big"), int.from_bytes(bytes(point.y), "big")


def _check_ak(public: TPMT_PUBLIC) -> ec.EllipticCurvePublicKey:
    """Refuse any AK that is not a restricted, TPM-born P-256 ECDSA-SHA256 signing key."""
    attrs = int(public.objectAttributes)
    if public.type != TPM2_ALG.ECC or public.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        raise _fail("ak_unacceptable", "the AK is not an ECC P-256 key")
    if public.nameAlg != TPM2_ALG.SHA256:
        raise _fail("ak_unacceptable", "the AK's name algorithm is not SHA-256")
    if attrs & _AK_REQUIRED != _AK_REQUIRED:
        raise _fail(
            "ak_unacceptable",
            "the AK must be restricted, sign, fixedTPM, fixedParent and sensitiveDataOrigin",
        )
    if attrs & _AK_FORBIDDEN or not attrs & TPMA_OBJECT.USERWITHAUTH:
        raise _fail(
            "ak_unacceptable", "the AK must be signing-only, authorised by authValue, no policy"
        )
    if len(bytes(public.authPolicy)) != 0:
        raise _fail("ak_unacceptable", "the AK must have an empty authPolicy")
    scheme = public.parameters.eccDetail.scheme
    if scheme.scheme != TPM2_ALG.ECDSA or scheme.details.ecdsa.hashAlg != TPM2_ALG.SHA256:
        raise _fail("ak_unacceptable", "the AK's scheme is not ECDSA-SHA256")
    x, y = _ecc_p256_point(public)
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError as exc:
        raise _fail("ak_malformed", "the AK's point is not on P-256") from exc


def _check_certified_key(public: TPMT_PUBLIC) -> tuple[int, int]:
    attrs = int(public.objectAttributes)
    if attrs & _RESIDENT != _RESIDENT:
        raise _fail(
            "key_not_tpm_resident",
            "the key lacks fixedTPM, fixedParent or sensitiveDataOrigin: it may have been "
            "imported or may be duplicated out of the TPM",
        )
    if attrs & TPMA_OBJECT.ADMINWITHPOLICY:
        raise _fail(
            "key_not_tpm_resident",
            "the key has adminWithPolicy: TPM2_Certify could then attest a public-only copy",
        )
    if public.type != TPM2_ALG.ECC or public.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        raise _fail("key_type", "the certified key is not an ECC P-256 key")
    if public.nameAlg != TPM2_ALG.SHA256:
        raise _fail("key_type", "the certified key's name algorithm is not SHA-256")
    if not attrs & TPMA_OBJECT.SIGN_ENCRYPT or attrs & TPMA_OBJECT.RESTRICTED:
        raise _fail("key_type", "the certified key is not an unrestricted signing key")
    return _ecc_p256_point(public)


@cache
def _ek_template_bytes(ek_type: str) -> bytes:
    """A standard TCG EK template (no vendor NV template or nonce), marshalled once."""

    def nv(index: int) -> bytes:
        if ek_type.startswith("EK-HIGH-") and index == _ECC_P384_EK_CERT_INDEX:
            return b""  # create_ek_template insists on a high-range certificate; unused
        raise NoSuchIndex(index)

    _, template = create_ek_template(ek_type, nv)
    return bytes(template.publicArea.marshal())


def _ek_public(ek_key: object) -> TPMT_PUBLIC:
    """The EK's public area: the standard template for the certified key's type and size,
    with the certified key in ``unique``. Anything else is refused."""
    if isinstance(ek_key, rsa.RSAPublicKey) and ek_key.key_size == 2048:
        numbers = ek_key.public_numbers()
        if numbers.e != 65537:
            raise _fail("ek_cert_unsupported", "the EK's exponent is not 65537")
        public, _ = TPMT_PUBLIC.unmarshal(_ek_template_bytes("EK-RSA2048"))
        public.unique.rsa = numbers.n.to_bytes(256, "big")
        return public
    if isinstance(ek_key, ec.EllipticCurvePublicKey) and isinstance(ek_key.curve, ec.SECP384R1):
        point = ek_key.public_numbers()
        public, _ = TPMT_PUBLIC.unmarshal(_ek_template_bytes("EK-HIGH-ECC384"))
        public.unique.ecc.x = point.x.to_bytes(48, "big")
        public.unique.ecc.y = point.y.to_bytes(48, "big")
        return public
    raise _fail("ek_cert_unsupported", "only RSA-2048 and ECC P-384 endorsement keys are supported")


def _default_clock() -> datetime:
    return datetime.now(UTC)


class AttestationVerifier:
    """Verifies one device's attestation: ``begin`` once, then ``finish`` once.

    ``vendor_ca_certs`` are the TPM-vendor CA certificates the station trusts (roots, or
    issuing CAs the operator chose to anchor on); ``intermediates`` are untrusted CA
    certificates that may help build a path. Build one verifier per device.
    """

    def __init__(
        self,
        vendor_ca_certs: Sequence[x509.Certificate],
        *,
        intermediates: Sequence[x509.Certificate] = (),
        clock: Callable[[], datetime] = _default_clock,
    ) -> None:
        if not vendor_ca_certs:
            raise _fail("configuration", "no TPM-vendor CA configured: nothing could be trusted")
        self._anchors = list(vendor_ca_certs)
        self._intermediates = list(intermediates)
        self._clock = clock
        self._state = _State.NEW
        self._secret = b""
        self._nonce = b""
        self._ak_public = b""
        self._ak_key: ec.EllipticCurvePublicKey | None = None
        self._ek_certificate: x509.Certificate | None = None
        self._qualified_name = b""
        self._certified_name = b""

    @property
    def ek_certificate(self) -> x509.Certificate:
        """The verified EK certificate (for the audit record), once ``begin`` succeeded."""
        if self._ek_certificate is None:
            raise _fail("protocol_state", "begin() has not succeeded")
        return self._ek_certificate

    @property
    def ak_name(self) -> bytes:
        """The AK's TPM name, once ``begin`` succeeded."""
        if not self._ak_public:
            raise _fail("protocol_state", "begin() has not succeeded")
        return _name_of(self._ak_public)

    # -- step 1 --------------------------------------------------------------------------------

    def begin(self, ek_cert_der: bytes, ak_public: bytes) -> CredentialChallenge:
        """Check the EK certificate and AK, and make the credential challenge and nonce."""
        if self._state is not _State.NEW:
            raise _fail("protocol_state", f"begin() called in state {self._state.value}")
        self._state = _State.FAILED  # until proven otherwise: no retry on the same verifier
        ek_cert = self._verify_ek_certificate(ek_cert_der)
        ek_public = _ek_public(ek_cert.public_key())

        ak = _parse_public(ak_public, "ak_malformed", "AK public area")
        ak_key = _check_ak(ak)

        secret = secrets.token_bytes(_SECRET_SIZE)
        nonce = secrets.token_bytes(_NONCE_SIZE)
        try:
            blob, encrypted = make_credential(ek_public, secret, _name_of(ak_public))
        except (ValueError, TypeError) as exc:
            raise _fail("ek_cert_unsupported", f"cannot encrypt to the EK: {exc}") from exc
        self._ek_certificate = ek_cert
        self._ak_public = ak_public
        self._ak_key = ak_key
        self._secret = secret
        self._nonce = nonce
        self._state = _State.CHALLENGED
        return CredentialChallenge(blob.marshal(), encrypted.marshal(), nonce)

    def _verify_ek_certificate(self, der: bytes) -> x509.Certificate:
        if not isinstance(der, bytes) or not 0 < len(der) <= 2 * _MAX_INPUT:
            raise _fail("ek_cert_malformed", "the EK certificate must be 1..8192 bytes of DER")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise _fail("ek_cert_malformed", f"the EK certificate does not parse: {exc}") from exc
        now = self._clock()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise _fail("ek_cert_expired", "the EK certificate is outside its validity window")
        try:
            verifier = (
                PolicyBuilder()
                .store(Store(self._anchors))
                .time(now)
                .extension_policies(
                    ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                    ee_policy=ExtensionPolicy.permit_all(),
                )
                .build_client_verifier()
            )
            verifier.verify(cert, self._intermediates)
        except VerificationError as exc:
            raise _fail(
                "ek_cert_untrusted", f"the EK certificate has no valid path to a vendor CA: {exc}"
            ) from exc
        except ValueError as exc:  # e.g. an unsupported signature algorithm
            raise _fail(
                "ek_cert_untrusted", f"the EK certificate cannot be verified: {exc}"
            ) from exc
        self._check_ek_leaf(cert)
        return cert

    @staticmethod
    def _check_ek_leaf(cert: x509.Certificate) -> None:
        """What the permissive leaf policy leaves out: an EK certificate is an end entity whose
        key encrypts (never signs) and whose EKU, when present, names the TCG EK purpose."""
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            if bc.ca:
                raise _fail("ek_cert_unsupported", "the EK certificate is a CA certificate")
        except x509.ExtensionNotFound:
            pass
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if TCG_KP_EK_CERTIFICATE not in eku:
                raise _fail("ek_cert_unsupported", "the EK certificate's EKU is not tcg-kp-EK")
        except x509.ExtensionNotFound:
            pass
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return
        # The TCG profile: keyEncipherment for an RSA EK, keyAgreement for an ECC EK.
        if isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
            if not ku.key_agreement:
                raise _fail("ek_cert_unsupported", "the ECC EK certificate lacks keyAgreement")
        elif not ku.key_encipherment:
            raise _fail("ek_cert_unsupported", "the EK certificate lacks keyEncipherment")

    # -- step 2 --------------------------------------------------------------------------------

    def finish(
        self,
        activated_secret: bytes,
        attest: bytes,
        signature: bytes,
        certified_public: bytes,
        csr_public_key: ec.EllipticCurvePublicKey,
    ) -> None:
        """Accept or raise. Whatever the outcome, this verifier cannot be used again."""
        if self._state is not _State.CHALLENGED or self._ak_key is None:
            raise _fail("protocol_state", f"finish() called in state {self._state.value}")
        self._state = _State.FAILED
        if not isinstance(activated_secret, bytes) or not hmac.compare_digest(
            activated_secret, self._secret
        ):
            raise _fail(
                "credential_mismatch",
                "the activated secret is wrong: the AK is not in the TPM that owns the EK",
            )
        if not isinstance(attest, bytes) or not 0 < len(attest) <= _MAX_INPUT:
            raise _fail("attest_malformed", f"the attestation must be 1..{_MAX_INPUT} bytes")
        if not isinstance(signature, bytes):
            raise _fail("bad_signature", "the signature must be DER bytes")
        try:
            self._ak_key.verify(signature, attest, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as exc:
            raise _fail("bad_signature", "the attestation is not signed by the AK") from exc

        try:
            info, used = TPMS_ATTEST.unmarshal(attest)
        except Exception as exc:  # the TSS raises TSS2_Exception, TypeError or ValueError
            raise _fail("attest_malformed", f"not a TPMS_ATTEST: {exc}") from exc
        if used != len(attest):
            raise _fail("attest_malformed", "trailing bytes after the TPMS_ATTEST")
        if info.magic != TPM_GENERATED_VALUE:
            raise _fail("not_tpm_generated", "TPMS_ATTEST magic is not TPM_GENERATED_VALUE")
        if info.type != TPM2_ST.ATTEST_CERTIFY:
            raise _fail("wrong_attest_type", "the attestation is not a TPM2_Certify result")
        if not hmac.compare_digest(bytes(info.extraData), self._nonce):
            raise _fail("nonce_mismatch", "the attestation is not over this challenge's nonce")

        key = _parse_public(certified_public, "key_malformed", "certified public area")
        self._certified_name = _name_of(certified_public)
        if not hmac.compare_digest(bytes(info.attested.certify.name), _name_of(certified_public)):
            raise _fail("name_mismatch", "the attested name is not that of the given public area")
        x, y = _check_certified_key(key)
        if not isinstance(csr_public_key, ec.EllipticCurvePublicKey) or not isinstance(
            csr_public_key.curve, ec.SECP256R1
        ):
            raise _fail("key_mismatch", "the CSR key is not a P-256 public key")
        csr = csr_public_key.public_numbers()
        if (csr.x, csr.y) != (x, y):
            raise _fail("key_mismatch", "the attested TPM key is not the CSR's key")
        self._qualified_name = bytes(info.attested.certify.qualifiedName)
        self._state = _State.DONE

    def storage_parent(self, public_area: bytes) -> VerifiedStorageParent:
        """After a successful :meth:`finish`: accept ``public_area`` as the device TPM's
        storage primary (SRK) only if the certified key was loaded under it.

        TPM2_Certify attests the key's *qualified name*, which the TPM computes from the
        actual parent chain: QN(key) = nameAlg || H(QN(parent) || name(key)), and for a
        primary of the owner hierarchy QN(SRK) = nameAlg || H(TPM_RH_OWNER || name(SRK)).
        So a matching QN proves that the SRK with exactly this public area (hence this
        point, fixedTPM, restricted decrypt) is an owner-hierarchy primary of the TPM that
        owns the certified EK: a secret wrapped to it opens in that TPM and nowhere else.
        A device that sends some other key's public area (a software key it could decrypt
        with) fails here."""
        if self._state is not _State.DONE:
            raise _fail("protocol_state", "storage_parent() needs a finished attestation")
        if not isinstance(public_area, bytes) or not 0 < len(public_area) <= _MAX_INPUT:
            raise _fail("parent_unacceptable", "the storage parent must be 1..4096 bytes")
        try:
            check_storage_public(public_area)
        except TpmImportError as exc:
            raise _fail("parent_unacceptable", str(exc)) from exc
        name = tpm_name(public_area)
        owner_qn = b"\x00\x0b" + hashlib.sha256(_TPM_RH_OWNER + name).digest()
        if not hmac.compare_digest(
            self._qualified_name,
            b"\x00\x0b" + hashlib.sha256(owner_qn + self._certified_name).digest(),
        ):
            raise _fail(
                "parent_mismatch",
                "the attested key was not loaded under this storage parent in the device TPM",
            )
        return VerifiedStorageParent(public_area, name)
