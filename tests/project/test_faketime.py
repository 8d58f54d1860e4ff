"""The controlled clock for real processes (``tests/fixtures/faketime.py``): what the
ten-year test relies on, checked on the real tools. A Python child and a running Mosquitto
2.0.11 follow the timestamp file as it is rewritten; ``openssl verify`` judges at the
simulated date; asyncio timers keep real time; no secret reaches a child's environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signers.software import SoftwareKey
from tests.fixtures.faketime import FakeClock
from trustcore.crl import build_crl
from trustcore.identity import DeviceId, SiteId
from trustcore.profiles import (
    issue_broker_certificate,
    issue_root_ca,
    issue_secondary_certificate,
    issue_site_ca,
)

PEM = serialization.Encoding.PEM
YEAR = timedelta(days=365)
T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)  # always in the future
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    clock = FakeClock.create(T0)
    try:
        yield clock
    finally:
        clock.remove()


def _py(clock: FakeClock, code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=clock.env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_python_child_follows_the_file_while_it_runs(clock: FakeClock) -> None:
    code = (
        "import sys, time, asyncio\n"
        "print(int(time.time()), flush=True)\n"
        "sys.stdin.readline()\n"
        "t = time.monotonic(); asyncio.run(asyncio.sleep(0.1)); time.sleep(0.05)\n"
        "slept = time.monotonic() - t\n"
        "print(int(time.time()), round(slept, 2), flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code],
        env=clock.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        first = int(child.stdout.readline())
        assert abs(first - T0.timestamp()) < 5
        clock.advance(7 * YEAR)  # while the child runs
        out, _ = child.communicate("go\n", timeout=10)
    second, slept = out.split()
    assert abs(int(second) - (T0 + 7 * YEAR).timestamp()) < 5
    assert 0.14 <= float(slept) < 1.0  # asyncio and time.sleep keep real time


def test_env_carries_no_secret(clock: FakeClock) -> None:
    env = clock.env(
        {"DEVTRUST_HQ_PASSPHRASE": "x", "DEVTRUST_HQ_PIN": "1", "API_TOKEN": "t", "PATH": "/bin"}
    )
    assert set(env) == {
        "PATH",
        "LD_PRELOAD",
        "FAKETIME_TIMESTAMP_FILE",
        "FAKETIME_NO_CACHE",
        "FAKETIME_DONT_FAKE_MONOTONIC",
        "PYTHONPATH",
    }


def test_inherited_clock_moves_itself_and_the_others(clock: FakeClock) -> None:
    """A driver that itself runs on the fake clock moves the date for everyone."""
    code = (
        "from datetime import UTC, datetime\n"
        "from tests.fixtures.faketime import FakeClock\n"
        "c = FakeClock.inherited()\n"
        "c.set(datetime(2041, 6, 1, tzinfo=UTC))\n"
        "print(int(datetime.now(UTC).timestamp()), int(c.time()))\n"
    )
    own, claimed = map(int, _py(clock, code).split())
    target = datetime(2041, 6, 1, tzinfo=UTC).timestamp()
    assert abs(own - target) < 5 and abs(claimed - target) < 5
    # The file now holds the new offset: a new child lands there too.
    assert abs(int(_py(clock, "import time; print(int(time.time()))")) - target) < 5


# ------------------------------------------------------------- Mosquitto and openssl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_key(path: Path, key: SoftwareKey) -> None:
    """Test-only key file for mosquitto_pub (mode 0600, removed with tmp_path)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_key().private_bytes(
                PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


@pytest.fixture
def year7(tmp_path: Path) -> Iterator[Path]:
    """Root → site CA (ten years) → broker certificate, and a device certificate valid only
    in year 7; the site CRL is valid one week in year 7. Started as root, Mosquitto drops
    to the ``mosquitto`` user: the files then live in a directory that user owns."""
    if os.geteuid() == 0:
        import pwd
        import tempfile

        owner = pwd.getpwnam("mosquitto")
        directory = Path(tempfile.mkdtemp(prefix="year7-"))
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        try:
            _year7_files(directory)
            for path in directory.iterdir():
                os.chown(path, owner.pw_uid, owner.pw_gid)
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    else:
        yield _year7_files(tmp_path)


def _year7_files(tmp_path: Path) -> Path:
    root_key, site_key, broker_key, dev_key = (SoftwareKey.ephemeral() for _ in range(4))
    root = issue_root_ca(
        root_key.private_key(),
        common_name="Root",
        organization="Acme",
        not_before=T0,
        not_after=T0 + 20 * YEAR,
    )
    site = issue_site_ca(
        root,
        root_key.private_key(),
        site_key.public_key(),
        site_id=SiteId("site-01"),
        organization="Tower",
        not_before=T0,
        not_after=T0 + 10 * YEAR,
    )
    broker = issue_broker_certificate(
        site,
        site_key.private_key(),
        broker_key.public_key(),
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        organization="Tower",
        not_before=T0,
        not_after=T0 + 10 * YEAR,
    )
    dev = issue_secondary_certificate(
        site,
        site_key.private_key(),
        dev_key.public_key(),
        device_id=DeviceId("TH-000007"),
        organization="Tower",
        not_before=T0 + 6 * YEAR,
        not_after=T0 + 7 * YEAR,
    )
    crl = build_crl(
        site,
        site_key.private_key(),
        revoked=[],
        crl_number=1,
        this_update=T0 + 6 * YEAR + timedelta(days=100),
        next_update=T0 + 6 * YEAR + timedelta(days=107),
    )
    (tmp_path / "root.pem").write_bytes(root.public_bytes(PEM))
    (tmp_path / "cas.pem").write_bytes(root.public_bytes(PEM) + site.public_bytes(PEM))
    (tmp_path / "broker.pem").write_bytes(broker.public_bytes(PEM) + site.public_bytes(PEM))
    (tmp_path / "dev.pem").write_bytes(dev.public_bytes(PEM) + site.public_bytes(PEM))
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(PEM))
    _write_key(tmp_path / "broker.key", broker_key)
    _write_key(tmp_path / "dev.key", dev_key)
    return tmp_path


@pytest.fixture
def faked_mosquitto(clock: FakeClock, year7: Path) -> Iterator[int]:
    port = _free_port()
    conf = year7 / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {year7 / 'cas.pem'}\ncertfile {year7 / 'broker.pem'}\n"
        f"keyfile {year7 / 'broker.key'}\ncrlfile {year7 / 'crl.pem'}\n"
        "require_certificate true\nuse_identity_as_username true\n"
        "allow_anonymous false\nset_tcp_nodelay true\nuser mosquitto\n"
    )
    log = (year7 / "mosquitto.log").open("wb")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf), "-v"], env=clock.env(), stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # readiness: the port accepts
            assert proc.poll() is None, (year7 / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _publish(clock: FakeClock, year7: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-i", "TH-000007",
            "--cafile", str(year7 / "root.pem"), "--cert", str(year7 / "dev.pem"),
            "--key", str(year7 / "dev.key"), "-t", "devices/TH-000007/t", "-m", "x",
        ],
        env=clock.env(), capture_output=True, text=True, timeout=15,
    )  # fmt: skip


def test_mosquitto_judges_certificates_and_crls_at_the_simulated_date(
    clock: FakeClock, year7: Path, faked_mosquitto: int
) -> None:
    """A running, faked Mosquitto accepts a certificate valid only in year 7 when the file
    says year 7, refuses it when the file moves past the CRL's nextUpdate (fail closed) and
    before the certificate starts, all without a restart."""
    assert _publish(clock, year7, faked_mosquitto).returncode != 0  # year 0: not yet valid
    clock.set(T0 + 6 * YEAR + timedelta(days=101))
    done = _publish(clock, year7, faked_mosquitto)
    assert done.returncode == 0, done.stderr + (year7 / "mosquitto.log").read_text()
    clock.set(T0 + 6 * YEAR + timedelta(days=108))  # CRL expired: every client refused
    assert _publish(clock, year7, faked_mosquitto).returncode != 0
    clock.set(T0 + 6 * YEAR + timedelta(days=102))
    assert _publish(clock, year7, faked_mosquitto).returncode == 0


def test_openssl_verify_at_the_simulated_date(clock: FakeClock, year7: Path) -> None:
    argv = ["openssl", "verify", "-CAfile", str(year7 / "cas.pem"), str(year7 / "dev.pem")]
    clock.set(T0 + 6 * YEAR + timedelta(days=101))
    assert subprocess.run(argv, env=clock.env(), capture_output=True).returncode == 0
    real = subprocess.run(argv, capture_output=True, text=True)  # the real date: year 0
    assert real.returncode != 0 and "not yet valid" in real.stdout + real.stderr
    crl = [*argv[:2], "-crl_check", "-CRLfile", str(year7 / "crl.pem"), *argv[2:]]
    assert subprocess.run(crl, env=clock.env(), capture_output=True).returncode == 0
    clock.advance(timedelta(days=30))
    late = subprocess.run(crl, env=clock.env(), capture_output=True, text=True)
    assert "CRL has expired" in late.stdout + late.stderr
