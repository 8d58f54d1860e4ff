"""What devices send the site besides registrations and renewals: telemetry and the wrap
keys of EST-enrolled devices.

Owns :class:`TelemetryLog` (decrypts ``devices/+/telemetry`` with the site payload keys
and keeps counts and digests only, never the plaintext, for ``registrar status`` and
``/metrics``; refuses telemetry under a payload key past its grace period) and
:func:`record_wrap_key` (verifies and records a device's wrap key, then offers it the
current payload key). The running registrar (:mod:`registrar.site_runtime`) routes the
site channel's messages here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from registrar.errors import BrokerError, StoreError
from registrar.key_distribution import KeyDistributor
from registrar.payload_keys import PayloadKeyring
from registrar.service import RegistrationService
from registrar.store import Store
from trustcore.identity import DeviceId
from trustcore.keys import spki_der
from trustcore.payload import PayloadError, envelope_key_id, open_payload
from trustcore.registration import RegistrationError
from trustcore.utctime import Clock
from trustcore.wrap_key import parse_wrap_key_registration, verify_wrap_key

__all__ = ["RECENT_TELEMETRY", "TelemetryLog", "record_wrap_key"]

log = logging.getLogger(__name__)

#: How many recent telemetry messages ``status.json`` lists.
RECENT_TELEMETRY = 50


@dataclass
class TelemetryLog:
    """Counts and digests of the site's telemetry (mutable: updated per message)."""

    messages: int = 0
    rejected: int = 0
    #: Refused because their payload key is past its grace period (also in ``rejected``).
    retired_key: int = 0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_TELEMETRY))

    def received(
        self,
        keyring: PayloadKeyring,
        keys: KeyDistributor,
        device: DeviceId,
        topic: str,
        payload: bytes,
        retained: bool = False,
    ) -> None:
        """One telemetry message of ``device``: opened, checked against the key the
        device is on, counted."""
        try:
            plaintext = open_payload(keyring.keys, topic, payload)
            key_id = envelope_key_id(payload)
        except PayloadError as exc:
            self.rejected += 1
            log.info("telemetry of %s does not open: %s", device, exc)
            return
        kid = key_id.hex()
        if not keys.check_telemetry(device, key_id, retained=retained):
            self.rejected += 1
            self.retired_key += 1
            log.warning(
                "telemetry of %s under retired payload key %s refused (grace period over)",
                device,
                kid,
            )
            return
        self.messages += 1
        self.recent.append(
            {
                "device_id": device.value,
                "key_id": kid,
                "size": len(plaintext),
                "sha256": hashlib.sha256(plaintext).hexdigest(),
                "time": round(time.time(), 3),
            }
        )


async def record_wrap_key(
    store: Store,
    keys: KeyDistributor,
    service: RegistrationService,
    device: DeviceId,
    payload: bytes,
    clock: Clock,
) -> None:
    """The wrap key of a device enrolled over EST (:mod:`trustcore.wrap_key`): verified,
    recorded once, then the current payload key goes to the device as a payload-key
    update. A refusal is logged and written as an event; the device gets no answer
    (it keeps waiting for the update, as for a lost message)."""
    try:
        message = parse_wrap_key_registration(payload)
        record = await store.device(device)
        registered = record is not None and record.status == "registered"
        wrap = verify_wrap_key(
            message,
            topic_device_id=device,
            site_cas=service.accepted_ldevid_issuers(),
            current_serial=record.ldevid_serial.value if registered and record else None,
            now=clock(),
        )
        assert record is not None
        der = spki_der(wrap)
        stored = await store.set_wrap_key(device, record.ldevid_serial, der)
        if stored is None or stored.wrap_key_der != der:
            raise RegistrationError(f"{device} has a wrap key already", reason="bad_wrap_key")
        await keys.offer(stored)
        log.info("recorded the wrap key of %s; payload key sent", device)
    except RegistrationError as exc:
        log.info("refused the wrap key of %s: %s", device, exc)
        store.note_event(device, "refused", f"wrap key: {exc}"[:500])
    except (StoreError, BrokerError) as exc:
        log.warning("wrap key of %s not recorded now: %s", device, exc)
