"""A fail-closed chain of policy plugins, decided without I/O.

Manufacturers extend the station's issuance checks and the site's admission with their own
Python plugins. A plugin is any callable taking one context value (what the caller knows
about the request) and returning a :class:`Decision`. Composition never trusts a plugin to
behave:

* the plugins run in the configured order; the first ``REFUSE`` wins and ends the chain;
* an exception, ``None`` or anything that is not a :class:`Decision` refuses
  (``plugin_error`` / ``plugin_no_answer``), naming the plugin: a bug is never an "allow";
* an empty chain refuses (``empty_policy``): a configuration mistake is never an "allow";
* ``HOLD`` (wait for a person, e.g. an installer's approval) is kept while later plugins
  still run, so a later refusal or error still wins over it; where holding makes no sense
  (the factory station: nobody approves a single provisioning later) the caller passes
  ``allow_hold=False`` and a hold refuses with the plugin's reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from trustcore.errors import InvalidValueError

__all__ = [
    "ALLOW",
    "CHAIN_REASONS",
    "Decision",
    "NamedPlugin",
    "PluginSetting",
    "Verdict",
    "hold",
    "missing_plugin",
    "plugin_settings",
    "refuse",
    "run_chain",
]

C = TypeVar("C")

_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_MESSAGE = 500

#: Reasons the chain itself gives (as opposed to a plugin's own reasons).
CHAIN_REASONS = frozenset({"plugin_error", "plugin_no_answer", "plugin_missing", "empty_policy"})


class Verdict(Enum):
    ALLOW = "allow"
    REFUSE = "refuse"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class Decision:
    """One plugin's answer. ``reason`` is a short code (``[a-z][a-z0-9_]*``) for logs,
    audit records and operators; ``message`` is human detail. ``plugin`` is filled in by
    :func:`run_chain` so every refusal names who decided it."""

    verdict: Verdict
    reason: str = ""
    message: str = ""
    plugin: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.verdict, Verdict):
            raise InvalidValueError(f"verdict must be a Verdict, not {self.verdict!r}")
        if self.verdict is Verdict.ALLOW:
            if self.reason:
                raise InvalidValueError("an ALLOW decision carries no reason")
        elif not isinstance(self.reason, str) or not _REASON.fullmatch(self.reason):
            raise InvalidValueError(
                f"a {self.verdict.value} decision needs a reason code like 'outside_shift', "
                f"not {self.reason!r}"
            )
        if not isinstance(self.message, str) or len(self.message) > _MAX_MESSAGE:
            raise InvalidValueError(f"message must be a string of at most {_MAX_MESSAGE} chars")

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


ALLOW = Decision(Verdict.ALLOW)


def refuse(reason: str, message: str = "") -> Decision:
    return Decision(Verdict.REFUSE, reason, message)


def hold(reason: str, message: str = "") -> Decision:
    return Decision(Verdict.HOLD, reason, message)


@dataclass(frozen=True, slots=True)
class NamedPlugin(Generic[C]):
    """A plugin under the name the configuration uses for it, with its settings already
    bound (``check`` is the configured plugin instance)."""

    name: str
    check: Callable[[C], object]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidValueError(f"plugin name {self.name!r} is not a simple name")
        if not callable(self.check):
            raise InvalidValueError(f"plugin {self.name} is not callable")


def missing_plugin(name: str, detail: str, reason: str = "plugin_missing") -> NamedPlugin[Any]:
    """A placeholder for a configured plugin that could not be loaded (not installed:
    ``plugin_missing``; its factory refused the settings: ``plugin_error``). It refuses every
    request, so a missing plugin fails closed on every decision, not only at start-up."""

    def absent(_context: object) -> Decision:
        return refuse(reason, f"plugin {name} is not available: {detail}"[:_MAX_MESSAGE])

    return NamedPlugin(name, absent)


@dataclass(frozen=True, slots=True)
class PluginSetting:
    """One enabled plugin in a station's or site's configuration: its entry-point name and
    its settings (kept as canonical JSON so the value stays immutable)."""

    name: str
    config_json: str = "{}"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidValueError(f"plugin name {self.name!r} is not a simple name")
        try:
            config = json.loads(self.config_json)
        except (TypeError, ValueError) as exc:
            raise InvalidValueError(f"plugin {self.name} settings are not JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise InvalidValueError(f"plugin {self.name} settings must be a JSON object")

    @property
    def config(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.config_json)
        return value

    @classmethod
    def create(cls, name: str, config: Mapping[str, Any] | None = None) -> PluginSetting:
        try:
            text = json.dumps(dict(config or {}), sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidValueError(f"plugin {name} settings are not JSON: {exc}") from exc
        return cls(name, text)

    @classmethod
    def from_obj(cls, obj: object) -> PluginSetting:
        """``{"name": ..., "config": {...}}`` (``config`` optional), strictly."""
        if not isinstance(obj, dict) or not {"name"} <= set(obj) <= {"name", "config"}:
            raise InvalidValueError(
                'a plugin entry must be {"name": NAME, "config": {...}}, not ' + repr(obj)
            )
        config = obj.get("config", {})
        if not isinstance(config, dict):
            raise InvalidValueError(f"plugin {obj['name']!r} config must be an object")
        return cls.create(obj["name"], config)

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config}


def plugin_settings(obj: object) -> tuple[PluginSetting, ...]:
    """A JSON list of plugin entries; a name may appear once (order is the run order)."""
    if not isinstance(obj, list):
        raise InvalidValueError("plugins must be a JSON list")
    settings = tuple(PluginSetting.from_obj(item) for item in obj)
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise InvalidValueError(f"a plugin is listed twice in {names}")
    return settings


def _refusal(name: str, reason: str, message: str) -> Decision:
    return Decision(Verdict.REFUSE, reason, message[:_MAX_MESSAGE], name)


def run_chain(
    plugins: Sequence[NamedPlugin[C]], context: C, *, allow_hold: bool = True
) -> Decision:
    """Run ``plugins`` in order on ``context``; see the module docstring for the rules.

    Returns ALLOW, the first REFUSE, or (``allow_hold``) the first HOLD when nothing
    refused. The returned decision names the plugin that decided it.
    """
    if not plugins:
        return _refusal("", "empty_policy", "no policy plugins configured")
    held: Decision | None = None
    for plugin in plugins:
        try:
            answer = plugin.check(context)
        except Exception as exc:
            # Any exception: the plugin could not decide, so the request is refused. Only
            # Exception: KeyboardInterrupt/SystemExit still stop the process.
            return _refusal(plugin.name, "plugin_error", f"plugin {plugin.name} raised {exc!r}")
        if not isinstance(answer, Decision):
            return _refusal(
                plugin.name,
                "plugin_no_answer",
                f"plugin {plugin.name} answered {type(answer).__name__}, not a Decision",
            )
        if answer.verdict is Verdict.REFUSE:
            return Decision(Verdict.REFUSE, answer.reason, answer.message, plugin.name)
        if answer.verdict is Verdict.HOLD:
            if not allow_hold:
                return Decision(Verdict.REFUSE, answer.reason, answer.message, plugin.name)
            if held is None:
                held = Decision(Verdict.HOLD, answer.reason, answer.message, plugin.name)
    return held if held is not None else ALLOW
