"""CSR validation: proof of possession, key type, requested names and extensions."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import given
from hypothesis import strategies as st

from signers.software import SoftwareKey
from tests.fixtures.pki import fixed_key, p256
from trustcore.csr import MAX_CSR_SIZE, build_csr, build_device_csr, validate_csr
from trustcore.errors import CsrError
from trustcore.identity import DeviceId
from trustcore.profiles import OID_HARDWARE_MODULE_NAME, encode_hardware_module_name

DEVICE = DeviceId("dev-000042")


def _csr(
    key: object,
    cn: str = DEVICE.value,
    extensions: list[x509.ExtensionType] | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def _reason(data: bytes, **kwargs: object) -> str:
    with pytest.raises(CsrError) as info:
        validate_csr(data, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


def test_device_csr_from_a_signer_validates() -> None:
    signer = SoftwareKey.generate()
    validated = validate_csr(build_device_csr(signer, DEVICE), expected_device_id=DEVICE)
    assert validated.device_id == DEVICE
    assert validated.common_name == DEVICE.value
    assert validated.public_key == signer.public_key()


def test_pem_csr_from_raw_key_validates() -> None:
    key = p256("csr-raw")
    der = build_device_csr(key, DEVICE)
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert validate_csr(pem, expected_device_id=DEVICE).public_key == key.public_key()


def test_station_enrolment_csr_with_expected_subject() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Factory Station CA station-9")])
    der = build_csr(p256("station-9"), subject)
    validated = validate_csr(der, expected_subject=subject)
    assert validated.device_id is None
    other = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Factory Station CA station-8")])
    assert _reason(der, expected_subject=other) == "wrong_name"


def test_csr_for_another_device_is_refused() -> None:
    der = build_device_csr(p256("csr-raw"), DeviceId("dev-other"))
    assert _reason(der, expected_device_id=DEVICE) == "wrong_name"
    assert _reason(_csr(p256("x"), cn="dev/+#"), expected_device_id=DEVICE) == "wrong_name"


def test_csr_for_a_key_the_sender_does_not_hold_is_refused() -> None:
    """Swap the public key of a validly signed CSR for another key of the same size."""
    der = build_device_csr(p256("holder"), DEVICE)
    victim = p256("victim").public_key()
    holder_point = (
        p256("holder")
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    victim_point = victim.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    forged = der.replace(holder_point, victim_point)
    assert forged != der
    assert _reason(forged, expected_device_id=DEVICE) == "bad_signature"


@pytest.mark.parametrize("curve", ["p384", "rsa"])
def test_wrong_key_types_are_refused(curve: str) -> None:
    assert _reason(_csr(fixed_key(f"csr-{curve}", curve))) == "wrong_key_type"
    with pytest.raises(CsrError):
        build_device_csr(fixed_key(f"csr-{curve}", curve), DEVICE)  # type: ignore[arg-type]


_KU_SIGN = dict(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


@pytest.mark.parametrize(
    ("extension", "reason"),
    [
        (x509.BasicConstraints(ca=True, path_length=None), "forbidden_extension"),
        (x509.KeyUsage(key_cert_sign=True, **_KU_SIGN), "forbidden_extension"),
        (
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            "forbidden_extension",
        ),
        (
            x509.UnrecognizedExtension(ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
            "forbidden_extension",
        ),
        (x509.SubjectAlternativeName([x509.DNSName("evil.example")]), "wrong_name"),
        (
            x509.SubjectAlternativeName(
                [
                    x509.OtherName(
                        OID_HARDWARE_MODULE_NAME,
                        encode_hardware_module_name(
                            ObjectIdentifier("1.3.6.1.4.1.55555.1.1"), b"dev-other"
                        ),
                    )
                ]
            ),
            "wrong_name",
        ),
    ],
)
def test_forbidden_requests_are_refused(extension: x509.ExtensionType, reason: str) -> None:
    assert _reason(_csr(p256("ext"), extensions=[extension]), expected_device_id=DEVICE) == reason


def test_harmless_extensions_are_allowed() -> None:
    der = _csr(
        p256("ext"),
        extensions=[
            x509.BasicConstraints(ca=False, path_length=None),
            x509.KeyUsage(key_cert_sign=False, **_KU_SIGN),
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
        ],
    )
    assert validate_csr(der, expected_device_id=DEVICE).device_id == DEVICE


def test_size_bound() -> None:
    assert _reason(b"0" * (MAX_CSR_SIZE + 1)) == "malformed"
    der = build_device_csr(p256("size"), DEVICE)
    assert _reason(der, max_size=len(der) - 1) == "malformed"


@given(data=st.binary(max_size=600))
def test_random_bytes_are_malformed(data: bytes) -> None:
    assert _reason(data) == "malformed"


def test_signer_key_is_used_through_its_private_key_object() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_der_x509_csr(build_device_csr(key, DEVICE))
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
