"""Device-TPM side of key attestation: prove to a factory station that a key lives in this TPM.

The station (``factory_station.attestation``) checks three links, and this module produces the
evidence for each:

1. **EK certificate** (:meth:`TpmAttestor.identity`): the TPM vendor's certificate for the
   endorsement key, read from NV (RSA-2048 EK, TCG index 0x01c00002). The EK itself is a
   restricted decryption key that never signs, so it cannot vouch for other keys directly.
2. **Credential activation** (:meth:`TpmAttestor.activate_credential`): the station encrypts a
   secret to the EK, bound to the *name* of our attestation key (AK). TPM2_ActivateCredential
   releases it only if the EK's private key and an object with exactly that name are loaded in
   the same TPM, which proves the AK is resident next to the EK.
3. **TPM2_Certify** (:meth:`TpmAttestor.certify`): the AK, a *restricted* signing key, signs a
   TPM-generated TPMS_ATTEST naming the device key, over the station's nonce. A restricted key
   never signs data that starts with ``TPM_GENERATED_VALUE`` unless the TPM built it, so the
   attested name (hence attributes such as fixedTPM) comes from the TPM, not from us.

Cost model (the factory targets 100 devices/s): the EK is used from its persistent handle
(0x81010001, which ``swtpm_setup`` and most vendors create) when its name matches the EK
certificate, else re-derived from the standard low-range template; the AK is a *primary* key
in the endorsement hierarchy, re-derived from the endorsement seed in about 1 ms, so no AK blob
has to be stored and its name never changes for this TPM. libtpms has only 3 transient object
slots and a raw swtpm socket has no resource manager, so every handle this module creates is
flushed before the call returns, and the :class:`~signers.tpm.Tpm`'s own cached key handles
are flushed first (they reload transparently from their blobs on next use). The device key
is loaded from its ``TSS2 PRIVATE KEY`` blob under a re-derived storage primary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_RH,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_ECC_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from signers.errors import TpmError, TpmKeyError
from signers.tpm import RSA_EK_CERT_NV_INDEX, Tpm, TpmKey

__all__ = [
    "AK_ATTRIBUTES",
    "RSA_EK_PERSISTENT_HANDLE",
    "AttestationEvidence",
    "AttestationIdentity",
    "TpmAttestor",
    "ak_template",
]

#: TCG "TPM v2.0 Provisioning Guidance": the RSA EK's persistent handle.
RSA_EK_PERSISTENT_HANDLE: Final = 0x81010001

#: Attributes of the attestation key. Restricted + sign makes it refuse to sign anything that
#: mimics a TPM-generated structure; fixedTPM/fixedParent/sensitiveDataOrigin make it a key born
#: in and bound to this TPM; no adminWithPolicy and an empty authPolicy mean ADMIN-role commands
#: (ActivateCredential) need its authValue, which a public-only (LoadExternal) copy lacks.
#: noDA: its authValue is empty, so dictionary-attack counting protects nothing, and a TPM in
#: DA lockout (e.g. after power cuts, which count as failures) must still be able to attest.
AK_ATTRIBUTES: Final = (
    TPMA_OBJECT.NODA
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)

_MAX_NONCE = 64  # TPM2B_DATA holds a TPMT_HA: 2 + 64 bytes; keep to a full SHA-512 or less
_T = TypeVar("_T")


def ak_template() -> TPMT_PUBLIC:
    """ECC P-256 restricted signing key, ECDSA-SHA256, SHA-256 name (no symmetric part)."""
    return TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRIBUTES)


@dataclass(frozen=True)
class AttestationIdentity:
    """What the device sends first: its EK certificate (DER) and AK public area (TPMT_PUBLIC)."""

    ek_certificate: bytes
    ak_public: bytes


@dataclass(frozen=True)
class AttestationEvidence:
    """The device's answer to a station challenge; every field is plain bytes for transport.

    ``attest`` is the marshalled TPMS_ATTEST exactly as the TPM signed it, ``signature`` the
    AK's ECDSA-SHA256 signature over it in DER, ``ak_public`` and ``certified_public`` the
    marshalled TPMT_PUBLIC areas (names are hashes of these exact bytes).
    """

    activated_secret: bytes
    attest: bytes
    signature: bytes
    ak_public: bytes
    certified_public: bytes


def _tpm_call(what: str, fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except TSS2_Exception as exc:
        raise TpmError(f"{what} failed: {exc}") from exc


class TpmAttestor:
    """Attestation responder for one device TPM, over an existing :class:`Tpm` connection.

    Every public method holds the connection's lock for its whole TPM sequence, so no other
    user of the ``Tpm`` can take object slots in the middle of it.
    """

    def __init__(
        self,
        tpm: Tpm,
        *,
        ek_cert_index: int = RSA_EK_CERT_NV_INDEX,
        ek_persistent_handle: int | None = RSA_EK_PERSISTENT_HANDLE,
    ) -> None:
        self._tpm = tpm
        self._ek_cert_index = ek_cert_index
        self._ek_persistent_handle = ek_persistent_handle
        self._identity: AttestationIdentity | None = None
        self._ak_name: bytes | None = None
        self._ek_template: TPM2B_PUBLIC | None = None
        self._ek_persistent: ESYS_TR | None = None

    # -- identity ------------------------------------------------------------------------------

    def identity(self) -> AttestationIdentity:
        """Read the EK certificate and derive the AK once; cached for this attestor."""
        if self._identity is not None:
            return self._identity
        with self._tpm.lock:
            ek_der = self._tpm.nv_read_all(self._ek_cert_index)
            self._select_ek(ek_der)
            self._tpm.flush_transients()
            with self._ak() as (_, ak_public):
                pass
        self._identity = AttestationIdentity(ek_certificate=ek_der, ak_public=ak_public)
        return self._identity

    def _nv_read_if_defined(self, index: int) -> bytes:
        """``create_ek_template``'s NV callback: NoSuchIndex for an undefined index."""
        ectx = self._tpm.esapi
        _, data = _tpm_call(
            "TPM2_GetCapability", lambda: ectx.get_capability(TPM2_CAP.HANDLES, index, 1)
        )
        handles = data.data.handles
        if handles.count == 0 or int(handles.handle[0]) != index:
            raise NoSuchIndex(index)
        return self._tpm.nv_read_all(index)

    def _select_ek(self, ek_der: bytes) -> None:
        """Use the persistent EK if its name matches the certificate's key, else re-derive.

        The template (including any vendor template/nonce in NV, per the TCG EK credential
        profile) gives the EK public area; with the certificate's modulus in ``unique`` its name
        is what the persistent EK's name must be. A mismatch means the persistent handle holds
        some other key, which we then ignore rather than trust.
        """
        _, template = create_ek_template("EK-RSA2048", self._nv_read_if_defined)
        try:
            cert_key = x509.load_der_x509_certificate(ek_der).public_key()
        except ValueError as exc:
            raise TpmError("the EK certificate in NV is not DER X.509") from exc
        if not isinstance(cert_key, rsa.RSAPublicKey) or cert_key.key_size != 2048:
            raise TpmError("the EK certificate does not hold an RSA-2048 key")
        self._ek_template = template
        if self._ek_persistent_handle is None:
            return
        expected = TPMT_PUBLIC.unmarshal(template.publicArea.marshal())[0]
        expected.unique.rsa = cert_key.public_numbers().n.to_bytes(256, "big")
        expected_name = _name_of(expected.marshal())
        ectx = self._tpm.esapi
        try:
            handle = ectx.tr_from_tpmpublic(self._ek_persistent_handle)
        except TSS2_Exception:
            return  # no persistent EK: re-derive it on each activation
        if bytes(ectx.tr_get_name(handle)) == expected_name:
            self._ek_persistent = handle
        else:
            _tpm_call("ESYS_TR close", lambda: ectx.tr_close(handle))

    @contextmanager
    def _ak(self) -> Iterator[tuple[ESYS_TR, bytes]]:
        """The AK, derived as an endorsement-hierarchy primary; flushed on exit."""
        ectx = self._tpm.esapi
        handle, public, *_ = _tpm_call(
            "TPM2_CreatePrimary (AK)",
            lambda: ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(),
                TPM2B_PUBLIC(publicArea=ak_template()),
                ESYS_TR.ENDORSEMENT,
            ),
        )
        try:
            ak_public = public.publicArea.marshal()
            name = _name_of(ak_public)
            if self._ak_name is None:
                self._ak_name = name
            elif name != self._ak_name:
                raise TpmError("the AK changed: the endorsement hierarchy was reset")
            yield handle, ak_public
        finally:
            _tpm_call("TPM2_FlushContext (AK)", lambda: ectx.flush_context(handle))

    @contextmanager
    def _ek(self) -> Iterator[ESYS_TR]:
        if self._ek_persistent is not None:
            yield self._ek_persistent
            return
        if self._ek_template is None:
            raise TpmError("identity() must run before the EK is used")
        ectx = self._tpm.esapi
        template = self._ek_template
        handle, *_ = _tpm_call(
            "TPM2_CreatePrimary (EK)",
            lambda: ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT),
        )
        try:
            yield handle
        finally:
            _tpm_call("TPM2_FlushContext (EK)", lambda: ectx.flush_context(handle))

    # -- challenge/response --------------------------------------------------------------------

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """Recover the station's secret: only works if our AK sits next to the certified EK."""
        self.identity()
        with self._tpm.lock:
            self._tpm.flush_transients()
            with self._ak() as (ak, _):
                return self._activate(ak, credential_blob, encrypted_secret)

    def certify(self, key: TpmKey | bytes, nonce: bytes) -> AttestationEvidence:
        """TPM2_Certify ``key`` (a :class:`TpmKey` or a ``TSS2 PRIVATE KEY`` PEM) with the AK.

        ``activated_secret`` is empty in the result; :meth:`respond` fills it.
        """
        identity = self.identity()
        with self._tpm.lock:
            self._tpm.flush_transients()
            with self._ak() as (ak, _):
                return self._certify(ak, key, nonce, identity, b"")

    def respond(
        self,
        key: TpmKey | bytes,
        *,
        credential_blob: bytes,
        encrypted_secret: bytes,
        nonce: bytes,
    ) -> AttestationEvidence:
        """Answer a station challenge in one pass with one AK: certify ``key``, then activate.

        Certify runs first so the device key's slot is free again before the EK needs one.
        """
        identity = self.identity()
        with self._tpm.lock:
            self._tpm.flush_transients()
            with self._ak() as (ak, _):
                evidence = self._certify(ak, key, nonce, identity, b"")
                secret = self._activate(ak, credential_blob, encrypted_secret)
        return replace(evidence, activated_secret=secret)

    def _activate(self, ak: ESYS_TR, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        try:
            blob, used = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, used2 = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except Exception as exc:  # the TSS unmarshal raises TSS2_Exception or TypeError
            raise TpmError(f"malformed credential from the station: {exc}") from exc
        if used != len(credential_blob) or used2 != len(encrypted_secret):
            raise TpmError("malformed credential from the station: trailing bytes")
        ectx = self._tpm.esapi
        # The EK's authPolicy is PolicySecret(TPM_RH_ENDORSEMENT) (TCG EK profile); the AK is
        # authorised by its (empty) authValue. The session is flushed whatever happens: libtpms
        # also has only 3 session slots.
        session = _tpm_call(
            "TPM2_StartAuthSession",
            lambda: ectx.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            ),
        )
        try:
            _tpm_call("TPM2_PolicySecret", lambda: ectx.policy_secret(ESYS_TR.ENDORSEMENT, session))
            with self._ek() as ek:
                out = _tpm_call(
                    "TPM2_ActivateCredential",
                    lambda: ectx.activate_credential(
                        ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                    ),
                )
        finally:
            # A session whose continueSession is clear is already gone: nothing to flush.
            with suppress(TSS2_Exception):
                ectx.flush_context(session)
        return bytes(out)

    def _certify(
        self,
        ak: ESYS_TR,
        key: TpmKey | bytes,
        nonce: bytes,
        identity: AttestationIdentity,
        secret: bytes,
    ) -> AttestationEvidence:
        if not 0 < len(nonce) <= _MAX_NONCE:
            raise TpmError(f"nonce must be 1..{_MAX_NONCE} bytes")
        blob = _tss_blob(key)
        ectx = self._tpm.esapi
        # Loaded here rather than through the Tpm's key cache, which has no public handle
        # accessor: storage primary (re-derived, flushed at once) + key, next to the AK, is
        # exactly libtpms' three slots; the key is flushed right after TPM2_Certify.
        srk, *_ = _tpm_call(
            "TPM2_CreatePrimary (storage key)",
            lambda: ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_srk_template()), ESYS_TR.OWNER
            ),
        )
        try:
            handle = _tpm_call(
                "TPM2_Load (device key)", lambda: ectx.load(srk, blob.private, blob.public)
            )
        finally:
            _tpm_call("TPM2_FlushContext (storage key)", lambda: ectx.flush_context(srk))
        try:
            attest, signature = _tpm_call(
                "TPM2_Certify",
                lambda: ectx.certify(handle, ak, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)),
            )
        finally:
            _tpm_call("TPM2_FlushContext (device key)", lambda: ectx.flush_context(handle))
        if signature.sigAlg != TPM2_ALG.ECDSA or signature.signature.ecdsa.hash != TPM2_ALG.SHA256:
            raise TpmError("the AK did not sign with ECDSA-SHA256")
        r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
        return AttestationEvidence(
            activated_secret=secret,
            attest=bytes(attest),
            signature=encode_dss_signature(r, s),
            ak_public=identity.ak_public,
            certified_public=blob.public.publicArea.marshal(),
        )


def _name_of(public_area: bytes) -> bytes:
    """TPM name of a SHA-256-named object: nameAlg (big-endian) || SHA-256(TPMT_PUBLIC)."""
    return int(TPM2_ALG.SHA256).to_bytes(2, "big") + hashlib.sha256(public_area).digest()


def _tss_blob(key: TpmKey | bytes) -> TSSPrivKey:
    pem = key.to_pem() if isinstance(key, TpmKey) else key
    try:
        blob = TSSPrivKey.from_pem(pem)
    except (ValueError, TypeError) as exc:
        raise TpmKeyError("not a TSS2 PRIVATE KEY PEM") from exc
    if not blob.empty_auth or blob.parent != TPM2_RH.OWNER:
        raise TpmKeyError("only empty-auth keys under the owner storage primary are supported")
    return blob


def _srk_template() -> TPMT_PUBLIC:
    """The TCG ECC P-256 storage primary (SRK) template, the parent of ``TSS2 PRIVATE KEY``s
    made by tpm2-openssl, tpm2-pytss and :class:`~signers.tpm.TpmKey` under the owner."""
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(
                    algorithm=TPM2_ALG.AES,
                    keyBits=TPMU_SYM_KEY_BITS(aes=128),
                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                ),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            ),
        ),
    )
