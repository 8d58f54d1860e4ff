"""The fail-closed plugin chain (pure): order, first refusal wins, holds, and every way a
plugin can misbehave (raise, answer nothing or nonsense, be missing, be absent)."""

from __future__ import annotations

import pytest

from trustcore.errors import InvalidValueError
from trustcore.policy_chain import (
    ALLOW,
    Decision,
    NamedPlugin,
    PluginSetting,
    Verdict,
    hold,
    missing_plugin,
    plugin_settings,
    refuse,
    run_chain,
)


def named(name: str, answer: object) -> NamedPlugin[int]:
    return NamedPlugin(name, lambda _ctx: answer)


def boom(_ctx: int) -> Decision:
    raise RuntimeError("disk on fire")


def test_all_allow_is_allow() -> None:
    assert run_chain([named("a", ALLOW), named("b", ALLOW)], 1) == ALLOW


def test_empty_chain_refuses() -> None:
    d = run_chain([], 1)
    assert d.verdict is Verdict.REFUSE and d.reason == "empty_policy"


def test_exception_refuses_naming_the_plugin() -> None:
    d = run_chain([named("a", ALLOW), NamedPlugin("bomb", boom)], 1)
    assert (d.verdict, d.reason, d.plugin) == (Verdict.REFUSE, "plugin_error", "bomb")
    assert "disk on fire" in d.message


@pytest.mark.parametrize("answer", [None, True, "allow", 0, Verdict.ALLOW])
def test_no_or_unknown_answer_refuses(answer: object) -> None:
    d = run_chain([named("quiet", answer)], 1)
    assert (d.verdict, d.reason, d.plugin) == (Verdict.REFUSE, "plugin_no_answer", "quiet")


def test_first_refusal_wins_and_stops_the_chain() -> None:
    seen: list[str] = []

    def rec(name: str, answer: Decision) -> NamedPlugin[int]:
        def check(_ctx: int) -> Decision:
            seen.append(name)
            return answer

        return NamedPlugin(name, check)

    d = run_chain([rec("a", ALLOW), rec("b", refuse("first")), rec("c", refuse("second"))], 1)
    assert (d.reason, d.plugin) == ("first", "b") and seen == ["a", "b"]


def test_hold_is_kept_but_a_later_refusal_or_error_wins() -> None:
    assert run_chain([named("h", hold("wait")), named("a", ALLOW)], 1).verdict is Verdict.HOLD
    d = run_chain([named("h", hold("wait")), named("r", refuse("no"))], 1)
    assert (d.verdict, d.reason) == (Verdict.REFUSE, "no")
    d = run_chain([named("h", hold("wait")), NamedPlugin("bomb", boom)], 1)
    assert d.reason == "plugin_error"


def test_hold_refuses_where_holding_is_not_allowed() -> None:
    d = run_chain([named("h", hold("wait"))], 1, allow_hold=False)
    assert (d.verdict, d.reason, d.plugin) == (Verdict.REFUSE, "wait", "h")


def test_missing_plugin_refuses_every_time() -> None:
    stand_in = missing_plugin("ghost", "not installed")
    for ctx in (1, 2):
        d = run_chain([named("a", ALLOW), stand_in], ctx)
        assert (d.reason, d.plugin) == ("plugin_missing", "ghost")


def test_decisions_are_validated_and_frozen() -> None:
    with pytest.raises(InvalidValueError):
        refuse("")
    with pytest.raises(InvalidValueError):
        hold("Not A Code")
    with pytest.raises(InvalidValueError):
        Decision(Verdict.ALLOW, "why")
    with pytest.raises(AttributeError):
        ALLOW.reason = "x"  # type: ignore[misc]


def test_plugin_settings_are_strict() -> None:
    s = plugin_settings([{"name": "shift_hours", "config": {"b": 1, "a": 2}}, {"name": "x"}])
    assert s[0].config == {"a": 2, "b": 1} and s[1].config == {}
    assert s[0].to_obj() == {"name": "shift_hours", "config": {"a": 2, "b": 1}}
    for bad in (
        {"name": "x"},
        [{"name": "x"}, {"name": "x"}],
        [{"name": "x", "extra": 1}],
        [{"name": "x", "config": []}],
        [{"name": "bad name!"}],
    ):
        with pytest.raises(InvalidValueError):
            plugin_settings(bad)
    with pytest.raises(InvalidValueError):
        PluginSetting("x", "[1]")
