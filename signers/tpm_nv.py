"""TPM NV counters: the station's anti-rollback counter (:class:`TpmNvCounter`).

A counter needs only a TPM connection's ESAPI context and its lock (:class:`TpmSession`,
which :class:`signers.tpm.Tpm` is); :mod:`signers.tpm` re-exports the class.
"""

from __future__ import annotations

import threading
from typing import Protocol, Self

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_NT, TPMA_NV
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

from signers.errors import TpmError

__all__ = ["TpmNvCounter", "TpmSession"]

_OWNER_NV_FIRST = 0x01000000  # TCG handle registry: owner-defined NV indices
_OWNER_NV_LAST = 0x013FFFFF


class TpmSession(Protocol):
    """One TPM connection: its ESAPI context and the lock that serialises it."""

    @property
    def lock(self) -> threading.RLock: ...

    @property
    def esapi(self) -> ESAPI: ...


class TpmNvCounter:
    """A TPM NV counter (TPM2_NT_COUNTER): a 64-bit value that can only go up.

    Used for anti-rollback (quota counters): restoring an old database cannot lower it, and
    even undefining and redefining the index does not reset it, because the TPM starts a new
    counter at the highest value any counter ever had. Authorised by the owner hierarchy.
    """

    def __init__(self, tpm: TpmSession, index: int) -> None:
        if not _OWNER_NV_FIRST <= index <= _OWNER_NV_LAST:
            raise TpmError(f"NV index 0x{index:08x} is outside the owner range")
        self._tpm = tpm
        self.index = index
        self._handle: ESYS_TR | None = None

    def exists(self) -> bool:
        with self._tpm.lock:
            ectx = self._tpm.esapi
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, self.index, 1)
            handles = data.data.handles
            return handles.count > 0 and int(handles.handle[0]) == self.index

    def define(self, *, exist_ok: bool = True) -> Self:
        """Create the index if needed and make it readable (first increment)."""
        with self._tpm.lock:
            if self.exists():
                if not exist_ok:
                    raise TpmError(f"NV index 0x{self.index:08x} already defined")
                self._check_is_counter()
                return self
            attrs = (
                (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
                | TPMA_NV.OWNERWRITE
                | TPMA_NV.OWNERREAD
                | TPMA_NV.NO_DA
            )
            public = TPM2B_NV_PUBLIC(
                nvPublic=TPMS_NV_PUBLIC(
                    nvIndex=self.index, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=8
                )
            )
            try:
                # A redefined index is a new object for ESYS: use the handle it returns.
                self._handle = self._tpm.esapi.nv_define_space(b"", public)
            except TSS2_Exception as exc:
                self._handle = None
                raise TpmError(f"cannot define NV counter 0x{self.index:08x}: {exc}") from exc
            self.increment()  # a counter cannot be read before its first increment
            return self

    def _nv(self) -> ESYS_TR:
        """The index's ESYS handle, resolved once (TPM2_NV_ReadPublic) per counter object.

        ESYS keeps the name and refreshes it itself after the first write; every command on
        the index still goes to the TPM, which refuses an undefined or redefined index.
        """
        if self._handle is None:
            try:
                self._handle = self._tpm.esapi.tr_from_tpmpublic(self.index)
            except TSS2_Exception as exc:
                raise TpmError(f"NV counter 0x{self.index:08x} is not defined") from exc
        return self._handle

    def _check_is_counter(self) -> None:
        pub, _ = self._tpm.esapi.nv_read_public(self._nv())
        if TPMA_NV(pub.nvPublic.attributes).nt != TPM2_NT.COUNTER:
            raise TpmError(f"NV index 0x{self.index:08x} is not a counter")

    def increment(self) -> int:
        """Add one and return the new value."""
        with self._tpm.lock:
            try:
                self._tpm.esapi.nv_increment(self._nv(), auth_handle=ESYS_TR.OWNER)
            except TSS2_Exception as exc:
                self._handle = None  # resolve afresh next time (the index may have changed)
                raise TpmError(f"cannot increment NV counter 0x{self.index:08x}: {exc}") from exc
            return self.read()

    def read(self) -> int:
        with self._tpm.lock:
            try:
                data = self._tpm.esapi.nv_read(self._nv(), 8, 0, auth_handle=ESYS_TR.OWNER)
            except TSS2_Exception as exc:
                self._handle = None
                raise TpmError(f"cannot read NV counter 0x{self.index:08x}: {exc}") from exc
            return int.from_bytes(bytes(data), "big")
