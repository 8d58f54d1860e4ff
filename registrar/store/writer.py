"""The registrar store's single writer: group commit, one-by-one retry of a failed batch,
writes that return rows, bulk loads, and the bounded pruning of replay records.

Owns the one writer connection's turn-taking (:attr:`GroupCommitWriter.exclusive`) and the
queue of pending writes; :class:`registrar.store.base.Store` turns its API calls into
queued items (see the package docstring, "Group commit") and never touches the backend's
writer connection itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from registrar.errors import StoreConflict, StoreError
from registrar.store import statements as q
from registrar.store.backend import Backend
from registrar.store.records import Change, Registration, Statements
from trustcore.registration import FRESHNESS_SECONDS

__all__ = ["PRUNE_BATCH", "REPLAY_RETENTION", "GroupCommitWriter"]

log = logging.getLogger(__name__)

#: Replay records (nonces, stored responses) older than the newest one by more than this are
#: pruned. Safe: a request is accepted only within ``FRESHNESS_SECONDS`` of the registrar's
#: clock, so the newest request time is at most that far ahead of the clock, and a request
#: older than the clock by more than that is refused as stale before its nonce is looked at.
REPLAY_RETENTION = 2 * FRESHNESS_SECONDS + 60
_PRUNE_EVERY = 60.0
PRUNE_BATCH = 2_000

#: A bulk load: (table, columns, rows) in order, one transaction.
BulkTables = Sequence[tuple[str, Sequence[str], list[tuple[Any, ...]]]]


@dataclass(slots=True)
class _Write:
    item: q.Item
    future: asyncio.Future[None] | None
    changes: tuple[Change, ...] = ()


@dataclass(slots=True)
class _Call:
    """A write that returns rows, run alone in its own transaction by the writer task."""

    sql: str
    params: tuple[Any, ...]
    future: asyncio.Future[list[tuple[Any, ...]]]


class GroupCommitWriter:
    """One writer task over ``backend``: every write queued within ``batch_window`` seconds
    (or up to ``max_batch``) commits in one transaction. ``deliver`` receives each committed
    change when the backend's feed is local (SQLite); ``what`` names the database in
    errors (no secret)."""

    def __init__(
        self,
        backend: Backend,
        *,
        batch_window: float,
        max_batch: int,
        instance: str,
        what: str,
        deliver: Callable[[Change], None],
    ) -> None:
        self._backend = backend
        self._window = batch_window
        self.max_batch = max_batch
        self._instance = instance
        self._what = what
        self._deliver = deliver
        self._queue: asyncio.Queue[_Write | _Call | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        #: The writer connection is one: the writer task and bulk loads take turns.
        self.exclusive = asyncio.Lock()
        #: Writes in the last group commit (1: no load, no batch window).
        self._last_batch = 0
        #: Replay-record pruning by the writer (monotonic time of the last pass).
        self._last_prune = -_PRUNE_EVERY
        self._prune_backlog = False
        #: Transactions committed and writes they carried (group-commit effectiveness).
        self.commits = 0
        self.writes = 0

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registrar-store-writer")

    async def stop(self) -> None:
        """Commit what is queued, then end the writer task."""
        if self._task is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def backlog(self) -> int:
        """Writes queued and not yet taken by the writer task."""
        return self._queue.qsize()

    def _require_running(self) -> None:
        if not self.running:
            raise StoreError("registrar database is closed")

    # -- queueing ----------------------------------------------------------------------------

    def submit(
        self, item: q.Item, wait: bool, changes: tuple[Change, ...] = ()
    ) -> asyncio.Future[None] | None:
        """Queue ``item``; with ``wait`` a future that resolves once it has committed."""
        self._require_running()
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.put_nowait(_Write(item, future, changes or q.changes_of(item, self._instance)))
        return future

    async def write(self, item: q.Item, changes: tuple[Change, ...] = ()) -> None:
        """Queue ``item`` and return once it has committed."""
        future = self.submit(item, True, changes)
        assert future is not None
        await future

    async def call(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """One statement that writes and returns rows, alone in its own transaction."""
        self._require_running()
        future: asyncio.Future[list[tuple[Any, ...]]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Call(sql, params, future))
        return await future

    async def bulk(self, tables: BulkTables) -> None:
        """One bulk load (between group commits: the writer connection is one)."""
        self._require_running()
        async with self.exclusive:
            try:
                await self._backend.bulk_load(tables)
            except self._backend.errors as exc:
                if self._backend.is_conflict(exc):
                    raise StoreConflict(f"registrar database refused a duplicate: {exc}") from exc
                raise StoreError(f"registrar database bulk load failed: {exc}") from exc

    async def after_bulk_load(self, tables: Sequence[str]) -> None:
        async with self.exclusive:
            try:
                await self._backend.after_bulk_load(tables)
            except self._backend.errors as exc:
                raise StoreError(f"registrar database bulk load failed: {exc}") from exc

    # -- the writer task ---------------------------------------------------------------------

    async def _run(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            if isinstance(first, _Call):
                await self._run_call(first)
                continue
            batch = [first]
            # Wait for companions only under load (the last batch had several writes): a
            # lone write after a quiet spell commits at once. A wave's first write goes
            # alone, and the writes that queue during its commit form the next batch.
            if self._window > 0 and self._last_batch > 1:
                await asyncio.sleep(self._window)
            held: _Call | None = None
            while len(batch) < self.max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                if isinstance(nxt, _Call):
                    held = nxt
                    break
                batch.append(nxt)
            self._last_batch = len(batch)
            await self._commit_batch(batch)
            await self._prune_step()
            if held is not None:
                await self._run_call(held)

    async def _run_call(self, call: _Call) -> None:
        try:
            async with self.exclusive:
                rows = await self._backend.call(call.sql, call.params)
        except self._backend.errors as exc:
            if not call.future.done():
                call.future.set_exception(StoreError(f"{self._what}: write failed: {exc}"))
        else:
            if not call.future.done():
                call.future.set_result(rows)

    async def _prune_step(self) -> None:
        """After a commit: one bounded batch of replay-record pruning when due."""
        now = time.monotonic()
        if not self._prune_backlog and now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        try:
            async with self.exclusive:
                rows = await self._backend.call(
                    q.PRUNE_EXPIRED_NONCES, (REPLAY_RETENTION, PRUNE_BATCH)
                )
                more = await self._backend.call(
                    q.PRUNE_EXPIRED_REQUESTS, (REPLAY_RETENTION, PRUNE_BATCH)
                )
        except self._backend.errors as exc:
            log.warning("pruning expired nonces failed (next time again): %s", exc)
            return
        self._prune_backlog = max(len(rows), len(more)) >= PRUNE_BATCH
        if rows or more:
            log.debug("pruned %d expired nonces and %d stored responses", len(rows), len(more))

    async def _commit_batch(self, batch: Sequence[_Write]) -> None:
        try:
            await self._apply(batch)
        except self._backend.errors as exc:
            if len(batch) == 1 or isinstance(exc, self._backend.unavailable):
                # one write, or the database is unreachable: nothing to gain one by one
                self._finish(batch, exc)
                return
            log.warning(
                "group commit of %d writes failed (%s); retrying one by one", len(batch), exc
            )
            for write in batch:
                try:
                    await self._apply([write])
                except self._backend.errors as one:
                    self._finish([write], one)
                else:
                    self._finish([write], None)
            return
        self._finish(batch, None)

    async def _apply(self, batch: Sequence[_Write]) -> None:
        # Statements are grouped by SQL text so a batch of N registrations costs a handful of
        # executemany calls, not 8N round trips. Grouping reorders statements across items,
        # which is safe only while items are independent: a second registration of the
        # same device, or an ad-hoc update, starts a new group (same transaction).
        groups: list[dict[str, list[tuple[Any, ...]]]] = [{}]
        devices: set[str] = set()
        registered: list[str] = []
        changes: list[Change] = []
        for write in batch:
            item = write.item
            if isinstance(item, tuple | Statements) or (
                isinstance(item, Registration) and item.device_id.value in devices
            ):
                groups.append({})
                devices.clear()
            if isinstance(item, Registration):
                devices.add(item.device_id.value)
                registered.append(item.device_id.value)
            for sql, params in q.statements_of(item):
                groups[-1].setdefault(sql, []).append(params)
            if isinstance(item, tuple | Statements):
                groups.append({})
            changes.extend(write.changes)
        async with self.exclusive:
            await self._backend.transaction(
                [g for g in groups if g], devices=registered, changes=changes
            )
        self.commits += 1
        self.writes += len(batch)
        if self._backend.local_feed:
            for change in changes:
                self._deliver(change)

    def _finish(self, batch: Sequence[_Write], exc: BaseException | None) -> None:
        dropped = sum(1 for write in batch if write.future is None)
        if exc is not None and dropped:
            log.warning("dropped %d queued event(s): %s", dropped, exc)
        for write in batch:
            fut = write.future
            if fut is None:
                continue
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            elif self._backend.is_conflict(exc):
                fut.set_exception(
                    StoreConflict(f"registrar database refused a duplicate write: {exc}")
                )
            else:
                fut.set_exception(StoreError(f"{self._what}: write failed: {exc}"))
