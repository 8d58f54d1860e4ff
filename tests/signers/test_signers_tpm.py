"""TPM keys on a real swtpm: creation, persistence across connections and power cycles, ECDH,
CSR and certificate signing checked by OpenSSL, NV counters, EK certificates."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPM2_GENERATED, TPM2_ST
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPMS_ATTEST

from device_sim.swtpm import Swtpm, provision_ek_certificate
from signers.errors import TpmError, TpmKeyError
from signers.tpm import (
    MAX_LOADED_KEYS,
    RSA_EK_CERT_NV_INDEX,
    Tpm,
    TpmKey,
    TpmKeyUsage,
    TpmNvCounter,
)
from tests.fixtures.swtpm import SwtpmFactory
from trustcore.keys import KeyAgreement, Signer

pytestmark = pytest.mark.tpm

ECDSA = ec.ECDSA(hashes.SHA256())
COUNTER_INDEX = 0x01000100


def _pem(obj: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def test_sign_key_attributes_and_protocol(swtpm: Swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm:
        key = TpmKey.create(tpm)
        assert isinstance(key, Signer)
        assert key.usage is TpmKeyUsage.SIGN
        sig = key.sign(b"hello")
        assert sig[0] == 0x30
        key.public_key().verify(sig, b"hello", ECDSA)
        with pytest.raises(InvalidSignature):
            key.public_key().verify(sig, b"hellO", ECDSA)
        with pytest.raises(TpmKeyError, match="cannot do ECDH"):
            key.exchange(ec.generate_private_key(ec.SECP256R1()).public_key())
        # The private scalar is not obtainable: the object only forwards to the TPM.
        with pytest.raises(NotImplementedError):
            key.private_key().private_numbers()


def test_persist_and_reload_in_new_connection_and_after_power_cycle(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    path = tmp_path / "device.tss2.pem"
    with Tpm(swtpm.tcti) as tpm:
        key = TpmKey.create(tpm)
        key.save(path)
        public = key.public_key()
    text = path.read_text()
    assert text.startswith("-----BEGIN TSS2 PRIVATE KEY-----")
    with Tpm(swtpm.tcti) as tpm:
        again = TpmKey.load(tpm, path)
        assert again.public_key() == public
        public.verify(again.sign(b"after reconnect"), b"after reconnect", ECDSA)
    swtpm.restart()
    with Tpm(swtpm.tcti) as tpm:
        again = TpmKey.load(tpm, path)
        public.verify(again.sign(b"after restart"), b"after restart", ECDSA)
        # tpm2-openssl compatibility: the generic TSSPrivKey loader accepts our blob.
        blob = TSSPrivKey.from_pem(path.read_bytes())
        handle = blob.load(tpm.esapi)
        tpm.esapi.flush_context(handle)


def test_blob_from_another_tpm_is_refused(swtpm_factory: SwtpmFactory) -> None:
    a, b = swtpm_factory(), swtpm_factory()
    with Tpm(a.tcti) as tpm:
        pem = TpmKey.create(tpm).to_pem()
    with Tpm(b.tcti) as tpm, pytest.raises(TpmKeyError, match="another TPM"):
        TpmKey.from_pem(tpm, pem)


def test_garbage_blob_refused(swtpm: Swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm, pytest.raises(TpmKeyError):
        TpmKey.from_pem(
            tpm, b"-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n"
        )


def test_ecdh_matches_software_peer(swtpm: Swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm:
        key = TpmKey.create(tpm, TpmKeyUsage.ECDH)
        assert isinstance(key, KeyAgreement)
        peer = ec.generate_private_key(ec.SECP256R1())
        shared = key.exchange(peer.public_key())
        assert len(shared) == 32
        assert shared == peer.exchange(ec.ECDH(), key.public_key())
        assert key.private_key().exchange(ec.ECDH(), peer.public_key()) == shared
        with pytest.raises(TpmKeyError, match="cannot sign"):
            key.sign(b"x")
        with pytest.raises(TpmKeyError, match="P-256"):
            key.exchange(ec.generate_private_key(ec.SECP384R1()).public_key())
        pem = key.to_pem()
    with Tpm(swtpm.tcti) as tpm:
        again = TpmKey.from_pem(tpm, pem)
        assert again.usage is TpmKeyUsage.ECDH
        assert again.exchange(peer.public_key()) == shared


def test_more_keys_than_slots(swtpm: Swtpm) -> None:
    """libtpms has 3 object slots; keys beyond that are evicted and reloaded transparently."""
    with Tpm(swtpm.tcti) as tpm:
        keys = [TpmKey.create(tpm) for _ in range(MAX_LOADED_KEYS + 3)]
        for _ in range(2):
            for key in keys:
                key.public_key().verify(key.sign(b"m"), b"m", ECDSA)
        builder_key = keys[0].private_key()
        for key in keys[1:]:
            key.sign(b"evict keys[0]")
        builder_key.public_key().verify(builder_key.sign(b"z", ECDSA), b"z", ECDSA)


def test_stale_transients_flushed_at_connect(swtpm: Swtpm) -> None:
    first = Tpm(swtpm.tcti)
    TpmKey.create(first)
    TpmKey.create(first)
    first.esapi.close()  # a crashed client: its objects stay loaded in the TPM
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.stale_flushed == 2
        TpmKey.create(tpm)


def test_unreachable_tpm() -> None:
    with pytest.raises(TpmError, match="cannot connect"):
        Tpm("swtpm:host=127.0.0.1,port=1")


def test_tpm_key_signs_csr_and_certificate_openssl_accepts(swtpm: Swtpm, tmp_path: Path) -> None:
    """MUST-SHOW: CA and device keys both live in the TPM; OpenSSL verifies the results."""
    now = dt.datetime.now(dt.UTC)
    with Tpm(swtpm.tcti) as tpm:
        ca_key = TpmKey.create(tpm)
        leaf_key = TpmKey.create(tpm)
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test TPM CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key.private_key(), hashes.SHA256())
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-0001")]))
            .sign(leaf_key.private_key(), hashes.SHA256())
        )
        assert csr.is_signature_valid
        leaf = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(ca_name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key.private_key(), hashes.SHA256())
        )
    assert leaf.public_key() == leaf_key.public_key()
    ca_pem, leaf_pem, csr_pem = tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "csr.pem"
    ca_pem.write_bytes(_pem(ca_cert))
    leaf_pem.write_bytes(_pem(leaf))
    csr_pem.write_bytes(_pem(csr))
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_pem), str(leaf_pem)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert f"{leaf_pem}: OK" in verify.stdout
    req = subprocess.run(
        ["openssl", "req", "-verify", "-noout", "-in", str(csr_pem)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert req.returncode == 0, req.stderr
    assert "verify OK" in (req.stdout + req.stderr)
    # Negative control: OpenSSL does reject a certificate against the wrong CA.
    other = tmp_path / "other.pem"
    other_key = ec.generate_private_key(ec.SECP256R1())
    other.write_bytes(
        _pem(
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(other_key.public_key())
            .serial_number(1)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(other_key, hashes.SHA256())
        )
    )
    bad = subprocess.run(
        ["openssl", "verify", "-CAfile", str(other), str(leaf_pem)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0


def test_nv_counter_monotonic_across_reconnect_and_restart(swtpm: Swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm:
        counter = TpmNvCounter(tpm, COUNTER_INDEX)
        assert not counter.exists()
        counter.define()
        first = counter.read()
        values = [counter.increment() for _ in range(5)]
        assert values == list(range(first + 1, first + 6))
    with Tpm(swtpm.tcti) as tpm:
        counter = TpmNvCounter(tpm, COUNTER_INDEX).define()  # exist_ok: no reset
        assert counter.read() == first + 5
        assert counter.increment() == first + 6
    swtpm.restart()
    with Tpm(swtpm.tcti) as tpm:
        counter = TpmNvCounter(tpm, COUNTER_INDEX)
        assert counter.exists()
        assert counter.read() == first + 6
        with pytest.raises(TpmError, match="already defined"):
            counter.define(exist_ok=False)


def test_nv_counter_redefine_does_not_roll_back(swtpm: Swtpm) -> None:
    """Undefining and redefining an index must not reset the count (anti-rollback)."""
    with Tpm(swtpm.tcti) as tpm:
        counter = TpmNvCounter(tpm, COUNTER_INDEX).define()
        for _ in range(10):
            high = counter.increment()
        ectx = tpm.esapi
        ectx.nv_undefine_space(ectx.tr_from_tpmpublic(COUNTER_INDEX))
        assert not counter.exists()
        assert counter.define().read() >= high


def test_nv_counter_bad_index(swtpm: Swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm, pytest.raises(TpmError, match="owner range"):
        TpmNvCounter(tpm, RSA_EK_CERT_NV_INDEX)


@pytest.mark.slow
def test_ek_certificate_provisioned_and_read(swtpm_factory: SwtpmFactory, tmp_path: Path) -> None:
    state, ca = tmp_path / "state", tmp_path / "tpm-vendor-ca"
    provision_ek_certificate(state, ca_dir=ca)
    issuer = x509.load_pem_x509_certificate((ca / "issuercert.pem").read_bytes())
    tpm_proc = swtpm_factory(state)
    with Tpm(tpm_proc.tcti) as tpm:
        cert = tpm.read_ek_certificate()
    assert cert.issuer == issuer.subject
    cert.verify_directly_issued_by(issuer)


def test_certify_with_attestation_key(swtpm: Swtpm) -> None:
    nonce = os.urandom(32)
    with Tpm(swtpm.tcti) as tpm:
        ak = TpmKey.create(tpm, TpmKeyUsage.ATTEST)
        device_key = TpmKey.create(tpm)
        with pytest.raises(TpmKeyError, match="attestation"):
            ak.private_key()
        with pytest.raises(TpmKeyError):
            ak.sign(b"arbitrary data")
        with pytest.raises(TpmKeyError, match="only an attestation"):
            device_key.certify(ak, nonce)
        result = ak.certify(device_key, nonce)
        ak_pem = ak.to_pem()
    ak.public_key().verify(result.signature, result.attest, ECDSA)
    attest, _ = TPMS_ATTEST.unmarshal(result.attest)
    assert attest.magic == TPM2_GENERATED.VALUE
    assert attest.type == TPM2_ST.ATTEST_CERTIFY
    assert bytes(attest.extraData) == nonce
    assert bytes(attest.attested.certify.name) == device_key.tpm_name()
    with pytest.raises(InvalidSignature):
        ak.public_key().verify(result.signature, result.attest[:-1] + b"\0", ECDSA)
    with Tpm(swtpm.tcti) as tpm:
        assert TpmKey.from_pem(tpm, ak_pem).usage is TpmKeyUsage.ATTEST
