"""``hq renew-roles``: HQ role certificates re-issued (same keys) before their five years run
out, so HQ can sign bundles, entitlements and revocation lists for a device's whole life."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hq.home import HqHome, HqSecrets
from hq.roles import renew_role_certificates
from tests.fixtures.hq import ENV, PASSPHRASE, run_hq
from trustcore.profiles import HqRole

YEAR = timedelta(days=365)


def test_renew_roles_only_when_due_same_key_chain_to_root(tmp_path: Path) -> None:
    home_dir = tmp_path / "hq"
    assert run_hq("init", "--home", str(home_dir), "--org", "Acme").exit_code == 0
    r = run_hq("renew-roles", "--home", str(home_dir), env=ENV)
    assert r.exit_code == 0, r.output
    assert "renewed" not in r.output and r.output.count(": current, valid until") == len(HqRole)

    home = HqHome.open(home_dir)
    before = {role: home.role_certificate(role) for role in HqRole}
    secrets = HqSecrets(None, None)
    later = datetime.now(UTC) + 4 * YEAR + timedelta(days=30)  # less than a year left
    (tmp_path / "pass").write_text(PASSPHRASE)
    (tmp_path / "pass").chmod(0o600)
    done = renew_role_certificates(home, HqSecrets(tmp_path / "pass", None), now=later)
    assert {r.role for r in done if r.renewed} == {role.value for role in HqRole}
    root = home.root_certificate()
    for role in HqRole:
        cert = home.role_certificate(role)
        old = before[role]
        assert cert.public_key() == old.public_key()  # same key: nothing pinned changes
        assert cert.serial_number != old.serial_number
        assert cert.not_valid_after_utc > old.not_valid_after_utc + 3 * YEAR
        cert.verify_directly_issued_by(root)
        assert cert.not_valid_before_utc <= later <= later + 2 * YEAR < cert.not_valid_after_utc
        assert old.not_valid_after_utc < later + 2 * YEAR  # the old one would have expired
    again = renew_role_certificates(home, secrets, now=later)  # nothing due: no key needed
    assert again and not any(r.renewed for r in again)


def test_renew_roles_without_passphrase_is_a_clean_error(tmp_path: Path) -> None:
    home_dir = tmp_path / "hq"
    assert run_hq("init", "--home", str(home_dir), "--org", "Acme").exit_code == 0
    r = run_hq(
        "renew-roles", "--home", str(home_dir), "--force", env={"DEVTRUST_HQ_PASSPHRASE": ""}
    )
    assert r.exit_code == 1
    assert r.output.startswith("error:") and "Traceback" not in r.output
