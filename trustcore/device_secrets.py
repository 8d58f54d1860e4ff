"""Which product secrets one device may receive, decided without I/O.

The entitlement carries product secrets (``EntitlementPayload.product_secrets``) and, in its
signed policy, one :class:`~trustcore.entitlement.SecretRule` per secret: the products and
device numbers that get it, and the time after which nobody does. The station asks
:func:`check_secret_use` before it builds a device's import blob (``signers.tpm_import``)
and writes a ``secret_provisioned`` audit record for each secret it hands out; HQ replays
the same function over those records (``trustcore.reconcile``), so a station that gave a
secret outside the rule is flagged even if it skipped the check.

Refusal reasons (``PolicyError.reason``):

``secret_unknown``
    the policy has no rule for that name (a secret without a rule is never provisioned)
``secret_wrong_product``
    the device's product is not one the rule names
``secret_device_out_of_range``
    the device id is not one of the rule's device numbers
``secret_expired``
    the rule's ``not_after`` has passed (or the entitlement's window has not begun)
"""

from __future__ import annotations

from collections.abc import Sequence

from trustcore.entitlement import EntitlementPolicy, SecretRule
from trustcore.errors import PolicyError

__all__ = [
    "MAX_SECRET_BYTES",
    "MIN_SECRET_BYTES",
    "SECRET_REASONS",
    "check_secret_use",
    "secrets_for_device",
]

#: A product secret becomes the key of an HMAC-SHA256 object in the device TPM. Keys longer
#: than SHA-256's 64-byte block would be hashed first by HMAC itself (and a TPM keyed-hash
#: object takes at most 128 bytes), so 64 bytes is the useful maximum; 16 the sane minimum.
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 64

SECRET_REASONS = frozenset(
    {"secret_unknown", "secret_wrong_product", "secret_device_out_of_range", "secret_expired"}
)


def check_secret_use(
    policy: EntitlementPolicy, name: str, device_id: str, product: str, now: int
) -> SecretRule:
    """The rule that lets ``device_id`` (of ``product``) receive secret ``name`` at ``now``;
    raises :class:`PolicyError` with one of :data:`SECRET_REASONS` otherwise."""
    rule = policy.secret_rule(name)
    if rule is None:
        raise PolicyError(
            f"the entitlement has no rule for secret {name!r}", reason="secret_unknown"
        )
    if product not in rule.products:
        raise PolicyError(
            f"secret {name!r} is for {', '.join(rule.products)}, not {product!r}",
            reason="secret_wrong_product",
        )
    if not rule.covers(policy.id_rule, device_id):
        raise PolicyError(
            f"secret {name!r} is for device numbers {rule.first}..{rule.last}, not {device_id}",
            reason="secret_device_out_of_range",
        )
    if not policy.not_before <= now < rule.not_after:
        raise PolicyError(
            f"secret {name!r} may be provisioned only in [{policy.not_before}, "
            f"{rule.not_after}), not at {now}",
            reason="secret_expired",
        )
    return rule


def secrets_for_device(
    policy: EntitlementPolicy,
    device_id: str,
    product: str,
    now: int,
    names: Sequence[str] | None = None,
) -> tuple[SecretRule, ...]:
    """The rules of the secrets ``device_id`` receives now.

    ``names=None``: every secret whose rule covers this device now (the others are simply not
    for it). An explicit list: exactly those, each checked, and the first one outside its rule
    refuses the whole request (:func:`check_secret_use`), so an operator asking for a secret
    the policy does not give learns why instead of getting less than asked.
    """
    if names is None:
        chosen = []
        for rule in policy.secrets:
            try:
                chosen.append(check_secret_use(policy, rule.name, device_id, product, now))
            except PolicyError:
                continue
        return tuple(chosen)
    if len(set(names)) != len(names):
        raise PolicyError("a secret is named twice", reason="secret_unknown")
    return tuple(check_secret_use(policy, n, device_id, product, now) for n in names)
