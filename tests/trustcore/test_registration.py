"""The registration protocol as pure functions: request format, every refusal, the response
and its verification on the device side, payload-key wrapping and rotation messages."""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signers.software import SoftwareKey
from tests.fixtures.pki import (
    DEFECTS,
    SITE_OPERATOR,
    Pki,
    make_crl,
    p256,
    shared_pki,
)
from tests.fixtures.registration import (
    ADMIT_STATION,
    DER,
    Dev,
    decide,
    der,
    make_dev,
    make_request,
    verifier,
)
from trustcore import cbor
from trustcore.csr import build_device_csr
from trustcore.identity import DeviceId, StationId
from trustcore.payload import PayloadKey
from trustcore.registration import (
    MAX_REQUEST_SIZE,
    REASONS,
    REQUEST_DOMAIN,
    Admission,
    AdmissionRule,
    RegistrationDenied,
    RegistrationError,
    RegistrationGranted,
    build_error_response,
    build_key_update,
    issue_registration,
    open_payload_key,
    parse_key_update,
    parse_request,
    parse_response,
    public_message,
    verify_request,
)
from trustcore.verify import ChainVerifier

# ------------------------------------------------------------------------------ accepted


def test_valid_request_is_accepted_and_parsed_exactly(pki: Pki) -> None:
    dev = make_dev("dev-100001")
    nonce = os.urandom(16)
    data = make_request(pki, dev, nonce=nonce)
    request = parse_request(data)
    assert request.device_id == dev.device_id
    assert request.nonce == nonce
    assert request.chain_der == (der(pki.station_ca),)
    assert len(data) < 3000
    assert decide(data) == "ok"


def test_listed_device_is_admitted_without_rule(pki: Pki) -> None:
    dev = make_dev("dev-100002")
    data = make_request(pki, dev)
    assert decide(data, admission=Admission(devices=frozenset({dev.device_id}))) == "ok"
    assert decide(data, admission=Admission(devices=frozenset({DeviceId("other")}))) == (
        "not_in_manifest"
    )


def test_prefix_rule(pki: Pki) -> None:
    data = make_request(pki, make_dev("dev-100003"))
    rule = Admission(rules=(AdmissionRule(StationId("station-01"), "dev-1"),))
    assert decide(data, admission=rule) == "ok"
    other = Admission(rules=(AdmissionRule(StationId("station-01"), "sensor-"),))
    assert decide(data, admission=other) == "not_in_manifest"
    wrong_station = Admission(rules=(AdmissionRule(StationId("station-99")),))
    assert decide(data, admission=wrong_station) == "not_in_manifest"
    assert decide(data, admission=Admission()) == "not_in_manifest"


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("make_defect", DEFECTS, ids=lambda f: f.__name__)
def test_every_defective_factory_certificate_is_refused(pki: Pki, make_defect) -> None:  # type: ignore[no-untyped-def]
    defect = make_defect(pki)
    dev = make_dev("dev-100004")
    # The defect's own key is not at hand for every defect: sign with dev's key; the chain
    # check comes before the signature, so the certificate's defect decides the reason.
    data = make_request(
        pki,
        dev,
        idevid=defect.leaf,
        chain=tuple(der(c) for c in defect.intermediates),
        device_id=dev.device_id,
    )
    expected = {
        "untrusted": "untrusted",
        "expired": "expired",
        "not_yet_valid": "not_yet_valid",
        "revoked": "revoked",
    }.get(defect.reason, "bad_certificate")
    assert decide(data) == expected, defect.name


def test_unknown_issuer_without_chain(pki: Pki) -> None:
    assert decide(make_request(pki, make_dev("dev-100005"), chain=())) == "untrusted"


def test_revoked_factory_certificate(pki: Pki) -> None:
    dev = make_dev("dev-100006")
    crl = make_crl(pki.now, pki.station_ca, pki.station_key, revoked=(dev.idevid,), number=5)
    revoking = ChainVerifier([pki.root], crls=(pki.root_crl, crl))
    assert decide(make_request(pki, dev), chain_verifier=revoking) == "revoked"


def test_missing_crl_fails_closed(pki: Pki) -> None:
    no_station_crl = ChainVerifier([pki.root], crls=(pki.root_crl,))
    data = make_request(pki, make_dev("dev-100007"))
    assert decide(data, chain_verifier=no_station_crl) == "revocation_unavailable"
    assert REASONS["revocation_unavailable"].retry


def test_request_signed_by_another_key(pki: Pki) -> None:
    dev = make_dev("dev-100008")
    assert decide(make_request(pki, dev, signer=SoftwareKey(p256("intruder")))) == "bad_signature"


def test_signature_does_not_cover_another_domain(pki: Pki) -> None:
    """A signature over the body alone (no domain) must not verify."""
    dev = make_dev("dev-100009")
    outer = cbor.decode(make_request(pki, dev), max_size=MAX_REQUEST_SIZE)
    outer["sig"] = dev.factory_key.sign(outer["body"])
    assert decide(cbor.encode(outer)) == "bad_signature"
    # and the domain really is part of the signed input
    outer["sig"] = dev.factory_key.sign(cbor.encode([REQUEST_DOMAIN, outer["body"]]))
    assert decide(cbor.encode(outer)) == "ok"


def test_tampered_body_fails_signature(pki: Pki) -> None:
    dev = make_dev("dev-100010")
    outer = cbor.decode(make_request(pki, dev), max_size=MAX_REQUEST_SIZE)
    body = cbor.decode(outer["body"], max_size=MAX_REQUEST_SIZE)
    body["time"] += 1
    outer["body"] = cbor.encode(body)
    assert decide(cbor.encode(outer)) == "bad_signature"


def test_device_id_must_match_topic_and_certificate(pki: Pki) -> None:
    dev = make_dev("dev-100011")
    data = make_request(pki, dev)
    assert decide(data, topic=DeviceId("dev-100012")) == "device_mismatch"
    other = make_dev("dev-100013")
    # dev's request naming dev but carrying other's certificate (and other's signature)
    forged = make_request(pki, dev, idevid=other.idevid, signer=other.factory_key)
    assert decide(forged) == "device_mismatch"


def test_freshness_window(pki: Pki) -> None:
    dev = make_dev("dev-100014")
    t = int(pki.now.timestamp())
    assert decide(make_request(pki, dev, time=t - 300)) == "ok"
    assert decide(make_request(pki, dev, time=t + 300)) == "ok"
    assert decide(make_request(pki, dev, time=t - 301)) == "stale_request"
    assert decide(make_request(pki, dev, time=t + 301)) == "stale_request"


def test_replayed_nonce(pki: Pki) -> None:
    assert decide(make_request(pki, make_dev("dev-100015")), nonce_seen=True) == "replayed_nonce"


def test_csr_for_a_key_the_device_does_not_hold(pki: Pki) -> None:
    """The device takes someone else's CSR and swaps in another public key: the CSR's
    self-signature no longer verifies."""
    dev = make_dev("dev-100016")
    csr = x509.load_der_x509_csr(build_device_csr(dev.ldevid_key, dev.device_id))
    victim = p256("victim-key").public_key()
    # Rebuild the CSR's DER with the victim's SPKI but the original signature.
    spki_old = csr.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spki_new = victim.public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    forged = csr.public_bytes(DER).replace(spki_old, spki_new)
    assert forged != csr.public_bytes(DER)
    assert decide(make_request(pki, dev, csr=forged)) == "csr_bad_signature"


def test_csr_with_foreign_key(pki: Pki) -> None:
    dev = make_dev("dev-100017")
    data = make_request(pki, dev)
    assert decide(data, key_owner=DeviceId("dev-999999")) == "csr_foreign_key"
    assert decide(data, key_owner=dev.device_id) == "ok"  # its own key, e.g. after a lost reply


def test_csr_reusing_the_factory_key(pki: Pki) -> None:
    dev = make_dev("dev-100018")
    csr = build_device_csr(dev.factory_key, dev.device_id)
    assert decide(make_request(pki, dev, csr=csr)) == "csr_idevid_key"


def test_csr_for_another_name(pki: Pki) -> None:
    dev = make_dev("dev-100019")
    csr = build_device_csr(dev.ldevid_key, DeviceId("dev-100020"))
    assert decide(make_request(pki, dev, csr=csr)) == "csr_wrong_name"
    assert decide(make_request(pki, dev, csr=b"\x30\x03junk")) == "csr_malformed"


def test_wrap_key_must_be_separate(pki: Pki) -> None:
    dev = make_dev("dev-100021")
    assert decide(make_request(pki, dev, wrap=dev.ldevid_key.public_key())) == "bad_wrap_key"
    assert decide(make_request(pki, dev, wrap=dev.factory_key.public_key())) == "bad_wrap_key"


def test_oversized_and_wrong_version(pki: Pki) -> None:
    assert decide(b"\xa0" * (MAX_REQUEST_SIZE + 1)) == "oversized"
    dev = make_dev("dev-100022")
    outer = cbor.decode(make_request(pki, dev), max_size=MAX_REQUEST_SIZE)
    body = cbor.decode(outer["body"], max_size=MAX_REQUEST_SIZE)
    body["v"] = 2
    outer["body"] = cbor.encode(body)
    assert decide(cbor.encode(outer)) == "unsupported_version"
    body["v"] = 1
    body["extra"] = 1
    outer["body"] = cbor.encode(body)
    assert decide(cbor.encode(outer)) == "malformed"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("nonce", b"short"),
        ("nonce", b"x" * 65),
        ("time", -1),
        ("device_id", "dev/+/#"),
        ("chain", [b"a", b"b", b"c"]),
        ("chain", "notalist"),
        ("idevid", "text"),
    ],
)
def test_bad_fields_are_malformed(pki: Pki, name: str, value: object) -> None:
    dev = make_dev("dev-100023")
    outer = cbor.decode(make_request(pki, dev), max_size=MAX_REQUEST_SIZE)
    body = cbor.decode(outer["body"], max_size=MAX_REQUEST_SIZE)
    body[name] = value
    outer["body"] = cbor.encode(body)
    outer["sig"] = dev.factory_key.sign(cbor.encode([REQUEST_DOMAIN, outer["body"]]))
    assert decide(cbor.encode(outer)) == "malformed"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(data: bytes) -> None:
    assert decide(data, topic=DeviceId("dev-x")) in {"malformed", "oversized"}


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_requests_are_refused_cleanly(data: st.DataObject) -> None:
    pki = shared_pki()
    good = _good_request()
    pos = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = good[:pos] + bytes([good[pos] ^ flip]) + good[pos + 1 :]
    reason = decide(mutated, topic=make_dev("dev-100024").device_id)
    assert reason != "ok" or mutated == good
    del pki


@functools.cache
def _good_request() -> bytes:
    return make_request(shared_pki(), make_dev("dev-100024"))


def test_public_messages_exist_for_every_reason() -> None:
    for reason in REASONS:
        assert public_message(reason) != "registration refused"


# -------------------------------------------------------------------- issuance & device


def _issue(pki: Pki, dev: Dev, payload_key: PayloadKey, data: bytes) -> bytes:
    request = parse_request(data)
    verified = verify_request(
        request,
        topic_device_id=dev.device_id,
        verifier=verifier(),
        admission=ADMIT_STATION,
        now=pki.now,
        nonce_seen=False,
        key_owner=None,
    )
    issued = issue_registration(
        verified,
        site_ca=pki.site_ca,
        site_ca_der=der(pki.site_ca),
        site_signer=SoftwareKey(pki.site_key),
        organization=SITE_OPERATOR,
        payload_key=payload_key,
        now=pki.now,
    )
    assert issued.ldevid.issuer == pki.site_ca.subject
    return issued.response


def test_ok_response_round_trip(pki: Pki) -> None:
    dev = make_dev("dev-100025")
    nonce = os.urandom(32)
    data = make_request(pki, dev, nonce=nonce)
    payload_key = PayloadKey.generate()
    response = _issue(pki, dev, payload_key, data)
    result = parse_response(
        response,
        device_id=dev.device_id,
        nonce=nonce,
        request_digest=parse_request(data).digest,
        ldevid_public_key=dev.ldevid_key.public_key(),
        roots=[pki.root],
        now=pki.now,
    )
    assert isinstance(result, RegistrationGranted)
    assert result.site_ca == pki.site_ca
    # The LDevID verifies as an operational client certificate against the site CA.
    site_verifier = ChainVerifier([pki.root], [pki.site_ca], pki.crls)
    identity = site_verifier.verify(result.ldevid, now=pki.now, require_device_id=True)
    assert identity.device_id == dev.device_id
    key = open_payload_key(dev.wrap_key, dev.device_id, result.payload_key)
    assert key == payload_key
    # Only the wrap key opens it; and not for another device id.
    with pytest.raises(RegistrationError):
        open_payload_key(dev.ldevid_key, dev.device_id, result.payload_key)
    with pytest.raises(RegistrationError):
        open_payload_key(dev.wrap_key, DeviceId("dev-100026"), result.payload_key)
    # Another nonce (someone else's response) is refused.
    with pytest.raises(RegistrationError):
        parse_response(
            response,
            device_id=dev.device_id,
            nonce=os.urandom(32),
            request_digest=parse_request(data).digest,
            ldevid_public_key=dev.ldevid_key.public_key(),
            roots=[pki.root],
            now=pki.now,
        )
    # A response signed by a key other than the site CA's is refused.
    outer = cbor.decode(response, max_size=1 << 16)
    outer["sig"] = SoftwareKey(p256("mallory")).sign(outer["body"])
    with pytest.raises(RegistrationError, match="signature"):
        parse_response(
            cbor.encode(outer),
            device_id=dev.device_id,
            nonce=nonce,
            request_digest=parse_request(data).digest,
            ldevid_public_key=dev.ldevid_key.public_key(),
            roots=[pki.root],
            now=pki.now,
        )


def test_response_ldevid_must_certify_the_requested_key(pki: Pki) -> None:
    dev = make_dev("dev-100027")
    nonce = os.urandom(32)
    data = make_request(pki, dev, nonce=nonce)
    response = _issue(pki, dev, PayloadKey.generate(), data)
    with pytest.raises(RegistrationError) as info:
        parse_response(
            response,
            device_id=dev.device_id,
            nonce=nonce,
            request_digest=parse_request(data).digest,
            ldevid_public_key=p256("not-mine").public_key(),
            roots=[pki.root],
            now=pki.now,
        )
    assert info.value.reason == "csr_foreign_key"


def test_error_response_is_signed_and_public(pki: Pki) -> None:
    dev = make_dev("dev-100028")
    nonce = os.urandom(16)
    digest = os.urandom(32)
    response = build_error_response(
        device_id=dev.device_id,
        nonce=nonce,
        request_digest=digest,
        reason="not_in_manifest",
        site_ca_der=der(pki.site_ca),
        site_signer=SoftwareKey(pki.site_key),
    )
    result = parse_response(
        response,
        device_id=dev.device_id,
        nonce=nonce,
        request_digest=digest,
        ldevid_public_key=dev.ldevid_key.public_key(),
        roots=[pki.root],
        now=pki.now,
    )
    assert result == RegistrationDenied("not_in_manifest", public_message("not_in_manifest"), False)
    # An internal reason never leaves: it becomes internal_error.
    leaked = build_error_response(
        device_id=dev.device_id,
        nonce=nonce,
        request_digest=digest,
        reason="sqlite says: disk I/O error at /var/lib/x",
        site_ca_der=der(pki.site_ca),
        site_signer=SoftwareKey(pki.site_key),
    )
    body = cbor.decode(cbor.decode(leaked, max_size=1 << 16)["body"], max_size=1 << 16)
    assert body["reason"] == "internal_error"
    assert "sqlite" not in body["message"]


def test_key_update_round_trip_and_rollback(pki: Pki) -> None:
    dev = make_dev("dev-100029")
    new_key = PayloadKey.generate()
    msg = build_key_update(
        device_id=dev.device_id,
        wrap_key=dev.wrap_key.public_key(),
        payload_key=new_key,
        issued=1000,
        site_signer=SoftwareKey(pki.site_key),
    )
    update = parse_key_update(msg, device_id=dev.device_id, site_ca=pki.site_ca, newer_than=999)
    assert open_payload_key(dev.wrap_key, dev.device_id, update.payload_key) == new_key
    with pytest.raises(RegistrationError) as info:
        parse_key_update(msg, device_id=dev.device_id, site_ca=pki.site_ca, newer_than=1000)
    assert info.value.reason == "replayed"
    with pytest.raises(RegistrationError):
        parse_key_update(msg, device_id=DeviceId("dev-1"), site_ca=pki.site_ca, newer_than=0)
    forged = build_key_update(
        device_id=dev.device_id,
        wrap_key=dev.wrap_key.public_key(),
        payload_key=new_key,
        issued=2000,
        site_signer=SoftwareKey(p256("mallory")),
    )
    with pytest.raises(RegistrationError) as info:
        parse_key_update(forged, device_id=dev.device_id, site_ca=pki.site_ca, newer_than=0)
    assert info.value.reason == "bad_signature"


def test_reason_table_is_complete() -> None:
    assert all(0x80 <= info.mqtt_reason <= 0xA2 for info in REASONS.values())
    assert {"replayed_nonce", "stale_request", "busy"} <= {r for r, i in REASONS.items() if i.retry}
    assert not REASONS["not_in_manifest"].retry
    assert not REASONS["revoked"].retry
    assert replace(REASONS["busy"]).retry
    with pytest.raises(TypeError):
        REASONS["busy"] = REASONS["internal_error"]  # type: ignore[index]


def test_docs_render_the_one_reason_table() -> None:
    """``docs/registration.md`` shows every row of :data:`REASONS` as the code has it (the
    public message a device is sent, its retry advice, MQTT code and action) and no other."""
    doc = (Path(__file__).parents[2] / "docs" / "registration.md").read_text()
    table = doc.split("| reason | retry | MQTT v5 | device action | public message |\n")[1]
    rows = {}
    for line in table.splitlines()[1:]:
        if not line.startswith("| `"):
            break
        reason, retry, mqtt, action, message = (c.strip() for c in line.strip("|").split(" | "))
        rows[reason.strip("`")] = (retry == "yes", int(mqtt, 16), action, message)
    assert rows == {r: (i.retry, i.mqtt_reason, i.action, i.message) for r, i in REASONS.items()}
