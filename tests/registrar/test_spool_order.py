"""The spool's order with a long command (``registrar.spool.LONG_COMMANDS``): a payload-key
push to every device runs in the background, a revocation behind it is applied at once, and
anything else waits for it with every request behind it.

The long command is a stand-in that waits for the test (its real cost, a signed update per
device, is in ``bench/soak.py``: ~10 s at 10,000 devices, during which the soak's revocation
waited 9.8 s before this order existed); the spool files, the watcher and the answers are
the registrar's own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from registrar.app import RegistrarApp
from registrar.revocation import RevokeResult
from registrar.run_dir import spool_dir
from registrar.site import SiteConfig, SiteHome, SiteSecrets
from registrar.spool import RotationResult
from trustcore.identity import DeviceId, SiteId


def _request(spool: Path, n: int, command: str, args: dict[str, Any]) -> Path:
    path = spool / f"{n:020d}-{n:08x}.request.json"
    path.write_text(json.dumps({"v": 1, "command": command, "args": args}), encoding="utf-8")
    return path


def _app(tmp_path: Path) -> RegistrarApp:
    """A registrar on a commissioned-looking site home (nothing to reload)."""
    home = SiteHome(
        tmp_path / "site",
        SiteConfig(SiteId("site-spool"), "Org", 0, ("localhost",), ("127.0.0.1",)),
    )
    home.path.mkdir(mode=0o700)
    (home.path / "state-1").mkdir()
    home.current.symlink_to("state-1")
    app = RegistrarApp(home, SiteSecrets())
    app._state_target = str(home.current.readlink())
    return app


def _answer(request: Path) -> dict[str, Any] | None:
    result = request.with_name(request.name.replace(".request.", ".result."))
    if not result.exists():
        return None
    doc = json.loads(result.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


async def test_a_revocation_does_not_wait_for_a_payload_key_push(tmp_path: Path) -> None:
    app = _app(tmp_path)
    done: list[str] = []
    pushing, release = asyncio.Event(), asyncio.Event()

    async def rotate_payload_key() -> RotationResult:
        pushing.set()
        await release.wait()  # the updates going out to every device
        done.append("rotate")
        return RotationResult("ab" * 16, 3)

    async def revoke(device_id: DeviceId, reason: str = "unspecified") -> RevokeResult:
        done.append(f"revoke {device_id.value}")
        return RevokeResult(device_id.value, reason, ("01",), 7, False, 1)

    async def retire_ca(**_: object) -> dict[str, Any]:
        done.append("retire")
        return {"retired": True}

    app.rotate_payload_key = rotate_payload_key  # type: ignore[method-assign]
    app.revoke = revoke  # type: ignore[method-assign]
    app.retire_ca = retire_ca  # type: ignore[method-assign]
    spool = spool_dir(app.home)
    rotation = _request(spool, 1, "rotate-payload-key", {})
    first = _request(spool, 2, "revoke", {"device_id": "dev-1", "reason": "keyCompromise"})
    retire = _request(spool, 3, "retire-ca", {})
    second = _request(spool, 4, "revoke", {"device_id": "dev-2"})

    await app._watch()
    await asyncio.wait_for(pushing.wait(), 5)
    answer = _answer(first)
    assert answer is not None and answer["ok"], answer  # applied while the push runs
    assert answer["result"]["device_id"] == "dev-1"
    assert done == ["revoke dev-1"]
    # retire-ca may not run beside the push: it waits, and so does what came after it.
    await app._watch()
    assert _answer(retire) is None and _answer(second) is None and _answer(rotation) is None
    assert retire.exists() and second.exists() and rotation.exists()

    release.set()
    running = app._long_command
    assert running is not None
    await asyncio.wait_for(running[1], 5)
    rotated = _answer(rotation)
    assert rotated == {"ok": True, "result": {"key_id": "ab" * 16, "updates_published": 3}}
    await app._watch()  # the push is over: the rest, in order
    assert done == ["revoke dev-1", "rotate", "retire", "revoke dev-2"]
    assert not list(spool.glob("*.request.json"))
    assert app._long_command is None


async def test_a_long_command_running_at_stop_is_cancelled_and_kept(tmp_path: Path) -> None:
    app = _app(tmp_path)
    pushing = asyncio.Event()

    async def migrate_ca() -> int:
        pushing.set()
        await asyncio.Event().wait()  # never ends by itself
        return 0

    app.migrate_ca = migrate_ca  # type: ignore[method-assign]
    request = _request(spool_dir(app.home), 1, "migrate-ca", {})
    await app._watch()
    await asyncio.wait_for(pushing.wait(), 5)
    await app._stop_long_command()
    assert app._long_command is None
    assert request.exists() and _answer(request) is None  # applied again at the next start
