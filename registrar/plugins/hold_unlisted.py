"""Site plugin: hold devices absent from the manifest for an installer's approval.

Without it, a device the manifest does not list is refused (``not_in_manifest``: stop).
With it, such a device — one that passed every other check, so it is a genuine device of a
trusted station — is answered ``held_for_approval`` (retry later) and the registrar records
a pending approval (``registrar pending``). Once the installer runs ``registrar approve
<device>``, the device's next retry registers. Why hold rather than admit: the manifest is
the site's decision, and an unlisted device appearing in the building is exactly what a
person should look at (a misplaced delivery, or a device that should not be here).

Settings: ``{}`` (none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trustcore.policy_chain import ALLOW, Decision, hold
from trustcore.registration import AdmissionContext

__all__ = ["HoldUnlisted"]


class HoldUnlisted:
    """The plugin factory (entry point ``hold_unlisted``) and, instantiated, the check."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        if config:
            raise ValueError(f"hold_unlisted takes no settings, got {sorted(config)}")

    def __call__(self, context: AdmissionContext) -> Decision:
        if context.admitted:
            return ALLOW
        return hold(
            "held_for_approval",
            f"{context.device_id} (station {context.station_id}) is not in the manifest: "
            f"approve with `registrar approve {context.device_id}`",
        )
