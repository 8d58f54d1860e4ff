"""``hq init``, ``hq enrol-station`` and ``hq entitle`` (software keystore and a SoftHSM2 root)."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hq.home import HqHome
from hq.store import HqStore
from signers.pkcs11 import SOFTHSM2_MODULE, Pkcs11Key
from signers.software import SoftwareKey
from tests.fixtures.hq import ENV, PASSPHRASE, SoftStation, entitle_args, midnight_utc, run_hq
from tests.fixtures.softhsm import SoftHsmToken
from trustcore.keys import key_id
from trustcore.profiles import (
    OID_EKU_AUDIT_RECEIVER,
    OID_EKU_ENTITLEMENT_SIGNER,
    OID_EKU_REVOCATION_SIGNER,
    station_id_from_certificate,
)
from trustcore.verify import ChainVerifier


def init(home: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    r = run_hq("init", "--home", str(home), "--org", "Acme", *extra, env=env)
    assert r.exit_code == 0, r.output
    return r.output


def enrol(home: Path, station: SoftStation, tmp: Path, *extra: str) -> str:
    path = tmp / f"{station.station_id}-{len(list(tmp.iterdir()))}.enrol"
    path.write_bytes(station.enrolment())
    r = run_hq("enrol-station", "--home", str(home), *extra, str(path))
    assert r.exit_code == 0, r.output
    return r.output


# ---------------------------------------------------------------------------------- init


def test_init_layout_keys_encrypted_and_chained(tmp_path: Path) -> None:
    home = tmp_path / "hq"
    init(home)
    hq = HqHome.open(home)
    root = hq.root_certificate()
    for name in ("root-ca", "entitlement-signer", "audit-receiver", "revocation-signer"):
        path = home / "keys" / f"{name}.key.pem"
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = SoftwareKey.load(path, PASSPHRASE.encode())
        cert = (
            root
            if name == "root-ca"
            else x509.load_pem_x509_certificate((home / "certs" / f"{name}.pem").read_bytes())
        )
        assert cert.public_key() == key.public_key()
    now = datetime.now(UTC)
    for role_file, eku in (
        ("entitlement-signer", OID_EKU_ENTITLEMENT_SIGNER),
        ("audit-receiver", OID_EKU_AUDIT_RECEIVER),
        ("revocation-signer", OID_EKU_REVOCATION_SIGNER),
    ):
        cert = x509.load_pem_x509_certificate((home / "certs" / f"{role_file}.pem").read_bytes())
        ChainVerifier([root], required_eku=eku, require_crl=False).verify(cert, now=now)
    ku = (
        x509.load_pem_x509_certificate((home / "certs" / "audit-receiver.pem").read_bytes())
        .extensions.get_extension_for_class(x509.KeyUsage)
        .value
    )
    assert ku.key_agreement and not ku.digital_signature
    with pytest.raises(ValueError):  # the passphrase really protects the key
        serialization.load_pem_private_key(
            (home / "keys" / "root-ca.key.pem").read_bytes(), password=b"wrong"
        )


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    home = tmp_path / "hq"
    init(home)
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    r = run_hq("init", "--home", str(home), "--org", "Other")
    assert r.exit_code == 1 and "refusing to overwrite" in " ".join(r.output.split())
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_init_without_passphrase_creates_nothing(tmp_path: Path) -> None:
    r = run_hq("init", "--home", str(tmp_path / "hq"), "--org", "Acme", env={})
    assert r.exit_code == 1 and "DEVTRUST_HQ_PASSPHRASE" in r.output
    assert list(tmp_path.iterdir()) == []


def test_passphrase_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-a-file\n")
    pw.chmod(0o600)
    init(tmp_path / "hq", "--passphrase-file", str(pw), env={})
    SoftwareKey.load(tmp_path / "hq" / "keys" / "root-ca.key.pem", b"from-a-file")
    pw.chmod(0o644)  # readable by others: refused
    r = run_hq("init", "--home", str(tmp_path / "hq2"), "--org", "A", "--passphrase-file", str(pw))
    assert r.exit_code == 1 and "other users" in r.output


# ------------------------------------------------------------------------------ enrolment


def test_enrolment_records_station_and_refuses_key_change(tmp_path: Path) -> None:
    home = tmp_path / "hq"
    init(home)
    st = SoftStation("line-1")
    assert "enrolled" in enrol(home, st, tmp_path)
    assert "already enrolled" in enrol(home, st, tmp_path)  # same keys: idempotent
    store = HqStore.open(home / "hq.sqlite")
    try:
        row = store.station("line-1")
        assert row is not None
        assert row.transport_public_der == st.transport.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert row.enrolled_at > 0 and row.generation == 1
    finally:
        store.close()
    impostor = SoftStation("line-1")
    path = tmp_path / "impostor.enrol"
    path.write_bytes(impostor.enrolment())
    r = run_hq("enrol-station", "--home", str(home), str(path))
    assert r.exit_code == 1 and "already_enrolled" in r.output


def test_enrolment_with_swapped_transport_key_is_refused(tmp_path: Path) -> None:
    from trustcore.messages import StationEnrolment

    home = tmp_path / "hq"
    init(home)
    genuine = StationEnrolment.decode(SoftStation("line-2").enrolment())
    attacker = (
        SoftwareKey.ephemeral()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    swapped = StationEnrolment(
        genuine.station_id, genuine.csr_der, attacker, genuine.binding_signature
    )
    path = tmp_path / "swapped.enrol"
    path.write_bytes(swapped.encode())
    r = run_hq("enrol-station", "--home", str(home), str(path))
    assert r.exit_code == 1 and "bad_signature" in r.output
    path.write_bytes(b"\xa1junk")
    r = run_hq("enrol-station", "--home", str(home), str(path))
    assert r.exit_code == 1 and "malformed" in r.output


# ---------------------------------------------------------------------------- entitlement


def test_entitlement_sequence_ca_bound_secrets_and_quorum(tmp_path: Path) -> None:
    home = tmp_path / "hq"
    init(home)
    st = SoftStation("line-3")
    enrol(home, st, tmp_path)
    secret = tmp_path / "wifi.bin"
    secret.write_bytes(b"\x00product-secret\xff")
    approvers = []
    for i in range(3):
        p = tmp_path / f"approver-{i}.pem"
        k = SoftwareKey.ephemeral().public_key()
        p.write_bytes(
            k.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        approvers.append((p, key_id(k)))
    out1 = tmp_path / "e1.bin"
    args = entitle_args(
        home,
        "line-3",
        out1,
        **{
            "--secret": f"wifi=@{secret}",
            "--quorum": "exceed_daily_limit:2:" + ",".join(str(p) for p, _ in approvers),
            "--timezone": "Asia/Shanghai",
        },
    )
    r = run_hq(*args)
    assert r.exit_code == 0, r.output
    assert "sequence 1" in r.output and "exceed_daily_limit 2/3" in r.output
    payload = st.import_entitlement(out1.read_bytes())
    policy = payload.policy
    assert (policy.sequence, policy.station_id) == (1, "line-3")
    assert (policy.total_quota, policy.daily_limit) == (20, 10)
    assert policy.day_timezone == "Asia/Shanghai"
    assert payload.product_secrets == {"wifi": b"\x00product-secret\xff"}
    [rule] = policy.quorum
    assert (rule.operation, rule.m, rule.approvers) == (
        "exceed_daily_limit",
        2,
        tuple(kid for _, kid in approvers),
    )
    ca = st.ca_cert
    assert ca is not None
    root = HqHome.open(home).root_certificate()
    ca.verify_directly_issued_by(root)
    assert station_id_from_certificate(ca).value == "line-3"
    assert ca.public_key() == st.ca_key.public_key()
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    # The station CA outlives the entitlement (it lasts until the root's end): devices made
    # under it verify for their whole life; the window bounds issuance only (docs/pki.md).
    assert ca.not_valid_after_utc == root.not_valid_after_utc
    assert int(ca.not_valid_after_utc.timestamp()) > policy.not_after + 10 * 365 * 86400
    # The next one gets the next sequence; an existing --out is never overwritten.
    r = run_hq(*entitle_args(home, "line-3", out1))
    assert r.exit_code == 2 and "exists" in r.output
    out2 = tmp_path / "e2.bin"
    assert run_hq(*entitle_args(home, "line-3", out2)).exit_code == 0
    assert st.import_entitlement(out2.read_bytes()).policy.sequence == 2


def test_entitlement_refusals(tmp_path: Path) -> None:
    home = tmp_path / "hq"
    init(home)
    enrol(home, SoftStation("line-4"), tmp_path)
    out = tmp_path / "e.bin"
    r = run_hq(*entitle_args(home, "nobody", out))
    assert r.exit_code == 1 and "not enrolled" in r.output
    past = (midnight_utc(10)).isoformat()
    r = run_hq(*entitle_args(home, "line-4", out, **{"--not-after": past}))
    assert r.exit_code == 1 and "window_expired" in r.output
    r = run_hq(*entitle_args(home, "line-4", out, **{"--not-before": "2026-01-01T00:00:00"}))
    assert r.exit_code == 2 and "time zone" in r.output
    r = run_hq(*entitle_args(home, "line-4", out, **{"--daily-limit": "30"}))
    assert r.exit_code == 1 and "daily limit above total quota" in r.output
    r = run_hq(*entitle_args(home, "line-4", out, **{"--timezone": "Mars/Olympus"}))
    assert r.exit_code == 1 and "unknown time zone" in r.output
    assert not out.exists()
    store = HqStore.open(home / "hq.sqlite")
    try:
        assert store.last_entitlement_sequence("line-4") == 0
    finally:
        store.close()


# ---------------------------------------------------------------------------- PKCS#11 root


def test_pkcs11_root_init_enrol_entitle(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    """The root key generated in a SoftHSM2 token (tests/fixtures/softhsm.py)."""
    label, pin = softhsm_token.label, softhsm_token.pin
    home = tmp_path / "hq"
    env = {**ENV, "DEVTRUST_HQ_PIN": pin}
    token_args = (
        "--root-pkcs11-module",
        SOFTHSM2_MODULE,
        "--root-pkcs11-token",
        label,
        "--root-pkcs11-key",
        "root-ca",
    )
    out = init(home, *token_args, env=env)
    assert "generated in the token" in out
    assert not (home / "keys" / "root-ca.key.pem").exists()  # the root key is only in the token
    root = HqHome.open(home).root_certificate()
    with Pkcs11Key.open(SOFTHSM2_MODULE, label, "root-ca", pin) as token_key:
        assert token_key.public_key() == root.public_key()
    st = SoftStation("line-hsm")
    enrol(home, st, tmp_path)
    ent = tmp_path / "e.bin"
    r = run_hq(*entitle_args(home, "line-hsm", ent), env=env)
    assert r.exit_code == 0, r.output
    st.import_entitlement(ent.read_bytes())
    assert st.ca_cert is not None
    st.ca_cert.verify_directly_issued_by(root)  # signed in the token
    # Without the PIN the root key cannot be used.
    r = run_hq(*entitle_args(home, "line-hsm", tmp_path / "e2.bin"))
    assert r.exit_code == 1 and "DEVTRUST_HQ_PIN" in r.output
    # A second HQ can take an existing token key instead of generating one.
    out = init(tmp_path / "hq2", *token_args, env=env)
    assert "taken from the token" in out
    assert HqHome.open(tmp_path / "hq2").root_certificate().public_key() == root.public_key()
    assert datetime.now(UTC) + timedelta(days=365) < root.not_valid_after_utc
