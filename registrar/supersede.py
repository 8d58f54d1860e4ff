"""Superseded LDevIDs: on the site CRL at once, then off the broker after a hand-over.

When a renewal or a re-registration issues a device a new LDevID, the old one must stop
working (issue 8: an old certificate used to keep connecting, publishing and kicking the
real device off). :class:`SupersededCertificates` does it in two steps:

1. **At issuance, before the answer leaves** (``RegistrationService.on_superseded``): the old
   serials go on the site CA CRL (reason ``superseded``, re-signed under
   :func:`registrar.site.revocation_lock`) and the broker reloads its CRLs: from then on
   a TLS handshake with the old certificate fails, on both brokers. Concurrent supersessions
   are signed and reloaded together (one CRL and one reload for a burst of renewals).
2. **After ``handover_seconds``**: a live session still on the old certificate is cut
   (:meth:`registrar.broker.Broker.cut_superseded`). The delay lets the answer reach the
   device over that very session, and the device reconnect with its new certificate first.

Why the device can never lose both certificates: the new certificate is committed before
the old one is put on the CRL, the answer is idempotent (the identical request gets it
again), and a device left with neither (a lost answer after a cut) still holds its IDevID,
with which it registers again on the registration listener (re-registration supersedes
whatever it missed). Identity blocks are NOT used here: a block is per identity (device id)
and would lock out the new certificate too.

:meth:`SupersededCertificates.reconcile` puts every serial the store lists as superseded on
the CRL if it is missing (a crash between the commit and the CRL, a failed reload); the
registrar runs it at start and at every CRL check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cryptography import x509

from registrar.broker import Broker
from registrar.errors import RegistrarError
from registrar.revocation import crl_numbers
from registrar.site import SiteHome, SiteSecrets, reissue_site_crl, revocation_lock
from registrar.store import Store
from trustcore.crl import RevokedEntry
from trustcore.errors import TrustCoreError
from trustcore.identity import CertSerial, DeviceId
from trustcore.utctime import Clock, system_clock

__all__ = ["SupersededCertificates"]

log = logging.getLogger(__name__)


class SupersededCertificates:
    """Owned by the running registrar (one per process)."""

    def __init__(
        self,
        *,
        home: SiteHome,
        secrets: SiteSecrets,
        broker: Broker,
        handover_seconds: float,
        clock: Clock = system_clock,
        store: Store | None = None,
    ) -> None:
        """``store``: CRL numbers come from its site-wide sequence (several instances)."""
        self._store = store
        self._home = home
        self._secrets = secrets
        self._broker = broker
        self._handover = handover_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._pending: list[tuple[tuple[RevokedEntry, ...], asyncio.Future[None]]] = []
        self._cuts: set[asyncio.Task[None]] = set()
        self.cut_sessions = 0

    async def supersede(self, device: DeviceId, serials: tuple[str, ...]) -> None:
        """Step 1 now (returns once the CRL is in force), step 2 scheduled."""
        moment = self._clock()
        entries = tuple(
            RevokedEntry(CertSerial.from_hex(s), moment, x509.ReasonFlags.superseded)
            for s in serials
        )
        await self._on_crl(entries)
        mark = self._broker.connection_mark(device.value)
        numbers = frozenset(e.serial.value for e in entries)
        log.info("LDevID(s) %s of %s superseded: on the site CRL", ", ".join(serials), device)
        task = asyncio.create_task(self._cut_later(device, numbers, mark))
        self._cuts.add(task)
        task.add_done_callback(self._cuts.discard)

    async def _on_crl(self, entries: tuple[RevokedEntry, ...]) -> None:
        """Group commit for CRLs: whoever takes the lock signs everything queued so far."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entries, future))
        async with self._lock:
            if not future.done():
                batch, self._pending = self._pending, []
                try:
                    merged = tuple(e for group, _ in batch for e in group)
                    numbers = None if self._store is None else crl_numbers(self._store)
                    await asyncio.to_thread(self._reissue, merged, numbers)
                    await self._broker.reload_crls()
                except BaseException as exc:
                    for _, waiting in batch:
                        if not waiting.done():
                            waiting.set_exception(exc)
                else:
                    for _, waiting in batch:
                        if not waiting.done():
                            waiting.set_result(None)
        await future

    def _reissue(
        self, entries: tuple[RevokedEntry, ...], numbers: Callable[[int], int] | None
    ) -> None:
        with revocation_lock(self._home):
            reissue_site_crl(
                self._home, self._secrets, revoke=entries, now=self._clock(), crl_number=numbers
            )

    async def _cut_later(self, device: DeviceId, serials: frozenset[int], mark: int) -> None:
        await asyncio.sleep(self._handover)
        try:
            self.cut_sessions += await self._broker.cut_superseded(device.value, serials, mark)
        except (RegistrarError, TrustCoreError) as exc:
            log.error("could not cut a superseded session of %s: %s", device, exc)
        except Exception:
            log.exception("could not cut a superseded session of %s", device)

    async def reconcile(self, store: Store) -> int:
        """Put every superseded serial the store knows on the site CRL if it is missing;
        returns how many were added (0: nothing signed, nothing reloaded)."""
        crl = x509.load_pem_x509_crl((self._home.current / "site-crl.pem").read_bytes())
        listed = {entry.serial_number for entry in crl}
        missing = [
            (serial, device)
            for serial, device, _ in await store.superseded_serials()
            if int(serial, 16) not in listed
        ]
        if not missing:
            return 0
        moment = self._clock()
        entries = tuple(
            RevokedEntry(CertSerial.from_hex(s), moment, x509.ReasonFlags.superseded)
            for s, _ in missing
        )
        await self._on_crl(entries)
        log.warning("%d superseded LDevID(s) were not on the site CRL: added", len(missing))
        return len(missing)

    async def close(self) -> None:
        for task in list(self._cuts):
            task.cancel()
        for task in list(self._cuts):
            with contextlib.suppress(asyncio.CancelledError):
                await task
