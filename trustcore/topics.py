"""MQTT topic names and the access rule for devices, decided without I/O.

Layout (``<id>`` is a :class:`~trustcore.identity.DeviceId`, which cannot contain ``/``,
``+``, ``#``, ``$``, whitespace or non-ASCII)::

    devtrust/register/<id>/request    device → registrar   (registration listener)
    devtrust/register/<id>/response   registrar → device   (registration listener)
    devices/<id>/...                  the device's own subtree (operational listener):
        telemetry                     device → registrar   sealed payload (trustcore.payload)
        keys                          registrar → device   payload-key update (retained)
        keys/ack                      device → registrar   acknowledgement (key_rotation)
        keys/wrap                     device → registrar   wrap key after EST (wrap_key)
        renewal/request               device → registrar   LDevID renewal (renewal)
        renewal/response              registrar → device
        rollover                      registrar → device   renew-now (site_rollover, retained)
        cmd                           registrar → device   an operator's command

Every level name is defined here and nowhere else; the other modules build topics, filters
and bindings with the helpers below and parse them with :func:`device_of`.

A device may use exactly its own subtree and nothing else. Subscription filters are
compared as *sets of topics*, not as strings: a filter is allowed only when every topic it
could ever match lies inside the allowed subtree. So ``devices/+/x`` is refused for device
``a`` (it matches ``devices/b/x``), ``#``, ``+/#``, ``$share/...`` and ``$SYS/...`` are
refused, and so is anything that is not valid MQTT (NUL, broken UTF-8, a wildcard inside a
level, more than 65,535 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from trustcore.errors import InvalidValueError
from trustcore.identity import DeviceId

REGISTRATION_PREFIX = "devtrust/register"
DEVICE_PREFIX = "devices"
MAX_TOPIC_BYTES = 65535

REQUEST_LEVEL = "request"
RESPONSE_LEVEL = "response"
TELEMETRY_LEVEL = "telemetry"
#: ``devices/<id>/keys``: payload-key updates.
KEYS_LEVEL = "keys"
#: ``devices/<id>/keys/ack``: the device's acknowledgement of a payload-key update.
KEY_ACK_LEVELS = (KEYS_LEVEL, "ack")
#: ``devices/<id>/keys/wrap``: inside the device's own subtree (no new broker ACL rule).
WRAP_KEY_LEVELS = (KEYS_LEVEL, "wrap")
#: ``devices/<id>/renewal/request`` (device -> registrar) and ``.../renewal/response``
#: (registrar -> device), on the operational listener: inside the device's own subtree, so
#: neither broker needs a new ACL rule and no device can read another's answer.
RENEWAL_LEVEL = "renewal"
RENEWAL_REQUEST_LEVELS = (RENEWAL_LEVEL, REQUEST_LEVEL)
RENEWAL_RESPONSE_LEVELS = (RENEWAL_LEVEL, RESPONSE_LEVEL)
#: ``devices/<id>/rollover``: where a registrar asks a device to renew its LDevID.
ROLLOVER_LEVEL = "rollover"
#: ``devices/<id>/cmd``: an operator's command to one device.
COMMAND_LEVEL = "cmd"


class Listener(Enum):
    """Which listener a session came in on decides which subtree its identity may use."""

    REGISTRATION = "registration"
    OPERATIONAL = "operational"


class Access(Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


def registration_request_topic(device_id: DeviceId) -> str:
    return f"{REGISTRATION_PREFIX}/{device_id.value}/{REQUEST_LEVEL}"


def registration_response_topic(device_id: DeviceId) -> str:
    return f"{REGISTRATION_PREFIX}/{device_id.value}/{RESPONSE_LEVEL}"


def device_topic(device_id: DeviceId, *levels: str) -> str:
    topic = "/".join((DEVICE_PREFIX, device_id.value, *levels))
    validate_topic_name(topic)
    return topic


def renewal_request_topic(device_id: DeviceId) -> str:
    return device_topic(device_id, *RENEWAL_REQUEST_LEVELS)


def renewal_response_topic(device_id: DeviceId) -> str:
    return device_topic(device_id, *RENEWAL_RESPONSE_LEVELS)


def key_ack_topic(device_id: DeviceId) -> str:
    return device_topic(device_id, *KEY_ACK_LEVELS)


#: Every device's registration request (a subscription filter of the registrar).
REGISTRATION_REQUEST_FILTER = f"{REGISTRATION_PREFIX}/+/{REQUEST_LEVEL}"


def every_device_filter(*levels: str) -> str:
    """``devices/+/<levels…>``: the same levels of every device (a registrar's filter)."""
    return "/".join((DEVICE_PREFIX, "+", *levels))


def device_of(topic: str, *levels: str) -> DeviceId | None:
    """``devices/<id>/<levels…>`` -> the device id; ``None`` for any other topic."""
    parts = topic.split("/")
    if len(parts) != 2 + len(levels) or parts[0] != DEVICE_PREFIX or tuple(parts[2:]) != levels:
        return None
    try:
        return DeviceId(parts[1])
    except InvalidValueError:
        return None


def device_of_registration_request(topic: str) -> DeviceId | None:
    """``devtrust/register/<id>/request`` -> the device id; ``None`` for anything else."""
    prefix = REGISTRATION_PREFIX + "/"
    suffix = "/" + REQUEST_LEVEL
    if not topic.startswith(prefix) or not topic.endswith(suffix):
        return None
    try:
        return DeviceId(topic[len(prefix) : -len(suffix)])
    except InvalidValueError:
        return None


def _check_utf8(text: str) -> bytes:
    try:
        data = text.encode("utf-8", "strict")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise InvalidValueError("topic is not valid UTF-8") from exc
    if not data or len(data) > MAX_TOPIC_BYTES:
        raise InvalidValueError("topic must be 1..65535 bytes")
    if "\x00" in text:
        raise InvalidValueError("topic contains NUL")
    return data


def validate_topic_name(topic: str) -> None:
    """A PUBLISH topic: no wildcards (MQTT 3.1.1 §4.7.1)."""
    _check_utf8(topic)
    if "+" in topic or "#" in topic:
        raise InvalidValueError("a topic name cannot contain wildcards")


def validate_topic_filter(topic_filter: str) -> None:
    """A SUBSCRIBE filter: ``+`` and ``#`` only as whole levels, ``#`` only last."""
    _check_utf8(topic_filter)
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise InvalidValueError("'#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise InvalidValueError("'+' must be a whole level")


@dataclass(frozen=True)
class AccessRule:
    """The topics one authenticated identity may use: the subtree under ``subtree`` (a
    tuple of literal levels; ``None`` for no subtree) for publish and subscribe, plus the
    exact topics in ``extra_publish`` / ``extra_subscribe``."""

    subtree: tuple[str, ...] | None
    extra_publish: frozenset[str] = frozenset()
    extra_subscribe: frozenset[str] = frozenset()

    def allows(self, access: Access, topic: str) -> bool:
        """Fail closed: anything malformed is refused (a bool, never an exception that a
        broker plugin could turn into "allow")."""
        try:
            if access is Access.PUBLISH:
                validate_topic_name(topic)
                exact = self.extra_publish
            else:
                validate_topic_filter(topic)
                exact = self.extra_subscribe
        except InvalidValueError:
            return False
        return topic in exact or self._in_subtree(topic.split("/"))

    def _in_subtree(self, levels: list[str]) -> bool:
        # Every subtree level must be present literally (a wildcard there would reach other
        # subtrees); below it anything goes, wildcards included, because every topic those
        # match still lies inside. The bare subtree root itself is not part of it.
        if self.subtree is None:
            return False
        n = len(self.subtree)
        return len(levels) > n and tuple(levels[:n]) == self.subtree


def device_access(device_id: DeviceId, listener: Listener) -> AccessRule:
    """What a device may do on a listener: on the registration listener only its own
    request/response pair; on the operational listener only ``devices/<id>/...``."""
    if listener is Listener.REGISTRATION:
        return AccessRule(
            subtree=None,
            extra_publish=frozenset({registration_request_topic(device_id)}),
            extra_subscribe=frozenset({registration_response_topic(device_id)}),
        )
    return AccessRule(subtree=(DEVICE_PREFIX, device_id.value))
