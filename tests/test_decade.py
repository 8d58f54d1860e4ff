"""Ten years in a minute (issue 8, item 9): HQ, a factory station, a site registrar with
Mosquitto (real ``registrar run`` and Mosquitto processes) and a few devices walk through a
simulated decade on one controlled clock.

The driver (``tests/decade_scenario.py``) runs in a child process on the libfaketime clock
(``tests/fixtures/faketime.py``) together with everything it starts, and writes its figures
per phase; this test checks them. The timeline and the figures are in ``docs/lifecycle.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.faketime import FakeClock

pytestmark = [pytest.mark.tpm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

#: Every phase of the timeline, in order.
PHASES = (
    "manufacture",
    "entitlement ends",
    "18 months in stock",
    "site offline 60 days",
)


@pytest.fixture(scope="module")
def decade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("decade")
    out = work / "figures.json"
    clock = FakeClock.create()
    began = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.decade_scenario", "--work", str(work / "w"),
             "--out", str(out)],
            cwd=ROOT, env=clock.env(), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    finally:
        clock.remove()
    assert out.exists(), done.stdout + done.stderr
    figures: dict[str, Any] = json.loads(out.read_text())
    figures["test_wall_s"] = round(time.monotonic() - began, 1)
    figures["stderr"] = done.stderr[-6000:]
    figures["returncode"] = done.returncode
    (ROOT / ".decade-figures.json").write_text(json.dumps(figures, indent=2))
    yield figures


def _phase(figures: dict[str, Any], name: str) -> dict[str, Any]:
    for row in figures["phases"]:
        if row["phase"] == name:
            assert row["status"] == "ok", json.dumps(row, indent=2) + figures["stderr"]
            return dict(row)
    raise AssertionError(f"phase {name!r} did not run: {figures['outcome']}\n{figures['stderr']}")


def test_every_phase_of_the_decade_passes(decade: dict[str, Any]) -> None:
    assert decade["returncode"] == 0, decade["stderr"]
    assert decade["outcome"] == "ok", decade["outcome"] + "\n" + decade["stderr"]
    assert [r["phase"] for r in decade["phases"]] == list(PHASES)
    assert decade["test_wall_s"] < 120


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
