"""TPM key attestation at the factory: device TPM (signers.attestation) against station checks
(factory_station.attestation), with real swtpm instances and swtpm_setup-made EK certificates.

Each device is a copy of a TPM state provisioned once per session (EK + EK certificate from a
"vendor" CA), started on its own swtpm, so tests never share a TPM process or DA counters.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
)

from device_sim.swtpm import Swtpm, provision_ek_certificate
from factory_station.attestation import (
    ATTESTATION_REASONS,
    AttestationVerifier,
    CredentialChallenge,
)
from factory_station.errors import AttestationError, FactoryStationError
from signers.attestation import AK_ATTRIBUTES, AttestationEvidence, TpmAttestor, _srk_template
from signers.errors import TpmError
from signers.tpm import ECC_P384_EK_CERT_NV_INDEX, RSA_EK_CERT_NV_INDEX, Tpm, TpmKey

pytestmark = pytest.mark.tpm


# ------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Vendor:
    root: x509.Certificate
    issuer: x509.Certificate


@dataclass(frozen=True)
class Provisioned:
    vendor: Vendor
    device_a: Path  # TPM states with EK certificates from ``vendor``
    device_b: Path
    rogue_device: Path  # EK certificate from another CA with the very same names


def _vendor(ca_dir: Path) -> Vendor:
    return Vendor(
        root=x509.load_pem_x509_certificate(
            (ca_dir / "swtpm-localca-rootca-cert.pem").read_bytes()
        ),
        issuer=x509.load_pem_x509_certificate((ca_dir / "issuercert.pem").read_bytes()),
    )


@pytest.fixture(scope="session")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    base = tmp_path_factory.mktemp("tpm-factory")
    for name, ca in (("a", "vendor-ca"), ("b", "vendor-ca"), ("rogue", "rogue-ca")):
        provision_ek_certificate(base / name, ca_dir=base / ca)
    return Provisioned(_vendor(base / "vendor-ca"), base / "a", base / "b", base / "rogue")


@dataclass(frozen=True)
class Device:
    tpm: Tpm
    key: TpmKey
    attestor: TpmAttestor

    def respond(
        self, challenge: CredentialChallenge, key: TpmKey | bytes | None = None
    ) -> AttestationEvidence:
        return self.attestor.respond(
            self.key if key is None else key,
            credential_blob=challenge.credential_blob,
            encrypted_secret=challenge.encrypted_secret,
            nonce=challenge.nonce,
        )


DeviceFactory = Callable[[Path], Device]


@pytest.fixture
def device(swtpm_factory: Callable[..., Swtpm], tmp_path: Path) -> Iterator[DeviceFactory]:
    """Start a device on a private copy of a provisioned TPM state; closed at teardown."""
    opened: list[Tpm] = []

    def make(template: Path) -> Device:
        state = tmp_path / f"dev{len(opened)}"
        shutil.copytree(template, state)
        tpm = Tpm(swtpm_factory(state).tcti)
        opened.append(tpm)
        return Device(tpm, TpmKey.create(tpm), TpmAttestor(tpm))

    yield make
    for tpm in opened:
        tpm.close()


def _verifier(p: Provisioned, clock: Callable[[], datetime] | None = None) -> AttestationVerifier:
    anchors, intermediates = [p.vendor.root], [p.vendor.issuer]
    if clock is None:
        return AttestationVerifier(anchors, intermediates=intermediates)
    return AttestationVerifier(anchors, intermediates=intermediates, clock=clock)


def _refused(reason: str) -> pytest.RaisesExc[AttestationError]:
    assert reason in ATTESTATION_REASONS
    return pytest.raises(AttestationError, match=f"^{reason}: ")


def _finish(
    verifier: AttestationVerifier, ev: AttestationEvidence, csr_key: ec.EllipticCurvePublicKey
) -> None:
    verifier.finish(ev.activated_secret, ev.attest, ev.signature, ev.certified_public, csr_key)


# ----------------------------------------------------------------------------- happy path


def test_key_in_genuine_tpm_is_accepted(provisioned: Provisioned, device: DeviceFactory) -> None:
    dev = device(provisioned.device_a)
    identity = dev.attestor.identity()
    verifier = _verifier(provisioned)
    challenge = verifier.begin(identity.ek_certificate, identity.ak_public)
    assert len(challenge.nonce) == 32

    evidence = dev.respond(challenge)
    _finish(verifier, evidence, dev.key.public_key())  # accepted: no exception

    # The default EK is the high-range P-384 one (cheap ECDH activation), when present.
    ek = dev.tpm.read_ek_certificate(ECC_P384_EK_CERT_NV_INDEX)
    assert verifier.ek_certificate == ek
    ek_key = ek.public_key()
    assert isinstance(ek_key, ec.EllipticCurvePublicKey) and ek_key.curve.name == "secp384r1"
    assert verifier.ak_name[:2] == b"\x00\x0b"
    # The TPM keeps working for the Tpm's own keys afterwards (handles flushed, not leaked).
    signature = dev.key.sign(b"after attestation")
    dev.key.public_key().verify(signature, b"after attestation", ec.ECDSA(hashes.SHA256()))
    # A verifier is one-shot: the same challenge cannot be answered twice.
    with _refused("protocol_state"):
        _finish(verifier, evidence, dev.key.public_key())
    with _refused("protocol_state"):
        verifier.begin(identity.ek_certificate, identity.ak_public)


@pytest.mark.parametrize("ek_index", [ECC_P384_EK_CERT_NV_INDEX, RSA_EK_CERT_NV_INDEX])
@pytest.mark.parametrize("persistent", [True, False])
def test_ek_types_and_rederived_ek(
    provisioned: Provisioned, device: DeviceFactory, ek_index: int, persistent: bool
) -> None:
    """Both EK types attest, from the persistent EK or re-derived from the template (a TPM
    without a persistent EK, or with another key at the usual handle)."""
    dev = device(provisioned.device_a)
    attestor = TpmAttestor(
        dev.tpm, ek_cert_index=ek_index, ek_persistent_handle="standard" if persistent else None
    )
    identity = attestor.identity()
    assert identity.ek_certificate == dev.tpm.read_ek_certificate(ek_index).public_bytes(
        serialization.Encoding.DER
    )
    verifier = _verifier(provisioned)
    challenge = verifier.begin(identity.ek_certificate, identity.ak_public)
    evidence = attestor.respond(
        dev.key,
        credential_blob=challenge.credential_blob,
        encrypted_secret=challenge.encrypted_secret,
        nonce=challenge.nonce,
    )
    _finish(verifier, evidence, dev.key.public_key())
    # The credential is bound to that EK: the other EK of the same TPM cannot recover it.
    other = (
        RSA_EK_CERT_NV_INDEX if ek_index == ECC_P384_EK_CERT_NV_INDEX else ECC_P384_EK_CERT_NV_INDEX
    )
    wrong_ek = TpmAttestor(dev.tpm, ek_cert_index=other)
    assert wrong_ek.identity().ak_public == identity.ak_public  # same AK, other EK
    challenge = _verifier(provisioned).begin(identity.ek_certificate, identity.ak_public)
    with pytest.raises(TpmError, match="ActivateCredential"):
        wrong_ek.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    assert attestor.activate_credential(challenge.credential_blob, challenge.encrypted_secret)


def test_ak_is_stable_and_ek_certificate_is_the_vendor_one(
    provisioned: Provisioned, device: DeviceFactory
) -> None:
    dev = device(provisioned.device_a)
    first = dev.attestor.identity()
    again = TpmAttestor(dev.tpm).identity()  # re-derived from the endorsement seed
    assert first == again
    ak, _ = TPMT_PUBLIC.unmarshal(first.ak_public)
    assert int(ak.objectAttributes) == int(AK_ATTRIBUTES)
    ek = x509.load_der_x509_certificate(first.ek_certificate)
    assert ek.issuer == provisioned.vendor.issuer.subject


# ------------------------------------------------------------------------------- refusals


def test_software_key_is_refused(provisioned: Provisioned, device: DeviceFactory) -> None:
    dev = device(provisioned.device_a)
    identity = dev.attestor.identity()
    software = ec.generate_private_key(ec.SECP256R1())

    # The device certifies its TPM key but the CSR carries a software key.
    verifier = _verifier(provisioned)
    evidence = dev.respond(verifier.begin(identity.ek_certificate, identity.ak_public))
    with _refused("key_mismatch"):
        _finish(verifier, evidence, software.public_key())

    # Nor can the TPM be made to certify a public-only copy of the software key that claims
    # fixedTPM: TPM2_Certify needs the object's authValue, which a LoadExternal copy lacks.
    ectx = dev.tpm.esapi
    dev.tpm.flush_transients()
    spki = software.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claimed = TPM2B_PUBLIC.from_pem(
        spki,
        objectAttributes=TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.SIGN_ENCRYPT,
    )
    external = ectx.load_external(claimed, None, ESYS_TR.RH_NULL)
    ak, *_ = ectx.create_primary(
        TPM2B_SENSITIVE_CREATE(),
        TPM2B_PUBLIC(publicArea=TPMT_PUBLIC.unmarshal(identity.ak_public)[0]),
        ESYS_TR.ENDORSEMENT,
    )
    with pytest.raises(TSS2_Exception, match="not available"):
        ectx.certify(external, ak, b"n" * 32, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
    ectx.flush_context(external)
    ectx.flush_context(ak)


def test_key_certified_by_another_tpms_ak_is_refused(
    provisioned: Provisioned, device: DeviceFactory
) -> None:
    dev_a, dev_b = device(provisioned.device_a), device(provisioned.device_b)
    identity_a = dev_a.attestor.identity()
    verifier = _verifier(provisioned)
    challenge = verifier.begin(identity_a.ek_certificate, identity_a.ak_public)
    secret = dev_a.attestor.activate_credential(
        challenge.credential_blob, challenge.encrypted_secret
    )
    from_b = dev_b.attestor.certify(dev_b.key, challenge.nonce)  # right nonce, wrong TPM
    with _refused("bad_signature"):
        verifier.finish(
            secret, from_b.attest, from_b.signature, from_b.certified_public, dev_b.key.public_key()
        )


def test_ak_outside_the_eks_tpm_cannot_recover_the_secret(
    provisioned: Provisioned, device: DeviceFactory
) -> None:
    dev_a, dev_b = device(provisioned.device_a), device(provisioned.device_b)
    identity_a, identity_b = dev_a.attestor.identity(), dev_b.attestor.identity()
    assert identity_a.ak_public != identity_b.ak_public

    # A's genuine EK certificate presented with B's AK: the credential is for A's EK.
    verifier = _verifier(provisioned)
    challenge = verifier.begin(identity_a.ek_certificate, identity_b.ak_public)
    with pytest.raises(TpmError, match="ActivateCredential"):
        dev_b.respond(challenge)  # B has no private key for A's EK
    with pytest.raises(TpmError, match="ActivateCredential"):
        dev_a.respond(challenge)  # A has the EK but no object named like B's AK
    # B's certify evidence is fine, but without the secret the station refuses.
    evidence = dev_b.attestor.certify(dev_b.key, challenge.nonce)
    with _refused("credential_mismatch"):
        verifier.finish(
            b"\0" * 32,
            evidence.attest,
            evidence.signature,
            evidence.certified_public,
            dev_b.key.public_key(),
        )


def test_ek_certificate_from_untrusted_vendor_is_refused(
    provisioned: Provisioned, device: DeviceFactory
) -> None:
    rogue = device(provisioned.rogue_device)
    identity = rogue.attestor.identity()
    cert = x509.load_der_x509_certificate(identity.ek_certificate)
    assert cert.issuer == provisioned.vendor.issuer.subject  # same name, different key
    with _refused("ek_cert_untrusted"):
        _verifier(provisioned).begin(identity.ek_certificate, identity.ak_public)
    # Anchoring on the root alone, without the issuing CA, leaves no path either.
    with _refused("ek_cert_untrusted"):
        AttestationVerifier([provisioned.vendor.root]).begin(
            identity.ek_certificate, identity.ak_public
        )


def test_malformed_or_out_of_window_ek_certificate_is_refused(
    provisioned: Provisioned, device: DeviceFactory
) -> None:
    identity = device(provisioned.device_a).attestor.identity()
    with _refused("ek_cert_malformed"):
        _verifier(provisioned).begin(identity.ek_certificate[:-1], identity.ak_public)
    with _refused("ek_cert_malformed"):
        _verifier(provisioned).begin(b"", identity.ak_public)
    past = _verifier(provisioned, clock=lambda: datetime(2000, 1, 1, tzinfo=UTC))
    with _refused("ek_cert_expired"):
        past.begin(identity.ek_certificate, identity.ak_public)
    # A certificate for a different purpose (the vendor's own CA) is no EK certificate.
    issuer_der = provisioned.vendor.issuer.public_bytes(serialization.Encoding.DER)
    with _refused("ek_cert_unsupported"):
        _verifier(provisioned).begin(issuer_der, identity.ak_public)


def _vendor_issued_ek(
    p: Provisioned,
    model: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    key_usage: x509.KeyUsage,
) -> bytes:
    """An EK-like certificate with ``key``, issued by the genuine vendor issuing CA."""
    ca_dir = p.device_a.parent / "vendor-ca"
    pem = (ca_dir / "signkey.pem").read_bytes()
    signer = serialization.load_pem_private_key(pem[pem.index(b"-----BEGIN") :], None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(model.subject)
        .issuer_name(p.vendor.issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(model.not_valid_before_utc)
        .not_valid_after(model.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(
            model.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(p.vendor.issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def test_ek_of_unsupported_type_or_usage_is_refused(
    provisioned: Provisioned, device: DeviceFactory
) -> None:
    """Only RSA-2048 (L-1) and P-384 (H-3) EKs: a P-256 EK could be L-2 or H-2, and the
    station must not guess the template; an ECC EK must be for key agreement."""
    identity = device(provisioned.device_a).attestor.identity()
    model = x509.load_der_x509_certificate(identity.ek_certificate)
    usage = dict.fromkeys(
        (
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
        ),
        False,
    )  # fmt: skip
    agreement = x509.KeyUsage(**{**usage, "key_agreement": True})
    signing = x509.KeyUsage(**{**usage, "digital_signature": True})
    # Control: a vendor-issued P-384 certificate is accepted as far as the template goes.
    p384 = _vendor_issued_ek(provisioned, model, ec.generate_private_key(ec.SECP384R1()), agreement)
    _verifier(provisioned).begin(p384, identity.ak_public)
    p256 = _vendor_issued_ek(provisioned, model, ec.generate_private_key(ec.SECP256R1()), agreement)
    with _refused("ek_cert_unsupported"):
        _verifier(provisioned).begin(p256, identity.ak_public)
    no_agreement = _vendor_issued_ek(
        provisioned, model, ec.generate_private_key(ec.SECP384R1()), signing
    )
    with _refused("ek_cert_unsupported"):
        _verifier(provisioned).begin(no_agreement, identity.ak_public)


def test_replayed_attestation_is_refused(provisioned: Provisioned, device: DeviceFactory) -> None:
    dev = device(provisioned.device_a)
    identity = dev.attestor.identity()
    first = _verifier(provisioned)
    old = dev.respond(first.begin(identity.ek_certificate, identity.ak_public))
    _finish(first, old, dev.key.public_key())

    # A new session: the secret is activated afresh, but the certify answer is the old one.
    second = _verifier(provisioned)
    fresh = dev.respond(second.begin(identity.ek_certificate, identity.ak_public))
    assert fresh.activated_secret != old.activated_secret
    with _refused("nonce_mismatch"):
        verifier_input = (fresh.activated_secret, old.attest, old.signature, old.certified_public)
        second.finish(*verifier_input, dev.key.public_key())


def test_duplicable_key_without_fixed_tpm_is_refused(
    provisioned: Provisioned, device: DeviceFactory
) -> None:
    dev = device(provisioned.device_a)
    identity = dev.attestor.identity()
    # A key the TPM would let leave it (fixedTPM/fixedParent clear), otherwise a normal key.
    ectx = dev.tpm.esapi
    dev.tpm.flush_transients()
    srk, *_ = ectx.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_srk_template()), ESYS_TR.OWNER
    )
    template = TPMT_PUBLIC.parse(
        "ecc256:ecdsa-sha256:null",
        objectAttributes=TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.SIGN_ENCRYPT,
    )
    private, public, *_ = ectx.create(
        srk,
        TPM2B_SENSITIVE_CREATE(),
        TPM2B_PUBLIC(publicArea=template),
        TPM2B_DATA(),
        TPML_PCR_SELECTION(),
    )
    ectx.flush_context(srk)
    pem = TSSPrivKey(private, public, empty_auth=True, parent=TPM2_RH.OWNER).to_pem()
    point = public.publicArea.unique.ecc
    duplicable = ec.EllipticCurvePublicNumbers(
        int.from_bytes(bytes(point.x), "big"), int.from_bytes(bytes(point.y), "big"), ec.SECP256R1()
    ).public_key()

    verifier = _verifier(provisioned)
    evidence = dev.respond(verifier.begin(identity.ek_certificate, identity.ak_public), key=pem)
    with _refused("key_not_tpm_resident"):
        _finish(verifier, evidence, duplicable)


def test_tampered_evidence_is_refused(provisioned: Provisioned, device: DeviceFactory) -> None:
    dev = device(provisioned.device_a)
    other = TpmKey.create(dev.tpm)  # a genuine key in the same TPM, but not the attested one
    identity = dev.attestor.identity()

    def fresh() -> tuple[AttestationVerifier, AttestationEvidence]:
        verifier = _verifier(provisioned)
        return verifier, dev.respond(verifier.begin(identity.ek_certificate, identity.ak_public))

    verifier, ev = fresh()
    flipped = ev.attest[:-1] + bytes([ev.attest[-1] ^ 1])
    with _refused("bad_signature"):
        verifier.finish(
            ev.activated_secret, flipped, ev.signature, ev.certified_public, dev.key.public_key()
        )

    verifier, ev = fresh()
    swapped = other.to_pem()
    other_public = TSSPrivKey.from_pem(swapped).public.publicArea.marshal()
    with _refused("name_mismatch"):
        verifier.finish(
            ev.activated_secret, ev.attest, ev.signature, other_public, other.public_key()
        )

    verifier, ev = fresh()
    with _refused("key_malformed"):
        verifier.finish(
            ev.activated_secret,
            ev.attest,
            ev.signature,
            ev.certified_public + b"\0",
            dev.key.public_key(),
        )


# ------------------------------------------------------------------ pure station-side checks


def test_unacceptable_ak_and_protocol_misuse(
    provisioned: Provisioned, device: DeviceFactory
) -> None:
    identity = device(provisioned.device_a).attestor.identity()
    ak, _ = TPMT_PUBLIC.unmarshal(identity.ak_public)

    unrestricted = TPMT_PUBLIC.unmarshal(identity.ak_public)[0]
    unrestricted.objectAttributes = int(ak.objectAttributes) & ~TPMA_OBJECT.RESTRICTED
    with _refused("ak_unacceptable"):
        _verifier(provisioned).begin(identity.ek_certificate, unrestricted.marshal())

    policy_admin = TPMT_PUBLIC.unmarshal(identity.ak_public)[0]
    policy_admin.objectAttributes = int(ak.objectAttributes) | TPMA_OBJECT.ADMINWITHPOLICY
    with _refused("ak_unacceptable"):
        _verifier(provisioned).begin(identity.ek_certificate, policy_admin.marshal())

    with _refused("ak_malformed"):
        _verifier(provisioned).begin(identity.ek_certificate, identity.ak_public + b"\0")
    with _refused("ak_malformed"):
        _verifier(provisioned).begin(identity.ek_certificate, identity.ak_public[:40])

    with _refused("protocol_state"):
        _verifier(provisioned).finish(
            b"", b"", b"", b"", ec.generate_private_key(ec.SECP256R1()).public_key()
        )
    with _refused("configuration"):
        AttestationVerifier([])
    assert issubclass(AttestationError, FactoryStationError)
