"""Chain verification: good chains pass, every defect is refused with its own reason, by
our verifier and (where OpenSSL has the check) by ``openssl verify`` on the same files."""

from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.fixtures.pki import (
    DEFECTS,
    MANUFACTURER,
    Defect,
    Pki,
    _leaf_builder,
    make_crl,
    p256,
    pem,
)
from trustcore.errors import VERIFICATION_REASONS, CrlError, VerificationError
from trustcore.identity import DeviceId, StationId
from trustcore.profiles import HqRole, issue_factory_certificate, issue_station_ca
from trustcore.verify import ChainVerifier, load_certificate, verify_client_chain

DAY = timedelta(days=1)
OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def verifier(pki: Pki) -> ChainVerifier:
    return ChainVerifier([pki.root], pki.intermediates, pki.crls)


def _refusal(verifier: ChainVerifier, leaf: x509.Certificate, now: datetime, **kw: object) -> str:
    with pytest.raises(VerificationError) as info:
        verifier.verify(leaf, now=now, **kw)  # type: ignore[arg-type]
    assert info.value.reason in VERIFICATION_REASONS
    return info.value.reason


# ------------------------------------------------------------------------------ good chains


def test_idevid_chain_is_accepted(pki: Pki, verifier: ChainVerifier) -> None:
    identity = verifier.verify(pki.idevid, now=pki.now, require_device_id=True)
    assert identity.device_id == pki.device_id
    assert identity.chain == (pki.idevid, pki.station_ca, pki.root)
    assert identity.issuer == pki.station_ca and identity.root == pki.root
    assert identity.subject == pki.idevid.subject


def test_ldevid_chain_is_accepted(pki: Pki, verifier: ChainVerifier) -> None:
    identity = verifier.verify(pki.ldevid, now=pki.now)
    assert identity.device_id == pki.device_id
    assert identity.chain == (pki.ldevid, pki.site_ca, pki.root)


def test_chain_with_intermediate_sent_by_the_client(pki: Pki) -> None:
    bare = ChainVerifier([pki.root], (), pki.crls)
    identity = bare.verify(pki.idevid, now=pki.now, intermediates=[pki.station_ca])
    assert identity.issuer == pki.station_ca
    assert _refusal(bare, pki.idevid, pki.now) == "untrusted"


def test_broker_and_role_certificates_with_their_ekus(pki: Pki) -> None:
    server = ChainVerifier(
        [pki.root], [pki.site_ca], pki.crls, required_eku=ExtendedKeyUsageOID.SERVER_AUTH
    )
    assert server.verify(pki.broker, now=pki.now).device_id is None
    assert _refusal(server, pki.broker, pki.now, require_device_id=True) == "missing_san"
    assert _refusal(server, pki.ldevid, pki.now) == "wrong_eku"
    for role, (cert, _key) in pki.roles.items():
        role_verifier = ChainVerifier([pki.root], (), pki.crls, required_eku=role.eku)
        assert role_verifier.verify(cert, now=pki.now).chain == (cert, pki.root)
        for other in HqRole:
            if other is not role:
                wrong = ChainVerifier([pki.root], (), pki.crls, required_eku=other.eku)
                assert _refusal(wrong, cert, pki.now) == "wrong_eku"


def test_one_shot_function_and_pem_input(pki: Pki) -> None:
    identity = verify_client_chain(
        pem(pki.idevid), [pki.station_ca], roots=[pki.root], crls=pki.crls, now=pki.now
    )
    assert identity.device_id == pki.device_id


# ------------------------------------------------------------------------- defective chains


@pytest.mark.parametrize("make", DEFECTS, ids=lambda f: f.__name__)
def test_defect_is_refused_with_its_reason(
    pki: Pki, verifier: ChainVerifier, make: Callable[[Pki], Defect]
) -> None:
    case = make(pki)
    assert _refusal(verifier, case.leaf, pki.now, intermediates=case.intermediates) == case.reason


def test_every_named_defect_reason_is_covered() -> None:
    names = {f.__name__ for f in DEFECTS}
    for required in (
        "expired",
        "not_yet_valid",
        "wrong_eku",
        "wrong_issuer",
        "self_signed",
        "revoked",
        "missing_san",
        "ca_true_leaf",
        "wrong_key_type_p384",
        "path_length_violation",
    ):
        assert f"{required}_certificate" in names


def _openssl_verify(
    tmp_path: Path, pki: Pki, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate]
) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None, "openssl must be installed (Debian package openssl)"
    (tmp_path / "root.pem").write_bytes(pem(pki.root))
    (tmp_path / "untrusted.pem").write_bytes(b"".join(pem(c) for c in intermediates))
    (tmp_path / "crl.pem").write_bytes(b"".join(pem(c) for c in pki.crls))
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    return subprocess.run(
        [
            OPENSSL,
            "verify",
            "-x509_strict",
            "-crl_check",
            "-attime",
            str(int(pki.now.timestamp())),
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            "-CRLfile",
            str(tmp_path / "crl.pem"),
            "-purpose",
            "sslclient",
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_openssl_accepts_the_good_chains(pki: Pki, tmp_path: Path) -> None:
    for leaf, issuer in ((pki.idevid, pki.station_ca), (pki.ldevid, pki.site_ca)):
        result = _openssl_verify(tmp_path, pki, leaf, [issuer])
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith(": OK")


@pytest.mark.parametrize("make", DEFECTS, ids=lambda f: f.__name__)
def test_openssl_agrees_where_it_can(
    pki: Pki, tmp_path: Path, make: Callable[[Pki], Defect]
) -> None:
    case = make(pki)
    result = _openssl_verify(tmp_path, pki, case.leaf, case.intermediates)
    output = result.stdout + result.stderr
    if case.openssl_error is None:
        # OpenSSL has no such check: it accepts what only our verifier refuses.
        assert result.returncode == 0, output
    else:
        assert result.returncode != 0, output
        assert case.openssl_error in output


# ---------------------------------------------------------------------------- revocation


def test_crl_missing_is_fail_closed(pki: Pki) -> None:
    without_station_crl = ChainVerifier([pki.root], pki.intermediates, [pki.root_crl])
    assert _refusal(without_station_crl, pki.idevid, pki.now) == "crl_missing"
    without_root_crl = ChainVerifier([pki.root], pki.intermediates, [pki.station_crl])
    assert _refusal(without_root_crl, pki.idevid, pki.now) == "crl_missing"
    lax = ChainVerifier([pki.root], pki.intermediates, (), require_crl=False)
    assert lax.verify(pki.idevid, now=pki.now).device_id == pki.device_id


def test_stale_crl_is_refused(pki: Pki, verifier: ChainVerifier) -> None:
    assert _refusal(verifier, pki.idevid, pki.now + 8 * DAY) == "crl_stale"
    stale = make_crl(
        pki.now,
        pki.station_ca,
        pki.station_key,
        this_update=pki.now - 10 * DAY,
        next_update=pki.now - DAY,
    )
    stale_verifier = ChainVerifier([pki.root], pki.intermediates, [pki.root_crl, stale])
    assert _refusal(stale_verifier, pki.idevid, pki.now) == "crl_stale"


def test_revoked_station_ca_revokes_its_devices(pki: Pki) -> None:
    root_crl = make_crl(pki.now, pki.root, pki.root_key, revoked=(pki.station_ca,), number=2)
    revoking = ChainVerifier([pki.root], pki.intermediates, [*pki.crls, root_crl])
    assert _refusal(revoking, pki.idevid, pki.now) == "revoked"
    assert revoking.verify(pki.ldevid, now=pki.now).device_id == pki.device_id  # site CA is fine


def test_newest_crl_wins(pki: Pki) -> None:
    newer = make_crl(pki.now, pki.station_ca, pki.station_key, number=5)  # un-revokes nothing
    lists_revoked = make_crl(
        pki.now, pki.station_ca, pki.station_key, revoked=(pki.idevid,), number=6
    )
    v = ChainVerifier([pki.root], pki.intermediates, [pki.root_crl, lists_revoked, newer])
    assert _refusal(v, pki.idevid, pki.now) == "revoked"


def test_forged_crl_of_a_known_ca_is_refused_at_construction(pki: Pki) -> None:
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.station_ca.subject)
        .last_update(pki.now - DAY)
        .next_update(pki.now + DAY)
        .add_extension(x509.CRLNumber(9), critical=False)
        .sign(p256("crl-forger"), hashes.SHA256())
    )
    with pytest.raises(CrlError) as info:
        ChainVerifier([pki.root], pki.intermediates, [pki.root_crl, forged])
    assert info.value.reason == "crl_bad_signature"


def test_crl_of_a_ca_sent_by_the_client_is_checked_once_the_ca_verifies(pki: Pki) -> None:
    v = ChainVerifier([pki.root], (), pki.crls)
    case = next(f for f in DEFECTS if f.__name__ == "revoked_certificate")(pki)
    assert _refusal(v, case.leaf, pki.now, intermediates=[pki.station_ca]) == "revoked"
    assert v.verify(pki.idevid, now=pki.now, intermediates=[pki.station_ca]).device_id
    # A forged CRL for a CA the verifier does not know yet is ignored: crl_missing, not "ok".
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.station_ca.subject)
        .last_update(pki.now - DAY)
        .next_update(pki.now + DAY)
        .add_extension(x509.CRLNumber(9), critical=False)
        .sign(p256("crl-forger"), hashes.SHA256())
    )
    v2 = ChainVerifier([pki.root], (), [pki.root_crl, forged])
    assert _refusal(v2, pki.idevid, pki.now, intermediates=[pki.station_ca]) == "crl_missing"


# ------------------------------------------------------------------------------- the rest


def test_expired_intermediate_is_reported_as_expired(pki: Pki) -> None:
    old_key = p256("old-station")
    old_station = issue_station_ca(
        pki.root,
        pki.root_key,
        old_key.public_key(),
        station_id=StationId("station-old"),
        organization=MANUFACTURER,
        not_before=pki.now - 300 * DAY,
        not_after=pki.now - 10 * DAY,
        max_not_after=pki.now,
    )
    leaf = issue_factory_certificate(
        old_station,
        old_key,
        p256("old-device").public_key(),
        device_id=DeviceId("dev-old"),
        manufacturer=MANUFACTURER,
        not_before=pki.now - 100 * DAY,
    )
    v = ChainVerifier([pki.root], [old_station], [pki.root_crl], require_crl=False)
    assert _refusal(v, leaf, pki.now) == "expired"


def test_inconsistent_device_identity_is_malformed(pki: Pki, verifier: ChainVerifier) -> None:
    leaf = _leaf_builder(pki, p256("mixed"))
    builder = x509.CertificateBuilder().subject_name(
        x509.Name(
            [
                x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "dev-someone-else"),
                *list(leaf.subject)[1:],
            ]
        )
    )
    builder = (
        builder.issuer_name(leaf.issuer)
        .public_key(leaf.public_key())
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for ext in leaf.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    mixed = builder.sign(pki.station_key, hashes.SHA256())
    assert _refusal(verifier, mixed, pki.now) == "malformed"


def test_bad_inputs(pki: Pki, verifier: ChainVerifier) -> None:
    with pytest.raises(VerificationError) as info:
        load_certificate(b"not a certificate")
    assert info.value.reason == "malformed"
    with pytest.raises(VerificationError) as info:
        verifier.verify(pki.idevid, now=datetime(2025, 1, 1))
    assert info.value.reason == "malformed"
    with pytest.raises(VerificationError):
        ChainVerifier([], (), ())


def test_verifier_is_fast_enough(pki: Pki, verifier: ChainVerifier) -> None:
    """Registration needs a few hundred verifications per second; leave a wide margin."""
    count = 300
    start = time.perf_counter()
    for _ in range(count):
        verifier.verify(pki.idevid, now=pki.now)
    elapsed = time.perf_counter() - start
    assert count / elapsed > 300, f"{count / elapsed:.0f} verifications/s"


def test_pem_dir_fixture_is_a_usable_pki(pki: Pki, pki_pem_dir: Path) -> None:
    assert OPENSSL is not None
    for leaf, issuer in (("idevid.pem", "station_ca.pem"), ("ldevid.pem", "site_ca.pem")):
        result = subprocess.run(
            [
                OPENSSL,
                "verify",
                "-x509_strict",
                "-crl_check",
                "-CAfile",
                str(pki_pem_dir / "root.pem"),
                "-untrusted",
                str(pki_pem_dir / issuer),
                "-CRLfile",
                str(pki_pem_dir / "crls.pem"),
                "-purpose",
                "sslclient",
                str(pki_pem_dir / leaf),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    key_pem = (pki_pem_dir / "broker-key.pem").read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_serial_that_is_not_positive_is_malformed(pki: Pki, verifier: ChainVerifier) -> None:
    """RFC 5280 §4.1.2.2: positive and at most 20 octets (the store keeps a CertSerial).
    The builder refuses serial 0, so it is patched into the DER (same length); the serial
    check runs before the signature check, so the broken signature does not matter."""
    leaf = _leaf_builder(pki, p256("zero"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(leaf.public_key())
        .serial_number(1)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for ext in leaf.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    one = builder.sign(pki.station_key, hashes.SHA256()).public_bytes(Encoding.DER)
    head = b"\xa0\x03\x02\x01\x02\x02\x01"  # [0] v3, then INTEGER of length 1
    assert one.count(head + b"\x01") == 1
    with warnings.catch_warnings():  # cryptography warns of a zero serial (the registrar's
        warnings.simplefilter("ignore")  # request path parses without making that an error)
        zero = x509.load_der_x509_certificate(one.replace(head + b"\x01", head + b"\x00"))
        assert zero.serial_number == 0
        assert _refusal(verifier, zero, pki.now) == "malformed"
    # control: the same certificate with its signed serial 1 verifies
    assert verifier.verify(x509.load_der_x509_certificate(one), now=pki.now).leaf.serial_number == 1
