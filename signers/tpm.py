"""Keys inside a TPM 2.0 (tpm2-pytss), addressed by a TCTI string.

The TCTI is configuration, never a constant: ``swtpm:host=127.0.0.1,port=P`` for the
software TPM in tests and simulations, ``device:/dev/tpmrm0`` on hardware (the kernel's
resource manager), ``tabrmd:`` where the access broker runs.

Key model
---------
Every key is a P-256 ordinary key created by the TPM under the *storage primary key* of the
owner hierarchy. The primary is re-derived on demand from the owner seed with the standard
template (the one tpm2-openssl and tpm2-tss-engine use), so it never needs a persistent
handle. A created key is exported only as a *wrapped blob*: its private part is encrypted
with the storage key and is useless outside this TPM, so it is stored as a
``TSS2 PRIVATE KEY`` PEM (``tpm2_pytss.tsskey.TSSPrivKey``, readable by tpm2-openssl) and
loaded back in a later process. Attributes: ``fixedTPM | fixedParent | sensitiveDataOrigin |
userWithAuth`` plus ``sign`` (signing keys, scheme pinned to ECDSA-SHA256) or ``decrypt``
(ECDH keys: TPM2_ECDH_ZGen requires ``decrypt`` and refuses restricted keys). A key never
has both: one key, one purpose.

Templates and the check of a loaded blob's attributes are in :mod:`signers.tpm_templates`,
NV counters in :mod:`signers.tpm_nv` (both re-exported here), and the
``cryptography`` private-key face of a key (:meth:`TpmKey.private_key`) in
:mod:`signers.tpm_crypto`.

Object slots
------------
libtpms has 3 transient object slots and a raw swtpm socket has no resource manager.
:class:`Tpm` flushes stale transient objects left by a previous client at connect time,
flushes the primary right after each create/load, and keeps at most
:data:`MAX_LOADED_KEYS` keys loaded, evicting the least recently used one (a key is
transparently reloaded from its blob on next use). Another user of the connection (the
attestation key of :mod:`signers.attestation`) may *hold* a slot across calls
(:meth:`Tpm.make_room`, :meth:`Tpm.hold`, :meth:`Tpm.unhold`, :meth:`Tpm.key_handle`); held slots
count against the same budget and are released (flushed) first-come when a key needs room.

Cost (the factory provisions 100 devices/s): a key is made with one TPM2_CreateLoaded,
templates are built once per process, and an NV counter's ESYS handle is resolved once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC, TPM2_RH, TPM2_ST
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_ECC_POINT,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_TEMPLATE,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMT_TK_HASHCHECK,
)

from signers.closing import Closing
from signers.errors import TpmError, TpmImportError, TpmKeyError
from signers.private_files import write_private_file
from signers.tpm_crypto import TpmEccPrivateKey
from signers.tpm_nv import TpmNvCounter
from signers.tpm_templates import (
    ECDSA_SHA256,
    TpmKeyUsage,
    key_template_bytes,
    storage_primary_public,
    storage_primary_template,
    usage_of,
)
from trustcore.stationtime import TpmClockReading

__all__ = [
    "ECC_EK_CERT_NV_INDEX",
    "MAX_LOADED_KEYS",
    "RSA_EK_CERT_NV_INDEX",
    "Tpm",
    "TpmCertification",
    "TpmKey",
    "TpmKeyUsage",
    "TpmNvCounter",
    "storage_primary_template",
    "tss_blob_from_pem",
]

#: TCG EK credential profile NV indices (swtpm_setup writes both).
RSA_EK_CERT_NV_INDEX = 0x01C00002
ECC_EK_CERT_NV_INDEX = 0x01C0000A  # P-256; swtpm 0.7 provisions P-384 at 0x01C00016 instead
ECC_P384_EK_CERT_NV_INDEX = 0x01C00016

#: Keys kept loaded at once; one of libtpms' 3 slots stays free for the transient primary.
MAX_LOADED_KEYS = 2

_TPM2_PT_NV_BUFFER_MAX = 0x12C  # TPM2_PT_FIXED + 44; not named in tpm2-pytss 3.0

#: TPM2_Import's symmetricAlg: no inner wrapper (see Tpm.import_object).
_NO_INNER_WRAPPER = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)


class Tpm(Closing):
    """One ESAPI connection to one TPM. Not shareable across processes on a raw swtpm socket.

    Operations are serialised with a lock (ESAPI contexts are not thread-safe), so a
    ``Tpm`` may be used from ``asyncio.to_thread`` workers.
    """

    def __init__(self, tcti: str) -> None:
        if not tcti:
            raise TpmError("empty TCTI configuration")
        # The TSS C library logs every TPM error response to stderr; callers get exceptions.
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        self.tcti = tcti
        self.lock = threading.RLock()
        self._loaded: OrderedDict[int, TpmKey] = OrderedDict()
        # Slots held by other users of this connection: owner id -> (handle, forget).
        self._held: OrderedDict[int, tuple[ESYS_TR, Callable[[], None]]] = OrderedDict()
        self._nv_buffer_max: int | None = None
        try:
            self._ectx: ESAPI | None = ESAPI(tcti)
        except Exception as exc:  # TSS2_Exception or a TCTI loader error
            raise TpmError(f"cannot connect to TPM via {tcti!r}: {exc}") from exc
        try:
            self.stale_flushed = self.flush_transients()
        except TpmError:
            self.close()
            raise

    @property
    def esapi(self) -> ESAPI:
        if self._ectx is None:
            raise TpmError("TPM connection is closed")
        return self._ectx

    def flush_transients(self) -> int:
        """Flush every transient object in the TPM; returns how many were flushed.

        A crashed previous client leaves its objects loaded, and with only 3 slots the next
        TPM2_Create would fail with "out of memory for object contexts".
        """
        with self.lock:
            ectx = self.esapi
            try:
                _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
                handles = [data.data.handles.handle[i] for i in range(data.data.handles.count)]
                for h in handles:
                    ectx.flush_context(ectx.tr_from_tpmpublic(h))
            except TSS2_Exception as exc:
                raise TpmError(f"cannot flush transient objects: {exc}") from exc
            for key in self._loaded.values():
                key._handle = None
            self._loaded.clear()
            held = list(self._held.values())
            self._held.clear()
            for _, forget in held:
                forget()
            return len(handles)

    def close(self) -> None:
        with self.lock:
            if self._ectx is None:
                return
            for key in list(self._loaded.values()):
                self._evict(key)
            for owner in list(self._held):
                self._release_held(owner)
            self._ectx.close()
            self._ectx = None

    # -- primary and slot management -----------------------------------------------------------

    def _create_primary(self) -> ESYS_TR:
        """The owner storage primary, re-derived (the caller flushes it)."""
        try:
            handle, *_ = self.esapi.create_primary(
                in_sensitive=TPM2B_SENSITIVE_CREATE(),
                in_public=storage_primary_public(),
                primary_handle=ESYS_TR.OWNER,
            )
        except TSS2_Exception as exc:
            raise TpmError(f"cannot derive storage primary key: {exc}") from exc
        return handle

    def make_room(self, *, keep: int | None = None) -> None:
        """Free slots until one more object plus a transient primary fit.

        Cached keys go first (least recently used), then slots held by other users (oldest
        first), never the holder ``keep`` (the caller's own held slot).
        """
        while len(self._loaded) + len(self._held) >= MAX_LOADED_KEYS:
            if self._loaded:
                _, victim = next(iter(self._loaded.items()))
                self._evict(victim)
                continue
            others = [owner for owner in self._held if owner != keep]
            if not others:
                return
            self._release_held(others[0])

    def hold(self, owner: int, handle: ESYS_TR, forget: Callable[[], None]) -> None:
        """Record that ``owner`` keeps ``handle`` loaded across calls (it counts against
        :data:`MAX_LOADED_KEYS`). ``forget`` is called, without TPM access, when the slot is
        taken back (flushed here, or by :meth:`flush_transients`)."""
        self._held[owner] = (handle, forget)

    def unhold(self, owner: int) -> None:
        """``owner`` flushed its handle itself: forget the record."""
        self._held.pop(owner, None)

    def _release_held(self, owner: int) -> None:
        entry = self._held.pop(owner, None)
        if entry is None:
            return
        handle, forget = entry
        forget()
        if self._ectx is not None:
            try:
                self._ectx.flush_context(handle)
            except TSS2_Exception as exc:
                raise TpmError(f"cannot flush a held TPM object: {exc}") from exc

    def _evict(self, key: TpmKey) -> None:
        handle = key._handle
        key._handle = None
        self._loaded.pop(id(key), None)
        if handle is not None and self._ectx is not None:
            try:
                self._ectx.flush_context(handle)
            except TSS2_Exception as exc:
                raise TpmError(f"cannot flush TPM key: {exc}") from exc

    def _load_blob(self, key: TpmKey, keep: int | None = None) -> ESYS_TR:
        """Load ``key``'s wrapped blob (under a fresh primary, flushed right after)."""
        self.make_room(keep=keep)
        ectx = self.esapi
        primary = self._create_primary()
        try:
            handle = ectx.load(primary, key._blob.private, key._blob.public)
        except TSS2_Exception as exc:
            raise TpmKeyError(
                "TPM refused the wrapped key (made by another TPM, or the owner hierarchy "
                f"was cleared): {exc}"
            ) from exc
        finally:
            ectx.flush_context(primary)
        self._loaded[id(key)] = key
        return handle

    def key_handle(self, key: TpmKey, keep: int | None = None) -> ESYS_TR:
        """``key``'s handle, loading it if needed (never releasing the holder ``keep``)."""
        if key._handle is None:
            key._handle = self._load_blob(key, keep)
        else:
            self._loaded.move_to_end(id(key))
        return key._handle

    # -- imported objects (product secrets: signers.tpm_import) ---------------------------------

    def storage_public(self) -> bytes:
        """The marshalled TPMT_PUBLIC of this TPM's storage primary (SRK): what a sender
        wraps an import blob to. Derived and flushed again at once (no slot kept)."""
        with self.lock:
            self.make_room()
            try:
                handle, public, *_ = self.esapi.create_primary(
                    in_sensitive=TPM2B_SENSITIVE_CREATE(),
                    in_public=storage_primary_public(),
                    primary_handle=ESYS_TR.OWNER,
                )
            except TSS2_Exception as exc:
                raise TpmError(f"cannot derive storage primary key: {exc}") from exc
            self.esapi.flush_context(handle)
            return bytes(public.publicArea.marshal())

    def import_object(self, public: bytes, duplicate: bytes, seed: bytes) -> bytes:
        """TPM2_Import a duplication blob under the storage primary; returns the object's
        new private part (marshalled TPM2B_PRIVATE), wrapped by this TPM's storage key and
        loadable only here. No inner wrapper (the outer one, keyed by an ECDH seed only this
        TPM can recover, carries confidentiality and integrity). Raises
        :class:`TpmImportError` with the TPM's response code when the TPM refuses."""
        try:
            pub, used1 = TPM2B_PUBLIC.unmarshal(public)
            dup, used2 = TPM2B_PRIVATE.unmarshal(duplicate)
            enc_seed, used3 = TPM2B_ENCRYPTED_SECRET.unmarshal(seed)
        except Exception as exc:  # the TSS unmarshal raises TSS2_Exception or TypeError
            raise TpmImportError(f"malformed import blob: {exc}") from exc
        if (used1, used2, used3) != (len(public), len(duplicate), len(seed)):
            raise TpmImportError("malformed import blob: trailing bytes")
        with self.lock:
            self.make_room()
            ectx = self.esapi
            primary = self._create_primary()
            try:
                private = ectx.import_(primary, TPM2B_DATA(), pub, dup, enc_seed, _NO_INNER_WRAPPER)
            except TSS2_Exception as exc:
                raise TpmImportError(f"TPM2_Import refused the blob: {exc}", int(exc.rc)) from exc
            finally:
                ectx.flush_context(primary)
            return bytes(private.marshal())

    def hmac_with(self, public: bytes, private: bytes, data: bytes) -> bytes:
        """TPM2_Load an imported HMAC key (``public`` and the ``private`` that
        :meth:`import_object` returned), TPM2_HMAC-SHA256 ``data`` with it, flush it.
        ``data`` is at most 1024 bytes (TPM2B_MAX_BUFFER)."""
        if len(data) > 1024:
            raise TpmError("HMAC input longer than 1024 bytes")
        try:
            pub, _ = TPM2B_PUBLIC.unmarshal(public)
            priv, _ = TPM2B_PRIVATE.unmarshal(private)
        except Exception as exc:  # the TSS unmarshal raises TSS2_Exception or TypeError
            raise TpmKeyError(f"malformed imported object: {exc}") from exc
        with self.lock:
            self.make_room()
            ectx = self.esapi
            primary = self._create_primary()
            try:
                handle = ectx.load(primary, priv, pub)
            except TSS2_Exception as exc:
                raise TpmKeyError(
                    f"TPM refused the imported object (another TPM's, or tampered): {exc}"
                ) from exc
            finally:
                ectx.flush_context(primary)
            try:
                return bytes(ectx.hmac(handle, data, TPM2_ALG.SHA256))
            except TSS2_Exception as exc:
                raise TpmError(f"TPM2_HMAC failed: {exc}") from exc
            finally:
                ectx.flush_context(handle)

    # -- clock ---------------------------------------------------------------------------------

    def read_clock(self) -> TpmClockReading:
        """TPM2_ReadClock: the TPM's time since boot, its Clock and boot counters (no
        authorisation needed; about 0.2 ms on a local swtpm)."""
        with self.lock:
            try:
                info = self.esapi.read_clock()
            except TSS2_Exception as exc:
                raise TpmError(f"TPM2_ReadClock failed: {exc}") from exc
            clock = info.clockInfo
            return TpmClockReading(
                time_ms=int(info.time),
                clock_ms=int(clock.clock),
                reset_count=int(clock.resetCount),
                restart_count=int(clock.restartCount),
                safe=bool(int(clock.safe)),
            )

    # -- EK certificate ------------------------------------------------------------------------

    def nv_read_all(self, index: int) -> bytes:
        """Read a whole NV index with owner authorisation, in TPM-sized chunks."""
        with self.lock:
            ectx = self.esapi
            try:
                nv = ectx.tr_from_tpmpublic(index)
                pub, _ = ectx.nv_read_public(nv)
                size = int(pub.nvPublic.dataSize)
                if self._nv_buffer_max is None:
                    _, cap = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, _TPM2_PT_NV_BUFFER_MAX, 1)
                    self._nv_buffer_max = int(cap.data.tpmProperties.tpmProperty[0].value) or 512
                chunk = self._nv_buffer_max
                out = bytearray()
                while len(out) < size:
                    n = min(chunk, size - len(out))
                    out += bytes(ectx.nv_read(nv, n, len(out), auth_handle=ESYS_TR.OWNER))
            except TSS2_Exception as exc:
                raise TpmError(f"cannot read NV index 0x{index:08x}: {exc}") from exc
            return bytes(out)

    def read_ek_certificate(self, index: int = RSA_EK_CERT_NV_INDEX) -> x509.Certificate:
        """The EK certificate the TPM vendor (or ``swtpm_setup``) stored in NV."""
        der = self.nv_read_all(index)
        try:
            return x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise TpmError(f"NV index 0x{index:08x} does not hold a DER certificate") from exc


class TpmKey:
    """A P-256 key that lives in a TPM; implements ``Signer`` (SIGN) or ``KeyAgreement`` (ECDH).

    Persist with :meth:`to_pem` / :meth:`save` (a TPM-wrapped blob, safe on disk) and get it
    back with :meth:`from_pem` / :meth:`load` on the same TPM, in any later process.
    """

    def __init__(self, tpm: Tpm, blob: TSSPrivKey) -> None:
        self._tpm = tpm
        self._blob = blob
        self.usage = usage_of(blob.public.publicArea)
        self._handle: ESYS_TR | None = None
        pub = blob.public.publicArea.unique.ecc
        self._public = ec.EllipticCurvePublicNumbers(
            int.from_bytes(bytes(pub.x), "big"), int.from_bytes(bytes(pub.y), "big"), ec.SECP256R1()
        ).public_key()
        self._priv: TpmEccPrivateKey | None = None

    @classmethod
    def create(cls, tpm: Tpm, usage: TpmKeyUsage = TpmKeyUsage.SIGN) -> Self:
        """Have the TPM generate a new non-exportable key; it is loaded and ready to use."""
        with tpm.lock:
            ectx = tpm.esapi
            tpm.make_room()
            primary = tpm._create_primary()
            try:
                # One round trip instead of TPM2_Create + TPM2_Load; same key, same blob.
                handle, private, public = ectx.create_loaded(
                    primary, TPM2B_SENSITIVE_CREATE(), TPM2B_TEMPLATE(key_template_bytes(usage))
                )
            except TSS2_Exception as exc:
                raise TpmError(f"TPM2_CreateLoaded failed: {exc}") from exc
            finally:
                ectx.flush_context(primary)
            key = cls(tpm, TSSPrivKey(private, public, empty_auth=True, parent=TPM2_RH.OWNER))
            key._handle = handle
            tpm._loaded[id(key)] = key
            return key

    @classmethod
    def from_pem(cls, tpm: Tpm, pem: bytes) -> Self:
        """Rebuild a key from its ``TSS2 PRIVATE KEY`` PEM and load it into ``tpm``."""
        key = cls(tpm, tss_blob_from_pem(pem))
        with tpm.lock:
            tpm.key_handle(key)  # fail now, not on first use, if the blob is foreign
        return key

    def to_pem(self) -> bytes:
        return bytes(self._blob.to_pem())

    def save(self, path: Path | str, *, overwrite: bool = False) -> None:
        """Write the wrapped blob atomically (0600 out of habit; it is not a secret)."""
        write_private_file(path, self.to_pem(), overwrite=overwrite)

    @classmethod
    def load(cls, tpm: Tpm, path: Path | str) -> Self:
        p = Path(path)
        try:
            pem = p.read_bytes()
        except OSError as exc:
            raise TpmKeyError(f"cannot read TPM key file {p}: {exc}") from exc
        return cls.from_pem(tpm, pem)

    def unload(self) -> None:
        """Free the TPM slot now; the key reloads from its blob on next use."""
        with self._tpm.lock:
            self._tpm._evict(self)

    # -- Signer / KeyAgreement ---------------------------------------------------------------

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def _loaded_handle(self) -> ESYS_TR:
        return self._tpm.key_handle(self)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """An ``EllipticCurvePrivateKey`` whose operations run inside the TPM."""
        if self.usage is TpmKeyUsage.ATTEST:
            raise TpmKeyError("an attestation key signs only TPM attestations (use certify)")
        if self._priv is None:
            self._priv = TpmEccPrivateKey(
                self, self._tpm.esapi, self._blob.public.publicArea, self._loaded_handle
            )
        return self._priv

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA-SHA256 signature computed by the TPM."""
        return self.sign_digest(hashlib.sha256(data).digest())

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA signature by the TPM over a SHA-256 ``digest`` computed elsewhere (a
        TLS handshake transcript, see :mod:`signers.tpm_tls`): one TPM2_Sign."""
        if self.usage is not TpmKeyUsage.SIGN:
            raise TpmKeyError(f"this TPM key ({self.usage.value}) cannot sign")
        if len(digest) != 32:
            raise TpmKeyError(f"a SHA-256 digest has 32 bytes, got {len(digest)}")
        with self._tpm.lock:
            try:
                signature = self._tpm.esapi.sign(
                    self._tpm.key_handle(self),
                    TPM2B_DIGEST(digest),
                    ECDSA_SHA256,
                    TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL),
                )
            except TSS2_Exception as exc:
                raise TpmError(f"TPM2_Sign failed: {exc}") from exc
        return bytes(signature)

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """ECDH (TPM2_ECDH_ZGen): the shared x coordinate, 32 bytes, as ``cryptography``."""
        if self.usage is not TpmKeyUsage.ECDH:
            raise TpmKeyError("this TPM key is a signing key and cannot do ECDH")
        if not isinstance(peer, ec.EllipticCurvePublicKey) or not isinstance(
            peer.curve, ec.SECP256R1
        ):
            raise TpmKeyError("ECDH peer must be a P-256 public key")
        nums = peer.public_numbers()
        point = TPM2B_ECC_POINT()
        point.point.x = nums.x.to_bytes(32, "big")
        point.point.y = nums.y.to_bytes(32, "big")
        with self._tpm.lock:
            try:
                out = self._tpm.esapi.ecdh_zgen(self._tpm.key_handle(self), point)
            except TSS2_Exception as exc:
                raise TpmError(f"TPM2_ECDH_ZGen failed: {exc}") from exc
        return bytes(out.point.x).rjust(32, b"\0")

    def certify(self, subject: TpmKey, qualifying_data: bytes) -> TpmCertification:
        """TPM2_Certify: this attestation key vouches that ``subject`` is loaded in this TPM.

        ``qualifying_data`` is the verifier's nonce (at most 32 bytes here, which a SHA-256
        nonce fits). The result is the marshalled ``TPMS_ATTEST`` (magic TPM_GENERATED,
        type ATTEST_CERTIFY, the subject's TPM name) and a DER ECDSA-SHA256 signature over
        it; verify it with this key's public key and compare the name with
        :meth:`tpm_name` of the subject's public area.
        """
        if self.usage is not TpmKeyUsage.ATTEST:
            raise TpmKeyError("only an attestation (restricted signing) key can certify")
        if len(qualifying_data) > 32:
            raise TpmKeyError("qualifying data longer than 32 bytes")
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        with self._tpm.lock:
            try:
                subject_handle = self._tpm.key_handle(subject)
                attest, signature = self._tpm.esapi.certify(
                    subject_handle,
                    self._tpm.key_handle(self),
                    TPM2B_DATA(qualifying_data),
                    scheme,
                    session1=ESYS_TR.PASSWORD,
                    session2=ESYS_TR.PASSWORD,
                )
            except TSS2_Exception as exc:
                raise TpmError(f"TPM2_Certify failed: {exc}") from exc
        return TpmCertification(attest=bytes(attest), signature=bytes(signature))

    @property
    def tpm(self) -> Tpm:
        """The TPM this key lives in."""
        return self._tpm

    def public_area(self) -> bytes:
        """The key's marshalled TPMT_PUBLIC (what TPM2_Certify certifies and names)."""
        return bytes(self._blob.public.publicArea.marshal())

    def tpm_name(self) -> bytes:
        """The TPM name of this key: nameAlg (SHA-256) || SHA-256(TPMT_PUBLIC)."""
        return bytes(self._blob.public.publicArea.get_name().marshal()[2:])

    def __repr__(self) -> str:
        return f"TpmKey(usage={self.usage.value}, loaded={self._handle is not None})"


@dataclass(frozen=True, slots=True)
class TpmCertification:
    """Output of TPM2_Certify: marshalled TPMS_ATTEST and DER ECDSA-SHA256 over it."""

    attest: bytes
    signature: bytes


def tss_blob_from_pem(pem: bytes) -> TSSPrivKey:
    """A ``TSS2 PRIVATE KEY`` PEM this module can load: an empty-auth key under the owner
    storage primary (anything else raises :class:`TpmKeyError`)."""
    try:
        blob = TSSPrivKey.from_pem(pem)
    except (ValueError, TypeError) as exc:
        raise TpmKeyError("not a TSS2 PRIVATE KEY PEM") from exc
    if not blob.empty_auth or blob.parent != TPM2_RH.OWNER:
        raise TpmKeyError("only empty-auth keys under the owner storage primary are supported")
    return blob
