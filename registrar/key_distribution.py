"""Payload-key distribution: which key each device holds, updates until acknowledged, grace.

Owns, for a running registrar (wired in :mod:`registrar.app`):

* **the key each device holds** — ``devices.payload_key_id`` in the store is the key the
  device *proved* it holds: the one in its registration response, or a newer one it
  acknowledged (:func:`trustcore.key_rotation.parse_key_ack` on ``devices/<id>/keys/ack``,
  or telemetry that opens under the current key id). Sending an update changes nothing
  there; so a lost update is never mistaken for a delivered one;
* **updates until acknowledged** — every registered device not on the current key gets a
  signed update (:func:`trustcore.registration.build_key_update`, wrapped to its TPM ECDH
  key) published retained, QoS 1, on ``devices/<id>/keys``: at rotation, at every start and
  at every (re)connection of the registrar's MQTT session — so whatever restarted (the
  registrar, the broker, both; retained messages of either broker may be gone) the update is
  in the broker again before the device can next connect — and again (rate-limited) when the
  device sends telemetry under an older key. Each update's ``issued`` is larger than the
  last one sent to that device (recorded in ``key_offers``), so the device accepts it;
* **the event loop stays free while it sends** — the updates are built (ECDH wrap and
  signature: CPU) in a worker thread, a chunk at a time, and at most ``PUSH_CHUNK``
  publishes are in flight per push; while a push runs, telemetry under an older key starts
  no re-send of its own (the push reaches that device anyway), and re-sends are bounded
  (``PUSH_CHUNK`` at once). A rotation for 10,000 devices once did the work of every
  old-key telemetry message on the loop at once: the registrar stalled for 25 s, its MQTT
  keep-alives and the Mosquitto admin session timed out (docs/scale.md, the soak);
* **the grace period** — :class:`trustcore.key_rotation.KeySchedule` persisted in
  ``payload_key_periods``: telemetry under a key superseded more than ``grace`` ago is
  refused and counted per key.

Why not broker persistence instead: the embedded broker (amqtt) has none, and Mosquitto's
persistence file is written at ``autosave_interval`` and at a clean stop, so a crash still
loses recent retained messages. The store is already the registrar's durable truth, and
re-sending from it works the same on both brokers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registrar.errors import BrokerError, RegistrarError, StoreError
from registrar.payload_keys import PayloadKeyring
from registrar.store import DeviceRecord, Store
from trustcore.errors import TrustCoreError
from trustcore.identity import DeviceId
from trustcore.key_rotation import KeyPeriod, KeySchedule, KeyState, parse_key_ack
from trustcore.keys import Signer
from trustcore.payload import PayloadKey
from trustcore.registration import build_key_update
from trustcore.topics import KEYS_LEVEL, device_topic
from trustcore.utctime import Clock, to_unix

__all__ = ["REPUSH_INTERVAL_S", "KeyDistributor", "key_rows", "load_schedule"]

log = logging.getLogger(__name__)

#: Updates built, published and recorded together (see ``push_pending``).
PUSH_CHUNK = 64
#: When a device uses an older key, the current one is sent again unless an update went to
#: it less than this many seconds ago.
REPUSH_INTERVAL_S = 10

Publish = Callable[[str, bytes], Awaitable[None]]


def key_rows(
    schedule: KeySchedule,
    key_ids: list[bytes],
    devices_per_key: Mapping[bytes, int],
    now: int,
    refused: Mapping[bytes, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per payload key (for ``registrar status``): its state, when it became
    current, when it was superseded and retires, and how many registered devices are still
    on it. Keys are listed current first, then newest first."""
    ids = list(dict.fromkeys([*key_ids, *devices_per_key]))
    rows = []
    for kid in ids:
        period = schedule.period(kid)
        rows.append(
            {
                "key_id": kid.hex(),
                "state": schedule.state(kid, now).value,
                "current_from": period.current_from if period else None,
                "superseded_at": period.superseded_at if period else None,
                "retires_at": schedule.retires_at(kid),
                "devices": devices_per_key.get(kid, 0),
                "telemetry_refused": (refused or {}).get(kid, 0),
            }
        )
    order = {KeyState.CURRENT.value: 0, KeyState.GRACE.value: 1, KeyState.RETIRED.value: 2}
    rows.sort(key=lambda r: (order[str(r["state"])], -int(r["current_from"] or 0)))
    return rows


async def load_schedule(store: Store, grace_s: int) -> KeySchedule:
    """The persisted schedule (``StoreError`` if the table holds an impossible state)."""
    try:
        periods = tuple(KeyPeriod(*row) for row in await store.key_periods())
        return KeySchedule(periods, grace_s)
    except TrustCoreError as exc:
        raise StoreError(f"payload key periods in the registrar database: {exc.message}") from exc


class KeyDistributor:
    """See the module docstring. ``publish(topic, message)`` publishes retained, QoS 1;
    ``signer_for(record)`` is the site CA key a device's update is signed with (the CA that
    issued its LDevID: the device verifies the update with the site CA it knows)."""

    def __init__(
        self,
        *,
        store: Store,
        signer_for: Callable[[DeviceRecord], Signer],
        publish: Publish,
        clock: Clock,
        grace_s: int,
    ) -> None:
        self._store = store
        self._signer_for = signer_for
        self._publish = publish
        self._clock = clock
        self._schedule = KeySchedule((), grace_s)
        self._keyring: PayloadKeyring | None = None
        #: Cache of ``devices.payload_key_id`` for devices seen on the current key.
        self._held: dict[str, bytes] = {}
        self._last_issued: dict[str, int] = {}
        self._last_repush: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Pushes (``push_pending``) running now; re-sends wait while one runs.
        self._pushing = 0
        #: Re-sends building or publishing at once.
        self._repush_slots = asyncio.Semaphore(PUSH_CHUNK)
        #: Telemetry refused per key id (retired keys); acknowledgements accepted.
        self.refused: Counter[bytes] = Counter()
        self.acks = 0
        self.updates_sent = 0

    @property
    def schedule(self) -> KeySchedule:
        return self._schedule

    @property
    def keyring(self) -> PayloadKeyring:
        if self._keyring is None:
            raise RegistrarError("payload keys are not loaded")
        return self._keyring

    async def start(self, keyring: PayloadKeyring) -> None:
        """Load the schedule and the last update per device; note the current key."""
        self._schedule = await load_schedule(self._store, self._schedule.grace_s)
        # ``_last_issued`` fills per chunk when updates are built (a registry of millions
        # is not read into memory at start)
        await self.use_keyring(keyring)

    async def use_keyring(self, keyring: PayloadKeyring) -> None:
        """After a rotation or a re-commission: the keyring's current key is current from
        now on (the previous one starts its grace period now)."""
        self._keyring = keyring
        before = self._schedule
        after = before.with_current(keyring.current.key_id, to_unix(self._clock()))
        for period in after.periods:
            if period not in before.periods:
                await self._store.save_key_period(
                    period.key_id, period.current_from, period.superseded_at
                )
        self._schedule = after

    async def wait_idle(self) -> None:
        """Let the confirmations and re-sends started by telemetry finish (stop, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- sending ------------------------------------------------------------------------------

    async def push_pending(self) -> int:
        """An update for every registered device not (yet) on the current key.

        In chunks of ``PUSH_CHUNK``: the updates of a chunk are built (CPU), published
        concurrently (QoS 1 acknowledgements overlap instead of one round trip each) and
        their offers recorded concurrently (one group commit instead of one fsync each)."""
        current = self.keyring.current.key_id
        sent = 0
        self._pushing += 1
        try:
            async for chunk in self._store.device_pages(
                size=PUSH_CHUNK, status="registered", not_key=current
            ):
                try:
                    sent += await self._push_many(chunk)
                except BrokerError as exc:
                    log.warning(
                        "payload-key updates: %d sent; the rest follow when the registrar's "
                        "MQTT session is back (%s)",
                        sent,
                        exc,
                    )
                    break
        finally:
            self._pushing -= 1
        if sent:
            log.info("published %d payload-key update(s) awaiting acknowledgement", sent)
        return sent

    async def _push(self, record: DeviceRecord) -> None:
        await self._push_many([record])

    async def offer(self, record: DeviceRecord) -> None:
        """Send the current payload key to one device now (its wrap key was just recorded:
        a device enrolled over EST, ``trustcore.wrap_key``); re-sent until acknowledged."""
        await self._push(record)

    async def _push_many(self, records: list[DeviceRecord]) -> int:
        key = self.keyring.current
        now = to_unix(self._clock())
        unknown = [r.device_id.value for r in records if r.device_id.value not in self._last_issued]
        for device_id, offer in (await self._store.key_offers(unknown)).items():
            self._last_issued[device_id] = offer[1]
        # Enrolled over EST: no ECDH wrap key registered (docs/est.md), so no update.
        work = [
            (
                record,
                max(now, self._last_issued.get(record.device_id.value, 0) + 1),
                self._signer_for(record),
            )
            for record in records
            if record.wrap_key_der
        ]

        def build() -> list[tuple[DeviceId, int, bytes]]:
            # CPU only (no state of this object): in a worker thread, off the event loop
            built = []
            for record, issued, signer in work:
                device = record.device_id
                wrap = serialization.load_der_public_key(record.wrap_key_der)
                if not isinstance(wrap, ec.EllipticCurvePublicKey):
                    log.error("%s has no usable wrap key; no payload-key update", device)
                    continue
                message = build_key_update(
                    device_id=device,
                    wrap_key=wrap,
                    payload_key=key,
                    issued=issued,
                    site_signer=signer,
                )
                built.append((device, issued, message))
            return built

        updates = await asyncio.to_thread(build) if work else []
        results = await asyncio.gather(
            *(self._publish(device_topic(d, KEYS_LEVEL), m) for d, _, m in updates),
            return_exceptions=True,
        )
        published = [u for u, r in zip(updates, results, strict=True) if r is None]
        for device, issued, _ in published:
            self._last_issued[device.value] = issued
            self._last_repush[device.value] = now  # telemetry in flight: no second copy
        self.updates_sent += len(published)
        await asyncio.gather(
            *(self._store.record_key_offer(d, key.key_id, i, now) for d, i, _ in published)
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            if isinstance(failed[0], BrokerError):
                raise failed[0]
            raise BrokerError(f"payload-key update not published: {failed[0]!r}") from failed[0]
        return len(published)

    # -- receiving ----------------------------------------------------------------------------

    def check_telemetry(self, device: DeviceId, key_id: bytes, *, retained: bool = False) -> bool:
        """Telemetry of ``device`` opened under ``key_id``: may it be accepted? (Called for
        every message: the common case is one dict look-up.) Under the current key it
        confirms that the device holds it; under an older key the device gets the current
        key again; under a retired key it is also refused (and counted)."""
        keyring = self._keyring
        if keyring is None:
            return False
        if key_id == keyring.current.key_id:
            if self._held.get(device.value) != key_id and not retained:
                self._held[device.value] = key_id  # one confirmation, not one per message
                self._spawn(self._confirm(device, key_id))
            return True
        now = to_unix(self._clock())
        accepted = self._schedule.accepts(key_id, now)
        if not accepted:
            self.refused[key_id] += 1
        if not retained:
            self._repush_soon(device, key_id, now)
        return accepted

    def ack_received(self, device: DeviceId, payload: bytes, retained: bool = False) -> bool:
        """An acknowledgement on ``devices/<id>/keys/ack``: proof that ``device`` holds the
        key it names (it opens only with that key, on that device's topic). The store is
        updated in the background (group commit; the MQTT read loop never waits for it).
        True if the ack verified."""
        if retained:  # a stored copy proves nothing about the device now
            return False
        keyring = self._keyring
        if keyring is None:
            return False
        try:
            ack = parse_key_ack(keyring.keys, device, payload)
        except TrustCoreError as exc:
            log.info("key acknowledgement of %s refused: %s", device, exc)
            return False
        self.acks += 1
        if ack.key_id != keyring.current.key_id:
            # acknowledged an older update: it still needs the current key
            self._repush_soon(device, ack.key_id, to_unix(self._clock()))
        elif self._held.get(device.value) != ack.key_id:
            self._held[device.value] = ack.key_id
            self._spawn(self._confirm(device, ack.key_id))
        return True

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except (RegistrarError, TrustCoreError) as exc:
                log.warning("payload-key bookkeeping failed: %s", exc)
            except Exception as exc:  # a background task must never die unobserved
                log.error("payload-key bookkeeping failed unexpectedly: %r", exc)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm(self, device: DeviceId, key_id: bytes) -> None:
        try:
            record = await self._store.device(device)
            if record is None or record.status != "registered":
                return
            if record.payload_key_id != key_id:
                await self._store.set_payload_key(device, key_id)
                log.info("%s is on payload key %s", device, key_id.hex())
        except RegistrarError:
            self._held.pop(device.value, None)  # not recorded: the next proof tries again
            raise

    def _repush_soon(self, device: DeviceId, used: bytes, now: int) -> None:
        """At most one update per device every ``REPUSH_INTERVAL_S``, counting every update
        sent (a flood of old-key telemetry, or the telemetry still in flight when a rotation
        sends the update, must not become a flood of updates)."""
        if self._pushing:
            return  # the running push sends it the current key (or already has)
        last = self._last_repush.get(device.value)
        if last is not None and 0 <= now - last < REPUSH_INTERVAL_S:
            return
        self._last_repush[device.value] = now
        self._spawn(self._repush(device, used))

    async def _repush(self, device: DeviceId, used: bytes) -> None:
        """``device`` proved it holds the older key ``used``: send the current key again."""
        async with self._repush_slots:
            await self._repush_now(device, used)

    async def _repush_now(self, device: DeviceId, used: bytes) -> None:
        record = await self._store.device(device)
        if record is None or record.status != "registered":
            return
        if record.payload_key_id == self.keyring.current.key_id:
            # It had acknowledged the current key and now uses an older one (a device reset
            # to old state?): the store says what it proved last.
            await self._store.set_payload_key(device, used)
            self._held.pop(device.value, None)
        await self._push(record)
        log.info("%s used an older payload key: the current one was sent again", device)

    async def key_for(self, device: DeviceId) -> PayloadKey:
        """The key to seal a command to ``device`` with: the one it acknowledged, while that
        is still accepted; the current key otherwise (never a retired one)."""
        keyring = self.keyring
        record = await self._store.device(device)
        if record is not None and record.payload_key_id != keyring.current.key_id:
            held = keyring.keys.get(record.payload_key_id)
            if held is not None and self._schedule.accepts(held.key_id, to_unix(self._clock())):
                return held
        return keyring.current

    # -- status -------------------------------------------------------------------------------

    async def rows(self) -> list[dict[str, Any]]:
        return key_rows(
            self._schedule,
            list(self.keyring.keys),
            await self._store.devices_per_payload_key(),
            to_unix(self._clock()),
            self.refused,
        )
