"""EST (RFC 7030) without a server: the bodies (``trustcore.est``) and the transport-bound
requests that enter the one registration decision (``tls_bound_request``,
``tls_bound_renewal``). The same checks as a signed MQTT request apply, except the envelope
signature, which the TLS handshake replaced; a request from bytes can never claim that."""

from __future__ import annotations

import base64
import os
import subprocess
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from signers.software import SoftwareKey
from tests.fixtures.docs import doc_vector
from tests.fixtures.pki import Pki, p256
from tests.fixtures.registration import ADMIT_STATION, der, make_dev, make_request, verifier
from trustcore import cbor
from trustcore.csr import build_device_csr
from trustcore.est import (
    CSR_ATTRS_DER,
    MAX_BODY_SIZE,
    answer_from_response,
    decode_csr_body,
    refusal,
)
from trustcore.identity import DeviceId
from trustcore.keys import spki_der
from trustcore.payload import PayloadKey
from trustcore.profiles import issue_secondary_certificate
from trustcore.registration import (
    REASONS,
    Admission,
    RegistrationError,
    build_error_response,
    issue_registration,
    parse_request,
    tls_bound_request,
    verify_request,
)
from trustcore.renewal import tls_bound_renewal
from trustcore.wrap_key import (
    build_wrap_key_registration,
    parse_wrap_key_registration,
    verify_wrap_key,
    wrap_key_body,
)

DER = serialization.Encoding.DER


def est_request(pki: Pki, name: str, **kw: object) -> object:
    dev = make_dev(name)
    fields: dict[str, object] = {
        "device_id": dev.device_id,
        "idevid_der": der(dev.idevid),
        "csr_der": build_device_csr(dev.ldevid_key, dev.device_id),
        "chain_der": (der(pki.station_ca),),
        "nonce": os.urandom(16),
        "time": int(pki.now.timestamp()),
    }
    fields.update(kw)
    return tls_bound_request(**fields)  # type: ignore[arg-type]


def decide(pki: Pki, request: object, admission: Admission = ADMIT_STATION) -> str:
    try:
        verify_request(
            request,  # type: ignore[arg-type]
            topic_device_id=request.device_id,  # type: ignore[attr-defined]
            verifier=verifier(),
            admission=admission,
            now=pki.now,
            nonce_seen=False,
            key_owner=None,
        )
    except RegistrationError as exc:
        return exc.reason
    return "ok"


def test_a_tls_bound_request_passes_the_same_checks_without_an_envelope(pki: Pki) -> None:
    request = est_request(pki, "dev-700001")
    assert decide(pki, request) == "ok"
    dev = make_dev("dev-700001")
    # Every other check still applies: another device's CSR, the factory key as the new
    # key, an unadmitted device, a certificate that expired.
    other = build_device_csr(make_dev("dev-700002").ldevid_key, DeviceId("dev-700002"))
    assert decide(pki, est_request(pki, "dev-700001", csr_der=other)) == "csr_wrong_name"
    own = build_device_csr(dev.factory_key, dev.device_id)
    assert decide(pki, est_request(pki, "dev-700001", csr_der=own)) == "csr_idevid_key"
    assert decide(pki, request, Admission()) == "not_in_manifest"
    later = replace(request, time=int((pki.now + timedelta(days=4000)).timestamp()))  # type: ignore[type-var]
    with pytest.raises(RegistrationError) as info:
        verify_request(
            later,
            topic_device_id=dev.device_id,
            verifier=verifier(),
            admission=ADMIT_STATION,
            now=pki.now + timedelta(days=4000),
            nonce_seen=False,
            key_owner=None,
        )
    assert info.value.reason in ("expired", "revocation_unavailable")


def test_the_idempotency_key_covers_certificate_and_csr(pki: Pki) -> None:
    dev = make_dev("dev-700003")
    csr = build_device_csr(dev.ldevid_key, dev.device_id)
    a = est_request(pki, "dev-700003", csr_der=csr, nonce=b"a" * 16)
    b = est_request(pki, "dev-700003", csr_der=csr, nonce=b"b" * 16)
    c = est_request(pki, "dev-700003")
    assert a.digest == b.digest != c.digest  # type: ignore[attr-defined]


def test_a_request_from_bytes_is_never_transport_authenticated(pki: Pki) -> None:
    """An MQTT request with a bad signature stays refused: only the EST listener (the TLS
    peer certificate) makes a transport-authenticated request."""
    dev = make_dev("dev-700004")
    data = make_request(pki, dev, signer=make_dev("dev-700005").factory_key)
    request = parse_request(data)
    assert not request.transport_authenticated
    assert decide(pki, request) == "bad_signature"
    assert est_request(pki, "dev-700004").transport_authenticated  # type: ignore[attr-defined]


def test_ok_answer_has_no_payload_key_without_a_wrap_key_and_becomes_pkcs7(pki: Pki) -> None:
    request = est_request(pki, "dev-700006")
    verified = verify_request(
        request,  # type: ignore[arg-type]
        topic_device_id=DeviceId("dev-700006"),
        verifier=verifier(),
        admission=ADMIT_STATION,
        now=pki.now,
        nonce_seen=False,
        key_owner=None,
    )
    assert verified.wrap_public_key is None
    issued = issue_registration(
        verified,
        site_ca=pki.site_ca,
        site_ca_der=der(pki.site_ca),
        site_signer=SoftwareKey(pki.site_key),
        organization="Site",
        payload_key=PayloadKey(b"k" * 8, os.urandom(32)),
        now=pki.now,
    )
    answer = answer_from_response(issued.response)
    assert answer.status == 200 and b"\n" not in answer.body
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.body))
    assert cert == issued.ldevid


def test_refusals_map_to_rfc_7030_status_codes(pki: Pki) -> None:
    statuses = {reason: refusal(reason).status for reason in REASONS}
    assert set(statuses.values()) <= {202, 400, 403, 413, 503}
    held = refusal("held_for_approval")
    assert held.status == 202 and held.retry_after is not None
    assert refusal("busy").retry_after is not None and refusal("busy").status == 503
    assert statuses["revoked"] == statuses["not_in_manifest"] == 403
    assert statuses["csr_wrong_name"] == 400 and statuses["oversized"] == 413
    assert refusal("no such reason").reason == "internal_error"
    error = build_error_response(
        device_id=DeviceId("dev-700007"),
        nonce=b"",
        request_digest=b"\0" * 32,
        reason="revoked",
        site_ca_der=der(pki.site_ca),
        site_signer=SoftwareKey(pki.site_key),
    )
    answer = answer_from_response(error)
    assert answer.status == 403 and answer.body.startswith(b"revoked: ")
    with pytest.raises(RegistrationError):
        answer_from_response(b"\xff junk")


def test_bodies_base64_wrapped_or_not_and_limits() -> None:
    der_bytes = bytes(range(200))
    wrapped = base64.encodebytes(der_bytes)  # 76-column lines
    assert b"\n" in wrapped.strip()
    assert decode_csr_body(wrapped) == decode_csr_body(base64.b64encode(der_bytes)) == der_bytes
    for bad in (b"", b"%%%", b"abc"):
        with pytest.raises(RegistrationError) as info:
            decode_csr_body(bad)
        assert info.value.reason == "csr_malformed"
    with pytest.raises(RegistrationError) as info:
        decode_csr_body(b"A" * (MAX_BODY_SIZE + 4))
    assert info.value.reason == "oversized"


def test_csrattrs_parse_with_openssl() -> None:
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER"],
        input=CSR_ATTRS_DER,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in ("ecdsa-with-SHA256", "id-ecPublicKey", "prime256v1", "serialNumber"):
        assert name in parsed


def test_renewal_request_bound_to_the_peer_certificate(pki: Pki) -> None:
    dev = make_dev("dev-700008")
    csr = build_device_csr(dev.wrap_key, dev.device_id)
    r = tls_bound_renewal(
        device_id=dev.device_id, ldevid_der=der(dev.idevid), csr_der=csr, nonce=b"n" * 16, time=1
    )
    assert r.transport_authenticated and r.csr_key_id is not None and r.signature == b""
    with pytest.raises(RegistrationError) as info:
        tls_bound_renewal(
            device_id=dev.device_id, ldevid_der=b"", csr_der=csr, nonce=b"n" * 16, time=1
        )
    assert info.value.reason == "oversized"
    assert isinstance(x509.load_der_x509_csr(csr), x509.CertificateSigningRequest)


# ------------------------------------------------------------- wrap key after EST enrolment


def _ldevid(pki: Pki, name: str, key: SoftwareKey) -> x509.Certificate:
    return issue_secondary_certificate(
        pki.site_ca,
        pki.site_key,
        key.public_key(),
        device_id=DeviceId(name),
        organization="Site",
        not_before=pki.now - timedelta(days=1),
        not_after=pki.now + timedelta(days=30),
    )


def wrap_key_reason(
    pki: Pki,
    *,
    topic: str = "dev-700010",
    signer: SoftwareKey | None = None,
    wrap: SoftwareKey | None = None,
    current: int | None = None,
    time_shift: int = 0,
    cas: tuple[x509.Certificate, ...] | None = None,
) -> str:
    key = SoftwareKey(p256("ldevid-wrap-test"))
    cert = _ldevid(pki, "dev-700010", key)
    message = build_wrap_key_registration(
        device_id=DeviceId("dev-700010"),
        time=int(pki.now.timestamp()) + time_shift,
        wrap_key=(wrap or SoftwareKey(p256("wrap-wrap-test"))).public_key(),
        ldevid_der=der(cert),
        ldevid_key=signer or key,
    )
    try:
        verify_wrap_key(
            parse_wrap_key_registration(message),
            topic_device_id=DeviceId(topic),
            site_cas=cas if cas is not None else (pki.site_ca,),
            current_serial=cert.serial_number if current is None else current,
            now=pki.now,
        )
    except RegistrationError as exc:
        return exc.reason
    return "ok"


def test_wrap_key_registration_checks_in_order(pki: Pki) -> None:
    assert wrap_key_reason(pki) == "ok"
    assert wrap_key_reason(pki, topic="dev-700011") == "device_mismatch"
    assert wrap_key_reason(pki, cas=(pki.station_ca,)) == "ldevid_unknown"
    assert wrap_key_reason(pki, signer=SoftwareKey(p256("someone"))) == "bad_signature"
    assert wrap_key_reason(pki, time_shift=-1000) == "stale_request"
    assert wrap_key_reason(pki, current=1) == "ldevid_superseded"
    same = SoftwareKey(p256("ldevid-wrap-test"))  # the LDevID key as its own wrap key
    assert wrap_key_reason(pki, wrap=same) == "bad_wrap_key"
    with pytest.raises(RegistrationError) as info:
        parse_wrap_key_registration(b"\xa0" * 3000)
    assert info.value.reason == "oversized"


def test_documented_vectors() -> None:
    body = wrap_key_body(
        DeviceId("TH-000001"),
        1700000000,
        spki_der(ec.derive_private_key(7, ec.SECP256R1()).public_key()),
        b"\x30\x03\x02\x01\x01",
    )
    assert cbor.encode(body) == doc_vector("wrap-key-body")
    assert doc_vector("est-csrattrs") == CSR_ATTRS_DER
