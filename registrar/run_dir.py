"""The site's run directory (``SITE/run``): where a running registrar and the offline
CLI commands meet.

Owns the paths under it (the store file of a SQLite site, ``status.json``, the command
spool), the single-instance lock ``SITE/run/registrar.lock`` (``flock``: exactly one
registrar, or one offline command, writes the site at a time), reading the running
registrar's status document, and the one atomic 0600 JSON writer the run files use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from registrar.errors import RegistrarError
from registrar.site import SiteHome
from registrar.store import StoreLocation, parse_store_location
from signers.errors import SignerError
from signers.private_files import write_private_file

__all__ = [
    "instance_lock",
    "read_status",
    "registrar_running",
    "run_dir",
    "spool_dir",
    "status_path",
    "store_location",
    "store_path",
    "write_json",
]


def store_path(home: SiteHome) -> Path:
    """The registrar database (devices, requests, nonces, events)."""
    return home.path / "registrar.db"


def store_location(home: SiteHome, store: str | None = None) -> StoreLocation:
    """``--store URL`` (``postgresql://…``, ``sqlite:///path`` or a path), or the site
    home's SQLite file when None."""
    return parse_store_location(store) if store else parse_store_location(store_path(home))


def run_dir(home: SiteHome) -> Path:
    path = home.path / "run"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def status_path(home: SiteHome) -> Path:
    return home.path / "run" / "status.json"


def spool_dir(home: SiteHome) -> Path:
    path = run_dir(home) / "commands"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


@contextlib.contextmanager
def instance_lock(home: SiteHome, *, wait: float = 0.0) -> Iterator[bool]:
    """Try to take ``SITE/run/registrar.lock``; yield True if this process now holds it
    (no registrar runs: the caller may work offline), False if a running registrar (or
    another offline command, for longer than ``wait`` seconds) holds it."""
    fd = os.open(run_dir(home) / "registrar.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held = False
                    break
                time.sleep(0.05)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def registrar_running(home: SiteHome) -> bool:
    with instance_lock(home) as free:
        return not free


def read_status(home: SiteHome) -> dict[str, Any] | None:
    """The running registrar's status document, or None when none runs."""
    if not registrar_running(home):
        return None
    try:
        data = json.loads(status_path(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any], *, sync: bool = True) -> None:
    """Atomically (a reader polls these files), 0600; ``sync=False`` for status snapshots."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        write_private_file(path, text.encode(), overwrite=True, sync=sync)
    except SignerError as exc:
        raise RegistrarError(exc.message, reason="io_error") from exc
