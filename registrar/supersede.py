"""Superseded LDevIDs: on the site CRL (at once, or within a window), then off the broker.

When a renewal or a re-registration issues a device a new LDevID, the old one must stop
working (issue 8: an old certificate used to keep connecting, publishing and kicking the
real device off). :class:`SupersededCertificates` does it in two steps:

1. **The site CRL.** The old serials go on the site CA CRL (reason ``superseded``,
   re-signed under :func:`registrar.site.revocation_lock`) and the broker reloads its CRLs:
   from then on a TLS handshake with the old certificate fails, on every broker.

   * A **re-registration**, and the first **renewal** after a quiet
     ``supersede_window_seconds`` (the LDevID policy; default 60 s), does it BEFORE its
     answer leaves (``RegistrationService.on_superseded`` is awaited): the old certificate
     is refused from the moment the new one exists.
   * A renewal that comes within the window of the last such CRL joins a **batch**: it is
     answered at once, and the batch goes on the CRL (one CRL, one reload) when the window
     since the last one has passed. So at most one reload per window comes from renewals,
     whatever their rate: each Mosquitto reload builds new TLS contexts that stay allocated
     as long as any connection made under them lives (``docs/broker.md``, "Reloads and
     Mosquitto's memory"), and a device that reconnects after its renewal pins one.
     The price: the superseded (not compromised) certificate of a batched renewal still
     completes a handshake until its batch is signed, at most one window. A compromised
     key is a revocation (``registrar revoke``), which never waits.
   * Immediate ones that arrive while a CRL is being signed wait for it and are then
     signed together, in one more CRL (a group commit); a waiting batch joins any CRL
     signed before its window ends.
2. **After ``handover_seconds``** from the answer, and not before the CRL lists the old
   serial: a live session still on the old certificate is cut
   (:meth:`registrar.broker.Broker.cut_superseded`). The delay lets the answer reach the
   device over that very session, and the device reconnect with its new certificate first.
   Mosquitto cannot see which certificate a session uses, so the cut compares connection
   marks: taken after the CRL when the CRL came first, and when the answer was given for a
   batched renewal (a connection after the answer is the device's reconnect with its new
   certificate; Mosquitto keeps one session per identity, so it took over any older one).

Why the device can never lose both certificates: the new certificate is committed before
the old one is put on the CRL, the answer is idempotent (the identical request gets it
again), and a device left with neither (a lost answer after a cut) still holds its IDevID,
with which it registers again on the registration listener (re-registration supersedes
whatever it missed). Identity blocks are NOT used here: a block is per identity (device id)
and would lock out the new certificate too.

Crash safety: the store commits the superseded serial before any of this, so a batch lost
with the process (or a failed reload) is not lost: :meth:`SupersededCertificates.reconcile`
puts every serial the store lists as superseded on the CRL if it is missing and not already
waiting in a batch; the registrar runs it at start and at every CRL check. A graceful stop
signs the waiting batch first.
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
        window_seconds: float = 0.0,
        clock: Clock = system_clock,
        store: Store | None = None,
    ) -> None:
        """``store``: CRL numbers come from its site-wide sequence (several instances).
        ``window_seconds``: at most one CRL for batched renewals per this many seconds."""
        self._store = store
        self._home = home
        self._secrets = secrets
        self._broker = broker
        self._handover = handover_seconds
        self._window = window_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._pending: list[tuple[tuple[RevokedEntry, ...], asyncio.Future[None]]] = []
        self._last_signed: float | None = None  # loop time of the last CRL signed here
        self._batch: asyncio.Task[None] | None = None  # the batch waiting for its window
        self._batches: set[asyncio.Task[None]] = set()  # waiting or signing
        self._signing = 0  # serials in the CRL being signed now
        self._cuts: set[asyncio.Task[None]] = set()
        self.cut_sessions = 0
        #: CRLs signed (each followed by one broker reload), for status and tests.
        self.crls_signed = 0

    @property
    def pending(self) -> int:
        """Superseded serials not in force on the broker yet: waiting for their batch, or in
        the CRL being signed and reloaded now (0: every one is refused at connect)."""
        return self._signing + sum(len(entries) for entries, _ in self._pending)

    async def supersede(
        self, device: DeviceId, serials: tuple[str, ...], *, renewal: bool = False
    ) -> None:
        """Step 1 (now, or in the next batch for a ``renewal`` within the window; see the
        module docstring), step 2 scheduled. Returns once the CRL is in force, except for a
        batched renewal, which returns at once."""
        loop = asyncio.get_running_loop()
        moment = self._clock()
        entries = tuple(
            RevokedEntry(CertSerial.from_hex(s), moment, x509.ReasonFlags.superseded)
            for s in serials
        )
        answered = loop.time()
        numbers = frozenset(e.serial.value for e in entries)
        if (
            renewal
            and self._window > 0
            and (
                self._batch is not None
                or (self._last_signed is not None and answered - self._last_signed < self._window)
            )
        ):
            # The device cannot have reconnected with its new certificate yet: a connection
            # after this mark is that reconnect.
            mark = self._broker.connection_mark(device.value)
            on_crl = self._enqueue(entries)
            self._schedule()
            log.info(
                "LDevID(s) %s of %s superseded: on the site CRL with the next batch",
                ", ".join(serials),
                device,
            )
        else:
            on_crl = self._enqueue(entries)
            await self._sign_pending()
            await on_crl
            mark = self._broker.connection_mark(device.value)
            log.info("LDevID(s) %s of %s superseded: on the site CRL", ", ".join(serials), device)
        task = asyncio.create_task(self._cut_later(device, numbers, mark, on_crl, answered))
        self._cuts.add(task)
        task.add_done_callback(self._cuts.discard)

    def _enqueue(self, entries: tuple[RevokedEntry, ...]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entries, future))
        return future

    def _schedule(self) -> None:
        """Make sure a batch task will sign what is pending once the window has passed."""
        if self._batch is None:
            self._batch = asyncio.create_task(self._sign_batch(), name="superseded-batch")
            self._batches.add(self._batch)
            self._batch.add_done_callback(self._batches.discard)

    async def _sign_batch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._last_signed is not None:
                await asyncio.sleep(max(0.0, self._last_signed + self._window - loop.time()))
        finally:
            self._batch = None  # arrivals from now on start the next window
        try:
            await self._sign_pending()
        except Exception as exc:
            log.error("could not put a batch of superseded LDevIDs on the CRL: %s", exc)

    async def _sign_pending(self) -> None:
        """Group commit for CRLs: whoever takes the lock signs everything queued so far.
        Raises what signing or reloading raised (every waiter of the batch gets it too)."""
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            self._last_signed = asyncio.get_running_loop().time()
            merged = tuple(e for group, _ in batch for e in group)
            self._signing = len(merged)
            try:
                numbers = None if self._store is None else crl_numbers(self._store)
                await asyncio.to_thread(self._reissue, merged, numbers)
                self.crls_signed += 1
                await self._broker.reload_crls()
            except BaseException as exc:
                for _, waiting in batch:
                    if not waiting.done():
                        waiting.set_exception(exc)
                        waiting.exception()  # retrieved: a waiter may be gone (cut cancelled)
                raise
            finally:
                self._signing = 0
            for _, waiting in batch:
                if not waiting.done():
                    waiting.set_result(None)

    def _reissue(
        self, entries: tuple[RevokedEntry, ...], numbers: Callable[[int], int] | None
    ) -> None:
        with revocation_lock(self._home):
            reissue_site_crl(
                self._home, self._secrets, revoke=entries, now=self._clock(), crl_number=numbers
            )

    async def _cut_later(
        self,
        device: DeviceId,
        serials: frozenset[int],
        mark: int,
        on_crl: asyncio.Future[None],
        answered: float,
    ) -> None:
        try:
            await on_crl
        except Exception as exc:
            log.error("superseded LDevID of %s not on the CRL, session not cut: %s", device, exc)
            return
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, answered + self._handover - loop.time()))
        try:
            self.cut_sessions += await self._broker.cut_superseded(device.value, serials, mark)
        except (RegistrarError, TrustCoreError) as exc:
            log.error("could not cut a superseded session of %s: %s", device, exc)
        except Exception:
            log.exception("could not cut a superseded session of %s", device)

    async def reconcile(self, store: Store) -> int:
        """Put every superseded serial the store knows on the site CRL if it is missing
        (and not waiting in a batch already); returns how many were added (0: nothing
        signed, nothing reloaded)."""
        crl = x509.load_pem_x509_crl((self._home.current / "site-crl.pem").read_bytes())
        listed = {entry.serial_number for entry in crl}
        listed.update(e.serial.value for group, _ in self._pending for e in group)
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
        on_crl = self._enqueue(entries)
        await self._sign_pending()
        await on_crl
        log.warning("%d superseded LDevID(s) were not on the site CRL: added", len(missing))
        return len(missing)

    async def close(self) -> None:
        """Sign a waiting batch now (the broker still runs; one being signed finishes),
        then stop the cuts."""
        waiting, self._batch = self._batch, None
        if waiting is not None:
            waiting.cancel()
        for batch in list(self._batches):
            with contextlib.suppress(asyncio.CancelledError):
                await batch
        if self._pending:
            try:
                await asyncio.wait_for(self._sign_pending(), 10)
            except Exception as exc:
                log.error("superseded LDevIDs left for the next start's CRL check: %s", exc)
        for task in list(self._cuts):
            task.cancel()
        for task in list(self._cuts):
            with contextlib.suppress(asyncio.CancelledError):
                await task
