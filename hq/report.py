"""Reports of ``hq ingest-audit``: one value object, rendered as a rich table or as JSON.

The JSON form is the machine interface (``--json``): one object, stable keys, ``status`` is
``clean``, ``violations`` or ``refused``. Violation lists are capped so that a hostile
million-violation export cannot make the report itself unusable; the counts are exact.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trustcore.reconcile import ReconciliationReport, Violation

__all__ = ["IngestReport", "RefusalReport", "render_ingest", "render_refusal"]

MAX_VIOLATIONS_SHOWN = 20


@dataclass(frozen=True)
class IngestReport:
    """An accepted export: where the chain now stands and what reconciliation found."""

    station_id: str
    export_number: int
    first_seq: int
    next_seq: int
    records: int
    head_hash: str
    events: dict[str, int]
    refused: dict[str, int]
    entitlements: tuple[ReconciliationReport, ...]
    violations: tuple[Violation, ...]  # HQ-level (manifest, duplicates across entitlements...)
    manifest_certs: int
    seconds: float

    def all_violations(self) -> list[Violation]:
        out = [v for e in self.entitlements for v in e.violations]
        out.extend(self.violations)
        return sorted(out, key=lambda v: (v.seq, v.kind))

    @property
    def violation_count(self) -> int:
        return len(self.violations) + sum(len(e.violations) for e in self.entitlements)

    @property
    def clean(self) -> bool:
        return self.violation_count == 0

    def violation_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(v.kind for v in self.all_violations()).items()))

    def to_map(self, max_violations: int = 1000) -> dict[str, Any]:
        return {
            "status": "clean" if self.clean else "violations",
            "station_id": self.station_id,
            "export_number": self.export_number,
            "records": self.records,
            "first_seq": self.first_seq,
            "next_seq": self.next_seq,
            "head_hash": self.head_hash,
            "events": self.events,
            "refused_at_station": self.refused,
            "manifest_certificates": self.manifest_certs,
            "entitlements": [e.to_map(max_violations=0) for e in self.entitlements],
            "violation_count": self.violation_count,
            "violation_counts": self.violation_counts(),
            "violations": [v.to_map() for v in self.all_violations()[:max_violations]],
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class RefusalReport:
    """An export refused as a whole; ``reason`` names the attack or defect."""

    reason: str
    message: str
    file: str

    def to_map(self) -> dict[str, Any]:
        return {
            "status": "refused",
            "reason": self.reason,
            "message": self.message,
            "file": self.file,
        }


def render_ingest(report: IngestReport, console: Console) -> None:
    head = Table(title=f"Audit export {report.export_number} from {report.station_id}")
    head.add_column("item")
    head.add_column("value", overflow="fold")
    head.add_row("records", f"{report.records} (seq {report.first_seq}..{report.next_seq - 1})")
    head.add_row("chain head", report.head_hash)
    head.add_row("events", ", ".join(f"{k} {v}" for k, v in report.events.items()) or "-")
    if report.refused:
        head.add_row("refused at station", ", ".join(f"{k} {v}" for k, v in report.refused.items()))
    uses: dict[str, int] = {}
    for e in report.entitlements:
        for name, n in e.secret_uses.items():
            uses[name] = uses.get(name, 0) + n
    if uses:
        head.add_row(
            "product secrets provisioned",
            ", ".join(f"{escape(k)} {v}" for k, v in sorted(uses.items())),
        )
    head.add_row("manifest certificates", str(report.manifest_certs))
    console.print(head)

    ents = Table(title="Entitlements")
    ents.add_column("entitlement", overflow="fold")
    for col in ("issued", "burned", "quota", "daily limit", "busiest day"):
        ents.add_column(col)
    for e in report.entitlements:
        busiest = max(e.per_day.items(), key=lambda kv: kv[1], default=("-", 0))
        ents.add_row(
            escape(e.entitlement_id),
            str(e.issued),
            str(e.burned),
            str(e.quota),
            str(e.daily_limit),
            f"{busiest[0]}: {busiest[1]}",
        )
    console.print(ents)

    if report.clean:
        console.print("[bold green]CLEAN[/]: chain verified, every issuance within policy")
        return
    table = Table(title=f"Violations ({report.violation_count})")
    for col in ("kind", "count"):
        table.add_column(col)
    for kind, n in report.violation_counts().items():
        table.add_row(kind, str(n))
    console.print(table)
    detail = Table(title=f"First {MAX_VIOLATIONS_SHOWN} violations")
    for col in ("seq", "kind", "device", "detail"):
        detail.add_column(col, overflow="fold")
    for v in report.all_violations()[:MAX_VIOLATIONS_SHOWN]:
        detail.add_row(
            str(v.seq) if v.seq >= 0 else "-",
            v.kind,
            escape(v.device_id) or "-",
            escape(v.detail),
        )
    console.print(detail)
    console.print(f"[bold red]VIOLATIONS[/]: {report.violation_count}")


def render_refusal(report: RefusalReport, console: Console) -> None:
    console.print(
        f"[bold red]REFUSED[/] ({report.reason}): {escape(report.message)}\n"
        f"{escape(report.file)}: nothing was stored; the audit head is unchanged.",
        soft_wrap=True,
        highlight=False,
    )
