"""What every ``registrar`` command shares: the options (``--home``, ``--passphrase-file``,
``--store``, ``--payload-key-grace``), the exit codes and the one-line failure and refusal
messages, parsing a device id argument, opening the site home, reading the store for a
report, and the rule of the commands that act live or offline (:func:`live_or_offline`:
through the running registrar's spool when one runs, else offline under the site lock).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from registrar.errors import RegistrarError

if TYPE_CHECKING:
    from registrar.site import SiteHome
    from trustcore.identity import DeviceId

__all__ = [
    "EXIT_ERROR",
    "EXIT_REFUSED",
    "duration",
    "fail",
    "grace_option",
    "home_option",
    "live_or_offline",
    "open_site",
    "parse_device_id",
    "passphrase_option",
    "refused",
    "run_offline",
    "store_option",
    "store_snapshot",
    "when",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: 0 done, 1 could not run (home, passphrase, I/O), 2 bundle refused.
EXIT_ERROR = 1
EXIT_REFUSED = 2


def home_option(f: F) -> F:
    return click.option(
        "--home",
        "home",
        required=True,
        type=click.Path(path_type=Path, file_okay=False),
        help="Site directory.",
    )(f)


def passphrase_option(f: F) -> F:
    return click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="File holding the site keystore passphrase (default: $DEVTRUST_SITE_PASSPHRASE).",
    )(f)


def store_option(f: F) -> F:
    return click.option(
        "--store",
        "store",
        envvar="DEVTRUST_REGISTRAR_STORE",
        metavar="URL",
        help="The registrar store: postgresql://user@host:port/db (several instances share "
        "it), sqlite:///path or a path (default: the site home's SQLite file; "
        "$DEVTRUST_REGISTRAR_STORE).",
    )(f)


def _grace(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """``--payload-key-grace``: 7d, 12h, 30m, 90s (or seconds) -> seconds."""
    if value is None:
        return None
    from trustcore.errors import TrustCoreError
    from trustcore.key_rotation import parse_grace

    try:
        return parse_grace(value)
    except TrustCoreError as exc:
        raise click.BadParameter(str(exc.args[0])) from exc


def grace_option(f: F) -> F:
    return click.option(
        "--payload-key-grace",
        "grace_s",
        callback=_grace,
        help="How long telemetry under a superseded payload key is still accepted "
        "(e.g. 7d, 12h; default 7d, at most 365d).",
    )(f)


def fail(exc: RegistrarError, code: int = EXIT_ERROR) -> NoReturn:
    """``error: …`` on stderr and exit ``code`` (1: could not run)."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def refused(exc: RegistrarError) -> NoReturn:
    """``REFUSED (reason): …`` on stderr and exit 2."""
    click.echo(f"REFUSED ({exc.reason}): {exc.args[0]}", err=True)
    sys.exit(EXIT_REFUSED)


def parse_device_id(text: str) -> DeviceId:
    """The device id given on the command line, or ``REFUSED (bad_device_id)`` and exit 2."""
    from trustcore.errors import InvalidValueError
    from trustcore.identity import DeviceId

    try:
        return DeviceId(text)
    except InvalidValueError as exc:
        refused(RegistrarError(exc.message, reason="bad_device_id"))


def open_site(home: Path) -> SiteHome:
    """The site home at ``home``, or exit 1 with one line."""
    from registrar.site import SiteHome

    try:
        return SiteHome.open(home)
    except RegistrarError as exc:
        fail(exc)


def duration(seconds: int) -> str:
    """Seconds as the shortest exact ``7d``/``12h``/``30m``/``90s``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def when(ts: float | int | None) -> str:
    """An epoch time as ``YYYY-MM-DD HH:MM:SS`` (UTC); ``-`` for None."""
    from datetime import UTC, datetime

    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def store_snapshot(site: SiteHome, store_url: str | None = None) -> dict[str, Any]:
    """Counts, devices and recent events from the store (read while a registrar runs, too).
    A site that never ran has no database yet: nothing is created by reading."""
    import asyncio

    from registrar.run_dir import store_location
    from registrar.store import Store

    location = store_location(site, store_url)
    if location.kind == "sqlite" and not location.path.exists():
        return {
            "counts": {},
            "devices": [],
            "certificates": [],
            "registered": [],
            "revoked": [],
            "refused": [],
            "key_periods": [],
            "per_key": {},
        }

    async def read() -> dict[str, Any]:
        store = await Store.open(location)
        try:
            devices = await store.devices()
            return {
                "counts": await store.counts(),
                "devices": devices,
                "certificates": await store.certificates(),
                "registered": await store.events(10, "registered"),
                "revoked": await store.events(10, "revoked"),
                "refused": await store.events(10, "refused"),
                "key_periods": await store.key_periods(),
                "per_key": await store.devices_per_payload_key(),
            }
        finally:
            await store.close()

    return asyncio.run(read())


def spool_wait(site: SiteHome) -> float:
    """How long a command waits for the running registrar. A rotation (or CA migration)
    answers once every registered device's message is published (about 1-3 ms each on this
    class of machine: 10,000 devices took 9-30 s in bench/soak.py), and a command that may
    not run beside it (``registrar.spool.BESIDE_LONG``: a second rotation, ``retire-ca``)
    waits for it: 30 s plus 10 ms a device. Revocations run beside it and answer at once."""
    from registrar.run_dir import read_status

    status = read_status(site) or {}
    counts = status.get("counts")
    devices = counts.get("devices", 0) if isinstance(counts, dict) else 0
    return 30.0 + 0.01 * (devices if isinstance(devices, int) and devices > 0 else 0)


def live_or_offline(
    site: SiteHome,
    command: str,
    args: dict[str, Any],
    offline: Callable[[], dict[str, Any]],
    *,
    data: bytes | None = None,
    timeout: float | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run ``offline`` while holding the instance lock when no registrar runs; otherwise
    hand the command to the running registrar (it applies it live), waiting up to
    ``timeout`` (default :func:`spool_wait`). Returns the result and whether it was
    applied live."""
    from registrar.run_dir import instance_lock, read_status
    from registrar.spool import submit_command

    with instance_lock(site, wait=0.0 if read_status(site) else 5.0) as free:
        if free:
            return offline(), False
    if timeout is None:
        timeout = spool_wait(site)
    answer = submit_command(site, command, args, data=data, timeout=timeout)
    if answer is None:
        fail(
            RegistrarError(
                f"the running registrar did not answer within {timeout:.0f} s; the request "
                "stays queued and the registrar applies it (it may be doing so now): see "
                "`registrar status` and its log",
                reason="timeout",
            )
        )
    if not answer.get("ok"):
        click.echo(f"REFUSED ({answer.get('reason')}): {answer.get('error')}", err=True)
        sys.exit(EXIT_REFUSED)
    result = answer["result"]
    assert isinstance(result, dict)
    return result, True


def run_offline(
    site: SiteHome, secrets: Any, work: Callable[[Any], Any], store_url: str | None = None
) -> Any:
    import asyncio

    from registrar.run_dir import store_location
    from registrar.store import Store

    async def go() -> Any:
        store = await Store.open(store_location(site, store_url))
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())
