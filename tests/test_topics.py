"""The device topic ACL: filters are compared as sets of topics, and anything odd is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustcore.identity import DeviceId
from trustcore.topics import Access, Listener, device_access, device_topic

A = DeviceId("dev-a")
OP = device_access(A, Listener.OPERATIONAL)
REG = device_access(A, Listener.REGISTRATION)


@pytest.mark.parametrize(
    "topic", ["devices/dev-a/telemetry", "devices/dev-a/x/y/z", "devices/dev-a//empty-level"]
)
def test_own_subtree_allowed(topic: str) -> None:
    assert OP.allows(Access.PUBLISH, topic)
    assert OP.allows(Access.SUBSCRIBE, topic)


@pytest.mark.parametrize("filt", ["devices/dev-a/#", "devices/dev-a/+", "devices/dev-a/+/cmd"])
def test_own_wildcards_allowed(filt: str) -> None:
    assert OP.allows(Access.SUBSCRIBE, filt)
    assert not OP.allows(Access.PUBLISH, filt)


@pytest.mark.parametrize(
    "topic",
    [
        "devices/dev-b/telemetry",
        "devices/dev-a",  # the subtree root is not inside the subtree
        "devices/+/telemetry",
        "devices/#",
        "#",
        "+/dev-a/telemetry",
        "+/+/+",
        "devices/dev-a#",
        "devices/dev-a+/x",
        "devices/dev-a/x#",
        "devices/dev-a/#/x",
        "$share/g/devices/dev-a/x",
        "$share/g/#",
        "$SYS/broker/clients",
        "$SYS/#",
        "devices//dev-a/x",
        "/devices/dev-a/x",
        "devices/dev-A/x",
        "devices/dev-a\u0000/x",
        "devices/dev-\u0430/x",  # Cyrillic a
        "devices/dev-a\ud800/x",  # lone surrogate: not encodable as UTF-8
        "",
        "devices/dev-a/" + "x" * 70000,
        "devtrust/register/dev-a/request",
    ],
)
def test_everything_else_refused(topic: str) -> None:
    assert not OP.allows(Access.SUBSCRIBE, topic)
    assert not OP.allows(Access.PUBLISH, topic)


def test_registration_listener_allows_only_the_pair() -> None:
    assert REG.allows(Access.PUBLISH, "devtrust/register/dev-a/request")
    assert REG.allows(Access.SUBSCRIBE, "devtrust/register/dev-a/response")
    assert not REG.allows(Access.SUBSCRIBE, "devtrust/register/dev-a/request")
    assert not REG.allows(Access.PUBLISH, "devtrust/register/dev-a/response")
    assert not REG.allows(Access.SUBSCRIBE, "devtrust/register/+/response")
    assert not REG.allows(Access.PUBLISH, "devices/dev-a/telemetry")


def test_device_topic_builder() -> None:
    assert device_topic(A, "telemetry") == "devices/dev-a/telemetry"


def _matches(filt: str, topic: str) -> bool:
    f, t = filt.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


levels = st.sampled_from(["devices", "dev-a", "dev-b", "+", "#", "x", "", "$SYS"])


@given(
    st.lists(levels, min_size=1, max_size=5),
    st.lists(levels.filter(lambda s: s not in "+#"), min_size=1, max_size=5),
)
def test_allowed_filter_never_matches_a_foreign_topic(
    flevels: list[str], tlevels: list[str]
) -> None:
    """Set semantics: if a filter is allowed, every topic it matches is allowed to publish."""
    filt, topic = "/".join(flevels), "/".join(tlevels)
    if OP.allows(Access.SUBSCRIBE, filt) and _matches(filt, topic):
        assert OP.allows(Access.PUBLISH, topic), (filt, topic)
