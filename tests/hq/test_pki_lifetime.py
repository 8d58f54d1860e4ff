"""Issue 8, items 1-3: a manufacturer chain that lives as long as the devices, a root that
stays offline (delegated CRL signer, indirect CRL), and sites offline for weeks.

Real HQ home and site home (``tests.fixtures.site.make_world``), real certificates, and
the real ``openssl`` binary for what standard tools must agree on.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hq.counterfeit import revoke
from hq.errors import HomeError, SecretError
from hq.revocation_data import root_ceremony
from hq.site import SiteBundleRequest, SiteError, build_site_bundle
from hq.store import DeviceRow, HqStore
from registrar.revocation import RevocationAwareVerifier, hq_data_freshness
from tests.fixtures.pkilint import SEVERE, lint_certificate, pkilint_findings, pkilint_tool
from tests.fixtures.site import SITE, STATION, World, make_world
from trustcore.crl import build_crl, load_crl
from trustcore.errors import VerificationError
from trustcore.identity import DeviceId
from trustcore.profiles import HqRole, crl_issuers_of, issue_factory_certificate
from trustcore.revocation import RevocationList, open_revocation_list
from trustcore.site_bundle import SiteBundlePayload
from trustcore.verify import ChainVerifier

DAY = timedelta(days=1)
PEM = serialization.Encoding.PEM


@pytest.fixture(scope="module")
def world_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki-world") / "w"
    make_world(base)
    return base


@pytest.fixture
def world(world_template: Path, tmp_path: Path) -> World:
    base = tmp_path / "w"
    shutil.copytree(world_template, base)
    return make_world_view(base)


def make_world_view(base: Path) -> World:
    from hq.home import HqHome, HqSecrets
    from registrar.site import SiteHome, SiteSecrets

    hq = HqHome.open(base / "hq")
    store = HqStore.open(hq.db_path)
    try:
        station_ca = x509.load_der_x509_certificate(store.station_ca_certificates(STATION)[-1][1])
    finally:
        store.close()
    return World(
        base,
        hq,
        HqSecrets(base / "hq.pass"),
        SiteHome.open(base / SITE),
        SiteSecrets(base / "site.pass"),
        None,  # type: ignore[arg-type]  (the station key is not needed by these tests)
        station_ca,
    )


@pytest.fixture
def factory(tmp_path: Path) -> tuple[World, ec.EllipticCurvePrivateKey]:
    """A fresh world whose station key is at hand (to sign factory certificates as the
    station does, with the HQ CRL signer as cRLIssuer)."""
    world = make_world(tmp_path / "f")
    return world, world.station_key.private_key()


def _idevid(
    world: World, key: ec.EllipticCurvePrivateKey, device_id: str, when: datetime
) -> x509.Certificate:
    signer = world.hq.role_certificate(HqRole.CRL_SIGNER)
    return issue_factory_certificate(
        world.station_ca,
        key,
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        device_id=DeviceId(device_id),
        manufacturer="Acme Devices",
        not_before=when,
        crl_issuer=signer.subject,
    )


def _openssl(*args: str | Path) -> str:
    done = subprocess.run(
        ["openssl", "verify", *map(str, args)], capture_output=True, text=True, check=False
    )
    return done.stdout + done.stderr


def _write(path: Path, *objs: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(b"".join(o.public_bytes(PEM) for o in objs))
    return path


def _know(world: World, cert: x509.Certificate, device_id: str) -> None:
    """Let HQ know the certificate (as an audit ingest or a site sighting would)."""
    store = HqStore.open(world.hq.db_path)
    with store.transaction():
        store.put_devices(
            [DeviceRow(device_id, f"{cert.serial_number:x}", STATION, 1, b"\x07" * 32, 9, 1, None)]
        )
    store.close()


# ---------------------------------------------------------------- 1. chain lifetime


def test_station_ca_outlives_the_entitlement_and_openssl_agrees_at_plus_5_years(
    factory: tuple[World, ec.EllipticCurvePrivateKey], tmp_path: Path
) -> None:
    world, key = factory
    root = world.hq.root_certificate()
    now = datetime.now(UTC).replace(microsecond=0)
    idevid = _idevid(world, key, "TH-000001", now)
    # The entitlement of make_world ends in 30 days; the station CA lasts as long as the root.
    assert world.station_ca.not_valid_after_utc == root.not_valid_after_utc
    assert world.station_ca.not_valid_after_utc - now > timedelta(days=12 * 365)
    root_pem = _write(tmp_path / "root.pem", root)
    ca_pem = _write(tmp_path / "station-ca.pem", world.station_ca)
    leaf = _write(tmp_path / "idevid.pem", idevid)
    for years in (0, 5, 10):
        at = int((now + timedelta(days=365 * years + 1)).timestamp())
        out = _openssl("-attime", str(at), "-CAfile", root_pem, "-untrusted", ca_pem, leaf)
        assert "idevid.pem: OK" in out, (years, out)
    # ... and so does the project's verifier, years after the entitlement ended.
    ChainVerifier([root], [world.station_ca], require_crl=False).verify(
        idevid, now=now + 5 * 365 * DAY
    )


def test_idevid_names_the_crl_signer_and_lints_clean(
    factory: tuple[World, ec.EllipticCurvePrivateKey], tmp_path: Path
) -> None:
    world, key = factory
    signer = world.hq.role_certificate(HqRole.CRL_SIGNER)
    idevid = _idevid(world, key, "TH-000001", datetime.now(UTC))
    assert crl_issuers_of(idevid) == (signer.subject,)
    ku = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.crl_sign and not ku.key_cert_sign
    for name, cert in (("idevid", idevid), ("crl-signer", signer)):
        findings = lint_certificate(_write(tmp_path / f"{name}.pem", cert))
        assert not [f for f in findings if f[0] in SEVERE], (name, findings)
    # The indirect CRL HQ publishes lints clean as a PKIX CRL as well.
    revoke(world.hq, world.hq_secrets, devices=["TH-000002", "TH-000003"], reason="cloned")
    _, package = revoke(world.hq, world.hq_secrets, devices=["TH-000001"], reason="cloned")
    published = open_revocation_list(
        package, root=world.hq.root_certificate(), now=datetime.now(UTC), root_crl=None,
        not_older_than=None,
    )  # fmt: skip
    assert published.hq_crl is not None
    crl_file = _write(tmp_path / "hq-indirect-crl.pem", load_crl(published.hq_crl))
    findings = pkilint_findings(
        [pkilint_tool("lint_crl"), "lint", "-t", "CRL", "-p", "PKIX"], crl_file
    )
    assert not [f for f in findings if f[0] in SEVERE], findings


# ------------------------------------------------------- 2. root offline, indirect CRL


def test_hq_revoked_counterfeit_is_revoked_for_openssl_with_the_indirect_crl(
    factory: tuple[World, ec.EllipticCurvePrivateKey], tmp_path: Path
) -> None:
    world, key = factory
    now = datetime.now(UTC).replace(microsecond=0)
    genuine = _idevid(world, key, "TH-000001", now)
    counterfeit = _idevid(world, key, "TH-000666", now)
    _know(world, counterfeit, "TH-000666")
    # Another revocation first: the counterfeit's entry then inherits its certificateIssuer
    # from the entry before it (RFC 5280 §5.3.3), which OpenSSL must follow.
    revoke(world.hq, world.hq_secrets, devices=["TH-000002"], reason="cloned")
    _, package = revoke(
        world.hq,
        world.hq_secrets,
        serials=[f"{STATION}:{counterfeit.serial_number:x}"],
        reason="counterfeit",
    )
    root = world.hq.root_certificate()
    published = open_revocation_list(
        package, root=root, now=now, root_crl=None, not_older_than=None
    )
    assert published.hq_crl and published.root_crl and published.crl_signer
    hq_crl, root_crl = load_crl(published.hq_crl), load_crl(published.root_crl)
    entries = list(hq_crl)
    assert entries[-1].serial_number == counterfeit.serial_number
    assert len(entries) == 2 and len(entries[-1].extensions) == 1  # reason only: inherited
    signer = x509.load_der_x509_certificate(published.crl_signer)
    files = [
        "-CAfile",
        _write(tmp_path / "root.pem", root),
        "-untrusted",
        _write(tmp_path / "station-ca.pem", world.station_ca),
        "-untrusted",
        _write(tmp_path / "crl-signer.pem", signer),
        "-CRLfile",
        _write(tmp_path / "root-crl.pem", root_crl),
        "-CRLfile",
        _write(tmp_path / "hq-indirect-crl.pem", hq_crl),
    ]
    bad = _write(tmp_path / "counterfeit.pem", counterfeit)
    good = _write(tmp_path / "genuine.pem", genuine)
    assert "certificate revoked" in _openssl("-extended_crl", "-crl_check_all", *files, bad)
    assert "genuine.pem: OK" in _openssl("-extended_crl", "-crl_check_all", *files, good)
    # Evidence for docs/pki.md: without -extended_crl OpenSSL 3.0 keeps an indirect CRL out
    # of scope and finds no CRL at all for the station CA (it fails closed).
    assert "unable to get certificate CRL" in _openssl("-crl_check_all", *files, good)
    # The project's verifier reads the same CRLs the same way.
    verifier = ChainVerifier(
        [root], [world.station_ca], [root_crl], indirect_crls=[(hq_crl, signer)]
    )
    verifier.verify(genuine, now=now)
    with pytest.raises(VerificationError) as info:
        verifier.verify(counterfeit, now=now)
    assert info.value.reason == "revoked"


def test_station_crl_only_adds_and_never_blocks_when_the_indirect_crl_is_fresh(
    factory: tuple[World, ec.EllipticCurvePrivateKey],
) -> None:
    world, key = factory
    now = datetime.now(UTC).replace(microsecond=0)
    genuine = _idevid(world, key, "TH-000001", now)
    _, package = revoke(world.hq, world.hq_secrets, devices=["TH-000002"], reason="cloned")
    root = world.hq.root_certificate()
    published = open_revocation_list(
        package, root=root, now=now, root_crl=None, not_older_than=None
    )
    assert published.hq_crl and published.crl_signer and published.root_crl
    indirect = [(load_crl(published.hq_crl), x509.load_der_x509_certificate(published.crl_signer))]
    stale_station_crl = build_crl(
        world.station_ca,
        key,
        revoked=[],
        crl_number=7,
        this_update=now - 300 * DAY,
        next_update=now - 200 * DAY,
    )
    crls = [load_crl(published.root_crl), stale_station_crl]
    verifier = ChainVerifier([root], [world.station_ca], crls, indirect_crls=indirect)
    verifier.verify(genuine, now=now)  # a switched-off station's stale CRL is no obstacle
    with pytest.raises(VerificationError) as info:  # the indirect CRL itself must be fresh
        verifier.verify(genuine, now=now + 200 * DAY)
    assert info.value.reason == "crl_stale"


def test_bundles_and_revocations_need_no_root_key(world: World) -> None:
    root_key = world.hq.keys_dir / "root-ca.key.pem"
    root_key.rename(world.base / "root-ca.key.pem.offline")  # the root goes to the safe
    now = datetime.now(UTC).replace(microsecond=0)
    first = build_site_bundle(
        world.hq, SiteBundleRequest(site_id=SITE, devices=("TH-000001",)), world.hq_secrets
    )
    result, package = revoke(world.hq, world.hq_secrets, devices=["TH-000003"], reason="cloned")
    second = build_site_bundle(
        world.hq,
        SiteBundleRequest(site_id=SITE, devices=("TH-000001",), max_offline_days=90),
        world.hq_secrets,
    )
    assert second.revocation_list_sequence > result.sequence > first.revocation_list_sequence
    assert second.root_crl_next_update - now > timedelta(days=300)  # the ceremony's CRL
    listed = open_revocation_list(
        package,
        root=world.hq.root_certificate(),
        now=now,
        root_crl=None,
        not_older_than=None,
    )
    assert [e.device_id.value for e in listed.entries] == ["TH-000003"]
    # Only a root ceremony needs the key, and says so when it is absent.
    with pytest.raises(SecretError):
        root_ceremony(world.hq, world.hq_secrets, now=now)
    (world.base / "root-ca.key.pem.offline").rename(root_key)
    ceremony = root_ceremony(world.hq, world.hq_secrets, now=now)
    assert ceremony.root_crl_number >= 2 and not ceremony.crl_signer_issued


# --------------------------------------------------------------- 3. offline tolerance


def test_max_offline_days_is_chosen_per_site_within_1_to_180(world: World) -> None:
    for bad in (0, 181, -5):
        with pytest.raises(SiteError) as info:
            build_site_bundle(
                world.hq,
                SiteBundleRequest(site_id=SITE, devices=("TH-000001",), max_offline_days=bad),
                world.hq_secrets,
            )
        assert info.value.reason == "bad_request"
    result = build_site_bundle(
        world.hq,
        SiteBundleRequest(site_id=SITE, devices=("TH-000001",), max_offline_days=90),
        world.hq_secrets,
    )
    assert result.max_offline_days == 90


def test_site_bundle_payload_round_trips_the_offline_limit() -> None:
    from tests.fixtures.docs import doc_vector

    base = SiteBundlePayload.decode(doc_vector("site-bundle-payload"))
    assert base.max_offline_days == 30  # older bundles: the default
    changed = SiteBundlePayload(**{**base.__dict__, "max_offline_days": 90})
    assert SiteBundlePayload.decode(changed.encode()).max_offline_days == 90


def test_registrar_refuses_new_registrations_past_the_offline_limit_and_warns_before(
    factory: tuple[World, ec.EllipticCurvePrivateKey],
) -> None:
    world, key = factory
    now = datetime.now(UTC).replace(microsecond=0)
    idevid = _idevid(world, key, "TH-000001", now)
    _, package = revoke(world.hq, world.hq_secrets, devices=["TH-000002"], reason="cloned")
    root = world.hq.root_certificate()
    held = open_revocation_list(package, root=root, now=now, root_crl=None, not_older_than=None)
    issued = datetime.fromtimestamp(held.issued, UTC)

    def verifier(days: int) -> RevocationAwareVerifier:
        return RevocationAwareVerifier(
            [root], [world.station_ca], hq_revocations=held, max_offline_days=days
        )

    # Offline 60 days with a 90-day limit: still registering (warning from day 60 = 2/3).
    at = issued + 60 * DAY
    verifier(90).verify(idevid, now=at)
    assert hq_data_freshness(held, 90, at).state == "warning"
    assert hq_data_freshness(held, 90, issued + 59 * DAY).state == "ok"
    # Past the limit: refused with the reason the protocol reports as revocation_unavailable.
    with pytest.raises(VerificationError) as info:
        verifier(30).verify(idevid, now=issued + 31 * DAY)
    assert info.value.reason == "crl_stale"
    assert "past this site's limit of 30 days" in str(info.value)
    assert hq_data_freshness(held, 30, issued + 31 * DAY).state == "refusing"
    # An older list without CRLs still works as before (no indirect CRL, no limit given).
    RevocationAwareVerifier(
        [root], [world.station_ca], hq_revocations=RevocationList(1, held.issued)
    )


def test_a_thiefs_certificate_without_crldp_cannot_escape_the_indirect_crl(
    factory: tuple[World, ec.EllipticCurvePrivateKey], tmp_path: Path
) -> None:
    """Whoever holds a station key can leave the CRLDP out. OpenSSL then fails closed with
    the root + HQ CRLs ("different CRL scope"), and the project's verifier refuses it as
    revoked once HQ listed it, even next to a fresh (empty) station CRL."""
    world, key = factory
    now = datetime.now(UTC).replace(microsecond=0)
    stolen = issue_factory_certificate(
        world.station_ca,
        key,
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        device_id=DeviceId("TH-000777"),
        manufacturer="Acme Devices",
        not_before=now,
    )
    assert crl_issuers_of(stolen) == ()
    _know(world, stolen, "TH-000777")
    _, package = revoke(
        world.hq,
        world.hq_secrets,
        serials=[f"{STATION}:{stolen.serial_number:x}"],
        reason="counterfeit",
    )
    root = world.hq.root_certificate()
    published = open_revocation_list(
        package, root=root, now=now, root_crl=None, not_older_than=None
    )
    assert published.hq_crl and published.root_crl and published.crl_signer
    hq_crl, root_crl = load_crl(published.hq_crl), load_crl(published.root_crl)
    signer = x509.load_der_x509_certificate(published.crl_signer)
    station_crl = build_crl(
        world.station_ca, key, revoked=[], crl_number=1, this_update=now - DAY,
        next_update=now + 30 * DAY,
    )  # fmt: skip
    out = _openssl(
        "-extended_crl", "-crl_check_all",
        "-CAfile", _write(tmp_path / "root.pem", root),
        "-untrusted", _write(tmp_path / "station-ca.pem", world.station_ca),
        "-untrusted", _write(tmp_path / "crl-signer.pem", signer),
        "-CRLfile", _write(tmp_path / "root-crl.pem", root_crl),
        "-CRLfile", _write(tmp_path / "hq-indirect-crl.pem", hq_crl),
        _write(tmp_path / "stolen.pem", stolen),
    )  # fmt: skip
    assert "different CRL scope" in out and ": OK" not in out
    verifier = ChainVerifier(
        [root], [world.station_ca], [root_crl, station_crl], indirect_crls=[(hq_crl, signer)]
    )
    with pytest.raises(VerificationError) as info:
        verifier.verify(stolen, now=now)
    assert info.value.reason == "revoked"


def test_an_hq_made_before_the_crl_signer_is_upgraded_by_one_root_ceremony(
    world: World,
) -> None:
    """An older HQ has no CRL signer: bundles say what to do, `hq root-crl` creates it."""
    for path in (
        world.hq.certs_dir / "crl-signer.pem",
        world.hq.keys_dir / "crl-signer.key.pem",
    ):
        path.unlink()
    request = SiteBundleRequest(site_id=SITE, devices=("TH-000001",))
    with pytest.raises(HomeError) as info:
        build_site_bundle(world.hq, request, world.hq_secrets)
    assert "hq root-crl" in str(info.value)
    ceremony = root_ceremony(world.hq, world.hq_secrets, now=datetime.now(UTC))
    assert ceremony.crl_signer_issued
    result = build_site_bundle(world.hq, request, world.hq_secrets)
    assert result.revocation_list_sequence >= 1


def test_hq_warns_before_the_root_crl_goes_stale_and_refuses_after(world: World) -> None:
    request = SiteBundleRequest(site_id=SITE, devices=("TH-000001",))
    now = datetime.now(UTC)
    assert build_site_bundle(world.hq, request, world.hq_secrets, now=now).warning is None
    soon = build_site_bundle(world.hq, request, world.hq_secrets, now=now + 170 * DAY)
    assert soon.warning is not None and "hq root-crl" in soon.warning
    with pytest.raises(SiteError) as info:
        build_site_bundle(world.hq, request, world.hq_secrets, now=now + 366 * DAY)
    assert info.value.reason == "root_crl_stale"
    root_ceremony(world.hq, world.hq_secrets, now=now + 366 * DAY)  # the yearly ceremony
    later = build_site_bundle(world.hq, request, world.hq_secrets, now=now + 367 * DAY)
    assert later.warning is None and later.root_crl_next_update > now + 700 * DAY


def test_a_site_adopts_the_root_crl_of_a_new_ceremony_from_an_hq_list(world: World) -> None:
    from click.testing import CliRunner

    from hq.revocation_data import publish_revocations
    from registrar.cli import main as registrar_main
    from registrar.site import commission_site, read_crls

    request = SiteBundleRequest(site_id=SITE, devices=("TH-000001",))
    bundle = build_site_bundle(world.hq, request, world.hq_secrets)
    commission_site(world.site, bundle.package, world.site_secrets)
    root = world.hq.root_certificate()

    def root_crl_number() -> int:
        [crl] = [c for c in read_crls(world.site) if c.issuer == root.subject]
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

    before = root_crl_number()
    now = datetime.now(UTC)
    ceremony = root_ceremony(world.hq, world.hq_secrets, now=now)
    assert ceremony.root_crl_number > before
    store = HqStore.open(world.hq.db_path)
    with store.transaction():
        _, package = publish_revocations(world.hq, store, world.hq_secrets, now)
    store.close()
    path = world.base / "fresh.sealed"
    path.write_bytes(package)
    result = CliRunner().invoke(
        registrar_main,
        ["import-revocations", str(path), "--home", str(world.site.path),
         "--passphrase-file", str(world.base / "site.pass")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert root_crl_number() == ceremony.root_crl_number


def test_hq_warns_before_the_crl_signer_ends_and_refuses_to_sign_after(world: World) -> None:
    """A CRL signer certificate that ends makes every list it signs void at the sites: HQ
    warns 200 days before and then refuses to publish until `hq root-crl` renews it."""
    from hq.revocation_data import root_crl_warning
    from hq.root_signing import issue_root_crl

    request = SiteBundleRequest(site_id=SITE, devices=("TH-000001",))
    signer = world.hq.role_certificate(HqRole.CRL_SIGNER)
    end = signer.not_valid_after_utc
    store = HqStore.open(world.hq.db_path)
    with store.transaction():  # a root CRL alone (no ceremony: the signer is not renewed)
        crl = issue_root_crl(world.hq, store, world.hq_secrets, end - 100 * DAY)
    store.close()
    warning = root_crl_warning(crl, end - 100 * DAY, signer)
    assert warning is not None and "CRL signer" in warning and "hq root-crl" in warning
    assert root_crl_warning(crl, end - 300 * DAY, signer) is None
    with pytest.raises(HomeError, match="hq root-crl"):
        build_site_bundle(world.hq, request, world.hq_secrets, now=end + DAY)
    renewed = root_ceremony(world.hq, world.hq_secrets, now=end - 10 * DAY)
    assert renewed.crl_signer_issued and renewed.crl_signer_not_after > end
    ok = build_site_bundle(world.hq, request, world.hq_secrets, now=end + DAY)
    assert ok.warning is None


def test_hq_commands_root_crl_and_bundle_offline_limit(world: World) -> None:
    from click.testing import CliRunner

    from hq.cli import main as hq_main

    secrets = ["--passphrase-file", str(world.base / "hq.pass")]
    home = ["--home", str(world.hq.path)]
    done = CliRunner().invoke(hq_main, ["root-crl", *home, *secrets])
    assert done.exit_code == 0, done.output
    assert "root CRL" in done.output and "CRL signer: kept" in done.output
    for bad in ("0", "181"):
        out = world.base / f"bundle-{bad}.sealed"
        refused = CliRunner().invoke(
            hq_main,
            ["site", "bundle", *home, "--site", SITE, "--device", "TH-000001",
             "--max-offline-days", bad, "--out", str(out), *secrets],
        )  # fmt: skip
        assert refused.exit_code == 1 and "max offline days must be 1..180" in refused.output
        assert "Traceback" not in refused.output and not out.exists()
    out = world.base / "bundle-90.sealed"
    made = CliRunner().invoke(
        hq_main,
        ["site", "bundle", *home, "--site", SITE, "--device", "TH-000001",
         "--max-offline-days", "90", "--out", str(out), *secrets],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "offline limit   90 days" in made.output


def test_a_list_cannot_pass_an_old_indirect_crl_off_as_fresh(world: World) -> None:
    """The site bounds the age of HQ data by the list's ``issued``; that bound holds for the
    indirect CRL only because its thisUpdate must match (else ``bad_crl``)."""
    from trustcore.revocation import RevocationListError, seal_revocation_list

    _, package = revoke(world.hq, world.hq_secrets, devices=["TH-000002"], reason="cloned")
    root = world.hq.root_certificate()
    now = datetime.now(UTC)
    held = open_revocation_list(package, root=root, now=now, root_crl=None, not_older_than=None)
    relabelled = RevocationList(
        held.sequence + 1,
        held.issued + 10 * 86400,
        held.entries,
        held.hq_crl,
        held.crl_signer,
        held.root_crl,
    )
    forged = seal_revocation_list(
        relabelled,
        signer=world.hq.role_key(HqRole.REVOCATION_SIGNER, world.hq_secrets),
        signer_cert=world.hq.role_certificate(HqRole.REVOCATION_SIGNER),
    )
    with pytest.raises(RevocationListError) as info:
        open_revocation_list(
            forged, root=root, now=now + 11 * DAY, root_crl=None, not_older_than=None
        )
    assert info.value.reason == "bad_crl"
