"""The command spool (``SITE/run/commands``): how the CLI talks to a running registrar.

Owns both ends of it: :func:`submit_command` (the CLI writes a request, waits for the
result file) and :func:`apply_request` (the registrar's watcher reads one request, runs
it through :class:`SpoolOperations`, answers with a result file and removes the request,
whatever happened); the bounded, no-symlink read of spool files; and the JSON shapes of
the results (:func:`revoke_json`, :func:`import_json`), which the offline commands print
too.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as _random
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from registrar.errors import RegistrarError
from registrar.revocation import ImportResult, RevokeResult
from registrar.run_dir import spool_dir, write_json
from registrar.site import SiteHome
from trustcore.errors import InvalidValueError
from trustcore.identity import DeviceId

__all__ = [
    "BESIDE_LONG",
    "LONG_COMMANDS",
    "MAX_SPOOL_FILE",
    "SPOOL_COMMANDS",
    "RotationResult",
    "SpoolOperations",
    "apply_request",
    "import_json",
    "read_spool_file",
    "request_command",
    "revoke_json",
    "submit_command",
]

log = logging.getLogger(__name__)

SPOOL_COMMANDS = (
    "revoke",
    "import-revocations",
    "rotate-payload-key",
    "send-command",
    "approve",
    "migrate-ca",
    "retire-ca",
)


#: Commands that may run for seconds (a signed message to every device): ``registrar run``
#: applies one in the background and goes on with the next requests, as long as they are
#: in :data:`BESIDE_LONG` (a revocation is not held up by a payload-key push to 10,000
#: devices). Anything else (a second long command, ``retire-ca``) waits for it, together
#: with every request behind it: requests are otherwise applied in the order they came.
LONG_COMMANDS = frozenset({"rotate-payload-key", "migrate-ca"})
BESIDE_LONG = frozenset({"revoke", "import-revocations", "approve", "send-command"})


@dataclass(frozen=True)
class RotationResult:
    key_id: str
    updates_published: int


class SpoolOperations(Protocol):
    """What a running registrar applies from the spool (``registrar.app.RegistrarApp``)."""

    async def approve(self, device_id: DeviceId) -> bool: ...

    async def revoke(self, device_id: DeviceId, reason: str = "unspecified") -> RevokeResult: ...

    async def import_revocations(self, package: bytes) -> ImportResult: ...

    async def rotate_payload_key(self) -> RotationResult: ...

    async def migrate_ca(self) -> int: ...

    async def retire_ca(self, *, now: datetime | None = None) -> dict[str, Any]: ...

    async def send_command(self, device_id: DeviceId, data: bytes) -> str: ...


def submit_command(
    home: SiteHome,
    command: str,
    args: dict[str, Any],
    *,
    data: bytes | None = None,
    timeout: float = 10.0,
) -> dict[str, Any] | None:
    """Hand ``command`` to the running registrar and wait for its answer (the result
    document: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error", "reason"}``).
    None if no answer came within ``timeout`` (the request stays queued: a registrar
    applies pending requests when it starts)."""
    if command not in SPOOL_COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    spool = spool_dir(home)
    ident = f"{time.time_ns():020d}-{_random.token_hex(4)}"
    if data is not None:
        data_path = spool / f"{ident}.data"
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        args = {**args, "data": data_path.name}
    write_json(spool / f"{ident}.request.json", {"v": 1, "command": command, "args": args})
    result_path = spool / f"{ident}.result.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text(encoding="utf-8"))
            except ValueError:
                time.sleep(0.02)  # being written (renamed into place, so rare)
                continue
            result_path.unlink(missing_ok=True)
            return result if isinstance(result, dict) else None
        time.sleep(0.05)
    return None


#: Largest spool file read (a revocation list or a command payload is far smaller).
MAX_SPOOL_FILE = 16 * 1024 * 1024


def read_spool_file(path: Path) -> bytes:
    """Read a spool file that this user wrote: never through a symlink (which could make
    the registrar read, and send-command send, any file it can read), only a regular file
    owned by the registrar's own user, and bounded. Raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise PermissionError(f"{path.name} is not a regular file of this user")
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            data = handle.read(MAX_SPOOL_FILE + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_SPOOL_FILE:
        raise OSError(f"{path.name} is larger than {MAX_SPOOL_FILE} bytes")
    return data


def request_command(request: Path) -> str | None:
    """The command a spool request names; None if it cannot be read as one
    (:func:`apply_request` answers such a request with the reason)."""
    try:
        command = json.loads(read_spool_file(request).decode("utf-8"))["command"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError):
        return None
    return command if isinstance(command, str) else None


async def apply_request(request: Path, ops: SpoolOperations) -> None:
    """Run one spool request and answer it (``<id>.result.json``); the request and its
    data file are removed whatever happened."""
    ident = request.name.removesuffix(".request.json")
    result_path = request.with_name(f"{ident}.result.json")
    data_path: Path | None = None
    try:
        doc = json.loads(read_spool_file(request).decode("utf-8"))
        command, args = doc["command"], doc["args"]
        if "data" in args:
            data_path = request.with_name(Path(str(args["data"])).name)
        result = await _dispatch(ops, command, args, data_path)
        answer: dict[str, Any] = {"ok": True, "result": result}
    except (RegistrarError, InvalidValueError) as exc:
        answer = {"ok": False, "error": str(exc.args[0]), "reason": exc.reason}
    except (ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
        answer = {"ok": False, "error": f"bad request: {exc!r}", "reason": "bad_request"}
    except Exception as exc:
        # Whatever else goes wrong, the request is answered and removed: a request left
        # in the spool would fail first on every tick and block every later command
        # (revocations included), even across restarts.
        log.exception("spool request %s failed", request.name)
        answer = {"ok": False, "error": f"failed: {exc!r}", "reason": "internal_error"}
    write_json(result_path, answer)
    request.unlink(missing_ok=True)
    if data_path is not None:
        data_path.unlink(missing_ok=True)


async def _dispatch(
    ops: SpoolOperations, command: str, args: dict[str, Any], data: Path | None
) -> Any:
    if command == "approve":
        device = DeviceId(args["device_id"])
        pending = await ops.approve(device)
        return {"device_id": device.value, "was_pending": pending}
    if command == "revoke":
        result = await ops.revoke(DeviceId(args["device_id"]), args.get("reason", "unspecified"))
        return revoke_json(result)
    if command == "import-revocations":
        if data is None:
            raise ValueError("no list")
        imported = await ops.import_revocations(read_spool_file(data))
        return import_json(imported)
    if command == "rotate-payload-key":
        rotation = await ops.rotate_payload_key()
        return {"key_id": rotation.key_id, "updates_published": rotation.updates_published}
    if command == "migrate-ca":
        return {"published": await ops.migrate_ca()}
    if command == "retire-ca":
        return await ops.retire_ca()
    if command == "send-command":
        if data is None:
            raise ValueError("no command payload")
        topic = await ops.send_command(DeviceId(args["device_id"]), read_spool_file(data))
        return {"topic": topic}
    raise ValueError(f"unknown command {command!r}")


def revoke_json(result: RevokeResult) -> dict[str, Any]:
    return {
        "device_id": result.device_id,
        "reason": result.reason,
        "serials": list(result.serials),
        "crl_number": result.crl_number,
        "already_revoked": result.already_revoked,
        "sessions_cut": result.sessions_cut,
    }


def import_json(result: ImportResult) -> dict[str, Any]:
    return {
        "sequence": result.sequence,
        "previous": result.previous,
        "status": result.status,
        "entries": result.entries,
        "revoked": [revoke_json(r) for r in result.revoked],
    }
