"""MQTT topic names and the access rule for devices, decided without I/O.

Layout (``<id>`` is a :class:`~trustcore.identity.DeviceId`, which cannot contain ``/``,
``+``, ``#``, ``$``, whitespace or non-ASCII)::

    devtrust/register/<id>/request    device → registrar   (registration listener)
    devtrust/register/<id>/response   registrar → device   (registration listener)
    devices/<id>/...                  the device's own subtree (operational listener)

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


class Listener(Enum):
    """Which listener a session came in on decides which subtree its identity may use."""

    REGISTRATION = "registration"
    OPERATIONAL = "operational"


class Access(Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


def registration_request_topic(device_id: DeviceId) -> str:
    return f"{REGISTRATION_PREFIX}/{device_id.value}/request"


def registration_response_topic(device_id: DeviceId) -> str:
    return f"{REGISTRATION_PREFIX}/{device_id.value}/response"


def device_topic(device_id: DeviceId, *levels: str) -> str:
    topic = "/".join((DEVICE_PREFIX, device_id.value, *levels))
    validate_topic_name(topic)
    return topic


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
