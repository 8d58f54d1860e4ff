"""Which registrar runs a site's duties, when several share one PostgreSQL store.

The site duties (command spool, CRL refresh, HQ-list enforcement, payload-key distribution,
broker blocks and kicks, telemetry) must run on exactly one registrar of a site. With a
PostgreSQL store that registrar holds a session-level advisory lock, keyed by the site id,
on a connection of its own for as long as it runs: another registrar that wants the duties
(a second ``registrar run`` on another machine with its own broker) is refused with a
clear error, or, with ``--standby``, waits and takes over the moment the holder dies
(PostgreSQL ends the dead session and its locks). Instances that only serve requests
(``--join``) never take it.

If the lock's connection is lost (PostgreSQL restarted, network cut), the holder can no
longer know that it is alone: :attr:`SiteDuties.lost` is set and the registrar stops
(fail closed); a supervisor restarts it and it competes again.

With SQLite nothing here runs: the site-home lock (``flock``) already allows one
registrar, on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Self

import psycopg

from registrar.errors import ConfigError

__all__ = ["SITE_DUTIES_LOCK_SPACE", "SiteDuties"]

log = logging.getLogger(__name__)

#: First key of the two-key advisory lock (the second: ``hashtext(site id)``). Distinct from
#: the store's per-device space (7301); PostgreSQL keeps one-key locks apart from these.
SITE_DUTIES_LOCK_SPACE = 7302
_CHECK_INTERVAL = 1.0


class SiteDuties:
    """The held lock; :meth:`acquire` to get one, :meth:`release` to give it back."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], site_id: str) -> None:
        self._conn = conn
        self.site_id = site_id
        #: Set when the lock's connection fails: the duties may run elsewhere now.
        self.lost = asyncio.Event()
        self._watch = asyncio.create_task(self._check(), name="site-duties-lock")

    @classmethod
    async def acquire(
        cls,
        url: str,
        site_id: str,
        *,
        standby: bool = False,
        poll: float = 0.5,
        stop: asyncio.Event | None = None,
    ) -> Self | None:
        """The lock for ``site_id``'s duties. Held elsewhere: ``ConfigError``, or with
        ``standby`` wait (polling every ``poll`` s) until it is free; None if ``stop`` is
        set meanwhile."""
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot reach the store for the site-duties lock: {exc}") from exc
        announced = False
        try:
            while True:
                cur = await conn.execute(
                    "SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                    (SITE_DUTIES_LOCK_SPACE, site_id),
                )
                row = await cur.fetchone()
                if row is not None and row[0]:
                    if announced:
                        log.warning("site %s: taking over the site duties", site_id)
                    return cls(conn, site_id)
                if not standby:
                    raise ConfigError(
                        f"another registrar runs the duties of site {site_id} on this store "
                        "(start this one with --standby to take over when it stops, or "
                        "with --instance N --join HOST:PORT to serve requests beside it)"
                    )
                if not announced:
                    log.warning("site %s: standby, another registrar runs the duties", site_id)
                    announced = True
                if stop is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), poll)
                    if stop.is_set():
                        await conn.close()
                        return None
                else:
                    await asyncio.sleep(poll)
        except psycopg.Error as exc:
            await conn.close()
            raise ConfigError(f"site-duties lock: {exc}") from exc
        except BaseException:
            await conn.close()
            raise

    async def _check(self) -> None:
        while True:
            await asyncio.sleep(_CHECK_INTERVAL)
            try:
                await self._conn.execute("SELECT 1")
            except psycopg.Error as exc:
                log.error("site %s: the site-duties lock is lost (%s)", self.site_id, exc)
                self.lost.set()
                return

    async def release(self) -> None:
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        with contextlib.suppress(psycopg.Error):
            await self._conn.close()  # ends the session: PostgreSQL releases the lock
