"""pkilint finds no ERROR or FATAL in any certificate profile, nor in our CRLs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tests.fixtures.pki import Pki, p256, pem
from tests.trustcore.test_profiles import service_client_certificate
from trustcore.profiles import PROFILES, issue_broker_certificate


def _tool(name: str) -> str:
    """pkilint's entry points sit beside the interpreter in the venv, or else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install pkilint)"
    return found


SEVERE = {"ERROR", "FATAL"}


def _findings(command: list[str], document: Path) -> list[tuple[str, str, str]]:
    """Run a pkilint command with JSON output; return (severity, code, node) findings.

    pkilint's exit status is the number of findings (INFO included), so it says nothing
    about success: a failed run is recognised by output that is not its JSON report.
    """
    result = subprocess.run(
        [*command, "-f", "JSON", str(document)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        report = json.loads(result.stdout)
        results = report["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AssertionError(
            f"pkilint did not run: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        ) from exc
    return [
        (finding["severity"], finding["code"], entry["node_path"])
        for entry in results
        for finding in entry["finding_descriptions"]
    ]


def _lint_certificate(path: Path) -> list[tuple[str, str, str]]:
    return _findings([_tool("lint_pkix_cert"), "lint"], path)


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
    findings = _lint_certificate(path)
    severe = [f for f in findings if f[0] in SEVERE]
    assert severe == [], severe
    # The run did lint the certificate: pkilint always reports how our SKI was derived.
    assert any(code == "pkix.subject_key_identifier_method_1_identified" for _, code, _ in findings)


def test_linter_finds_errors_when_there_are_some(pki: Pki, tmp_path: Path) -> None:
    """The parsing above could hide a broken linter; show it does report an ERROR."""
    path = tmp_path / "broker-localhost.pem"
    path.write_bytes(pem(pki.broker))
    findings = _lint_certificate(path)
    assert ("ERROR", "pkix.invalid_domain_name_syntax") in {(s, c) for s, c, _ in findings}


def test_linter_failure_is_a_test_failure(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"not a certificate")
    with pytest.raises(AssertionError, match="pkilint did not run"):
        _lint_certificate(path)


@pytest.mark.parametrize("which", ["root_crl", "station_crl", "site_crl"])
def test_crls_lint_clean(pki: Pki, tmp_path: Path, which: str) -> None:
    path = tmp_path / f"{which}.pem"
    path.write_bytes(pem(getattr(pki, which)))
    findings = _findings([_tool("lint_crl"), "lint", "-t", "CRL", "-p", "PKIX"], path)
    assert [f for f in findings if f[0] in SEVERE] == []
