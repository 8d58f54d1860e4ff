"""HQ killed with SIGKILL while it ingests an audit export and while it writes a site
bundle, and HQ out of disk space while it writes a bundle: the database stays sound, a
re-run succeeds, and nothing is counted twice or lost (a kill at a random time, in a
bounded loop: the kill point is not a hook in HQ, HQ does not know it is tested).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.faults_support import (
    Outcome,
    assert_one_line_error,
    command,
    kill_loop,
    leftovers,
    run,
    run_on_full_directory,
    sqlite_intact,
)
from tests.fixtures.hq import ENV, World, build_world
from tests.fixtures.site import SITE, make_world

ISSUED = 18  # within the entitlement: quota 20, 10 a day (nine a day on two days)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("faults-hq"))


def _stored(home: Path) -> tuple[int, int, int]:
    """(audit exports stored, devices known, next audit seq) of station-a."""
    conn = sqlite3.connect(home / "hq.sqlite")
    try:
        exports = conn.execute(
            "SELECT count(*) FROM ingests WHERE station_id = 'station-a'"
        ).fetchone()[0]
        devices = conn.execute(
            "SELECT count(*) FROM devices WHERE station_id = 'station-a'"
        ).fetchone()[0]
        head = conn.execute(
            "SELECT next_seq FROM audit_heads WHERE station_id = 'station-a'"
        ).fetchone()
    finally:
        conn.close()
    return exports, devices, 0 if head is None else head[0]


def _ingest(home: Path, export: Path) -> list[str]:
    return command("hq", "ingest-audit", "--home", str(home), str(export), "--json")


def _report(outcome: Outcome) -> dict[str, object]:
    return json.loads(outcome.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_kill_during_ingest_audit(world: World, tmp_path: Path) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0)
    for i in range(ISSUED):
        slog.issue(f"dev-{i + 1:04d}", world.t0 + (i // 9) * 86400 + 10 + i)
    first = tmp_path / "export-1.sealed"
    first.write_bytes(slog.export(world.t0 + 86400 + 100))
    slog.issue(f"dev-{ISSUED + 1:04d}", world.t0 + 86400 + 200)
    second = tmp_path / "export-2.sealed"
    second.write_bytes(slog.export(world.t0 + 86400 + 300))

    # A first ingest on a throwaway copy warms the interpreter's caches (a fresh clone
    # compiles every module on its first run, twice as slow as the runs killed below).
    run(_ingest(world.copy(tmp_path / "warm-up"), first), env=ENV)
    reference = world.copy(tmp_path / "reference")
    clean = run(_ingest(reference, first), env=ENV)
    assert clean.code == 0, clean.stderr
    assert _stored(reference) == (1, ISSUED, ISSUED + 1)

    home = world.copy(tmp_path / "hq")
    states: set[tuple[int, int, int]] = set()

    def check(outcome: Outcome) -> None:
        sqlite_intact(home / "hq.sqlite")
        state = _stored(home)
        # All or nothing: never part of an export, never an export twice.
        assert state in {(0, 0, 0), (1, ISSUED, ISSUED + 1)}, (state, outcome)
        states.add(state)

    # Once one run completes, the rest are quick "replayed" refusals: the window must
    # make the first runs die, so it opens early.
    outcomes = kill_loop(
        lambda _: _ingest(home, first),
        attempts=6,
        window=(0.2 * clean.seconds, 0.9 * clean.seconds),
        seed=11,
        after_each=check,
        env=ENV,
    )
    assert any(o.killed for o in outcomes), "no run was killed: the window is wrong"
    # The re-run: stored now (clean) or already stored (refused as a replay, nothing added).
    again = run(_ingest(home, first), env=ENV)
    report = _report(again)
    if report["status"] == "clean":
        assert again.code == 0
    else:
        assert (again.code, report["reason"]) == (2, "replayed"), report
    assert _stored(home) == (1, ISSUED, ISSUED + 1)
    # The continuation is counted once: issued = ISSUED + 1 for the entitlement.
    nxt = run(_ingest(home, second), env=ENV)
    assert nxt.code == 0, nxt.stdout + nxt.stderr
    [ent] = _report(nxt)["entitlements"]  # type: ignore[misc]
    assert ent["issued"] == ISSUED + 1, ent
    assert _stored(home) == (2, ISSUED + 1, ISSUED + 2)
    print(f"ingest kills: {[round(o.seconds, 2) for o in outcomes]}, states {states}")


# ------------------------------------------------------------------------------ bundles


@pytest.fixture(scope="module")
def bundle_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("faults-bundle") / "w"
    make_world(base)
    return base


def _bundle(base: Path, out: Path) -> list[str]:
    return command(
        "hq",
        "site",
        "bundle",
        "--home",
        str(base / "hq"),
        "--site",
        SITE,
        "--device",
        "TH-000001",
        "--passphrase-file",
        str(base / "hq.pass"),
        "--out",
        str(out),
    )


def _bundle_sequences(base: Path) -> list[int]:
    conn = sqlite3.connect(base / "hq" / "hq.sqlite")
    try:
        return [r[0] for r in conn.execute("SELECT sequence FROM site_bundles ORDER BY sequence")]
    finally:
        conn.close()


def _bundle_written(base: Path, out: Path) -> int:
    """The sequence of a complete bundle at ``out`` (a half-written one fails to verify)."""
    from datetime import UTC, datetime

    from registrar.site import SiteHome, SiteSecrets
    from trustcore.site_bundle import verify_site_bundle

    site = SiteHome.open(base / SITE)
    secrets = SiteSecrets(base / "site.pass")
    verified = verify_site_bundle(
        out.read_bytes(),
        root=site.root_certificate(),
        transport=site.key("transport", secrets),
        site_id=site.site_id,
        site_ca_public=site.key("site-ca", secrets).public_key(),
        last_sequence=None,
        last_revocation_sequence=None,
        now=datetime.now(UTC),
    )
    return verified.sequence


def test_kill_while_writing_a_site_bundle(bundle_world: Path, tmp_path: Path) -> None:
    base = tmp_path / "w"
    shutil.copytree(bundle_world, base, symlinks=True)
    timing = tmp_path / "w-timing"
    shutil.copytree(bundle_world, timing, symlinks=True)
    clean = run(_bundle(timing, tmp_path / "timing.sealed"))
    assert clean.code == 0, clean.stdout + clean.stderr
    outs = tmp_path / "out"
    outs.mkdir()
    written: list[int] = []

    def check(outcome: Outcome) -> None:
        sqlite_intact(base / "hq" / "hq.sqlite")
        recorded = _bundle_sequences(base)
        assert recorded == list(range(1, len(recorded) + 1)), recorded
        out = outs / f"bundle-{len(written_or_not)}.sealed"
        if out.exists():  # a file is there only complete, and HQ recorded it
            sequence = _bundle_written(base, out)
            assert sequence in recorded
            written.append(sequence)
        written_or_not.append(outcome)

    written_or_not: list[Outcome] = []
    outcomes = kill_loop(
        lambda i: _bundle(base, outs / f"bundle-{i}.sealed"),
        attempts=6,
        window=(0.5 * clean.seconds, 1.1 * clean.seconds),
        seed=12,
        after_each=check,
    )
    assert any(o.killed for o in outcomes), "no run was killed: the window is wrong"
    # A re-run writes the next bundle above every sequence HQ recorded (a sequence whose
    # file was never written is skipped: the site only needs sequences to increase).
    before = _bundle_sequences(base)
    final = outs / "final.sealed"
    again = run(_bundle(base, final))
    assert again.code == 0, again.stdout + again.stderr
    assert _bundle_written(base, final) == len(before) + 1 == max(before + written + [0]) + 1
    print(
        f"bundle kills: {[round(o.seconds, 2) for o in outcomes]}, recorded {before}, "
        f"files {written}, leftovers {leftovers(outs)}"
    )


def test_hq_database_cannot_be_written(bundle_world: Path, tmp_path: Path) -> None:
    """A file-size limit of 2 KiB (as good as a full disk for a 250 KiB database): HQ
    cannot even open its database, says so in one line, and works once it can write."""
    limit = 2048
    base = tmp_path / "w"
    shutil.copytree(bundle_world, base, symlinks=True)
    before = _bundle_sequences(base)
    out = tmp_path / "bundle.sealed"
    full = run(_bundle(base, out), fsize_limit=limit)
    assert_one_line_error(full, 1, "error: store_error:", "hq.sqlite")
    assert not out.exists() and leftovers(tmp_path) == []
    sqlite_intact(base / "hq" / "hq.sqlite")
    assert _bundle_sequences(base) == before  # nothing recorded
    # Space again: the bundle is written, with the next sequence.
    again = run(_bundle(base, out))
    assert again.code == 0, again.stdout + again.stderr
    assert _bundle_sequences(base) == [*before, len(before) + 1]
    assert _bundle_written(base, out) == len(before) + 1


def test_bundle_on_a_full_disk(bundle_world: Path, tmp_path: Path) -> None:
    """The bundle's directory is on a full filesystem (a filled tmpfs): a one-line
    error, no file and no temporary file left; with space again, the next run writes it."""
    base = tmp_path / "w"
    shutil.copytree(bundle_world, base, symlinks=True)
    outdir = tmp_path / "usb"
    runs = run_on_full_directory(outdir, tmp_path / "logs", _bundle(base, outdir / "b.sealed"))
    assert_one_line_error(runs.full, 1, "output_not_written:", "No space left", "b.sealed")
    assert runs.files_when_full == []
    assert runs.freed.code == 0, runs.freed.stdout + runs.freed.stderr
    assert runs.files_when_freed == ["b.sealed"]
    sqlite_intact(base / "hq" / "hq.sqlite")
    # The failed run consumed sequence 1 (committed before the write); the file holds 2.
    assert _bundle_sequences(base) == [1, 2]
