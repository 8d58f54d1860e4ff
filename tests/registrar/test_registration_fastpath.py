"""The registration fast path keeps every check: the CSR parsed once is the one checked, a
CSR whose key was never looked up is refused, and after a station CA's path was remembered
the registrar still refuses that station's devices once the CA has expired at the
service's clock or new trust data revokes it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from registrar.service import RegistrationService, SiteAuthority
from registrar.store import Store
from signers.software import SoftwareKey
from tests.fixtures.pki import SITE_OPERATOR, Pki, make_crl
from tests.fixtures.registration import ADMIT_STATION, decide, make_dev, make_request
from trustcore import cbor, registration
from trustcore.csr import build_device_csr
from trustcore.keys import key_id, spki_der
from trustcore.payload import PayloadKey
from trustcore.registration import RegistrationDenied, RegistrationGranted, parse_request
from trustcore.registration import parse_response as parse_registration_response
from trustcore.verify import ChainVerifier


def test_the_csr_is_parsed_once_with_its_key_id(pki: Pki) -> None:
    dev = make_dev("dev-310001")
    request = parse_request(make_request(pki, dev))
    assert request.csr is not None
    assert request.csr_spki == spki_der(dev.ldevid_key.public_key())
    assert request.csr_key_id == key_id(dev.ldevid_key.public_key())
    assert decide(make_request(pki, dev)) == "ok"


def test_a_csr_that_only_parses_late_is_refused(pki: Pki) -> None:
    """A PEM CSR has no key id at parse time, so its key's owner was never looked up:
    refused rather than certified unchecked."""
    dev = make_dev("dev-310002")
    pem = x509.load_der_x509_csr(build_device_csr(dev.ldevid_key, dev.device_id)).public_bytes(
        serialization.Encoding.PEM
    )
    request = parse_request(make_request(pki, dev, csr=pem))
    assert request.csr is None and request.csr_key_id is None
    assert decide(make_request(pki, dev, csr=pem)) == "csr_malformed"


async def test_new_trust_data_after_a_remembered_path_refuses_the_station(
    pki: Pki, tmp_path: Path
) -> None:
    store = await Store.open(str(tmp_path / "registrar.db"))
    clock = [pki.now]
    try:
        first = ChainVerifier([pki.root], crls=pki.crls)
        service = RegistrationService(
            store=store,
            verifier=first,
            admission=ADMIT_STATION,
            site=SiteAuthority(pki.site_ca, SoftwareKey(pki.site_key), SITE_OPERATOR),
            payload_key=PayloadKey.generate(),
            clock=lambda: clock[0],
        )

        async def register(name: str) -> RegistrationGranted | RegistrationDenied:
            dev = make_dev(name)
            data = make_request(pki, dev, time=int(clock[0].timestamp()))
            parsed = parse_request(data)
            response = await service.handle(dev.device_id, data)
            return parse_registration_response(
                response,
                device_id=dev.device_id,
                nonce=parsed.nonce,
                request_digest=parsed.digest,
                ldevid_public_key=dev.ldevid_key.public_key(),
                roots=[pki.root],
                now=pki.now,  # the device's clock, at which the site CA is valid
            )

        assert isinstance(await register("dev-310003"), RegistrationGranted)
        # the service's clock passes the station CA's notAfter: refused, path remembered or not
        clock[0] = pki.station_ca.not_valid_after_utc + timedelta(seconds=1)
        expired = await register("dev-310006")
        assert isinstance(expired, RegistrationDenied) and expired.reason == "expired"
        clock[0] = pki.now
        assert first.remembered_paths == 1
        assert isinstance(await register("dev-310004"), RegistrationGranted)
        # HQ revokes the station CA: the registrar gets a verifier with the new root CRL
        root_crl = make_crl(pki.now, pki.root, pki.root_key, revoked=(pki.station_ca,), number=2)
        service.update_trust(verifier=ChainVerifier([pki.root], crls=(*pki.crls, root_crl)))
        refused = await register("dev-310005")
        assert isinstance(refused, RegistrationDenied) and refused.reason == "revoked"
    finally:
        await store.close()


@pytest.mark.parametrize("size", [0, 23, 24, 255, 256, 1500, 65535, 65536])
def test_assembled_envelopes_are_the_encoders_bytes(size: int) -> None:
    body, sig = bytes(range(256)) * (size // 256) + bytes(size % 256), b"\x30" * 71
    for domain in ("devtrust/registration-request/v1", "devtrust/registration-response/v1"):
        assert registration._signed_input(domain, body) == cbor.encode([domain, body])
    assert registration._envelope_bytes(body, sig) == cbor.encode({"body": body, "sig": sig})
    assert cbor.bytes_head(size) + body == cbor.encode(body)
