"""Policy plugins end to end: real entry points (a throw-away dist-info on sys.path for the
misbehaving test plugins), a swtpm station and RegistrationService.handle on real SQLite.

A plugin that raises, answers nothing or is missing makes the check refuse, at the station
and at the site; shift_hours allows inside and refuses outside a shift; hold_unlisted holds
an unlisted device until ``registrar approve``, and the device's retry then registers."""

from __future__ import annotations

import json
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from factory_station.errors import IssuanceRefused
from factory_station.plugins import load_station_plugins
from factory_station.plugins.shift_hours import ShiftHours
from factory_station.station import CONFIG_FILE, StationConfig
from registrar.plugins import load_site_plugins, read_site_plugins
from registrar.service import RegistrationService, SiteAuthority
from registrar.store import Store
from signers.software import SoftwareKey
from tests.fixtures.pki import SITE_OPERATOR, Pki
from tests.fixtures.registration import ADMIT_STATION, make_dev, make_request, verifier
from tests.fixtures.station import StationEnv
from trustcore import cbor
from trustcore.identity import DeviceId, StationId
from trustcore.payload import PayloadKey
from trustcore.policy_chain import PluginSetting
from trustcore.registration import Admission

TEST_PLUGINS = textwrap.dedent(
    """
    from trustcore.policy_chain import ALLOW, refuse

    class Raises:
        def __init__(self, config):
            pass
        def __call__(self, *facts):
            raise RuntimeError("plugin bug")

    class Silent:
        def __init__(self, config):
            pass
        def __call__(self, *facts):
            return None

    class Allows:
        def __init__(self, config):
            pass
        def __call__(self, *facts):
            return ALLOW

    class Refuses:
        def __init__(self, config):
            self.reason = config.get("reason", "vendor_rule")
        def __call__(self, *facts):
            return refuse(self.reason, "the vendor says no")
    """
)


@pytest.fixture
def test_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install test plugins as real entry points in both groups (no mocks: importlib
    .metadata finds them on sys.path like any installed distribution)."""
    site = tmp_path / "plugin-site"
    dist = site / "devtrust_test_plugins-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "devtrust_test_plugins.py").write_text(TEST_PLUGINS)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: devtrust-test-plugins\n")
    names = ("raises", "silent", "allows", "refuses")
    lines = [f"{n} = devtrust_test_plugins:{n.capitalize()}" for n in names]
    body = "\n".join(lines)
    (dist / "entry_points.txt").write_text(
        f"[devtrust.station_checks]\n{body}\n\n[devtrust.site_admission]\n{body}\n"
    )
    monkeypatch.syspath_prepend(str(site))


# ------------------------------------------------------------------------------- station


def _configure(env: StationEnv, *plugins: dict[str, object]) -> None:
    path = env.home / CONFIG_FILE
    doc = json.loads(path.read_text())
    doc["plugins"] = list(plugins)
    path.write_text(json.dumps(doc))


def _refusal(env: StationEnv, **open_kwargs: object) -> str | None:
    with env.open(**open_kwargs) as station:
        if station.policy is None:
            station.import_entitlement(env.hq.entitlement())
        try:
            station.check(DeviceId("dev-000001"))
        except IssuanceRefused as exc:
            return exc.reason
        return None


@pytest.mark.tpm
def test_station_plugins_fail_closed_and_shift_hours_works(
    station_env: StationEnv, test_plugins: None
) -> None:
    env = station_env
    assert _refusal(env) is None  # no plugins: the built-in checks alone
    _configure(env, {"name": "allows"}, {"name": "raises"})
    assert _refusal(env) == "plugin_error"
    _configure(env, {"name": "silent"})
    assert _refusal(env) == "plugin_no_answer"
    _configure(env, {"name": "not-installed"})
    with env.open() as station:
        assert station.plugins.problems and "not installed" in station.plugins.problems[0]
    assert _refusal(env) == "plugin_missing"
    # A plugin can only add refusals: built-in checks still run first.
    _configure(env, {"name": "allows"})
    with env.open() as station:
        with pytest.raises(IssuanceRefused) as info:
            station.check(DeviceId("dev-000001"), product="another-product")
        assert info.value.reason == "wrong_product"
    # shift_hours, Berlin time, judged at the real clock (a station's host clock may not run
    # ahead of the time its TPM vouches for): a shift around now, then one later today.
    berlin = datetime.now(ZoneInfo("Europe/Berlin"))

    def shift(start_h: int, end_h: int) -> str:
        start, end = berlin + timedelta(hours=start_h), berlin + timedelta(hours=end_h)
        return f"{start:%H:%M}-{end:%H:%M}"

    _configure(
        env,
        {"name": "allows"},
        {"name": "shift_hours", "config": {"shifts": [shift(-2, 2)], "timezone": "Europe/Berlin"}},
    )
    assert _refusal(env) is None
    _configure(
        env,
        {"name": "allows"},
        {"name": "shift_hours", "config": {"shifts": [shift(3, 5)], "timezone": "Europe/Berlin"}},
    )
    assert _refusal(env) == "outside_shift"
    # The refusal is audited like any other.
    with env.open() as station:
        assert any(r.get("reason") == "outside_shift" for r in _audit(station))


def _audit(station: object) -> list[dict[str, object]]:
    from trustcore.audit import decode_record

    rows = station.store.db.execute("SELECT record FROM audit").fetchall()  # type: ignore[attr-defined]
    return [dict(decode_record(r[0]).fields) for r in rows]


def test_shift_hours_unit_and_bad_settings() -> None:
    plugin = ShiftHours({"shifts": ["22:00-06:00"], "timezone": "UTC"})
    from trustcore.issuance import IssuanceRequest

    def at(hour: int, minute: int = 0) -> str:
        when = int(datetime(2030, 1, 1, hour, minute, tzinfo=UTC).timestamp())
        decision = plugin(None, None, IssuanceRequest("dev-000001", "p", when))  # type: ignore[arg-type]
        return decision.verdict.value + ":" + decision.reason

    assert at(23) == "allow:" and at(5, 59) == "allow:"
    assert at(6) == "refuse:outside_shift" and at(12) == "refuse:outside_shift"
    for bad in (
        {"shifts": ["25:00-06:00"], "timezone": "UTC"},
        {"shifts": [], "timezone": "UTC"},
        {"shifts": ["06:00-06:00"], "timezone": "UTC"},
        {"shifts": ["06:00-14:00"], "timezone": "Mars/Olympus"},
        {"shifts": ["06:00-14:00"]},
    ):
        with pytest.raises(ValueError):
            ShiftHours(bad)
    # A bad setting fails closed at load time: the placeholder refuses every issuance.
    loaded = load_station_plugins([PluginSetting.create("shift_hours", {"shifts": []})])
    assert loaded.problems and "cannot be loaded" in loaded.problems[0]


def test_station_config_round_trips_plugins() -> None:
    text = json.dumps(
        {
            "version": 1,
            "station_id": "station-t1",
            "tcti": "swtpm:port=1",
            "nv_index": "0x01000100",
            "attestation": "tpm2-certify",
            "plugins": [{"name": "shift_hours", "config": {"shifts": ["06:00-14:00"]}}],
        }
    )
    config = StationConfig.from_json(text)
    assert [p.name for p in config.plugins] == ["shift_hours"]
    assert StationConfig.from_json(config.to_json()) == config


# ---------------------------------------------------------------------------------- site


class Site:
    def __init__(self, pki: Pki, store: Store, plugins: list[dict[str, object]] | None) -> None:
        self.pki = pki
        self.store = store
        loaded = None
        if plugins is not None:
            loaded = load_site_plugins([PluginSetting.from_obj(p) for p in plugins]).plugins
        self.service = RegistrationService(
            store=store,
            verifier=verifier(),
            admission=Admission(),  # the manifest lists nobody
            site=SiteAuthority(pki.site_ca, SoftwareKey(pki.site_key), SITE_OPERATOR),
            payload_key=PayloadKey.generate(),
            clock=lambda: pki.now,
            admission_plugins=loaded,
        )

    async def register(self, name: str, admission: Admission | None = None) -> str:
        if admission is not None:
            self.service.update_trust(admission=admission)
        dev = make_dev(name)
        answer = await self.service.handle(dev.device_id, make_request(self.pki, dev))
        body = cbor.decode(cbor.decode(answer, max_size=1 << 16)["body"], max_size=1 << 16)
        return str(body.get("reason", "granted"))


@pytest.fixture
async def site_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(tmp_path / "registrar.db")
    try:
        yield store
    finally:
        await store.close()


async def test_site_without_plugins_refuses_unlisted(pki: Pki, site_store: Store) -> None:
    site = Site(pki, site_store, None)
    assert await site.register("dev-500001") == "not_in_manifest"
    assert await site.store.pending() == []


@pytest.mark.parametrize(
    ("plugin", "reason"),
    [
        ("raises", "policy_unavailable"),
        ("silent", "policy_unavailable"),
        ("not-installed", "policy_unavailable"),
        ("refuses", "policy_refused"),
    ],
)
async def test_site_plugins_fail_closed(
    pki: Pki, site_store: Store, test_plugins: None, plugin: str, reason: str
) -> None:
    site = Site(pki, site_store, [{"name": "allows"}, {"name": plugin}])
    # Even a device the manifest lists is refused: the chain decides before issuance.
    assert await site.register("dev-500002", ADMIT_STATION) == reason
    await site.store.record_event(None, "flush", "")
    events = await site.store.events(kind="refused")
    assert plugin in events[0].detail


async def test_site_allowing_plugins_never_admit_unlisted(
    pki: Pki, site_store: Store, test_plugins: None
) -> None:
    site = Site(pki, site_store, [{"name": "allows"}])
    assert await site.register("dev-500003") == "not_in_manifest"
    assert await site.register("dev-500004", ADMIT_STATION) == "granted"


async def test_hold_unlisted_then_approve_then_registered(
    pki: Pki, site_store: Store, tmp_path: Path
) -> None:
    site = Site(pki, site_store, [{"name": "hold_unlisted"}])
    assert await site.register("dev-500005") == "held_for_approval"
    assert await site.register("dev-500005") == "held_for_approval"  # retry: still held
    [pending] = await site.store.pending()
    assert (pending.device_id, pending.plugin, pending.attempts) == (
        DeviceId("dev-500005"),
        "hold_unlisted",
        2,
    )
    assert pending.station_id == StationId("station-01")
    assert await site.store.approve(DeviceId("dev-500005"), at=1) is True
    assert await site.register("dev-500005") == "granted"
    assert await site.store.pending() == []
    # Another unlisted device is still held: approval is per device.
    assert await site.register("dev-500006") == "held_for_approval"


async def test_registrar_pending_and_approve_cli(pki: Pki, tmp_path: Path) -> None:
    """A held device, then the installer's commands on the (offline) site: ``registrar
    pending`` lists it, ``registrar approve`` records it, the device's retry registers."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from registrar.cli import main
    from registrar.site import SiteSecrets, init_site

    secret = tmp_path / "site.pass"
    secret.write_text("site-passphrase")
    secret.chmod(0o600)
    home = tmp_path / "site"
    init_site(
        home,
        site_id="site-plugins",
        root_pem=pki.root.public_bytes(Encoding.PEM),
        secrets=SiteSecrets(secret),
    )
    store = await Store.open(store_path_of(home))
    try:
        site = Site(pki, store, [{"name": "hold_unlisted"}])
        assert await site.register("dev-500007") == "held_for_approval"
    finally:
        await store.close()
    runner = CliRunner()

    def cli(*args: str) -> str:
        return await_free(runner, main, args)

    listed = cli("pending", "--home", str(home), "--json")
    assert [p["device_id"] for p in json.loads(listed)] == ["dev-500007"]
    assert "dev-500007 approved" in cli("approve", "--home", str(home), "dev-500007")
    assert json.loads(cli("pending", "--home", str(home), "--json")) == []
    store = await Store.open(store_path_of(home))
    try:
        site = Site(pki, store, [{"name": "hold_unlisted"}])
        assert await site.register("dev-500007") == "granted"
    finally:
        await store.close()


def store_path_of(home: Path) -> Path:
    """Where the CLI finds the store (registrar.run_dir.store_path of the site home)."""
    from registrar.run_dir import store_path
    from registrar.site import SiteHome

    return store_path(SiteHome.open(home))


def await_free(runner: CliRunner, main: object, args: tuple[str, ...]) -> str:
    """Run a CLI command (which runs its own event loop) in a worker thread."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(runner.invoke, main, list(args)).result()  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    return result.output


def test_site_plugins_file(tmp_path: Path) -> None:
    from registrar.errors import ConfigError

    assert read_site_plugins(tmp_path) == ()
    (tmp_path / "plugins.json").write_text(
        json.dumps({"version": 1, "admission": [{"name": "hold_unlisted"}]})
    )
    assert [p.name for p in read_site_plugins(tmp_path)] == ["hold_unlisted"]
    (tmp_path / "plugins.json").write_text(json.dumps({"admission": []}))
    with pytest.raises(ConfigError):
        read_site_plugins(tmp_path)
    assert load_site_plugins(read_site_plugins(tmp_path / "none")).plugins == ()
