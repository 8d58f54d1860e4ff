"""deploy/: the systemd units and the logrotate configuration, checked by the real tools.

``systemd-analyze verify`` loads each unit as systemd would (unknown keys, bad values,
missing executables are reported); ``systemd-analyze security --offline`` scores the
sandbox; ``logrotate`` rotates real files with the shipped configuration. The unit files
name ``/opt/devtrust/.venv/bin``; the tests point them at this checkout's virtualenv.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
LOGROTATE = ROOT / "deploy" / "logrotate" / "devtrust"
INSTALLED_BIN = "/opt/devtrust/.venv/bin"
SERVICES = ("devtrust-registrar.service", "devtrust-station-export.service")
#: What every service must set (the hardening the operations guide promises).
REQUIRED = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectClock": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key may repeat), with continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, line
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def installed_here(tmp: Path) -> Path:
    """The units with this checkout's virtualenv in place of /opt/devtrust/.venv/bin."""
    out = tmp / "units"
    out.mkdir()
    for unit in SYSTEMD.iterdir():
        text = unit.read_text().replace(INSTALLED_BIN, str(Path(sys.executable).parent))
        (out / unit.name).write_text(text)
    return out


@pytest.mark.parametrize("name", SERVICES)
def test_service_sets_the_required_hardening(name: str) -> None:
    service = unit_keys((SYSTEMD / name).read_text())["Service"]
    for key, value in REQUIRED.items():
        assert service.get(key) == [value], (name, key, service.get(key))
    assert service["ReadWritePaths"] and all(
        p.startswith("/var/lib/devtrust/") for p in service["ReadWritePaths"]
    )
    (command,) = service["ExecStart"]
    assert "--log-format json" in command
    # no secret in the unit or the service's environment
    assert "Environment" not in service and "PASSPHRASE" not in (SYSTEMD / name).read_text()


def test_registrar_unit_hands_the_passphrase_as_a_credential_and_kills_mosquitto_too() -> None:
    service = unit_keys((SYSTEMD / "devtrust-registrar.service").read_text())["Service"]
    assert service["LoadCredential"] == ["site-passphrase:/etc/devtrust/site-passphrase"]
    (command,) = service["ExecStart"]
    assert "--passphrase-file %d/site-passphrase" in command
    assert "--broker mosquitto" in command and "--metrics-host 127.0.0.1" in command
    assert service["KillMode"] == ["control-group"]


def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    units = installed_here(tmp_path)
    names = sorted(p.name for p in units.iterdir())
    result = subprocess.run(
        ["systemd-analyze", "verify", *names],
        cwd=units, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    # and the check is a real one: a misspelt key is reported
    bad = units / "devtrust-registrar.service"
    bad.write_text(bad.read_text().replace("ProtectSystem=", "ProtectSytem="))
    result = subprocess.run(
        ["systemd-analyze", "verify", bad.name],
        cwd=units, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Unknown key" in result.stderr


@pytest.mark.parametrize("name", SERVICES)
def test_sandbox_exposure_is_low(tmp_path: Path, name: str) -> None:
    """``systemd-analyze security`` scores exposure 0 (locked down) .. 10; --threshold is
    in tenths. Both services stay under 2.0 ("OK")."""
    units = installed_here(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", name],
        cwd=units, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert score is not None and float(score.group(1)) < 2.0


def test_logrotate_keeps_dated_copies_of_sealed_exports(tmp_path: Path) -> None:
    """The shipped configuration, pointed at a temporary tree: the export is renamed to a
    dated copy, not truncated or compressed, and nothing is created in its place."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    text = LOGROTATE.read_text().replace("/var/lib/devtrust", str(tmp_path / "state"))
    text = re.sub(r"su \S+ \S+", f"su {user} {group}", text)
    config = tmp_path / "logrotate.conf"
    config.write_text(text)
    exports = tmp_path / "state" / "station" / "exports"
    exports.mkdir(parents=True, mode=0o700)
    export = exports / "audit-export.sealed"
    sealed = os.urandom(4096)
    export.write_bytes(sealed)
    result = subprocess.run(
        ["logrotate", "--force", "--state", str(tmp_path / "status"), str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (rotated,) = exports.iterdir()
    assert re.fullmatch(r"audit-export\.sealed-\d{8}-\d+", rotated.name), rotated.name
    assert rotated.read_bytes() == sealed  # renamed as is: not truncated, not compressed
    assert not export.exists()  # nocreate: the next export writes a new file


def test_security_md_names_only_tests_that_exist() -> None:
    """docs/security.md cites ``tests/FILE.py::test_name`` for each attack: every one must
    be a test function in that file (renaming a test must update the threat model)."""
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    cited = set(re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", text))
    assert len(cited) > 60
    missing = []
    for path, name in sorted(cited):
        source = (ROOT / path).read_text(encoding="utf-8") if (ROOT / path).exists() else ""
        if not re.search(rf"^(async )?def {name}\(", source, re.MULTILINE):
            missing.append(f"{path}::{name}")
    assert not missing, missing
