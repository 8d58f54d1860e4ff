"""Rows of a bulk import of registrations (:meth:`registrar.store.Store.import_registrations`):
per registration the rows a live registration writes, laid out per table for the backend's
bulk load (COPY on PostgreSQL, ``executemany`` on SQLite), in bounded chunks. Pure: no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from registrar.store.records import FactorySighting, Registration

__all__ = ["IMPORTED_TABLES", "chunks", "registration_tables", "sighting_tables"]

T = TypeVar("T")

#: The tables a bulk import grows (planner statistics are refreshed after it).
IMPORTED_TABLES = (
    "devices",
    "certificates",
    "certified_keys",
    "requests",
    "nonces",
    "events",
    "factory_certs",
)


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part


def registration_tables(
    part: Sequence[Registration],
) -> list[tuple[str, Sequence[str], list[tuple[Any, ...]]]]:
    """The rows :func:`statements.statements_of` would write for each registration."""
    return [
        (
            "devices",
            (
                "device_id",
                "station_id",
                "idevid_serial",
                "ldevid_serial",
                "ldevid_der",
                "ldevid_key_id",
                "wrap_key",
                "payload_key_id",
                "registered_at",
            ),
            [
                (
                    r.device_id.value,
                    None if r.station_id is None else r.station_id.value,
                    r.idevid_serial.hex,
                    r.ldevid_serial.hex,
                    r.ldevid_der,
                    r.ldevid_key_id,
                    r.wrap_key_der,
                    r.payload_key_id,
                    r.at,
                )
                for r in part
            ],
        ),
        (
            "certificates",
            ("serial", "device_id", "kind", "issued_at", "not_after"),
            [
                (r.ldevid_serial.hex, r.device_id.value, r.kind, r.at, r.ldevid_not_after)
                for r in part
            ],
        ),
        (
            "certified_keys",
            ("key_id", "device_id"),
            [(r.ldevid_key_id, r.device_id.value) for r in part],
        ),
        (
            "requests",
            ("digest", "device_id", "response", "created"),
            [(r.request_digest, r.device_id.value, r.response, r.at) for r in part],
        ),
        (
            "nonces",
            ("nonce", "device_id", "time"),
            [(r.nonce, r.device_id.value, r.request_time) for r in part],
        ),
        (
            "events",
            ("time", "device_id", "kind", "detail"),
            [
                (
                    r.at,
                    r.device_id.value,
                    "renewed" if r.kind == "renewal" else "registered",
                    f"ldevid {r.ldevid_serial} idevid {r.idevid_serial}",
                )
                for r in part
            ],
        ),
    ]


def sighting_tables(
    seen: Sequence[FactorySighting],
) -> list[tuple[str, Sequence[str], list[tuple[Any, ...]]]]:
    """The ``factory_certs`` rows of factory-certificate sightings."""
    return [
        (
            "factory_certs",
            ("station_id", "serial", "device_id", "der", "first_seen"),
            [
                (f.station_id.value, f.serial.hex, f.device_id.value, f.der, f.first_seen)
                for f in seen
            ],
        )
    ]
