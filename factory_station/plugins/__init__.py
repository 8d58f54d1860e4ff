"""Station issuance plugins: loaded from the ``devtrust.station_checks`` entry-point group.

An entry point names a *factory*: ``factory(config: dict) -> plugin``, where the plugin is a
callable ``plugin(policy, state, request) -> trustcore.policy_chain.Decision`` — it sees the
same facts as the built-in checks in :mod:`trustcore.issuance`. The configured plugins run
as ONE extra check after :data:`~trustcore.issuance.DEFAULT_CHECKS` (they can add refusals,
never remove a built-in check), composed by :func:`trustcore.policy_chain.run_chain` with
holds disallowed (a provisioning cannot wait for a person). A configured plugin that is
not installed, or whose factory rejects its settings, becomes a placeholder that refuses every
issuance; :func:`load_station_plugins` also reports it so the operator sees it at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import PolicyError
from trustcore.issuance import DEFAULT_CHECKS, Check, IssuanceRequest, IssuanceState
from trustcore.policy_chain import (
    Decision,
    NamedPlugin,
    PluginSetting,
    Verdict,
    missing_plugin,
    run_chain,
)

__all__ = [
    "GROUP",
    "LoadedPlugins",
    "StationPlugin",
    "installed_plugins",
    "issuance_checks",
    "load_station_plugins",
]

GROUP = "devtrust.station_checks"

StationPlugin = Callable[[EntitlementPolicy, IssuanceState, IssuanceRequest], Decision]
_Context = tuple[EntitlementPolicy, IssuanceState, IssuanceRequest]


@dataclass(frozen=True)
class LoadedPlugins:
    """The configured plugins, in order, and what went wrong loading them (empty: all
    loaded). ``checks`` is what the station runs: the built-in checks, then the chain."""

    plugins: tuple[NamedPlugin[_Context], ...]
    problems: tuple[str, ...]
    checks: tuple[Check, ...]


def installed_plugins() -> dict[str, EntryPoint]:
    """Plugins installed in this Python environment, by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _bind(name: str, plugin: Callable[..., object]) -> NamedPlugin[_Context]:
    def check(context: _Context) -> object:
        return plugin(*context)

    return NamedPlugin(name, check)


def _load_one(setting: PluginSetting, installed: dict[str, EntryPoint]) -> tuple[Any, str]:
    ep = installed.get(setting.name)
    if ep is None:
        detail = f"not installed (no entry point {setting.name!r} in group {GROUP})"
        return missing_plugin(setting.name, detail), f"plugin {setting.name}: {detail}"
    try:
        factory = ep.load()
        plugin = factory(setting.config)
        if not callable(plugin):
            raise TypeError(f"{ep.value} made a {type(plugin).__name__}, not a callable")
    except Exception as exc:  # any failure to load or configure: fail closed, say why
        detail = f"cannot be loaded or configured: {exc!r}"
        return (
            missing_plugin(setting.name, detail, reason="plugin_error"),
            f"plugin {setting.name}: {detail}",
        )
    return _bind(setting.name, plugin), ""


def issuance_checks(plugins: Sequence[NamedPlugin[_Context]]) -> tuple[Check, ...]:
    """Built-in checks first (always), then one check running the plugin chain."""
    if not plugins:
        return DEFAULT_CHECKS
    chain = tuple(plugins)

    def check_plugins(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
        decision = run_chain(chain, (p, s, r), allow_hold=False)
        if decision.verdict is not Verdict.ALLOW:
            raise PolicyError(
                f"plugin {decision.plugin or '(none)'} refused: "
                f"{decision.message or decision.reason}",
                reason=decision.reason,
            )

    return (*DEFAULT_CHECKS, check_plugins)


def load_station_plugins(settings: Sequence[PluginSetting]) -> LoadedPlugins:
    """Load the configured plugins in order (see the module docstring)."""
    installed = installed_plugins() if settings else {}
    plugins: list[NamedPlugin[_Context]] = []
    problems: list[str] = []
    for setting in settings:
        plugin, problem = _load_one(setting, installed)
        plugins.append(plugin)
        if problem:
            problems.append(problem)
    return LoadedPlugins(tuple(plugins), tuple(problems), issuance_checks(plugins))
