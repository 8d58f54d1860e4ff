"""pkilint finds no ERROR or FATAL in any certificate profile, nor in our CRLs."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from tests.fixtures.pki import Pki, p256, pem
from tests.fixtures.pkilint import SEVERE, lint_certificate, pkilint_findings, pkilint_tool
from tests.fixtures.profiles import service_client_certificate
from trustcore.profiles import PROFILES, issue_broker_certificate


def _profile_certificates(pki: Pki) -> dict[str, x509.Certificate]:
    # The shared fixture's broker is named "localhost" for local brokers; pkilint rightly
    # calls a single-label name invalid, so lint the profile with a real FQDN.
    broker = issue_broker_certificate(
        pki.site_ca,
        pki.site_key,
        p256("lint-broker").public_key(),
        dns_names=["mqtt.site-hq-1.example.com"],
        ip_addresses=["192.0.2.10"],
        organization="Devtrust Test Site",
        not_before=pki.now,
        not_after=pki.now + (pki.site_ca.not_valid_after_utc - pki.now) / 2,
    )
    certs = {
        "root_ca": pki.root,
        "station_ca": pki.station_ca,
        "site_ca": pki.site_ca,
        "idevid": pki.idevid,
        "ldevid": pki.ldevid,
        "broker_server": broker,
        "service_client": service_client_certificate(pki),
    }
    for role, (cert, _key) in pki.roles.items():
        certs[role.value.replace("-", "_")] = cert
    assert set(certs) == set(PROFILES)
    return certs


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_lints_clean(pki: Pki, tmp_path: Path, profile: str) -> None:
    path = tmp_path / f"{profile}.pem"
    path.write_bytes(pem(_profile_certificates(pki)[profile]))
    findings = lint_certificate(path)
    severe = [f for f in findings if f[0] in SEVERE]
    assert severe == [], severe
    # The run did lint the certificate: pkilint always reports how our SKI was derived.
    assert any(code == "pkix.subject_key_identifier_method_1_identified" for _, code, _ in findings)


def test_linter_finds_errors_when_there_are_some(pki: Pki, tmp_path: Path) -> None:
    """The parsing above could hide a broken linter; show it does report an ERROR."""
    path = tmp_path / "broker-localhost.pem"
    path.write_bytes(pem(pki.broker))
    findings = lint_certificate(path)
    assert ("ERROR", "pkix.invalid_domain_name_syntax") in {(s, c) for s, c, _ in findings}


def test_linter_failure_is_a_test_failure(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"not a certificate")
    with pytest.raises(AssertionError, match="pkilint did not run"):
        lint_certificate(path)


@pytest.mark.parametrize("which", ["root_crl", "station_crl", "site_crl"])
def test_crls_lint_clean(pki: Pki, tmp_path: Path, which: str) -> None:
    path = tmp_path / f"{which}.pem"
    path.write_bytes(pem(getattr(pki, which)))
    findings = pkilint_findings([pkilint_tool("lint_crl"), "lint", "-t", "CRL", "-p", "PKIX"], path)
    assert [f for f in findings if f[0] in SEVERE] == []
