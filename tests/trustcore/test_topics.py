"""The device topic ACL: filters are compared as sets of topics, and anything odd is refused."""

from __future__ import annotations

import ast
from pathlib import Path

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


def test_topic_names_are_built_only_in_the_topics_module() -> None:
    """No string literal outside ``trustcore/topics.py`` spells a topic or a filter of the
    layout (``devtrust/register/...``, ``devices/...``, ``.../+/...``): every component
    builds them with the helpers, so the layout is defined once (docstrings may show it)."""
    root = Path(__file__).parents[2]
    packages = ("trustcore", "signers", "device_sim", "hq", "factory_station", "registrar")
    layout = ("devtrust/register", "devices/")
    found = []
    for path in sorted(
        p for pkg in (*packages, "broker_config") for p in (root / pkg).rglob("*.py")
    ):
        if path == root / "trustcore" / "topics.py":
            continue
        text = path.read_text()
        if not any(marker in text for marker in (*layout, "/+/")):
            continue  # nothing to look at: skip the parse
        tree = ast.parse(text)
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and (node.value.startswith(layout) or "/+/" in node.value)
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_helpers_build_the_documented_layout() -> None:
    from trustcore.topics import (
        KEY_ACK_LEVELS,
        REGISTRATION_REQUEST_FILTER,
        TELEMETRY_LEVEL,
        device_of,
        device_of_registration_request,
        every_device_filter,
        key_ack_topic,
        registration_response_topic,
        renewal_request_topic,
        renewal_response_topic,
    )

    assert registration_response_topic(A) == "devtrust/register/dev-a/response"
    assert REGISTRATION_REQUEST_FILTER == "devtrust/register/+/request"
    assert device_of_registration_request("devtrust/register/dev-a/request") == A
    assert renewal_request_topic(A) == "devices/dev-a/renewal/request"
    assert renewal_response_topic(A) == "devices/dev-a/renewal/response"
    assert key_ack_topic(A) == "devices/dev-a/keys/ack"
    assert every_device_filter(TELEMETRY_LEVEL) == "devices/+/telemetry"
    assert device_of("devices/dev-a/keys/ack", *KEY_ACK_LEVELS) == A
    assert device_of("devices/dev-a/keys/ack", TELEMETRY_LEVEL) is None
    assert device_of("devices/+/telemetry", TELEMETRY_LEVEL) is None  # not a device id
    assert device_of("devices/dev-a/telemetry/x", TELEMETRY_LEVEL) is None
