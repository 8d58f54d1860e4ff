"""``registrar`` commands that read a site: ``status``, ``devices``, ``pending`` (devices
held for approval) and ``report`` (the signed site report for HQ). They read the store
and, when a registrar runs, its ``status.json``; they change nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from registrar.cli_common import (
    duration,
    fail,
    home_option,
    open_site,
    passphrase_option,
    store_option,
    store_snapshot,
    when,
)
from registrar.errors import RegistrarError
from trustcore.utctime import system_clock, to_unix

if TYPE_CHECKING:
    from registrar.site import SiteHome
    from registrar.store import PendingApproval

__all__ = ["devices_command", "pending_command", "report_command", "status_command"]


def _payload_key_rows(site: SiteHome, snap: dict[str, Any]) -> list[dict[str, Any]]:
    """Per payload key: state and devices on it, from the store and the key file (key ids
    only, nothing decrypted), for a site whose registrar is not running."""

    from registrar.key_distribution import key_rows
    from registrar.payload_keys import listed_key_ids
    from trustcore.key_rotation import KeyPeriod, KeySchedule

    if not site.commissioned:
        return []
    try:
        current, ids = listed_key_ids(site.payload_keys_path)
    except RegistrarError:
        return []
    from trustcore.errors import TrustCoreError

    try:
        schedule = KeySchedule(
            tuple(KeyPeriod(*p) for p in snap["key_periods"]), site.config.payload_key_grace_s
        )
        if current is not None:  # what a registrar starting now would record
            schedule = schedule.with_current(current, to_unix(system_clock()))
    except TrustCoreError as exc:
        click.echo(f"warning: payload key periods unreadable: {exc}", err=True)
        return []
    return key_rows(schedule, ids, snap["per_key"], to_unix(system_clock()))


@click.command("status")
@home_option
@store_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status_command(home: Path, store: str | None, as_json: bool) -> None:
    """Listeners of the running registrar, counts, last registrations and revocations."""
    import json
    from dataclasses import asdict

    from registrar.run_dir import read_status

    site = open_site(home)
    running = read_status(site)
    try:
        snap = store_snapshot(site, store)
    except RegistrarError as exc:
        fail(exc)
    devices = snap["devices"]
    by_status: dict[str, int] = {}
    for record in devices:
        by_status[record.status] = by_status.get(record.status, 0) + 1
    state = site.commission_state() or {}
    payload_keys = (running or {}).get("payload_keys") or _payload_key_rows(site, snap)
    doc = {
        "site_id": site.site_id.value,
        "commissioned": site.commissioned,
        "bundle_sequence": state.get("bundle_sequence"),
        "revocation_list_sequence": state.get("revocation_list_sequence"),
        "running": running is not None,
        "instance": running,
        "counts": snap["counts"],
        "devices": by_status,
        "last_registrations": [asdict(e) for e in snap["registered"]],
        "last_revocations": [asdict(e) for e in snap["revoked"]],
        "last_refusals": [asdict(e) for e in snap["refused"]],
        "payload_keys": payload_keys,
        "payload_key_grace_s": site.config.payload_key_grace_s,
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    console = Console(highlight=False)
    table = Table(title=f"site {doc['site_id']}", show_header=False)
    table.add_column("item")
    table.add_column("value")
    table.add_row("commissioned", f"bundle {doc['bundle_sequence']}" if site.commissioned else "no")
    if running is None:
        table.add_row("registrar", "[yellow]not running[/]")
    else:
        table.add_row("registrar", f"running (pid {running['pid']}, {running['broker']} broker)")
        for name, ep in running["listeners"].items():
            table.add_row(f"{name} listener", f"{ep['host']}:{ep['port']}")
        if running.get("metrics"):
            ep = running["metrics"]
            table.add_row("metrics", f"http://{ep['host']}:{ep['port']}/metrics, /healthz")
        table.add_row("payload key", str(running.get("payload_key")))
        table.add_row("site CRL valid until", str(running.get("site_crl_next_update")))
        site_ca = running.get("site_ca") or {}
        if site_ca.get("issuing"):
            retiring = site_ca.get("retiring")
            table.add_row(
                "site CA",
                str(site_ca["issuing"]) + (f" (retiring: {retiring})" if retiring else ""),
            )
        tele = running.get("telemetry", {})
        table.add_row(
            "telemetry", f"{tele.get('messages', 0)} decrypted, {tele.get('rejected', 0)} rejected"
        )
    table.add_row("HQ revocation list", f"sequence {doc['revocation_list_sequence']}")
    hq_data = (running or {}).get("hq_revocation_data")
    if hq_data:
        table.add_row(
            "HQ data age",
            f"{hq_data['age_days']} of {hq_data['max_offline_days']} days "
            f"({hq_data['state']}; new registrations stop {hq_data['refuse_after']})",
        )
    table.add_row(
        "devices",
        ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none registered",
    )
    console.print(table)
    for alert in (running or {}).get("alerts", []):
        console.print(f"[bold red]ALERT[/] {alert}")
    if payload_keys:
        keys = Table(title=f"payload keys (grace {duration(site.config.payload_key_grace_s)})")
        keys.add_column("key id", no_wrap=True)
        for col in ("state", "superseded", "retires", "devices on it", "refused"):
            keys.add_column(col)
        for row in payload_keys:
            keys.add_row(
                row["key_id"],
                row["state"],
                when(row["superseded_at"])[:16],
                when(row["retires_at"])[:16],
                str(row["devices"]),
                str(row.get("telemetry_refused") or 0),
            )
        console.print(keys)
    for title, events in (
        ("last registrations", snap["registered"]),
        ("last revocations", snap["revoked"]),
    ):
        if not events:
            continue
        t = Table(title=title)
        for col in ("time (UTC)", "device", "detail"):
            t.add_column(col)
        for e in events:
            t.add_row(when(e.time), e.device_id or "-", e.detail)
        console.print(t)


# ------------------------------------------------------------------------------- devices


@click.command("devices")
@home_option
@click.option("--json", "as_json", is_flag=True, help="A JSON list.")
@click.option(
    "--certificates",
    "show_chain",
    is_flag=True,
    help="Also list every LDevID of each device (issued, notAfter, superseded, revoked).",
)
@store_option
def devices_command(home: Path, as_json: bool, show_chain: bool, store: str | None) -> None:
    """Registered devices (status, station, certificates, payload key). Each device's chain
    of LDevIDs (registration and renewals) is in the JSON as ``certificates``."""
    import json

    site = open_site(home)
    try:
        snapshot = store_snapshot(site, store)
    except RegistrarError as exc:
        fail(exc)
    chains: dict[str, list[dict[str, Any]]] = {}
    for c in snapshot["certificates"]:
        chains.setdefault(c.device_id.value, []).append(
            {
                "serial": c.serial.hex,
                "kind": c.kind,
                "state": c.state,
                "issued_at": c.issued_at,
                "not_after": c.not_after,
                "superseded_at": c.superseded_at,
                "revoked_at": c.revoked_at,
            }
        )
    rows = [
        {
            "device_id": d.device_id.value,
            "status": d.status,
            "station_id": None if d.station_id is None else d.station_id.value,
            "idevid_serial": d.idevid_serial.hex,
            "ldevid_serial": d.ldevid_serial.hex,
            "payload_key_id": d.payload_key_id.hex(),
            "registered_at": d.registered_at,
            "registrations": d.registrations,
            "renewals": sum(
                1 for c in chains.get(d.device_id.value, []) if c["kind"] == "renewal"
            ),
            "certificates": chains.get(d.device_id.value, []),
        }
        for d in snapshot["devices"]
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    table = Table(title=f"{len(rows)} device(s)")
    columns = ("device", "status", "station", "LDevID serial", "payload key", "registered")
    for col in (*columns, "renewals"):
        table.add_column(col)
    for r in rows:
        status = r["status"] if r["status"] == "registered" else f"[red]{r['status']}[/]"
        table.add_row(
            r["device_id"],
            status,
            r["station_id"] or "-",
            r["ldevid_serial"],
            r["payload_key_id"],
            when(r["registered_at"]),
            str(r["renewals"]),
        )
    console = Console(highlight=False)
    console.print(table)
    if not show_chain:
        return
    chain_table = Table(title="LDevID certificates per device (oldest first)")
    for col in ("device", "serial", "kind", "state", "issued", "notAfter", "superseded", "revoked"):
        chain_table.add_column(col)
    for r in rows:
        for c in r["certificates"]:
            chain_table.add_row(
                r["device_id"],
                c["serial"],
                c["kind"],
                c["state"],
                when(c["issued_at"]),
                when(c["not_after"]),
                when(c["superseded_at"]),
                when(c["revoked_at"]),
            )
    console.print(chain_table)


@click.command("report")
@home_option
@passphrase_option
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@store_option
def report_command(home: Path, passphrase_file: Path | None, out: Path, store: str | None) -> None:
    """Write the next signed site report for HQ (`hq ingest-report`): every factory
    certificate seen, with the certificate as evidence, and every registration."""
    from registrar.report import write_site_report
    from registrar.site import SiteSecrets

    site = open_site(home)
    try:
        result = write_site_report(site, SiteSecrets(passphrase_file), out, store=store)
    except RegistrarError as exc:
        fail(exc)
    click.echo(
        f"site report {result.sequence}: {result.seen} factory certificate(s) seen, "
        f"{result.registered} registration(s); written to {result.out}"
    )


# ------------------------------------------------------------- admission plugins (holds)


@click.command("pending")
@home_option
@click.option("--json", "as_json", is_flag=True)
@store_option
def pending_command(home: Path, as_json: bool, store: str | None) -> None:
    """Devices an admission plugin (e.g. hold_unlisted) holds for the installer's approval."""
    import json

    from registrar.run_dir import store_location
    from registrar.store import Store

    site = open_site(home)

    async def read() -> list[PendingApproval]:
        opened = await Store.open(store_location(site, store))
        try:
            return await opened.pending()
        finally:
            await opened.close()

    import asyncio

    try:
        rows = asyncio.run(read())
    except RegistrarError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps([_pending_json(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo("no devices waiting for approval")
    for r in rows:
        click.echo(
            f"{r.device_id}  station {r.station_id}  idevid {r.idevid_serial}  "
            f"held by {r.plugin} ({r.reason})  first {when(r.first_seen)}  "
            f"attempts {r.attempts}"
        )


def _pending_json(r: PendingApproval) -> dict[str, Any]:
    """A held device as ``registrar pending --json`` prints it (ids and serials as text)."""
    return {
        "device_id": r.device_id.value,
        "station_id": None if r.station_id is None else r.station_id.value,
        "idevid_serial": r.idevid_serial.hex,
        "plugin": r.plugin,
        "reason": r.reason,
        "first_seen": r.first_seen,
        "last_seen": r.last_seen,
        "attempts": r.attempts,
    }
