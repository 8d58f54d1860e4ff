"""Payload-key rotation decided without I/O: the device's acknowledgement and the grace period.

Why a registrar needs both (``docs/registrar.md``, "Payload-key rotation"):

* **The device's key is what the device proved it holds**, never what the registrar sent.
  An update published while a device is offline lives only in the broker (retained), and a
  broker restart loses it (the embedded broker keeps retained messages in memory; Mosquitto
  runs with ``persistence false``). So the registrar records a device as being on a key only
  when the device *acknowledges* it, and re-sends the update until it does.
* **An acknowledgement is a payload envelope** (:func:`trustcore.payload.seal_payload`)
  sealed with the *new* key on the device's own topic ``devices/<id>/keys/ack``::

      seal_payload(new_key, "devices/<id>/keys/ack", CBOR {"v": 1, "issued": <update's issued>})

  Only a holder of the new key can make it open (AES-GCM), the AAD binds the topic and the
  key id, and only the device's identity may publish on its own subtree (broker ACL). So an
  ack that opens proves possession by that device, for the cost of one AEAD call and no TPM
  operation. Telemetry that opens under the new key id on the device's topic proves the
  same thing and counts as an acknowledgement too.
* **Old keys retire after a grace period.** A key stops being current at ``superseded_at``;
  telemetry under it is still accepted until ``superseded_at + grace`` and refused after.
  A key the registrar holds but never saw current (a legacy key file, a key a bundle brought)
  gets its grace counted from the moment the current key became current.

:class:`KeySchedule` is the record of when each key was current; it is a value: every
change returns a new schedule (:meth:`KeySchedule.with_current`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from trustcore import cbor
from trustcore.errors import EncodingError, TrustCoreError
from trustcore.identity import DeviceId
from trustcore.payload import KEY_ID_LENGTH, PayloadKey, open_payload, seal_payload
from trustcore.topics import key_ack_topic

__all__ = [
    "DEFAULT_GRACE_S",
    "MAX_GRACE_S",
    "KeyAck",
    "KeyPeriod",
    "KeyRotationError",
    "KeySchedule",
    "KeyState",
    "build_key_ack",
    "parse_grace",
    "parse_key_ack",
]

#: Old payload keys are accepted this long after they stop being current (7 days).
DEFAULT_GRACE_S = 7 * 86400
#: Longest grace a site may configure (a year: beyond that a key never really retires).
MAX_GRACE_S = 365 * 86400
_ACK_VERSION = 1
_MAX_ACK = 256


class KeyRotationError(TrustCoreError):
    """A key acknowledgement or a grace setting was refused (``reason`` says why)."""

    reason = "malformed"


def build_key_ack(key: PayloadKey, device_id: DeviceId, issued: int) -> bytes:
    """The device side: acknowledge the update ``issued`` by sealing under its new key."""
    topic = key_ack_topic(device_id)
    return seal_payload(key, topic, cbor.encode({"v": _ACK_VERSION, "issued": issued}))


@dataclass(frozen=True, slots=True)
class KeyAck:
    """A verified acknowledgement: ``device_id`` holds ``key_id`` (update ``issued``)."""

    device_id: DeviceId
    key_id: bytes
    issued: int


def parse_key_ack(keys: Mapping[bytes, PayloadKey], device_id: DeviceId, envelope: bytes) -> KeyAck:
    """The registrar side: open an ack received on ``device_id``'s ack topic with any held
    key. Raises :class:`~trustcore.payload.PayloadError` (does not open: no proof) or
    :class:`KeyRotationError` (opens, but the content is not an ack)."""
    plaintext = open_payload(keys, key_ack_topic(device_id), envelope)
    try:
        body = cbor.map_of(cbor.decode(plaintext, max_size=_MAX_ACK), "key ack")
        cbor.expect_keys(body, {"v", "issued"}, what="key ack")
        if cbor.field(body, "v", int) != _ACK_VERSION:
            raise EncodingError("unknown key ack version")
        issued = cbor.field(body, "issued", int)
    except EncodingError as exc:
        raise KeyRotationError(f"key ack: {exc.message}") from exc
    return KeyAck(device_id, bytes(envelope[1 : 1 + KEY_ID_LENGTH]), issued)


def parse_grace(text: str) -> int:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"`` or plain seconds -> seconds (0..MAX_GRACE_S)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    factor = units.get(value[-1:], 0)
    digits = value[:-1] if factor else value
    if not digits.isdigit() or len(digits) > 12:
        raise KeyRotationError(f"not a duration: {text!r} (e.g. 7d, 12h, 30m)", reason="bad_value")
    seconds = int(digits) * (factor or 1)
    if seconds > MAX_GRACE_S:
        raise KeyRotationError("the grace period is at most 365 days", reason="bad_value")
    return seconds


class KeyState(Enum):
    CURRENT = "current"
    GRACE = "grace"  # superseded, still accepted
    RETIRED = "retired"  # superseded, refused


@dataclass(frozen=True, slots=True)
class KeyPeriod:
    """When one key became current here and when it stopped (None: still current)."""

    key_id: bytes
    current_from: int
    superseded_at: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, bytes) or len(self.key_id) != KEY_ID_LENGTH:
            raise KeyRotationError("payload key id must be 8 bytes", reason="bad_value")
        if self.superseded_at is not None and self.superseded_at < self.current_from:
            raise KeyRotationError("a key cannot be superseded before it was current")


@dataclass(frozen=True, slots=True)
class KeySchedule:
    """Which key is current, since when, and when each older key retires."""

    periods: tuple[KeyPeriod, ...]
    grace_s: int = DEFAULT_GRACE_S

    def __post_init__(self) -> None:
        if not 0 <= self.grace_s <= MAX_GRACE_S:
            raise KeyRotationError("grace period out of range", reason="bad_value")
        if sum(p.superseded_at is None for p in self.periods) > 1:
            raise KeyRotationError("more than one current payload key")
        if len({p.key_id for p in self.periods}) != len(self.periods):
            raise KeyRotationError("a payload key is listed twice")

    @property
    def current(self) -> KeyPeriod | None:
        return next((p for p in self.periods if p.superseded_at is None), None)

    def period(self, key_id: bytes) -> KeyPeriod | None:
        return next((p for p in self.periods if p.key_id == key_id), None)

    def with_current(self, key_id: bytes, now: int) -> KeySchedule:
        """``key_id`` is current from ``now`` (the previous current one is superseded now);
        unchanged if it already is."""
        current = self.current
        if current is not None and current.key_id == key_id:
            return self
        periods = []
        for p in self.periods:
            if p.key_id == key_id:
                continue
            if p.superseded_at is None:
                p = KeyPeriod(p.key_id, p.current_from, max(now, p.current_from))
            periods.append(p)
        periods.append(KeyPeriod(key_id, now))
        return KeySchedule(tuple(periods), self.grace_s)

    def retires_at(self, key_id: bytes) -> int | None:
        """When telemetry under ``key_id`` stops being accepted (None: it is current). A
        key with no period (never current here) retires ``grace`` after the current key
        became current."""
        period = self.period(key_id)
        if period is not None and period.superseded_at is None:
            return None
        if period is not None:
            assert period.superseded_at is not None
            return period.superseded_at + self.grace_s
        current = self.current
        return (current.current_from if current is not None else 0) + self.grace_s

    def state(self, key_id: bytes, now: int) -> KeyState:
        retires = self.retires_at(key_id)
        if retires is None:
            return KeyState.CURRENT
        return KeyState.GRACE if now < retires else KeyState.RETIRED

    def accepts(self, key_id: bytes, now: int) -> bool:
        """May telemetry under ``key_id`` (a key the registrar holds) be accepted now?"""
        return self.state(key_id, now) is not KeyState.RETIRED
