"""A site that hears nothing from HQ for two years keeps every operational device, on BOTH
brokers, with real processes (issue 8, item 3: "Operational devices are never cut off
because HQ was unreachable").

``tests/offline_year_scenario.py`` runs on a fake clock (libfaketime, ``FakeClock``) shared
with the ``registrar run`` it starts and the Mosquitto that one starts: a site is
commissioned and two devices register at t0; then the date moves to day 250, 500 and 750
while the registrar runs, with no HQ contact at all. The root CRL (1 year) and the first
broker/registrar certificates (1 year) run out on the way. Each time the running registrar
re-issues its service certificates from the site CA key (live: the operational listener
serves the new one to new handshakes, a session open across the reload keeps working);
the devices connect, their telemetry is accepted and they renew their LDevIDs over MQTT
(``renewed``, not registered again). On day 750 the registrar is restarted (start path),
the devices still connect, and a new registration is refused with ``revocation_unavailable``
(past the site's offline limit: fail closed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.faketime import LIBFAKETIME, FakeClock

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_two_years_without_hq_keeps_operational_devices(broker: str, tmp_path: Path) -> None:
    if not LIBFAKETIME.is_file():
        pytest.fail(f"libfaketime is required ({LIBFAKETIME}): apt-get install libfaketime")
    clock = FakeClock.create()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.offline_year_scenario", broker, str(tmp_path)],
            cwd=ROOT,
            env=clock.env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        clock.remove()
    log = tmp_path / f"registrar-{broker}.log"
    detail = done.stdout + done.stderr + (log.read_text() if log.exists() else "")
    assert done.returncode == 0, detail
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["root_crl_days"] <= 366  # the HQ data really went stale on the way
    assert report["first_service_cert_days"] <= 366
    assert [p["day"] for p in report["phases"]] == [250, 500, 750]
    assert report["service_reissues"] >= 3
    assert report["root_crl_stale_alert"]  # said loudly, but operational devices unaffected
    # A new registration is refused (fail closed): by the registrar with the reason behind
    # Mosquitto (leaf-only CRL check at the handshake); at the handshake by the embedded
    # broker, whose registration listener checks the whole chain (the root CRL is stale).
    expected = "revocation_unavailable" if broker == "mosquitto" else "handshake_refused"
    assert report["late_registration"] == expected
