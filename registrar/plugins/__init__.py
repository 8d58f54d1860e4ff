"""Site admission plugins: loaded from the ``devtrust.site_admission`` entry-point group.

An entry point names a *factory*: ``factory(config: dict) -> plugin``, where the plugin is a
callable ``plugin(context: trustcore.registration.AdmissionContext) -> Decision``. Enabled
plugins are listed, in run order, in ``SITE/plugins.json``::

    {"version": 1, "admission": [{"name": "hold_unlisted", "config": {}}]}

They run after every built-in check (:func:`trustcore.registration.decide_admission`): they
can refuse or hold a device, never admit one the manifest (or the installer) did not. A
listed plugin that is not installed, or rejects its settings, is reported by
:func:`load_site_plugins` (``registrar run`` refuses to start) and, should the service run
anyway, replaced by a placeholder that refuses every registration.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from registrar.errors import ConfigError
from trustcore.errors import InvalidValueError
from trustcore.policy_chain import NamedPlugin, PluginSetting, missing_plugin, plugin_settings
from trustcore.registration import AdmissionContext

__all__ = [
    "CONFIG_FILE",
    "GROUP",
    "LoadedAdmission",
    "installed_plugins",
    "load_site_plugins",
    "read_site_plugins",
]

GROUP = "devtrust.site_admission"
CONFIG_FILE = "plugins.json"


@dataclass(frozen=True)
class LoadedAdmission:
    """Configured plugins in order (placeholders for broken ones) and the problems found."""

    plugins: tuple[NamedPlugin[AdmissionContext], ...]
    problems: tuple[str, ...]


def installed_plugins() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def read_site_plugins(site_path: Path) -> tuple[PluginSetting, ...]:
    """The enabled plugins of a site; no ``plugins.json``: none (built-in admission only)."""
    path = site_path / CONFIG_FILE
    if not path.exists():
        return ()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or set(doc) != {"version", "admission"}:
            raise InvalidValueError('must be {"version": 1, "admission": [...]}')
        if doc["version"] != 1:
            raise InvalidValueError(f"unknown version {doc['version']!r}")
        return plugin_settings(doc["admission"])
    except (OSError, ValueError, InvalidValueError) as exc:
        raise ConfigError(f"{path} is invalid: {exc}") from exc


def load_site_plugins(settings: Sequence[PluginSetting]) -> LoadedAdmission:
    installed = installed_plugins() if settings else {}
    plugins: list[NamedPlugin[AdmissionContext]] = []
    problems: list[str] = []
    for setting in settings:
        ep = installed.get(setting.name)
        if ep is None:
            detail = f"not installed (no entry point {setting.name!r} in group {GROUP})"
            plugins.append(missing_plugin(setting.name, detail))
            problems.append(f"plugin {setting.name}: {detail}")
            continue
        try:
            plugin = ep.load()(setting.config)
            if not callable(plugin):
                raise TypeError(f"{ep.value} made a {type(plugin).__name__}, not a callable")
        except Exception as exc:  # any failure to load or configure: fail closed, say why
            detail = f"cannot be loaded or configured: {exc!r}"
            plugins.append(missing_plugin(setting.name, detail, reason="plugin_error"))
            problems.append(f"plugin {setting.name}: {detail}")
            continue
        plugins.append(NamedPlugin(setting.name, plugin))
    return LoadedAdmission(tuple(plugins), tuple(problems))
