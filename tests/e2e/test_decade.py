"""Ten years in a minute (issue 8, item 9): HQ, a factory station, a site registrar with
Mosquitto (real ``registrar run`` and Mosquitto processes) and a few devices walk through a
simulated decade on one controlled clock.

The driver (``tests/decade_scenario.py``) runs in a child process on the libfaketime clock
(``tests/fixtures/faketime.py``) together with everything it starts, and writes its figures
per phase; this test checks them. The timeline and the figures are in ``docs/lifecycle.md``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.decade_scenario import markdown_table
from tests.fixtures.faketime import FakeClock

pytestmark = [pytest.mark.tpm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

#: The issue's timeline, in the order the phases first happen.
TIMELINE = (
    "manufacture",
    "entitlement ends",
    "18 months in stock",
    "site offline 60 days",
    "station CA renewal",
    "renewals",
    "site CA rollover",
    "old site CA retired",
    "revocation",
    "year 10",
)
#: The site CA (five years) rolls over in years 4 and 8.
ROLLOVERS = 2
YEAR = timedelta(days=365)


@pytest.fixture(scope="module")
def decade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("decade")
    out = work / "figures.json"
    clock = FakeClock.create()
    began = time.monotonic()
    # Its own process group: on a timeout the registrar, brokers and swtpms it started go
    # too (a bare subprocess.run timeout kills the scenario and leaves them running).
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.decade_scenario", "--work", str(work / "w"),
         "--out", str(out)],
        cwd=ROOT, env=clock.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=600)  # ~100 s quiet; 200+ s at load 15
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    finally:
        clock.remove()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.exists(), done.stdout + done.stderr
    figures: dict[str, Any] = json.loads(out.read_text())
    figures["test_wall_s"] = round(time.monotonic() - began, 1)
    figures["stderr"] = done.stderr[-6000:]
    figures["returncode"] = done.returncode
    # The figures docs/lifecycle.md shows (regenerate them from these two files).
    (ROOT / ".decade-figures.json").write_text(json.dumps(figures, indent=2))
    (ROOT / ".decade-figures.md").write_text(markdown_table(figures))
    yield figures


def _phase(figures: dict[str, Any], name: str) -> dict[str, Any]:
    rows = _phases(figures, name)
    assert rows, f"phase {name!r} did not run: {figures['outcome']}\n{figures['stderr']}"
    return rows[0]


def _phases(figures: dict[str, Any], name: str) -> list[dict[str, Any]]:
    rows = [dict(r) for r in figures["phases"] if r["phase"] == name]
    for row in rows:
        assert row["status"] == "ok", json.dumps(row, indent=2) + figures["stderr"]
    return rows


def test_the_whole_decade_passes(decade: dict[str, Any]) -> None:
    """Every phase ok, in order, ten years covered. Its wall time is a figure
    (``test_wall_s`` in .decade-figures.json, about a minute on a quiet machine), not an
    assertion: speed is measured by bench/, and a timed test fails on a busy machine."""
    failed = [r for r in decade["phases"] if r["status"] != "ok"]
    assert not failed, json.dumps(failed, indent=2) + decade["stderr"]
    assert decade["outcome"] == "ok", decade["outcome"] + "\n" + decade["stderr"]
    assert decade["returncode"] == 0, decade["stderr"]
    first_seen = list(dict.fromkeys(r["phase"] for r in decade["phases"]))
    assert [p for p in first_seen if p in TIMELINE] == list(TIMELINE)
    started = datetime.fromisoformat(decade["started"])
    last = datetime.fromisoformat(decade["phases"][-1]["date"]).replace(tzinfo=UTC)
    assert last >= started + 10 * YEAR - timedelta(days=2)


def test_factory_certificates_outlive_the_entitlement(decade: dict[str, Any]) -> None:
    made = _phase(decade, "manufacture")
    assert made["openssl_attime_plus_5y"] == "3/3 OK"
    ended = _phase(decade, "entitlement ends")
    assert ended["refused"]  # the station issues nothing after its window
    assert ended["openssl_now"] == "3/3 OK"
    assert _phase(decade, "18 months in stock")["openssl_now"] == "3/3 OK"


def test_an_offline_site_still_registers(decade: dict[str, Any]) -> None:
    row = _phase(decade, "site offline 60 days")
    assert row["online"] == row["devices"] == 3
    assert row["ldevids_issued"] == 3


def test_renewals_through_the_decade_and_superseded_certificates_refused(
    decade: dict[str, Any],
) -> None:
    rounds = _phases(decade, "renewals")
    assert len(rounds) >= 10  # one-year LDevIDs renewed from 2/3 of their life, years 2..10
    assert sum(r["renewed"] for r in rounds) >= 40
    end = _phase(decade, "year 10")
    assert end["superseded"] >= 40
    refused, total = map(int, end["superseded_refused_mosquitto_pub"].split("/"))
    assert refused == total == end["superseded"]
    assert end["online"] == end["devices"] - 1  # everyone but the revoked device
    assert end["one_current_certificate"] == f"{end['online']}/{end['online']}"


def test_the_site_ca_rolls_over_twice_and_the_old_one_is_retired(decade: dict[str, Any]) -> None:
    started = datetime.fromisoformat(decade["started"])
    begun = _phases(decade, "site CA rollover")
    retired = _phases(decade, "old site CA retired")
    assert len(begun) == len(retired) == ROLLOVERS
    first = datetime.fromisoformat(begun[0]["date"]).replace(tzinfo=UTC)
    assert started + 4 * YEAR <= first < started + 5 * YEAR
    for row in retired:
        assert row["devices_on_new_ca"] == row["online"]  # nobody left behind, all online


def test_revoked_in_year_6_and_cut_within_a_second(decade: dict[str, Any]) -> None:
    row = _phase(decade, "revocation")
    started = datetime.fromisoformat(decade["started"])
    assert datetime.fromisoformat(row["date"]).replace(tzinfo=UTC) >= started + 6 * YEAR
    assert row["cut_after_command_s"] <= 1.0
    assert row["online"] == row["devices"] - 1
