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
(``renewed``, not registered again). Then the registrar is down from day 750 to day 1000:
at start it re-issues them before its broker starts (start path), the devices connect and
renew again, and a new registration is refused (past the site's offline limit: fail
closed) with ``revocation_unavailable`` behind Mosquitto.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from hq.site import SiteBundleRequest, build_site_bundle
from registrar.site import commission_site, reissue_service_certificates
from tests.fixtures.faketime import LIBFAKETIME, FakeClock
from tests.fixtures.site import SITE, STATION, make_world

ROOT = Path(__file__).resolve().parents[2]


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
    assert report["service_reissues"] >= 4  # days 250, 500, 750 live; day 1000 at start
    assert report["restart"]["served_until_days"] > report["phases"][-1]["served_until_days"]
    assert report["root_crl_stale_alert"]  # said loudly, but operational devices unaffected
    # A new registration is refused (fail closed): by the registrar with the reason behind
    # Mosquitto (leaf-only CRL check at the handshake); at the handshake by the embedded
    # broker, whose registration listener checks the whole chain (the root CRL is stale).
    expected = "revocation_unavailable" if broker == "mosquitto" else "handshake_refused"
    assert report["late_registration"] == expected


def test_service_certificates_reissued_at_half_life_capped_at_the_site_ca(tmp_path: Path) -> None:
    """In process: nothing before half life; past it, new broker and registrar certificates
    (same keys, issued by the site CA, one year); near the site CA's end, capped at it, and
    not re-issued again while that would not move the end."""
    world = make_world(tmp_path / "w")
    bundle = build_site_bundle(
        world.hq, SiteBundleRequest(site_id=SITE, admit_stations=(STATION,)), world.hq_secrets
    )
    home, secrets = world.site, world.site_secrets
    commission_site(home, bundle.package, secrets)

    def cert(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((home.current / name).read_bytes())

    first, client = cert("broker.pem"), cert("registrar-client.pem")
    site_ca = cert("site-ca.pem")
    start = first.not_valid_before_utc
    assert reissue_service_certificates(home, secrets, now=start + timedelta(days=100)) is None
    assert cert("broker.pem") == first
    day200 = start + timedelta(days=200)
    end = reissue_service_certificates(home, secrets, now=day200)
    assert end is not None and end > first.not_valid_after_utc
    for name, old in (("broker.pem", first), ("registrar-client.pem", client)):
        new = cert(name)
        assert new.serial_number != old.serial_number
        assert new.public_key() == old.public_key()  # same key, in the keystore
        assert new.issuer == site_ca.subject and new.not_valid_after_utc == end
        new.verify_directly_issued_by(site_ca)
    assert cert("broker.pem").subject == first.subject
    # Close to the site CA's end: capped at it, then nothing more to gain.
    late = site_ca.not_valid_after_utc - timedelta(days=100)
    assert reissue_service_certificates(home, secrets, now=late) == site_ca.not_valid_after_utc
    capped = cert("broker.pem")
    assert reissue_service_certificates(home, secrets, now=late + timedelta(days=80)) is None
    assert cert("broker.pem") == capped
    assert reissue_service_certificates(home, secrets, now=site_ca.not_valid_after_utc) is None
