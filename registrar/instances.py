"""What a registrar instance learns from the other instances of its site.

Several ``registrar run`` instances share one PostgreSQL store (``docs/registrar.md``,
"Several instances per site"); they coordinate through it and the broker only. This module
owns the follower side, driven by the store's change feed (:meth:`Store.changes`,
LISTEN/NOTIFY, milliseconds):

* a revocation committed elsewhere joins this instance's revoked set (which the service's
  verifier holds by reference): refused from the next request on;
* a payload-key rotation (instance 1) is loaded for the next registration;
* an LDevID superseded elsewhere (renewal, re-registration): on the instance that runs the
  site duties it goes onto the site CRL and its session is cut after the hand-over
  (:meth:`OtherInstances.reconcile_superseded`); a joining instance waits, before it
  answers a renewal, until the site CRL lists the old serial
  (:meth:`OtherInstances.superseded_on_crl`). These are never batched
  (``supersede_window_seconds`` applies to the renewals the site-duties instance answers
  itself): the cut of a session left on the old certificate compares connections with a
  mark taken after the CRL, so the device must get its answer only after that;
* a ``resync`` (the feed reconnected or fell behind) re-reads what matters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509

from registrar.errors import RegistrarError
from registrar.store import Store
from registrar.supersede import SupersededCertificates
from trustcore.errors import TrustCoreError
from trustcore.identity import DeviceId

__all__ = ["SUPERSEDE_WAIT", "OtherInstances"]

log = logging.getLogger(__name__)

#: How long a joining instance waits for the site CRL to list an LDevID it superseded.
SUPERSEDE_WAIT = 5.0


class OtherInstances:
    """Follows the other instances of a site (one per registrar process)."""

    def __init__(
        self,
        *,
        store: Store,
        revoked: set[DeviceId],
        site_crl: Callable[[], Path],
        reload_payload_key: Callable[[], Awaitable[None]],
        superseded: SupersededCertificates | None = None,
    ) -> None:
        """``revoked``: the set the verifier reads (updated in place); ``site_crl``: where
        the current site CRL is; ``superseded``: given on the instance that runs the site
        duties (it owns the broker and the CRL)."""
        self._store = store
        self._revoked = revoked
        self._site_crl = site_crl
        self._reload_payload_key = reload_payload_key
        self._superseded = superseded
        self._due = asyncio.Event()
        self._devices: set[DeviceId] = set()
        self._resync = False

    async def follow(self) -> None:
        """Apply what other instances commit, until cancelled."""
        store = self._store
        feed = store.changes()
        try:
            async for change in feed:
                if change.origin == store.instance:
                    continue
                try:
                    if change.kind == "revoked" and change.device_id is not None:
                        self._revoked.add(DeviceId(change.device_id))
                    elif change.kind == "resync":
                        self._revoked.update(await store.revoked_device_ids())
                        self._resync = True
                        self._due.set()
                    elif change.kind == "payload_key" and change.device_id is None:
                        await self._reload_payload_key()
                    elif change.kind in ("registered", "renewed") and change.device_id is not None:
                        self._devices.add(DeviceId(change.device_id))
                        self._due.set()
                except (RegistrarError, TrustCoreError, OSError) as exc:
                    log.error("change %s from %s not applied: %s", change.kind, change.origin, exc)
        finally:
            await feed.aclose()

    async def reconcile_superseded(self) -> None:
        """The site-duties instance: an LDevID another instance superseded gets the same
        treatment as one superseded here — onto the site CRL at once (one CRL for a burst),
        the session still on it cut after the hand-over. Runs until cancelled."""
        superseded = self._superseded
        if superseded is None:
            return
        while True:
            await self._due.wait()
            await asyncio.sleep(0.02)  # a burst of changes: one pass
            self._due.clear()
            devices, self._devices = self._devices, set()
            resync, self._resync = self._resync, False
            try:
                if resync:
                    await superseded.reconcile(self._store)
                listed = await asyncio.to_thread(self.site_crl_serials)
                due: list[tuple[DeviceId, tuple[str, ...]]] = []
                for device in devices:
                    rows = await self._store.superseded_serials(device)
                    missing = tuple(s for s, _, _ in rows if int(s, 16) not in listed)
                    if missing:
                        due.append((device, missing))
                await asyncio.gather(*(superseded.supersede(d, serials) for d, serials in due))
            except (RegistrarError, TrustCoreError, OSError) as exc:
                log.error("superseded LDevIDs of other instances not on the CRL yet: %s", exc)

    def site_crl_serials(self) -> set[int]:
        crl = x509.load_pem_x509_crl(self._site_crl().read_bytes())
        return {entry.serial_number for entry in crl}

    async def superseded_on_crl(
        self, device: DeviceId, serials: tuple[str, ...], *, renewal: bool
    ) -> None:
        """A joining instance's ``on_superseded``: the site-duties instance puts the old
        LDevID on the site CRL when the change feed tells it; the answer waits until the
        site CRL lists it (as on one instance, the old certificate is refused from the
        moment the new one is handed out), at most :data:`SUPERSEDE_WAIT` seconds. A
        ``renewal`` too: see the module docstring for why it is not batched."""
        del renewal
        wanted = {int(s, 16) for s in serials}
        deadline = time.monotonic() + SUPERSEDE_WAIT
        while not wanted <= await asyncio.to_thread(self.site_crl_serials):
            if time.monotonic() > deadline:
                log.warning(
                    "superseded LDevID(s) %s of %s not on the site CRL after %.0f s (the "
                    "site-duties instance down?): answered anyway; it adds them when it runs",
                    ", ".join(serials),
                    device,
                    SUPERSEDE_WAIT,
                )
                return
            await asyncio.sleep(0.02)
