"""Device-TPM side of key attestation: prove to a factory station that a key lives in this TPM.

The station (``factory_station.attestation``) checks three links, and this module produces the
evidence for each:

1. **EK certificate** (:meth:`TpmAttestor.identity`): the TPM vendor's certificate for the
   endorsement key, read from NV. The EK itself is a restricted decryption key that never
   signs, so it cannot vouch for other keys directly. Two EKs are supported, both from the TCG
   EK Credential Profile: the high-range ECC NIST P-384 EK (template H-3, certificate at
   0x01c00016, what ``swtpm_setup`` makes besides the RSA one) and the low-range RSA-2048 EK
   (template L-1, certificate at 0x01c00002). By default the P-384 EK is used when the TPM
   has its certificate: TPM2_ActivateCredential then costs one ECDH in the TPM (about 0.7 ms
   on swtpm) instead of an RSA-2048 private-key operation (5 to 10 ms), and because the
   high-range templates set userWithAuth (with an empty EK authValue), the EK is authorised
   by a password session instead of a PolicySecret(ENDORSEMENT) policy session (two round
   trips and about 1 ms of client CPU saved). Who may *use* the EK is an endorsement-hierarchy
   privacy matter; what the station relies on is that only this TPM can decrypt for the EK.
2. **Credential activation** (:meth:`TpmAttestor.activate_credential`): the station encrypts a
   secret to the EK, bound to the *name* of our attestation key (AK). TPM2_ActivateCredential
   releases it only if the EK's private key and an object with exactly that name are loaded in
   the same TPM, which proves the AK is resident next to the EK.
3. **TPM2_Certify** (:meth:`TpmAttestor.certify`): the AK, a *restricted* signing key, signs a
   TPM-generated TPMS_ATTEST naming the device key, over the station's nonce. A restricted key
   never signs data that starts with ``TPM_GENERATED_VALUE`` unless the TPM built it, so the
   attested name (hence attributes such as fixedTPM) comes from the TPM, not from us.

Cost model (the factory targets 100 devices/s): the EK is used from its persistent handle
(0x81010016 for P-384 where ``swtpm_setup`` puts it, 0x81010001 for RSA) when its name matches
the EK certificate, else re-derived from the standard template; the AK is a *primary* key in
the endorsement hierarchy, re-derived from the endorsement seed, so no AK blob has to be
stored and its name never changes for this TPM. The AK is derived once per protocol run: it
stays loaded from :meth:`~TpmAttestor.identity` until :meth:`~TpmAttestor.respond` ends, in a
slot *held* through the :class:`~signers.tpm.Tpm` (libtpms has only 3 transient object slots
and a raw swtpm socket has no resource manager, so the ``Tpm`` accounts for every slot and may
take the held one back; the AK is then re-derived on next use). A :class:`TpmKey` of the same
connection is certified from the ``Tpm``'s key cache (no reload when it is still loaded from
its creation); a ``TSS2 PRIVATE KEY`` PEM is loaded under a re-derived storage primary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from functools import cache
from typing import Final, Literal, NamedTuple, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from signers.errors import TpmError
from signers.tpm import (
    ECC_P384_EK_CERT_NV_INDEX,
    RSA_EK_CERT_NV_INDEX,
    Tpm,
    TpmKey,
    storage_primary_template,
    tss_blob_from_pem,
)

__all__ = [
    "AK_ATTRIBUTES",
    "ECC_P384_EK_PERSISTENT_HANDLE",
    "RSA_EK_PERSISTENT_HANDLE",
    "AttestationEvidence",
    "AttestationIdentity",
    "CredentialChallenge",
    "TpmAttestor",
    "ak_template",
]

#: TCG "TPM v2.0 Provisioning Guidance": the RSA EK's persistent handle.
RSA_EK_PERSISTENT_HANDLE: Final = 0x81010001
#: Where ``swtpm_setup`` makes the high-range P-384 EK persistent (beside its 0x01c00016 cert).
ECC_P384_EK_PERSISTENT_HANDLE: Final = 0x81010016

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
_NAME_HASHES: Final = {int(TPM2_ALG.SHA256): hashlib.sha256, int(TPM2_ALG.SHA384): hashlib.sha384}


@dataclass(frozen=True)
class _EkKind:
    """One TCG EK type: its tpm2-pytss template name, NV certificate index, usual handle."""

    template: str
    cert_index: int
    persistent_handle: int


_EK_ECC384: Final = _EkKind(
    "EK-HIGH-ECC384", ECC_P384_EK_CERT_NV_INDEX, ECC_P384_EK_PERSISTENT_HANDLE
)
_EK_RSA2048: Final = _EkKind("EK-RSA2048", RSA_EK_CERT_NV_INDEX, RSA_EK_PERSISTENT_HANDLE)
_EK_KINDS: Final = {kind.cert_index: kind for kind in (_EK_ECC384, _EK_RSA2048)}


def ak_template() -> TPMT_PUBLIC:
    """ECC P-256 restricted signing key, ECDSA-SHA256, SHA-256 name (no symmetric part)."""
    return TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRIBUTES)


@cache
def _ak_public_in() -> TPM2B_PUBLIC:
    """The AK template as a TPM2B_PUBLIC, built once (ESAPI only reads its inputs)."""
    return TPM2B_PUBLIC(publicArea=ak_template())


@cache
def _standard_ek_template(template: str) -> bytes:
    """The TCG template of an EK type, marshalled (no vendor template or nonce from NV)."""

    def no_nv(index: int) -> bytes:
        raise NoSuchIndex(index)

    if template == _EK_ECC384.template:
        # create_ek_template insists on reading a high-range certificate; the template
        # itself does not depend on it.
        def no_nv_but_cert(index: int) -> bytes:
            if index == _EK_ECC384.cert_index:
                return b""
            raise NoSuchIndex(index)

        _, public = create_ek_template(template, no_nv_but_cert)
    else:
        _, public = create_ek_template(template, no_nv)
    return bytes(public.publicArea.marshal())


def _ek_public_area(template: str, cert_key: object) -> bytes:
    """The EK's TPMT_PUBLIC (marshalled): the standard template with the certified key."""
    area, _ = TPMT_PUBLIC.unmarshal(_standard_ek_template(template))
    if template == _EK_ECC384.template:
        if not isinstance(cert_key, ec.EllipticCurvePublicKey) or not isinstance(
            cert_key.curve, ec.SECP384R1
        ):
            raise TpmError("the EK certificate does not hold an ECC P-384 key")
        nums = cert_key.public_numbers()
        area.unique.ecc.x = nums.x.to_bytes(48, "big")
        area.unique.ecc.y = nums.y.to_bytes(48, "big")
    else:
        if not isinstance(cert_key, rsa.RSAPublicKey) or cert_key.key_size != 2048:
            raise TpmError("the EK certificate does not hold an RSA-2048 key")
        area.unique.rsa = cert_key.public_numbers().n.to_bytes(256, "big")
    return bytes(area.marshal())


class CredentialChallenge(NamedTuple):
    """What the station sends to the device (``factory_station.attestation`` makes it): a
    TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET (marshalled, for TPM2_ActivateCredential) and
    the nonce for TPM2_Certify's qualifyingData. Here, beside the device's answer
    (:class:`AttestationEvidence`), because both sides of the protocol speak it."""

    credential_blob: bytes
    encrypted_secret: bytes
    nonce: bytes


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

    ``ek_cert_index``: the EK certificate's NV index, 0x01c00016 (P-384) or 0x01c00002
    (RSA-2048); ``None`` picks P-384 when the TPM has that certificate, else RSA-2048.
    ``ek_persistent_handle``: ``"standard"`` for the EK type's usual handle, an explicit
    handle, or ``None`` to re-derive the EK from its template on each activation.

    Every public method holds the connection's lock for its whole TPM sequence, so no other
    user of the ``Tpm`` can take object slots in the middle of it.
    """

    def __init__(
        self,
        tpm: Tpm,
        *,
        ek_cert_index: int | None = None,
        ek_persistent_handle: int | Literal["standard"] | None = "standard",
    ) -> None:
        if ek_cert_index is not None and ek_cert_index not in _EK_KINDS:
            raise TpmError(f"unsupported EK certificate index 0x{ek_cert_index:08x}")
        self._tpm = tpm
        self._ek_cert_index = ek_cert_index
        self._ek_persistent_handle = ek_persistent_handle
        self._identity: AttestationIdentity | None = None
        self._ak_name: bytes | None = None
        self._ak_public: bytes | None = None
        self._ak: ESYS_TR | None = None
        self._ek_kind: _EkKind | None = None
        self._ek_template: TPM2B_PUBLIC | None = None
        self._ek_persistent: ESYS_TR | None = None
        self._ek_user_auth = False

    # -- identity ------------------------------------------------------------------------------

    def identity(self) -> AttestationIdentity:
        """Read the EK certificate and derive the AK once; cached for this attestor.

        The AK stays loaded (a held slot) for the challenge that normally follows.
        """
        if self._identity is not None:
            return self._identity
        with self._tpm.lock:
            ek_der = self._read_ek_certificate()
            self._select_ek(ek_der)
            self._ak_handle()
            assert self._ak_public is not None  # set with the AK
            self._identity = AttestationIdentity(ek_certificate=ek_der, ak_public=self._ak_public)
        return self._identity

    def _read_ek_certificate(self) -> bytes:
        if self._ek_cert_index is not None:
            kind = _EK_KINDS[self._ek_cert_index]
            der = self._tpm.nv_read_all(kind.cert_index)
        else:
            try:
                kind = _EK_ECC384
                der = self._tpm.nv_read_all(kind.cert_index)
            except TpmError:
                kind = _EK_RSA2048
                der = self._tpm.nv_read_all(kind.cert_index)
        self._ek_kind = kind
        return der

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

        The standard template with the certificate's key in ``unique`` gives the EK public
        area, hence the name the persistent EK must have. A mismatch means the persistent
        handle holds some other key (or the vendor customised the template in NV), which we
        then ignore rather than trust: the EK is re-derived with ``create_ek_template``.
        """
        kind = self._ek_kind
        assert kind is not None
        try:
            cert_key = x509.load_der_x509_certificate(ek_der).public_key()
        except ValueError as exc:
            raise TpmError("the EK certificate in NV is not DER X.509") from exc
        expected = _ek_public_area(kind.template, cert_key)
        area, _ = TPMT_PUBLIC.unmarshal(expected)
        self._ek_user_auth = bool(int(area.objectAttributes) & TPMA_OBJECT.USERWITHAUTH)
        handle_no = (
            kind.persistent_handle
            if self._ek_persistent_handle == "standard"
            else self._ek_persistent_handle
        )
        if handle_no is not None:
            ectx = self._tpm.esapi
            try:
                handle = ectx.tr_from_tpmpublic(handle_no)
            except TSS2_Exception:
                handle = None  # no persistent EK: re-derive it on each activation
            if handle is not None:
                # The TPM's own name for it (ESYS's TR_GetName costs more client CPU).
                _, name, _ = _tpm_call("TPM2_ReadPublic (EK)", lambda: ectx.read_public(handle))
                if bytes(name) == _name_of(expected):
                    self._ek_persistent = handle
                    return
                _tpm_call("ESYS_TR close", lambda: ectx.tr_close(handle))
        _, template = create_ek_template(kind.template, self._nv_read_if_defined)
        self._ek_template = template
        self._ek_user_auth = bool(
            int(template.publicArea.objectAttributes) & TPMA_OBJECT.USERWITHAUTH
        )

    def _ak_handle(self) -> ESYS_TR:
        """The AK, derived as an endorsement-hierarchy primary and kept in a held slot."""
        if self._ak is not None:
            return self._ak
        tpm = self._tpm
        ectx = tpm.esapi
        tpm.make_room(keep=id(self))
        handle, public, *_ = _tpm_call(
            "TPM2_CreatePrimary (AK)",
            lambda: ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), _ak_public_in(), ESYS_TR.ENDORSEMENT
            ),
        )
        ak_public = bytes(public.publicArea.marshal())
        name = _name_of(ak_public)
        if self._ak_name is None:
            self._ak_name = name
        elif name != self._ak_name:
            _tpm_call("TPM2_FlushContext (AK)", lambda: ectx.flush_context(handle))
            raise TpmError("the AK changed: the endorsement hierarchy was reset")
        self._ak_public = ak_public
        self._ak = handle
        tpm.hold(id(self), handle, self._forget_ak)
        return handle

    def _forget_ak(self) -> None:
        """The ``Tpm`` took the AK's slot back (flushed it): re-derive on next use."""
        self._ak = None

    def _drop_ak(self) -> None:
        handle, self._ak = self._ak, None
        if handle is None:
            return
        self._tpm.unhold(id(self))
        ectx = self._tpm.esapi
        _tpm_call("TPM2_FlushContext (AK)", lambda: ectx.flush_context(handle))

    # -- challenge/response --------------------------------------------------------------------

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """Recover the station's secret: only works if our AK sits next to the certified EK."""
        self.identity()
        with self._tpm.lock:
            return self._activate(self._ak_handle(), credential_blob, encrypted_secret)

    def certify(self, key: TpmKey | bytes, nonce: bytes) -> AttestationEvidence:
        """TPM2_Certify ``key`` (a :class:`TpmKey` or a ``TSS2 PRIVATE KEY`` PEM) with the AK.

        ``activated_secret`` is empty in the result; :meth:`respond` fills it.
        """
        identity = self.identity()
        with self._tpm.lock:
            return self._certify(self._ak_handle(), key, nonce, identity, b"")

    def respond(
        self,
        key: TpmKey | bytes,
        *,
        credential_blob: bytes,
        encrypted_secret: bytes,
        nonce: bytes,
    ) -> AttestationEvidence:
        """Answer a station challenge in one pass with one AK: certify ``key``, then activate.

        The AK's slot is given back at the end, whatever happens: the protocol run is over.
        """
        identity = self.identity()
        with self._tpm.lock:
            try:
                ak = self._ak_handle()
                evidence = self._certify(ak, key, nonce, identity, b"")
                secret = self._activate(ak, credential_blob, encrypted_secret)
            finally:
                self._drop_ak()
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
        if self._ek_user_auth:
            # High-range EK: userWithAuth with an empty authValue (TCG EK profile), and
            # ActivateCredential uses the EK in the USER role: a password session.
            with self._ek() as ek:
                out = _tpm_call(
                    "TPM2_ActivateCredential",
                    lambda: ectx.activate_credential(
                        ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD
                    ),
                )
            return bytes(out)
        # Low-range EK: authPolicy is PolicySecret(TPM_RH_ENDORSEMENT) and userWithAuth is
        # clear; the AK is authorised by its (empty) authValue. The session is flushed whatever
        # happens: libtpms also has only 3 session slots.
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
        ectx = self._tpm.esapi
        if isinstance(key, TpmKey) and key.tpm is self._tpm:
            # From the Tpm's cache: still loaded from its creation in the usual flow. The
            # cache evicts keys (or other holders) for room, never our AK.
            handle = self._tpm.key_handle(key, keep=id(self))
            certified_public = key.public_area()
            flush_key = False
        else:
            blob = _tss_blob(key)
            certified_public = bytes(blob.public.publicArea.marshal())
            self._tpm.make_room(keep=id(self))
            # Storage primary (re-derived, flushed at once) + key, next to the AK: exactly
            # libtpms' three slots; the key is flushed right after TPM2_Certify.
            srk, *_ = _tpm_call(
                "TPM2_CreatePrimary (storage key)",
                lambda: ectx.create_primary(
                    TPM2B_SENSITIVE_CREATE(), _srk_public_in(), ESYS_TR.OWNER
                ),
            )
            try:
                handle = _tpm_call(
                    "TPM2_Load (device key)", lambda: ectx.load(srk, blob.private, blob.public)
                )
            finally:
                _tpm_call("TPM2_FlushContext (storage key)", lambda: ectx.flush_context(srk))
            flush_key = True
        try:
            attest, signature = _tpm_call(
                "TPM2_Certify",
                lambda: ectx.certify(handle, ak, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)),
            )
        finally:
            if flush_key:
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
            certified_public=certified_public,
        )


def _name_of(public_area: bytes) -> bytes:
    """TPM name of an object: nameAlg (big-endian) || H_nameAlg(TPMT_PUBLIC).

    The nameAlg is the second field of the marshalled TPMT_PUBLIC (after the 2-byte type).
    """
    alg = int.from_bytes(public_area[2:4], "big")
    hasher = _NAME_HASHES.get(alg)
    if hasher is None:
        raise TpmError(f"unsupported name algorithm 0x{alg:04x}")
    return public_area[2:4] + hasher(public_area).digest()


def _tss_blob(key: TpmKey | bytes) -> TSSPrivKey:
    return tss_blob_from_pem(key.to_pem() if isinstance(key, TpmKey) else key)


@cache
def _srk_public_in() -> TPM2B_PUBLIC:
    return TPM2B_PUBLIC(publicArea=_srk_template())


def _srk_template() -> TPMT_PUBLIC:
    """The TCG ECC P-256 storage primary (SRK) template: the very one
    :class:`~signers.tpm.TpmKey` uses, so a device key blob loads under it."""
    return storage_primary_template()
