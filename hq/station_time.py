"""``hq time-statement``: HQ vouches for the current time to one enrolled station.

A station believes its host clock only up to the time HQ last vouched for plus the time its
TPM has been powered since (``trustcore.stationtime``). A station that was switched off for
longer than its entitlement's clock tolerance, or that needs a new date (a simulated decade
under libfaketime), gets a time statement: HQ's current time, signed by the entitlement
signer, bound to the station id. It is not secret, so it is signed but not encrypted.
"""

from __future__ import annotations

from datetime import datetime

from hq.errors import EntitlementError
from hq.home import HqHome, HqSecrets
from hq.store import HqStore
from trustcore.messages import CT_TIME_STATEMENT, TimeStatement
from trustcore.profiles import HqRole
from trustcore.sealed import seal_package
from trustcore.utctime import now_utc

__all__ = ["issue_time_statement"]


def issue_time_statement(
    home: HqHome, station_id: str, secrets: HqSecrets, *, now: datetime | None = None
) -> tuple[bytes, int]:
    """A sealed time statement for ``station_id`` at HQ's time now; returns it and the time.
    Recorded in HQ's database before it is returned: ``hq ingest-audit`` checks a station's
    ``time_anchored`` records against the statements HQ issued."""
    moment = int(now_utc(now).timestamp())
    store = HqStore.open(home.store_location)
    try:
        if store.station(station_id) is None:
            raise EntitlementError(
                f"station {station_id!r} is not enrolled", reason="unknown_station"
            )
        package = seal_package(
            content_type=CT_TIME_STATEMENT,
            payload=TimeStatement(station_id, moment).encode(),
            sender=home.role_key(HqRole.ENTITLEMENT_SIGNER, secrets),
            sender_cert=home.role_certificate(HqRole.ENTITLEMENT_SIGNER),
            receiver_public=None,
            sequence=moment,
            created=moment,
        )
        with store.transaction():
            store.record_time_statement(station_id, moment)
    finally:
        store.close()
    return package, moment
