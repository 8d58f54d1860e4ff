"""Operations: Prometheus metrics and health of a running registrar, JSON logs.

What is real: a site commissioned from an HQ bundle, ``registrar run`` as a process (and
the same composition root in-process where the test moves the app's clock), the embedded
broker, software-key devices registering over mTLS MQTT, ``curl`` reading the endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_sim.client import DeviceRegistrationError
from registrar.app import AppSettings, RegistrarApp
from registrar.broker import Endpoint
from registrar.site import SiteSecrets, commission_site
from tests.fixtures.ops_site import OpsSite, registrar_process, software_device
from tests.fixtures.site import make_world

pytestmark = [pytest.mark.slow]

REGISTRAR = Path(sys.executable).parent / "registrar"
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def ops_site(tmp_path_factory: pytest.TempPathFactory) -> OpsSite:
    """Manifest: TH-000001 only, no admission rule (TH-000002 is refused, not_in_manifest)."""
    world = make_world(tmp_path_factory.mktemp("ops") / "w")
    commission_site(world.site, world.bundle(devices=("TH-000001",)), world.site_secrets)
    return OpsSite(world, world.site.path, world.base / "site.pass")


async def curl(url: str) -> tuple[int, str]:
    """``curl`` the URL; (HTTP status, body)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    body, _, code = out.decode().rpartition("\n")
    return int(code), body


def sample(exposition: str, name: str, labels: str = "") -> float:
    """The value of one sample line ``name{labels} value`` of a Prometheus exposition."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in exposition.splitlines():
        if not line.startswith("#") and line.rpartition(" ")[0] == wanted:
            return float(line.rpartition(" ")[2])
    raise AssertionError(f"no sample {wanted} in:\n{exposition}")


# --------------------------------------------------------------- registrar run, a process


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
async def test_registrar_run_metrics_move_health_is_ok_and_logs_are_json(
    ops_site: OpsSite, tmp_path: Path, broker: str
) -> None:
    home = ops_site.copy(tmp_path / "site")
    log = tmp_path / "registrar.err"
    with registrar_process(ops_site, home, log, broker) as status:
        metrics = status["metrics"]
        assert isinstance(metrics, dict) and metrics["host"] == "127.0.0.1"
        base = f"http://127.0.0.1:{metrics['port']}"
        listeners = status["listeners"]
        assert isinstance(listeners, dict)
        registration = Endpoint(**listeners["registration"])
        operational = Endpoint(**listeners["operational"])

        code, body = await curl(f"{base}/healthz")
        assert code == 200, body
        assert json.loads(body) == {
            "status": "ok",
            "failing": [],
            "checks": {"store": "ok", "broker": "ok", "revocation_data": "ok"},
        }
        _, before = await curl(f"{base}/metrics")
        assert sample(before, "devtrust_registrar_registrations_total") == 0
        assert sample(before, "devtrust_registrar_connected_devices") == 0
        assert sample(before, "devtrust_registrar_revocation_data_expiry_seconds") > 86_400
        assert sample(before, "devtrust_registrar_broker_connected") == 1

        device = software_device(ops_site.world, "TH-000001")
        await device.register(registration)
        with pytest.raises(DeviceRegistrationError) as refused:
            await software_device(ops_site.world, "TH-000002").register(registration)
        assert refused.value.reason == "not_in_manifest"

        async with device.operational(operational):
            # the broker counts the session once its CONNECT is processed (Mosquitto: once
            # its log line is read), and the registration session once its end is
            deadline = time.monotonic() + 5
            while True:
                _, during = await curl(f"{base}/metrics")
                if sample(during, "devtrust_registrar_connected_devices") == 1:
                    break
                assert time.monotonic() < deadline, during
                await asyncio.sleep(0.05)

        assert sample(during, "devtrust_registrar_registrations_total") == 1
        assert sample(during, "devtrust_registrar_refusals_total", 'reason="not_in_manifest"') == 1
        count = sample(during, "devtrust_registrar_request_seconds_count", 'kind="registration"')
        assert count == 2
        assert sample(during, "devtrust_registrar_request_seconds_sum", 'kind="registration"') > 0
        age = [line for line in during.splitlines() if "crl_age_seconds{" in line]
        assert age and all(float(line.rpartition(" ")[2]) > 0 for line in age), during
        code, body = await curl(f"{base}/nothing")
        assert code == 404
        if broker == "embedded":
            # docs/operations.md: the online backup of the live SQLite store has the device
            copy = tmp_path / "backup.db"
            backup = subprocess.run(
                ["sqlite3", str(home / "registrar.db"), f".backup {copy}"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert backup.returncode == 0, backup.stderr
            with contextlib.closing(sqlite3.connect(copy)) as db:
                rows = db.execute("SELECT device_id, status FROM devices").fetchall()
            assert rows == [("TH-000001", "registered")]

    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines, "no log output"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    messages = [r["message"] for r in records]
    assert any(m.startswith("metrics and health on http://127.0.0.1:") for m in messages)
    refusal = [r for r in records if "refused registration on TH-000002" in r["message"]]
    assert refusal and refusal[0]["level"] == "INFO" and refusal[0]["logger"] == "registrar.service"


# ------------------------------------------- the same composition root, with a moving clock


async def test_healthz_is_503_naming_each_failing_check(ops_site: OpsSite, tmp_path: Path) -> None:
    """Revocation data past the site's offline limit (the app's clock moved), the
    registrar's broker session down, the store closed: each turns /healthz to 503 with
    that check named; the gauge of seconds to expiry goes negative."""
    home = ops_site.copy(tmp_path / "site")
    from registrar.site import SiteHome

    offset = [timedelta(0)]
    app = RegistrarApp(
        SiteHome.open(home),
        SiteSecrets(ops_site.passphrase_file),
        AppSettings(registration_port=0, operational_port=0, metrics=Endpoint("127.0.0.1", 0)),
        clock=lambda: datetime.now(UTC) + offset[0],
    )
    await app.start()
    try:
        endpoint = app.metrics_endpoint
        assert endpoint is not None
        base = f"http://{endpoint.host}:{endpoint.port}"
        code, body = await curl(f"{base}/healthz")
        assert code == 200, body

        site = app.site
        assert site is not None
        offset[0] = timedelta(days=site.max_offline_days + 1)
        code, body = await curl(f"{base}/healthz")
        doc = json.loads(body)
        assert code == 503 and doc["status"] == "failing", body
        assert doc["failing"] == ["revocation_data"]
        assert "expired" in doc["checks"]["revocation_data"]
        _, metrics = await curl(f"{base}/metrics")
        assert sample(metrics, "devtrust_registrar_revocation_data_expiry_seconds") < 0
        offset[0] = timedelta(0)

        assert app.broker is not None
        await app.broker.stop()  # the registrar's own session drops with it
        deadline = time.monotonic() + 10
        while True:
            code, body = await curl(f"{base}/healthz")
            if code == 503:
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.05)
        assert json.loads(body)["failing"] == ["broker"]
        _, metrics = await curl(f"{base}/metrics")
        assert sample(metrics, "devtrust_registrar_broker_connected") == 0

        assert app.store is not None
        await app.store.close()
        code, body = await curl(f"{base}/healthz")
        assert code == 503
        doc = json.loads(body)
        assert doc["failing"] == ["store", "broker"]
        assert "not running" in doc["checks"]["store"]
    finally:
        with contextlib.suppress(Exception):
            await app.stop()


def test_two_apps_in_one_process_have_their_own_registries(
    ops_site: OpsSite, tmp_path: Path
) -> None:
    """No global registry: building a second app does not fail on duplicate metric names,
    and one app's latency observations do not show in the other's exposition."""
    from registrar.site import SiteHome

    apps = [
        RegistrarApp(SiteHome.open(ops_site.copy(tmp_path / f"s{i}")), SiteSecrets(None))
        for i in range(2)
    ]
    apps[0].metrics.registration_latency.observe(0.5)
    first, second = (a.metrics.exposition().decode() for a in apps)
    name = "devtrust_registrar_request_seconds_count"
    assert sample(first, name, 'kind="registration"') == 1
    assert sample(second, name, 'kind="registration"') == 0


# ------------------------------------------------------------------------------ JSON logs


def test_json_formatter_keeps_a_traceback_and_extras_on_one_line() -> None:
    import io
    import logging

    from trustcore.logformat import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("devtrust.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            logger.exception("failed for %s", "dev-1", extra={"device_id": "dev-1"})
        logger.warning("plain ünïcode")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "failed for dev-1" and first["level"] == "ERROR"
    assert first["device_id"] == "dev-1"
    assert "ValueError: bad\nvalue" in first["exc"] and "Traceback" in first["exc"]
    assert datetime.fromisoformat(first["ts"]).tzinfo is not None
    assert second == {**second, "message": "plain ünïcode", "level": "WARNING"}


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("hq", ["station-cas", "--home", "{tmp}/no-hq", "--station", "s1"]),
        ("factory-station", ["status", "--home", "{tmp}/no-station"]),
        ("registrar", ["run", "--home", "{tmp}/no-site"]),
        ("hq", ["station-cas", "--no-such-option"]),
    ],
)
def test_every_stderr_line_of_each_cli_is_json_in_json_mode(
    tmp_path: Path, command: str, args: list[str]
) -> None:
    """The refusal of each CLI (and click's usage error) arrive as JSON records."""
    argv = [str(REGISTRAR.parent / command)]
    if command == "registrar":
        argv += [args[0], "--log-format", "json", *(a.format(tmp=tmp_path) for a in args[1:])]
    else:
        argv += ["--log-format", "json", *(a.format(tmp=tmp_path) for a in args)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0, result.stderr  # refused (exit codes: docs of each CLI)
    lines = result.stderr.splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    assert {r["logger"] for r in records} == {f"{command}.stderr"}
    assert records[-1]["level"] == "ERROR"
    assert "Traceback" not in result.stderr


def test_latency_histogram_buckets_are_cumulative_and_le_is_inclusive() -> None:
    from registrar.errors import ConfigError
    from registrar.metrics import LatencyHistogram

    h = LatencyHistogram((0.01, 0.1))
    for seconds in (0.001, 0.01, 0.05, 0.1, 7.0):
        h.observe(seconds)
    buckets, total = h.cumulative()
    assert buckets == [("0.01", 2), ("0.1", 4), ("+Inf", 5)]
    assert total == pytest.approx(7.161)
    with pytest.raises(ConfigError):
        LatencyHistogram((0.1, 0.01))


async def test_rabbitmq_auth_backend_serves_and_counts_only_device_sessions() -> None:
    """The auth backend and the metrics listener bind through one helper
    (``registrar.http_listener``); the RabbitMQ live-session table counts devices only."""
    from registrar.broker.rabbitmq_auth import ADMIN_USER, AuthBackend, AuthPolicy, LiveSessions

    live = LiveSessions()
    live.created("n1", "c1", "TH-000001")
    live.created("n1", "c2", "registrar@site")
    live.created("n2", "c3", ADMIN_USER)
    live.created("n2", "c4", "TH-000002")
    live.closed("n2", "c4")
    assert live.devices() == 1 and len(live) == 3

    backend = AuthBackend(lambda _identity: None, AuthPolicy("x" * 32), live=live)  # type: ignore[arg-type]
    await backend.start("127.0.0.1", 0)
    try:
        code, body = await curl(f"http://127.0.0.1:{backend.port}/nothing")
        assert (code, body) == (200, "deny")
    finally:
        await backend.stop()
