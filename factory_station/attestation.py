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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING, Final, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from cryptography.x509.oid import ObjectIdentifier, PublicKeyAlgorithmOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPMS_ATTEST, TPMT_PUBLIC
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from factory_station.errors import AttestationError
from signers.attestation import CredentialChallenge
from signers.errors import TpmImportError
from signers.tpm_import import check_storage_public, tpm_name

if TYPE_CHECKING:
    from factory_station.core import Clock

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
    point = public.unique.ecc  # each tpm2-pytss attribute step costs microseconds: once
    return int.from_bytes(bytes(point.x), "big"), int.from_bytes(bytes(point.y), "big")


def _check_ak(public: TPMT_PUBLIC) -> ec.EllipticCurvePublicKey:
    """Refuse any AK that is not a restricted, TPM-born P-256 ECDSA-SHA256 signing key."""
    attrs = int(public.objectAttributes)
    detail = public.parameters.eccDetail  # read once (meaningful only for ECC, checked next)
    if public.type != TPM2_ALG.ECC or detail.curveID != TPM2_ECC.NIST_P256:
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
    scheme = detail.scheme
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


@dataclass(frozen=True)
class _EkCredentialParams:
    """What TPM2_MakeCredential needs from an EK's template: its name algorithm (which the
    KDFs and the HMAC use) and the AES key size of its symmetric definition (CFB mode)."""

    hash: type[hashes.SHA256] | type[hashes.SHA384]
    aes_bits: int


@cache
def _ek_credential_params(ek_type: str) -> _EkCredentialParams:
    """Read once from the standard TCG template (no vendor NV template or nonce); anything
    but SHA-256/SHA-384 with AES-CFB is refused (fail closed)."""

    def nv(index: int) -> bytes:
        if ek_type.startswith("EK-HIGH-") and index == _ECC_P384_EK_CERT_INDEX:
            return b""  # create_ek_template insists on a high-range certificate; unused
        raise NoSuchIndex(index)

    _, template = create_ek_template(ek_type, nv)
    area = template.publicArea
    symmetric = area.parameters.asymDetail.symmetric
    by_alg: dict[int, type[hashes.SHA256] | type[hashes.SHA384]] = {
        int(TPM2_ALG.SHA256): hashes.SHA256,
        int(TPM2_ALG.SHA384): hashes.SHA384,
    }
    name_alg = by_alg.get(int(area.nameAlg))
    if (
        name_alg is None
        or symmetric.algorithm != TPM2_ALG.AES
        or symmetric.mode.aes != TPM2_ALG.CFB
    ):
        raise _fail("ek_cert_unsupported", f"unexpected {ek_type} template")
    return _EkCredentialParams(name_alg, int(symmetric.keyBits.aes))


def _kdfa(
    algorithm: type[hashes.SHA256] | type[hashes.SHA384],
    key: bytes,
    label: bytes,
    context: bytes,
    bits: int,
) -> bytes:
    """TPM KDFa (Part 1, 11.4.10.2): SP 800-108 HMAC counter mode, label || 00 || context."""
    return KBKDFHMAC(
        algorithm=algorithm(),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
    ).derive(key)


def _make_credential(ek_key: object, secret: bytes, ak_name: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software (TPM 2.0 Part 1, 24: credential protection), on the
    EK key taken from its verified certificate: (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET),
    marshalled. A P-384 EK gets a fresh ephemeral ECDH key (seed = KDFe), an RSA-2048 EK a
    fresh random seed under OAEP; the secret is then wrapped exactly as the TPM unwraps it in
    TPM2_ActivateCredential (AES-CFB with a zero IV under KDFa(seed, "STORAGE", AK name),
    HMAC under KDFa(seed, "INTEGRITY") over the ciphertext and the AK name).

    The same computation as ``tpm2_pytss.utils.make_credential`` without the detour through
    TPMT_PUBLIC objects (about 1 ms of CPU per device on the station)."""
    if isinstance(ek_key, ec.EllipticCurvePublicKey) and isinstance(ek_key.curve, ec.SECP384R1):
        params = _ek_credential_params("EK-HIGH-ECC384")
        ephemeral = ec.generate_private_key(ec.SECP384R1())
        point = ephemeral.public_key().public_numbers()
        ex, ey = point.x.to_bytes(48, "big"), point.y.to_bytes(48, "big")
        z = ephemeral.exchange(ec.ECDH(), ek_key)
        # KDFe (Part 1, 11.4.10.3): Hash(counter || Z || "IDENTITY\0" || ephemeral.x || EK.x)
        seed = ConcatKDFHash(
            algorithm=params.hash(),
            length=params.hash.digest_size,
            otherinfo=b"IDENTITY\x00" + ex + ek_key.public_numbers().x.to_bytes(48, "big"),
        ).derive(z)
        encrypted_seed = len(ex).to_bytes(2, "big") + ex + len(ey).to_bytes(2, "big") + ey
    elif isinstance(ek_key, rsa.RSAPublicKey) and ek_key.key_size == 2048:
        if ek_key.public_numbers().e != 65537:
            raise _fail("ek_cert_unsupported", "the EK's exponent is not 65537")
        params = _ek_credential_params("EK-RSA2048")
        seed = secrets.token_bytes(params.hash.digest_size)
        encrypted_seed = ek_key.encrypt(
            seed,
            padding.OAEP(
                mgf=padding.MGF1(params.hash()), algorithm=params.hash(), label=b"IDENTITY\x00"
            ),
        )
    else:
        raise _fail(
            "ek_cert_unsupported", "only RSA-2048 and ECC P-384 endorsement keys are supported"
        )
    sym_key = _kdfa(params.hash, seed, b"STORAGE", ak_name, params.aes_bits)
    plain = len(secret).to_bytes(2, "big") + secret  # TPM2B_DIGEST
    # CFB: what TPM 2.0 mandates here (cryptography files it under "decrepit" for new designs).
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(plain) + encryptor.finalize()
    hmac_key = _kdfa(params.hash, seed, b"INTEGRITY", b"", params.hash.digest_size * 8)
    mac = HMAC(hmac_key, params.hash())
    mac.update(enc_identity + ak_name)
    outer = mac.finalize()
    id_object = len(outer).to_bytes(2, "big") + outer + enc_identity  # TPM2B_DIGEST || ...
    return (
        len(id_object).to_bytes(2, "big") + id_object,  # TPM2B_ID_OBJECT
        len(encrypted_seed).to_bytes(2, "big") + encrypted_seed,  # TPM2B_ENCRYPTED_SECRET
    )


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
        clock: Clock = _default_clock,
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

        ak = _parse_public(ak_public, "ak_malformed", "AK public area")
        ak_key = _check_ak(ak)

        secret = secrets.token_bytes(_SECRET_SIZE)
        nonce = secrets.token_bytes(_NONCE_SIZE)
        try:
            blob, encrypted = _make_credential(ek_cert.public_key(), secret, _name_of(ak_public))
        except (ValueError, TypeError) as exc:
            raise _fail("ek_cert_unsupported", f"cannot encrypt to the EK: {exc}") from exc
        self._ek_certificate = ek_cert
        self._ak_public = ak_public
        self._ak_key = ak_key
        self._secret = secret
        self._nonce = nonce
        self._state = _State.CHALLENGED
        return CredentialChallenge(blob, encrypted, nonce)

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
        # The TCG profile: keyEncipherment for an RSA EK, keyAgreement for an ECC EK. (The
        # key's algorithm OID, not the key: loading a P-384 key validates its point, ~0.1 ms.)
        if cert.public_key_algorithm_oid == PublicKeyAlgorithmOID.EC_PUBLIC_KEY:
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
