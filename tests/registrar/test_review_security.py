"""Security review regressions: each test failed before its fix."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from registrar.app import RegistrarApp
from registrar.run_dir import spool_dir
from registrar.service import RegistrationService, SiteAuthority
from registrar.site import (
    SiteConfig,
    SiteHome,
    SiteSecrets,
    commission_site,
    reissue_site_crl,
    revocation_lock,
)
from registrar.store import Store
from signers.software import SoftwareKey
from tests.fixtures.pki import SITE_OPERATOR, Pki
from tests.fixtures.readiness import wait_for_flock_waiter
from tests.fixtures.registration import ADMIT_STATION, make_dev, make_request, verifier
from tests.fixtures.site import World, world, world_template
from trustcore import cbor
from trustcore.crl import RevokedEntry
from trustcore.identity import CertSerial, SiteId
from trustcore.payload import PayloadKey


@pytest.fixture
async def service(pki: Pki, tmp_path: Path) -> AsyncIterator[RegistrationService]:
    store = await Store.open(tmp_path / "registrar.db")
    try:
        yield RegistrationService(
            store=store,
            verifier=verifier(),
            admission=ADMIT_STATION,
            site=SiteAuthority(pki.site_ca, SoftwareKey(pki.site_key), SITE_OPERATOR),
            payload_key=PayloadKey.generate(),
            clock=lambda: pki.now,
        )
    finally:
        await store.close()


def _status(response: bytes) -> tuple[str, str | None]:
    outer = cbor.decode(response, max_size=1 << 16)
    body = cbor.decode(outer["body"], max_size=1 << 16)
    return body["status"], body.get("reason")


async def test_stored_response_is_not_served_on_another_devices_topic(
    pki: Pki, service: RegistrationService
) -> None:
    """The idempotency shortcut must not skip the topic check: device B replaying A's
    request bytes on B's topic gets ``device_mismatch``, not A's stored ``ok`` answer
    (A's LDevID and wrapped payload key)."""
    a, b = make_dev("dev-rv0001"), make_dev("dev-rv0002")
    request = make_request(pki, a)
    assert _status(await service.handle(a.device_id, request)) == ("ok", None)
    assert _status(await service.handle(b.device_id, request)) == ("error", "device_mismatch")
    # The owner's own retry is still idempotent.
    assert _status(await service.handle(a.device_id, request)) == ("ok", None)


async def test_a_poison_spool_request_is_answered_and_removed(tmp_path: Path) -> None:
    """A request the registrar cannot handle (here JSON nested too deeply for the parser,
    a RecursionError) must still get an answer and leave the spool: left there, it failed
    first on every tick and blocked every later command, revocations included."""
    home = SiteHome(
        tmp_path / "site",
        SiteConfig(SiteId("site-review"), "Org", 0, ("localhost",), ("127.0.0.1",)),
    )
    home.path.mkdir(mode=0o700)
    app = RegistrarApp(home, SiteSecrets())
    spool = spool_dir(home)
    poison = spool / "00000000000000000001-aaaaaaaa.request.json"
    poison.write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    await app._apply_request(poison)
    assert not poison.exists()
    answer = json.loads((spool / "00000000000000000001-aaaaaaaa.result.json").read_text())
    assert answer["ok"] is False
    assert answer["reason"] == "bad_request"


async def test_spool_data_is_never_read_through_a_symlink(tmp_path: Path) -> None:
    """``send-command`` seals its data file and sends it to a device: a data file that is a
    symlink would let whoever can write the spool exfiltrate any file the registrar reads."""
    home = SiteHome(
        tmp_path / "site",
        SiteConfig(SiteId("site-review"), "Org", 0, ("localhost",), ("127.0.0.1",)),
    )
    home.path.mkdir(mode=0o700)
    app = RegistrarApp(home, SiteSecrets())
    spool = spool_dir(home)
    secret = tmp_path / "secret.txt"
    secret.write_text("site passphrase", encoding="utf-8")
    (spool / "x.data").symlink_to(secret)
    request = spool / "00000000000000000002-bbbbbbbb.request.json"
    request.write_text(
        json.dumps(
            {"v": 1, "command": "send-command", "args": {"device_id": "dev-1", "data": "x.data"}}
        ),
        encoding="utf-8",
    )
    await app._apply_request(request)
    answer = json.loads((spool / "00000000000000000002-bbbbbbbb.result.json").read_text())
    assert answer == {"ok": False, "error": answer["error"], "reason": "bad_request"}
    assert not (spool / "x.data").exists()
    assert secret.read_text(encoding="utf-8") == "site passphrase"


def test_commission_waits_for_a_live_revocation(world: World) -> None:
    """Commissioning reads the site CRL and the revocation-list sequence and switches
    ``current``; a running registrar revokes (re-signs the site CRL) under
    ``revocation_lock``. Unserialised, a revocation landing in between was dropped by the
    switch (the LDevID un-revoked on the CRL, or the list rolled back)."""
    commission_site(world.site, world.bundle(), world.site_secrets)
    package = world.bundle()
    serial = CertSerial.random()
    done: list[int] = []
    with revocation_lock(world.site):
        worker = threading.Thread(
            target=lambda: done.append(
                commission_site(world.site, package, world.site_secrets).sequence
            )
        )
        worker.start()
        wait_for_flock_waiter(world.site.path / "revocation.lock")  # the kernel says so
        assert worker.is_alive() and not done  # waiting for the lock
        reissue_site_crl(
            world.site,
            world.site_secrets,
            revoke=(RevokedEntry(serial, datetime.now(UTC) - timedelta(days=1)),),
        )
    worker.join(30)
    assert done == [2]
    site_crl = x509.load_pem_x509_crl((world.site.current / "site-crl.pem").read_bytes())
    assert site_crl.get_revoked_certificate_by_serial_number(serial.value) is not None


__all__ = ["world", "world_template"]  # fixtures (tests/fixtures/site.py)
