"""Errors of the HQ component. Everything :mod:`hq` raises on purpose derives from ``HqError``
(whose base is the shared ``trustcore.errors.ReasonedError``).

The tree names every subclass, wherever it is defined (``tests/project/test_error_trees.py`` checks
it against the code); classes outside this module carry their module in brackets::

    HqError
    ├── HomeError            the HQ directory is missing, damaged or already initialised
    │   └── StoreError       the HQ database cannot be opened or refused a statement
    │       └── StoreConflict    a unique or foreign key constraint refused a write
    ├── SecretError          no passphrase / PIN, a wrong one, or a key that cannot be opened
    ├── EnrolmentError       a station enrolment request was refused (``reason``)
    ├── EntitlementError     an entitlement cannot be issued (unknown station, bad policy)
    ├── ExportRefusedError   an audit export was refused as a whole (``reason`` names the
    │                        attack: gap, fork, reorder, truncation, rewritten_entry,
    │                        forged_checkpoint, wrong_station, foreign_station, replayed, ...)
    ├── QuorumRefused        a gated operation lacks a valid quorum [approvals]
    ├── ReportRefusedError   a site report was refused as a whole [counterfeit]
    ├── RevokeRefusedError   ``hq revoke`` could not do what was asked [counterfeit]
    ├── SiteError            a site enrolment, rollover or bundle was refused [site]
    └── StationCaError       a station CA renewal or re-key request was refused [station_ca]

Library and core errors (``trustcore``, ``signers``, ``sqlite3``, ``psycopg``, ``OSError``)
are chained with ``raise ... from exc`` so the cause stays visible. A *refused* export is
different from an export with *policy violations*: the first is not accepted at all (nothing
is stored), the second is accepted, stored and reported (see ``docs/hq.md``).
"""

from __future__ import annotations

from trustcore.errors import ReasonedError

__all__ = [
    "EnrolmentError",
    "EntitlementError",
    "ExportRefusedError",
    "HomeError",
    "HqError",
    "SecretError",
    "StoreConflict",
    "StoreError",
]


class HqError(ReasonedError):
    """Root of every error :mod:`hq` raises. ``reason`` is a short stable code."""


class HomeError(HqError):
    reason = "bad_home"


class StoreError(HomeError):
    """The HQ database (SQLite file or PostgreSQL server) failed; nothing was half-written."""

    reason = "store_error"


class StoreConflict(StoreError):
    reason = "store_conflict"


class SecretError(HqError):
    reason = "secret_unavailable"


class EnrolmentError(HqError):
    reason = "enrolment_refused"


class EntitlementError(HqError):
    reason = "entitlement_refused"


class ExportRefusedError(HqError):
    """The export is not accepted; ``reason`` names the defect and nothing was stored."""

    reason = "refused"
