"""Registration latency and registrar memory on an empty and on a large registry.

    python bench/registry_scale.py --preload 1000000 --store sqlite --json
    python bench/registry_scale.py --preload 1000000 --store postgres --json

Progress goes to stderr; the LAST line of stdout is one JSON object:

* ``p50_ms_empty`` / ``p50_ms_full``: median time of one registration through
  :meth:`registrar.service.RegistrationService.handle` — the code ``registrar run`` serves
  requests with: parse, idempotency and nonce look-up, chain verification, LDevID issuance,
  payload-key wrap, durable group commit (SQLite ``synchronous=FULL`` / PostgreSQL
  ``synchronous_commit=on``), signed response — over a real store, ``--registrations``
  devices one after another, first on the empty registry, then after ``--preload N``
  registered devices were bulk-loaded (:meth:`registrar.store.Store.import_registrations`:
  device, LDevID record, certified key, request digest→response, nonce, event and factory
  certificate sighting per device, in a separate process);
* ``ratio``: ``p50_ms_full / p50_ms_empty`` (same run, same machine);
* ``peak_rss_mb``: the peak resident memory (``VmHWM``, reset just before) of this
  process while it opens the full registry, does the registrar's start-up reads of it
  (revoked devices, superseded serials, devices pending a payload key, status counts,
  devices per payload key) and serves the registrations, with the registrar's status
  refresh (counts, devices per key) running every 0.5 s beside them, as ``registrar run``
  does. ``peak_rss_mb_empty`` is the same on the empty registry.

Every response is parsed as the device would (signature, LDevID, payload key): a refusal
or a bad response is a failure (``failures``), and the run exits non-zero.

The PostgreSQL store is a fresh database on ``--pg-url`` (default: the machine's server on
127.0.0.1:5432), dropped at the end unless ``--keep``; the SQLite file lives in a temporary
directory (``--dir`` to choose; it needs about 5 GB per million devices).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.site_fixture import SitePki, build_site_pki
from device_sim.client import DeviceClient, SoftwareKeys
from registrar.service import RegistrationService
from registrar.store import FactorySighting, Registration, Store
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.registration import RegistrationGranted, parse_request, parse_response

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
#: How often ``registrar run`` refreshes its status file (``AppSettings.status_interval``).
STATUS_INTERVAL = 0.5


def say(msg: str) -> None:
    print(f"[registry_scale] {msg}", file=sys.stderr, flush=True)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


# ------------------------------------------------------------------------------ preload


def synthetic_registrations(
    count: int, *, at: int, payload_key_id: bytes, sizes: dict[str, int]
) -> Iterator[tuple[Registration, FactorySighting]]:
    """``count`` registered devices ``pre-0000000``…, with rows of the sizes a real
    registration writes (``sizes``: DER and response lengths measured from one). Unique
    serials, key ids, digests and nonces; registered on the current payload key (no
    payload-key update pending)."""
    rnd = os.urandom
    for i in range(count):
        device = DeviceId(f"pre-{i:07d}")
        reg = Registration(
            device_id=device,
            station_id=StationId("station-01"),
            idevid_serial=CertSerial.random(),
            ldevid_serial=CertSerial.random(),
            ldevid_der=rnd(sizes["ldevid"]),
            ldevid_key_id=rnd(20),
            wrap_key_der=rnd(sizes["wrap_key"]),
            payload_key_id=payload_key_id,
            request_digest=rnd(32),
            response=rnd(sizes["response"]),
            nonce=rnd(32),
            request_time=at,
            at=at,
            ldevid_not_after=at + 365 * 86400,
        )
        seen = FactorySighting(
            StationId("station-01"),
            reg.idevid_serial,
            device,
            rnd(sizes["idevid"]),
            at,
        )
        yield reg, seen


async def _preload(location: str, count: int, key_hex: str, sizes: dict[str, int]) -> None:
    at = int(time.time())
    key = bytes.fromhex(key_hex)
    start = time.perf_counter()

    def progress(done: int) -> None:
        if done % 100_000 == 0 or done == count:
            rate = done / (time.perf_counter() - start)
            say(f"preload: {done:,} devices ({rate:,.0f}/s)")

    async with await Store.open(location) as store:
        await store.import_registrations(
            (r for r, _ in synthetic_registrations(count, at=at, payload_key_id=key, sizes=sizes)),
            sightings=(
                s for _, s in synthetic_registrations(count, at=at, payload_key_id=key, sizes=sizes)
            ),
            progress=progress,
        )


def preload(location: str, count: int, key_id: bytes, sizes: dict[str, int]) -> float:
    """Bulk-load in a child process (its memory is not the serving registrar's)."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "_preload",
            location,
            str(count),
            key_id.hex(),
            json.dumps(sizes),
        ],
        check=True,
    )
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ serving


class Registry:
    """One registry as ``registrar run`` serves it: the store opened, the start-up reads,
    the status refresh every 0.5 s, and the registration service over it."""

    def __init__(self, pki: SitePki, location: str, name: str) -> None:
        self.pki = pki
        self.location = location
        self.name = name
        self.times: list[float] = []
        self.failures = 0
        self.status_ms: list[float] = []
        self.startup_ms = 0.0
        self.devices = 0
        self._sent = 0
        self._stop = asyncio.Event()
        self._status: asyncio.Task[None] | None = None
        self._store: Store | None = None
        self._service: RegistrationService | None = None

    async def open(self) -> None:
        t0 = time.perf_counter()
        store = self._store = await Store.open(self.location)
        # the registrar's start-up reads of the registry (RegistrarApp._start)
        steps: dict[str, float] = {}

        def lap(name: str, since: float) -> float:
            now = time.perf_counter()
            steps[name] = round((now - since) * 1000, 1)
            return now

        t = lap("open", t0)
        await store.revoked_device_ids()
        t = lap("revoked", t)
        await store.superseded_serials()
        t = lap("superseded", t)
        async for _ in store.device_pages(
            size=256, status="registered", not_key=self.pki.payload_key.key_id
        ):
            pass
        t = lap("pending_key", t)
        self.devices = (await store.counts())["devices"]
        t = lap("counts", t)
        await store.devices_per_payload_key()
        lap("per_key", t)
        say(f"{self.name}: start-up reads (ms) {steps}")
        self.startup_ms = (time.perf_counter() - t0) * 1000
        self._service = RegistrationService(
            store=store,
            verifier=self.pki.verifier(),
            admission=self.pki.admission(),
            site=self.pki.site_authority(),
            payload_key=self.pki.payload_key,
        )
        self._status = asyncio.create_task(self._refresh_status(store))

    async def _refresh_status(self, store: Store) -> None:
        """What ``registrar run`` reads for ``status.json`` every ``status_interval``."""
        while not self._stop.is_set():
            t0 = time.perf_counter()
            await store.counts()
            await store.devices_per_payload_key()
            self.status_ms.append((time.perf_counter() - t0) * 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), STATUS_INTERVAL)

    def requests(self, count: int) -> list[tuple[DeviceId, bytes]]:
        """Fresh signed requests of new devices (made outside the clock, like a device)."""
        out = []
        for _ in range(count):
            fd = self.pki.factory_device(f"{self.name}-{self._sent:06d}")
            self._sent += 1
            request, _, _ = DeviceClient(fd.credentials(), SoftwareKeys()).new_request()
            out.append((fd.device_id, request))
        return out

    async def register(self, requests: list[tuple[DeviceId, bytes]]) -> None:
        """One after another, each timed through ``RegistrationService.handle``."""
        assert self._service is not None
        for device, request in requests:
            t = time.perf_counter()
            response = await self._service.handle(device, request)
            self.times.append((time.perf_counter() - t) * 1000)
            if not self._granted(device, request, response):
                self.failures += 1

    async def close(self) -> None:
        self._stop.set()
        if self._status is not None:
            await self._status
        if self._store is not None:
            await self._store.close()

    def _granted(self, device: DeviceId, request: bytes, response: bytes) -> bool:
        parsed = parse_request(request)
        key = x509.load_der_x509_csr(parsed.csr_der).public_key()
        try:
            answer = parse_response(
                response,
                device_id=device,
                nonce=parsed.nonce,
                request_digest=parsed.digest,
                ldevid_public_key=key,  # type: ignore[arg-type]
                roots=[self.pki.root],
                now=datetime.now(UTC),
            )
        except Exception as exc:  # a response the device cannot use is a failure
            say(f"bad response for {device}: {exc!r}")
            return False
        return isinstance(answer, RegistrationGranted)

    def summary(self) -> dict[str, float]:
        times = sorted(self.times)
        return {
            "p50_ms": statistics.median(times),
            "p90_ms": times[int(len(times) * 0.9)],
            "status_ms_p50": statistics.median(self.status_ms) if self.status_ms else 0.0,
        }


async def measure_sizes(pki: SitePki, location: str) -> dict[str, int]:
    """Row sizes of one real registration (then forgotten: a throw-away store)."""
    device = pki.factory_device("size-000000")
    request, _, _ = DeviceClient(device.credentials(), SoftwareKeys()).new_request()
    async with await Store.open(location) as store:
        service = RegistrationService(
            store=store,
            verifier=pki.verifier(),
            admission=pki.admission(),
            site=pki.site_authority(),
            payload_key=pki.payload_key,
        )
        response = await service.handle(device.device_id, request)
        record = await store.device(device.device_id)
    if record is None:
        raise RuntimeError("the sizing registration was refused")
    return {
        "ldevid": len(record.ldevid_der),
        "wrap_key": len(record.wrap_key_der),
        "response": len(response),
        "idevid": len(device.idevid.public_bytes(serialization.Encoding.DER)),
    }


# --------------------------------------------------------------------------------- main


@contextlib.contextmanager
def store_location(kind: str, directory: Path, name: str, pg_url: str, keep: bool) -> Iterator[str]:
    if kind == "sqlite":
        yield str(directory / f"{name}.db")
        return
    import psycopg

    db = f"devtrust_regscale_{name}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}".encode())
    try:
        yield pg_url.rsplit("/", 1)[0] + "/" + db
    finally:
        if keep:
            say(f"kept database {db}")
        else:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)".encode())


async def bench(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    pki = build_site_pki()
    sizes = await measure_sizes(pki, str(directory / "sizing.db"))
    say(f"row sizes from a real registration: {sizes}")
    with contextlib.ExitStack() as stack:
        empty_at = stack.enter_context(
            store_location(args.store, directory, "empty", args.pg_url, args.keep)
        )
        full_at = stack.enter_context(
            store_location(args.store, directory, "full", args.pg_url, args.keep)
        )
        async with await Store.open(empty_at):
            pass  # the empty registry: schema only
        seconds = preload(full_at, args.preload, pki.payload_key.key_id, sizes)
        say(f"preloaded {args.preload:,} devices in {seconds:.0f} s")
        if args.store == "sqlite":
            size = sum(f.stat().st_size for f in directory.glob("full.db*"))
            say(f"SQLite files: {size / 2**30:.2f} GiB")
        rss_before = _rss_mb("VmRSS")
        _reset_peak_rss()
        empty, full = Registry(pki, empty_at, "new"), Registry(pki, full_at, "old")
        await full.open()
        await empty.open()
        say(
            f"opened: start-up reads {empty.startup_ms:.0f} ms empty, {full.startup_ms:.0f} ms full"
        )
        # registrations alternate one by one between the two registries (and which goes
        # first), so the noise of a shared 2-core machine falls on both alike; requests
        # are made per round (a request is fresh for five minutes)
        rounds = 10
        block = max(1, args.registrations // rounds)
        for i in range(rounds):
            pending = {r: r.requests(block) for r in (empty, full)}
            for j in range(block):
                order = (empty, full) if (i + j) % 2 == 0 else (full, empty)
                for registry in order:
                    await registry.register(pending[registry][j : j + 1])
            say(f"round {i + 1}/{rounds}: {2 * block * (i + 1)} registrations")
        await empty.close()
        await full.close()
        peak = _rss_mb("VmHWM")
    e, f = empty.summary(), full.summary()
    say(f"p50 {e['p50_ms']:.2f} ms empty, {f['p50_ms']:.2f} ms full; peak RSS {peak:.0f} MB")
    return {
        "store": args.store,
        "preload": args.preload,
        "registrations": len(full.times),
        "p50_ms_empty": round(e["p50_ms"], 3),
        "p50_ms_full": round(f["p50_ms"], 3),
        "ratio": round(f["p50_ms"] / e["p50_ms"], 3),
        "p90_ms_empty": round(e["p90_ms"], 3),
        "p90_ms_full": round(f["p90_ms"], 3),
        "peak_rss_mb": round(peak, 1),
        "rss_mb_before_open": round(rss_before, 1),
        "startup_ms_empty": round(empty.startup_ms, 1),
        "startup_ms_full": round(full.startup_ms, 1),
        "status_ms_p50_empty": round(e["status_ms_p50"], 2),
        "status_ms_p50_full": round(f["status_ms_p50"], 2),
        "devices_full": full.devices,
        "preload_s": round(seconds, 1),
        "failures": empty.failures + full.failures,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_preload"]:
        location, count, key_hex, sizes = argv[1:5]
        asyncio.run(_preload(location, int(count), key_hex, json.loads(sizes)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preload", type=int, default=100_000, help="devices in the full registry")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--registrations", type=int, default=300, help="per phase")
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="admin URL of a PostgreSQL server")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (SQLite file)")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--json", action="store_true", help="(the last line is always JSON)")
    args = parser.parse_args(argv)
    if args.preload < 0 or args.registrations < 10:
        parser.error("--preload must be >= 0 and --registrations >= 10")
    directory = args.dir or Path(tempfile.mkdtemp(prefix="registry-scale-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(bench(args, directory))
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
