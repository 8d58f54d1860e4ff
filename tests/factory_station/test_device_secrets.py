"""Product secrets of the entitlement provisioned into device TPMs (issue 10, item 5).

Pure: the secret rules of the policy (encoding, validation) and the decision
(``trustcore.device_secrets``), and HQ's reconciler over ``secret_provisioned`` records.
With swtpm (station TPM and two device TPMs, each with its own EK and seeds): a device gets
the secret as an imported HMAC key and proves it with TPM2_HMAC; the blob made for it does
not import into the other device's TPM (TPM_RC_INTEGRITY); the object neither unseals nor
duplicates; a device that names another TPM's storage key is refused; a request outside
the rule is refused and audited; the station database holds no plaintext.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CC, TPM2_RC, TPM2_SE
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
)

from device_sim.cli import main as device_main
from device_sim.device import SimDevice, TpmDevice, read_secret_object, vendor_ca_pem
from device_sim.swtpm import Swtpm, provision_ek_certificate
from factory_station.cli import main as station_main
from factory_station.errors import AttestationError, EntitlementImportError, IssuanceRefused
from factory_station.provision import provision_device
from factory_station.station import AttestationMode, FactoryStation
from hq.cli import main as hq_main
from signers.errors import TpmImportError, TpmKeyError
from signers.tpm import storage_primary_template
from signers.tpm_import import SecretImport, secret_hmac
from tests.fixtures.pki import Pki
from tests.fixtures.station import (
    PRODUCT,
    STATION_ID,
    SoftHq,
    StationEnv,
    Vendor,
)
from trustcore.audit import decode_record
from trustcore.device_secrets import check_secret_use, secrets_for_device
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy, SecretRule
from trustcore.errors import EncodingError, InvalidValueError, PolicyError
from trustcore.identity import DeviceId, StationId
from trustcore.reconcile import Reconciler

NOW = 1_800_000_000
DAY = 86_400
FW_KEY = bytes(range(32))
TOKEN = b"cloud-token-0123456789abcdef"


def _policy(*rules: SecretRule) -> EntitlementPolicy:
    return EntitlementPolicy(
        entitlement_id="ent-1",
        station_id="station-t1",
        sequence=1,
        product=PRODUCT,
        total_quota=10,
        daily_limit=10,
        day_timezone="UTC",
        not_before=NOW - DAY,
        not_after=NOW + 30 * DAY,
        id_rule=DeviceIdRule("dev-", 1, 999_999, 6),
        secrets=rules,
    )


FW_RULE = SecretRule("fw-key", (PRODUCT,), 1, 5, NOW + DAY)
TOKEN_RULE = SecretRule("cloud-token", (PRODUCT,), 3, 3, NOW + DAY)


# ------------------------------------------------------------------------------------ pure


def test_secret_rules_round_trip_and_old_policies_keep_their_bytes() -> None:
    policy = _policy(FW_RULE, TOKEN_RULE)
    assert EntitlementPolicy.from_map(policy.to_map()) == policy
    plain = _policy()
    assert "secrets" not in plain.to_map()  # a policy without secrets encodes as before
    m = policy.to_map()
    m["secrets"][0]["extra"] = 1
    with pytest.raises(EncodingError, match="unknown"):
        EntitlementPolicy.from_map(m)
    with pytest.raises(EncodingError, match="present but empty"):
        EntitlementPolicy.from_map(plain.to_map() | {"secrets": []})


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (SecretRule("fw-key", (PRODUCT,), 0, 5, NOW + DAY), "outside the entitlement"),
        (SecretRule("fw-key", (PRODUCT,), 1, 5, NOW + 31 * DAY), "inside the key-use window"),
    ],
)
def test_a_rule_cannot_reach_past_the_entitlement(rule: SecretRule, message: str) -> None:
    with pytest.raises(InvalidValueError, match=message):
        _policy(rule)


def test_bad_rules_are_refused() -> None:
    with pytest.raises(InvalidValueError, match="one rule per product secret"):
        _policy(FW_RULE, FW_RULE)
    with pytest.raises(InvalidValueError, match="no product"):
        SecretRule("fw-key", (), 1, 5, NOW)
    with pytest.raises(InvalidValueError, match="bad secret name"):
        SecretRule("../etc", (PRODUCT,), 1, 5, NOW)


def test_which_device_gets_which_secret() -> None:
    policy = _policy(FW_RULE, TOKEN_RULE)
    names = [r.name for r in secrets_for_device(policy, "dev-000003", PRODUCT, NOW)]
    assert names == ["fw-key", "cloud-token"]
    assert [r.name for r in secrets_for_device(policy, "dev-000001", PRODUCT, NOW)] == ["fw-key"]
    assert secrets_for_device(policy, "dev-000006", PRODUCT, NOW) == ()
    assert secrets_for_device(policy, "dev-000003", PRODUCT, NOW + DAY) == ()  # expired
    cases = [
        ("nope", "dev-000001", PRODUCT, NOW, "secret_unknown"),
        ("cloud-token", "dev-000001", PRODUCT, NOW, "secret_device_out_of_range"),
        ("fw-key", "dev-000001", "toaster", NOW, "secret_wrong_product"),
        ("fw-key", "dev-000001", PRODUCT, NOW + DAY, "secret_expired"),
        ("fw-key", "dev-000001", PRODUCT, NOW - 2 * DAY, "secret_expired"),
    ]
    for name, device, product, when, reason in cases:
        with pytest.raises(PolicyError) as info:
            check_secret_use(policy, name, device, product, when)
        assert info.value.reason == reason, (name, device)
    with pytest.raises(PolicyError) as info:
        secrets_for_device(policy, "dev-000001", PRODUCT, NOW, ["fw-key", "cloud-token"])
    assert info.value.reason == "secret_device_out_of_range"


def test_hq_reconciler_counts_secret_uses_and_flags_uses_outside_the_rule() -> None:
    rec = Reconciler(_policy(FW_RULE, TOKEN_RULE))
    rec.add_issued(1, NOW, "dev-000001", b"\x01" * 32, PRODUCT)
    rec.add_issued(2, NOW, "dev-000003", b"\x03" * 32, PRODUCT)
    rec.add_secret(3, NOW, "dev-000001", "fw-key", PRODUCT)
    rec.add_secret(4, NOW, "dev-000003", "fw-key", PRODUCT)
    rec.add_secret(5, NOW, "dev-000003", "cloud-token", PRODUCT)
    assert rec.report().clean
    rec.add_secret(6, NOW, "dev-000001", "cloud-token", PRODUCT)  # not its device range
    rec.add_secret(7, NOW + DAY, "dev-000001", "fw-key", PRODUCT)  # after the rule's end
    rec.add_secret(8, NOW, "dev-000004", "fw-key", PRODUCT)  # no certificate
    rec.add_secret(9, NOW, "dev-000001", "unknown", PRODUCT)
    report = rec.report()
    assert report.secret_uses == {"fw-key": 4, "cloud-token": 2, "unknown": 1}
    assert [(v.kind, v.seq) for v in report.violations] == [
        ("secret_outside_policy", 6),
        ("secret_outside_policy", 7),
        ("secret_outside_policy", 8),
        ("secret_outside_policy", 9),
    ]
    assert "secret_device_out_of_range" in report.violations[0].detail
    assert report.to_map()["secret_uses"] == {"cloud-token": 2, "fw-key": 4, "unknown": 1}


# ------------------------------------------------------------------------------ with swtpm


class RecordingDevice(TpmDevice):
    """A device that keeps the import blobs it was sent (to try them elsewhere), and can be
    told to name another TPM's storage key."""

    def __init__(self, device: SimDevice, lie_parent: bytes | None = None) -> None:
        assert device.tpm is not None
        super().__init__(device.tpm, device.directory)
        self.received: list[SecretImport] = []
        self.lie_parent = lie_parent

    def storage_parent(self) -> bytes:
        return self.lie_parent if self.lie_parent is not None else super().storage_parent()

    def import_secrets(self, device_id: DeviceId, imports: Sequence[SecretImport]) -> None:
        self.received.extend(imports)
        super().import_secrets(device_id, imports)


def _own_tpm_device(env: StationEnv, vendor: Vendor, name: str) -> SimDevice:
    """A device whose TPM has its own EK and seeds (not a copy of the template's)."""
    return SimDevice.manufacture(env.devices_dir / name, ek_ca_dir=vendor.ca_dir).power_on()


def _entitlement(env: StationEnv, *, until: int) -> bytes:
    return env.hq.entitlement(
        secrets={"fw-key": FW_KEY, "cloud-token": TOKEN},
        secret_rules=(
            SecretRule("fw-key", (PRODUCT,), 1, 5, until),
            SecretRule("cloud-token", (PRODUCT,), 3, 3, until),
        ),
    )


@pytest.mark.tpm
def test_a_secret_lives_only_in_the_device_tpm_it_was_made_for(
    station_env: StationEnv, vendor: Vendor
) -> None:
    env = station_env
    now = int(datetime.now(UTC).timestamp())
    a_dev = _own_tpm_device(env, vendor, "a")
    b_dev = _own_tpm_device(env, vendor, "b")
    try:
        with env.open() as station:
            station.import_entitlement(_entitlement(env, until=now + DAY))
            a = RecordingDevice(a_dev)
            result = provision_device(station, a, DeviceId("dev-000001"))
            assert result.secrets == ("fw-key",)  # cloud-token is for dev-000003 only
            [blob] = a.received
            assert blob.name == "fw-key"

            # The device proves it holds the secret: HMAC computed inside its TPM, checked by
            # whoever knows the secret (here: the plaintext HQ put in the entitlement).
            challenge = os.urandom(32)
            assert a_dev.endpoint.secret_hmac("fw-key", challenge) == secret_hmac(FW_KEY, challenge)
            # After a power cycle, from the TPM-wrapped object on disk.
            a_dev.power_off()
            a_dev.power_on()
            assert a_dev.endpoint.secret_hmac("fw-key", b"again") == secret_hmac(FW_KEY, b"again")

            # Another device's TPM cannot import the blob: the seed was encrypted to A's
            # storage key, so B derives the wrong integrity key.
            assert b_dev.tpm is not None
            with pytest.raises(TpmImportError) as info:
                b_dev.tpm.import_object(blob.public, blob.duplicate, blob.seed)
            assert info.value.rc is not None
            assert info.value.rc & 0xBF == TPM2_RC.INTEGRITY  # format-1 code, parameter 3
            assert "integrity check failed" in str(info.value)
            # Nor load what A's TPM made of it (wrapped by A's storage key).
            a_obj = (a_dev.directory / "secrets" / "fw-key.cbor").read_bytes()
            assert FW_KEY not in a_obj
            stored = read_secret_object(a_dev.directory, "fw-key")
            assert stored is not None
            public, private = stored
            with pytest.raises(TpmKeyError, match="refused the imported object"):
                b_dev.tpm.hmac_with(public, private, b"x")

            # Inside A, the object does HMAC only: no unseal, no duplication out.
            _assert_not_extractable(a_dev, public, private)

            # B names A's storage key (it would want A's blobs): the attestation's qualified
            # name shows B's key was not loaded under it.
            b = RecordingDevice(b_dev, lie_parent=a_dev.endpoint.storage_parent())
            with pytest.raises(AttestationError) as refused:
                provision_device(station, b, DeviceId("dev-000003"))
            assert refused.value.reason == "parent_mismatch"
            assert b.received == []

            # A secret outside its rule is refused before any device work, and audited.
            c_dev = env.device()
            with pytest.raises(IssuanceRefused) as info2:
                provision_device(
                    station, c_dev.endpoint, DeviceId("dev-000002"), secrets=["cloud-token"]
                )
            assert info2.value.reason == "secret_device_out_of_range"
            assert c_dev.certificate() is None

            events = [decode_record(r) for _, r in station.store.audit_records(0)]
            given = [r.fields for r in events if r.event == "secret_provisioned"]
            assert given == [
                {
                    "device_id": "dev-000001",
                    "secret": "fw-key",
                    "product": PRODUCT,
                    "entitlement_seq": 1,
                    "parent": given[0]["parent"],
                }
            ]
            refused_reasons = [r.fields["reason"] for r in events if r.event == "refused"]
            assert refused_reasons == ["attestation_parent_mismatch", "secret_device_out_of_range"]

        # No plaintext secret anywhere in the station's files.
        for path in env.home.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert FW_KEY not in data and TOKEN not in data, path
    finally:
        a_dev.power_off()
        b_dev.power_off()


def _assert_not_extractable(device: SimDevice, public: bytes, private: bytes) -> None:
    tpm = device.tpm
    assert tpm is not None
    ectx = tpm.esapi
    with tpm.lock:
        srk, *_ = ectx.create_primary(
            in_sensitive=TPM2B_SENSITIVE_CREATE(),
            in_public=TPM2B_PUBLIC(publicArea=storage_primary_template()),
            primary_handle=ESYS_TR.OWNER,
        )
        try:
            handle = ectx.load(
                srk, TPM2B_PRIVATE.unmarshal(private)[0], TPM2B_PUBLIC.unmarshal(public)[0]
            )
        finally:
            ectx.flush_context(srk)
        try:
            with pytest.raises(TSS2_Exception) as unseal:
                ectx.unseal(handle)
            assert unseal.value.rc & 0xBF == TPM2_RC.ATTRIBUTES
            # TPM2_Duplicate needs the DUP role: a policy session whose digest is the
            # object's authPolicy. It is empty, so even the right command code fails.
            session = ectx.start_auth_session(
                tpm_key=ESYS_TR.NONE,
                bind=ESYS_TR.NONE,
                session_type=TPM2_SE.POLICY,
                symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                auth_hash=TPM2_ALG.SHA256,
            )
            try:
                ectx.policy_command_code(session, TPM2_CC.Duplicate)
                with pytest.raises(TSS2_Exception) as dup:
                    ectx.duplicate(
                        handle,
                        ESYS_TR.RH_NULL,
                        TPM2B_DATA(),
                        TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                        session1=session,
                    )
                assert dup.value.rc & 0xBF == TPM2_RC.POLICY_FAIL
            finally:
                ectx.flush_context(session)
        finally:
            ectx.flush_context(handle)


# ------------------------------------------------------------------- through the commands


@pytest.mark.tpm
@pytest.mark.slow
def test_hq_secret_to_device_tpm_and_back_to_hq_reconciliation(
    tmp_path: Path, swtpm_factory: Callable[..., Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hq entitle --secret --secret-rule`` → ``device-sim provision`` (at the station)
    imports it into the device TPM → ``device-sim secret-hmac`` proves it → ``hq ingest-audit``
    counts it."""
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "correct horse battery staple")
    runner = CliRunner()

    def run(cli: object, *args: object, code: int = 0) -> str:
        result = runner.invoke(cli, [str(a) for a in args])  # type: ignore[arg-type]
        assert result.exit_code == code, result.output
        return result.output

    hq, station = tmp_path / "hq", tmp_path / "station"
    run(hq_main, "init", "--home", hq, "--org", "Acme Devices")
    vendor = tmp_path / "vendor"
    provision_ek_certificate(tmp_path / "probe-tpm", ca_dir=vendor)
    (tmp_path / "vendor.pem").write_bytes(vendor_ca_pem(vendor))
    station_tpm = swtpm_factory(tmp_path / "station-tpm")
    enrolment = tmp_path / "enrolment.cbor"
    run(
        station_main, "init", "--home", station, "--station-id", "station-01",
        "--tcti", station_tpm.tcti, "--root", hq / "certs" / "root-ca.pem",
        "--tpm-vendor-ca", tmp_path / "vendor.pem", "--enrolment-out", enrolment,
    )  # fmt: skip
    run(hq_main, "enrol-station", "--home", hq, enrolment)

    (tmp_path / "fw.key").write_bytes(FW_KEY)
    (tmp_path / "token").write_bytes(TOKEN)
    (tmp_path / "short").write_bytes(b"pin1")
    now = datetime.now(UTC)
    base = [
        "entitle", "--home", hq, "--station", "station-01", "--product", "thermostat",
        "--quota", "5", "--daily-limit", "5", "--timezone", "UTC",
        "--not-before", (now - timedelta(hours=1)).isoformat(),
        "--not-after", (now + timedelta(days=30)).isoformat(),
        "--id-prefix", "TH-", "--id-first", "0", "--id-last", "999", "--id-digits", "6",
        "--out", tmp_path / "refused.sealed",
    ]  # fmt: skip
    # Refused at HQ, nothing written: a value no TPM HMAC key takes, a rule without its
    # secret, a malformed rule.
    out = run(hq_main, *base, "--secret", f"pin=@{tmp_path / 'short'}", code=1)
    assert "bad_secret" in out and "4 bytes" in out
    out = run(hq_main, *base, "--secret-rule", f"ghost:0-1:{now.isoformat()}", code=1)
    assert "rule for a secret not given" in out
    out = run(hq_main, *base, "--secret-rule", "fw-key:0:tomorrow", code=2)
    assert "NAME:FIRST-LAST:UNTIL" in out
    assert not (tmp_path / "refused.sealed").exists()
    entitlement = tmp_path / "entitlement.sealed"
    out = run(
        hq_main, "entitle", "--home", hq, "--station", "station-01", "--product", "thermostat",
        "--quota", "5", "--daily-limit", "5", "--timezone", "UTC",
        "--not-before", (now - timedelta(hours=1)).isoformat(),
        "--not-after", (now + timedelta(days=30)).isoformat(),
        "--id-prefix", "TH-", "--id-first", "0", "--id-last", "999", "--id-digits", "6",
        "--secret", f"fw-key=@{tmp_path / 'fw.key'}",
        "--secret", f"cloud-token=@{tmp_path / 'token'}",
        "--secret-rule", f"cloud-token:0-0:{(now + timedelta(days=1)).isoformat()}",
        "--out", entitlement,
    )  # fmt: skip
    assert "cloud-token (devices 0..0" in out and "fw-key (devices 0..999" in out
    run(station_main, "import-entitlement", "--home", station, entitlement)

    devices = []
    for i in range(2):
        dev = SimDevice.manufacture(tmp_path / f"dev{i}", ek_ca_dir=vendor).power_on()
        assert dev.tpm is not None
        dev.tpm.close()  # the station takes the single-client swtpm socket
        dev.tpm = None
        devices.append(dev)

    def provision(dev: SimDevice, *extra: str, code: int = 0) -> str:
        return run(
            device_main, "provision", "--station", station, "--device-tcti", dev.tcti,
            "--device-dir", dev.directory, "--json", *extra, code=code,
        )  # fmt: skip

    try:
        first = json.loads(provision(devices[0]))
        assert first["device_id"] == "TH-000000"
        assert sorted(first["secrets"]) == ["cloud-token", "fw-key"]
        # Asking for the cloud token for TH-000001 is outside its rule: refused, exit 2.
        out = provision(devices[1], "--secret", "cloud-token", code=2)
        assert "secret_device_out_of_range" in out
        second = json.loads(provision(devices[1]))
        assert second["secrets"] == ["fw-key"]
    finally:
        for dev in devices:
            dev.power_off()

    challenge = os.urandom(16)
    for dev in devices:
        mac = run(
            device_main, "secret-hmac", dev.directory, "--name", "fw-key",
            "--challenge", challenge.hex(),
        )  # fmt: skip
        assert mac.strip() == secret_hmac(FW_KEY, challenge).hex()
    out = run(
        device_main, "secret-hmac", devices[1].directory, "--name", "cloud-token",
        "--challenge", "00", code=1,
    )  # fmt: skip
    assert "holds no product secret 'cloud-token'" in out

    export = tmp_path / "audit-1.sealed"
    run(station_main, "export-audit", "--home", station, "--out", export)
    report = json.loads(run(hq_main, "ingest-audit", "--home", hq, export, "--json"))
    assert report["status"] == "clean", report
    assert report["events"]["secret_provisioned"] == 3
    [ent] = report["entitlements"]
    assert ent["secret_uses"] == {"cloud-token": 1, "fw-key": 2}
    assert report["refused_at_station"] == {"secret_device_out_of_range": 1}


@pytest.mark.tpm
def test_the_station_refuses_secrets_without_a_rule_or_unfit_for_a_tpm(
    station_env: StationEnv,
) -> None:
    env = station_env
    now = int(datetime.now(UTC).timestamp())
    rule = SecretRule("fw-key", (PRODUCT,), 1, 5, now + DAY)
    with env.open() as station:
        cases = [
            ({"fw-key": FW_KEY}, ()),  # a secret without a rule
            ({}, (rule,)),  # a rule without its secret
            ({"fw-key": b"short"}, (rule,)),  # no TPM HMAC key of 5 bytes
        ]
        for sequence, (values, rules) in enumerate(cases, start=1):
            package = env.hq.entitlement(sequence=sequence, secrets=values, secret_rules=rules)
            with pytest.raises(EntitlementImportError) as info:
                station.import_entitlement(package)
            assert info.value.reason == "bad_secrets"
        assert station.policy is None  # nothing imported
        # Without secrets in the entitlement nothing changes for provisioning.
        station.import_entitlement(env.hq.entitlement(sequence=4))
        result = provision_device(station, env.device().endpoint)
        assert result.secrets == ()


@pytest.mark.tpm
def test_no_secret_without_attestation(
    pki: Pki, vendor: Vendor, tmp_path: Path, swtpm_factory: Callable[..., Swtpm]
) -> None:
    """An ``unsafe-csr-only`` station cannot tell a device TPM's storage key from a key the
    device made up, so it gives no secret (fail closed) and issues nothing either."""
    tpm = swtpm_factory(tmp_path / "station-tpm")
    root_pem = pki.root.public_bytes(Encoding.PEM)
    home = tmp_path / "station"
    enrolment = FactoryStation.init(
        home,
        station_id=StationId(STATION_ID),
        tcti=tpm.tcti,
        root_pem=root_pem,
        attestation=AttestationMode.UNSAFE_CSR_ONLY,
    )
    hq = SoftHq(pki, enrolment)
    now = int(datetime.now(UTC).timestamp())
    with FactoryStation.open(home, tcti=tpm.tcti) as station:
        station.import_entitlement(
            hq.entitlement(
                secrets={"fw-key": FW_KEY},
                secret_rules=(SecretRule("fw-key", (PRODUCT,), 1, 5, now + DAY),),
            )
        )
        dev = SimDevice.manufacture(tmp_path / "dev", template=vendor.template).power_on()
        try:
            with pytest.raises(IssuanceRefused) as info:
                provision_device(station, dev.endpoint, DeviceId("dev-000001"))
            assert info.value.reason == "secret_needs_attestation"
            assert station.status().issued_total == 0 and dev.certificate() is None
            # A device outside every rule gets no secret and needs none.
            assert provision_device(station, dev.endpoint, DeviceId("dev-000006")).secrets == ()
        finally:
            dev.power_off()
