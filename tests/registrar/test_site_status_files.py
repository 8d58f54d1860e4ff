"""registrar.site_status.pem_not_after: status.json's PEM dates are parsed again exactly when
the file is replaced (by rename, as the registrar writes them: a new inode)."""

from __future__ import annotations

from pathlib import Path

from registrar.site_status import pem_not_after
from tests.fixtures.pki import Pki, pem


def test_a_replaced_certificate_or_crl_is_read_again(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "broker.pem"
    path.write_bytes(pem(pki.idevid))
    assert pem_not_after(path) == pki.idevid.not_valid_after_utc
    assert pem_not_after(path) == pki.idevid.not_valid_after_utc  # kept
    fresh = tmp_path / "broker.pem.new"
    fresh.write_bytes(pem(pki.station_ca))
    fresh.replace(path)
    assert pem_not_after(path) == pki.station_ca.not_valid_after_utc
    crl = tmp_path / "site-crl.pem"
    crl.write_bytes(pem(pki.station_crl))
    assert pem_not_after(crl, crl=True) == pki.station_crl.next_update_utc
