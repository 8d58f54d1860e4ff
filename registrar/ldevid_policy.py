"""The site's LDevID life-cycle settings: ``SITE/ldevid.json`` (``registrar ldevid-policy``).

::

    {"version": 2, "validity_days": 365, "renew_from": 0.6667, "min_interval_seconds": 3600,
     "handover_seconds": 10, "supersede_window_seconds": 60, "expired_reregistration": "allow"}

Every key is required and no other is allowed (strict, like ``site.json``); no file means
the defaults of :class:`trustcore.renewal.LdevidPolicy`. A version 1 file (written before
``supersede_window_seconds`` existed: the same keys without it) is still read, with that
key's default; writing always gives version 2. ``registrar run`` reads it at start
(a change needs a restart). What each value means: :class:`~trustcore.renewal.LdevidPolicy`.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

from registrar.errors import ConfigError
from signers.private_files import write_private_file
from trustcore.errors import InvalidValueError
from trustcore.renewal import LdevidPolicy

__all__ = ["POLICY_FILE", "policy_json", "read_ldevid_policy", "write_ldevid_policy"]

POLICY_FILE = "ldevid.json"
_KEYS_V1 = {
    "version",
    "validity_days",
    "renew_from",
    "min_interval_seconds",
    "handover_seconds",
    "expired_reregistration",
}
_KEYS = {*_KEYS_V1, "supersede_window_seconds"}


def policy_json(policy: LdevidPolicy) -> dict[str, Any]:
    return {
        "version": 2,
        "validity_days": policy.validity / timedelta(days=1),
        "renew_from": policy.renew_from,
        "min_interval_seconds": policy.min_interval.total_seconds(),
        "handover_seconds": policy.handover_seconds,
        "supersede_window_seconds": policy.supersede_window_seconds,
        "expired_reregistration": policy.expired_reregistration,
    }


def _number(doc: dict[str, Any], key: str) -> float:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidValueError(f"{key} must be a number")
    return float(value)


def read_ldevid_policy(site_path: Path) -> LdevidPolicy:
    path = site_path / POLICY_FILE
    if not path.exists():
        return LdevidPolicy()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or "version" not in doc:
            raise InvalidValueError(f"keys must be exactly {sorted(_KEYS)}")
        version = doc["version"]
        expected = {1: _KEYS_V1, 2: _KEYS}.get(version) if type(version) is int else None
        if expected is None:
            raise InvalidValueError(f"unknown version {version!r}")
        if set(doc) != expected:
            raise InvalidValueError(f"keys must be exactly {sorted(expected)}")
        window = LdevidPolicy().supersede_window_seconds
        if version == 2:
            window = _number(doc, "supersede_window_seconds")
        return LdevidPolicy(
            validity=timedelta(days=_number(doc, "validity_days")),
            renew_from=_number(doc, "renew_from"),
            min_interval=timedelta(seconds=_number(doc, "min_interval_seconds")),
            handover_seconds=_number(doc, "handover_seconds"),
            supersede_window_seconds=window,
            expired_reregistration=doc["expired_reregistration"],
        )
    except (OSError, ValueError, InvalidValueError) as exc:
        raise ConfigError(f"{path} is invalid: {exc}") from exc


def write_ldevid_policy(site_path: Path, policy: LdevidPolicy) -> Path:
    path = site_path / POLICY_FILE
    text = json.dumps(policy_json(policy), indent=2, sort_keys=True) + "\n"
    write_private_file(path, text.encode("utf-8"), overwrite=True)
    return path
