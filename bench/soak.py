"""Sustained load (soak): N software-key devices onboard through the real registrar on
Mosquitto + SQLite, then live for a bounded time while telemetry, renewals, revocations and
payload-key rotations run; memory and CPU of every process are sampled from ``/proc``.

    python bench/soak.py --devices 10000 --minutes 10 --png docs/img/soak.png --json

Set-up, as in :mod:`bench.registration` (the same pieces): a site home commissioned from a
real HQ bundle, N factory devices (software keys), each batch's registration requests made
just before the batch powers on (a request is fresh for 300 s), and ONE ``registrar run
--broker mosquitto`` process (SQLite store in the site home) -- the production entry point,
nothing in-process. The site's LDevID policy is set with the real CLI (``registrar
ldevid-policy --min-interval-seconds 0``) so a device may
renew at any moment: ``registrar run`` has no clock to move, so instead of years passing the
renewals are paced by the bench.

1. **Onboarding**: every device registers (:func:`bench.registration.wave`, at most
   ``--connecting`` handshakes in flight), the answers are verified on the device side, and
   each device opens its operational session with its new LDevID (mTLS, client id = device
   id) and subscribes to its key-update and renewal-answer topics.
2. **Soak** (``--minutes``), all at once:

   * telemetry: every device publishes one AES-GCM envelope (QoS 1) every ``--interval``
     seconds, phases spread evenly; the registrar opens and counts each one (its
     ``status.json``);
   * renewals: ``--renewals-per-min`` devices renew their LDevID on
     ``devices/<id>/renewal/request`` over their live session
     (:meth:`device_sim.client.DeviceClient.accept_renewal` verifies the answer), then
     reconnect with the new certificate;
   * revocations: ``--revocations`` devices, spread over the run, revoked with the real
     ``registrar revoke`` (the running registrar applies it live); each must be cut off
     (its session closed by the broker within 10 s) and a new connection with its LDevID
     must be refused;
   * payload-key rotations every ``--rotate-every`` seconds with the real ``registrar
     rotate-payload-key``: every device verifies the signed update, unwraps the key
     (:meth:`device_sim.client.Registered.apply_key_update`), acknowledges it and seals
     its telemetry under it; a rotation is complete when every live device holds the key.

3. **Drain**: telemetry stops; every acknowledged message must reach the registrar (its
   count equals the devices' count: nothing lost, nothing duplicated); the registrar stops
   (exit 0); the store must hold one device row per registration and one certificate per
   registration and renewal, with unique serials.

Every ``--sample-every`` seconds the RSS (``VmRSS``) and CPU (``utime + stime``) of the
registrar, its Mosquitto and this bench process are read from ``/proc``, with the counters.
Memory trend: least-squares slope of RSS over the second half of the soak phase, in MB/min;
the verdict is "growth" only if the fitted change over that window is significant (slope
above 2 standard errors) and larger than both twice the residual noise and 1 % of the mean
RSS, otherwise "no growth". The curves (memory, throughput, CPU) go to ``--png``.

Progress on stderr; the LAST line of stdout is one JSON object (``--json``): ``errors``
(target 0) with ``error_kinds``, ``registrations``, ``messages_sent`` /
``messages_received``, ``renewals``, ``rotations``, ``revocations``, ``memory`` (per
process: start/end/max MB, slope, verdict), ``cpu_percent``, ``samples``, ``png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lean_mqtt import LeanMqtt
from bench.registration import Prepared, granted, prepare, store_totals, wave
from bench.site_fixture import (
    BenchSite,
    RegistrarProcess,
    build_commissioned_site,
    process_cpu_seconds,
)
from device_sim.client import DeviceClient, Registered, SoftwareKeys
from registrar.broker import Endpoint
from trustcore.errors import TrustCoreError
from trustcore.identity import DeviceId
from trustcore.key_rotation import build_key_ack, key_ack_topic
from trustcore.payload import seal_payload
from trustcore.topics import (
    KEYS_LEVEL,
    RENEWAL_REQUEST_LEVELS,
    RENEWAL_RESPONSE_LEVELS,
    TELEMETRY_LEVEL,
    device_topic,
)

REGISTRAR = Path(sys.executable).parent / "registrar"
PROCESSES = ("registrar", "mosquitto", "bench")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ /proc sampling


def rss_mb(pid: int) -> float:
    """Resident set size of one process (``VmRSS`` of ``/proc/<pid>/status``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the registrar started
    phase: str
    rss_mb: dict[str, float]
    cpu_s: dict[str, float]  # cumulative CPU seconds
    sent: int  # telemetry acknowledged by the broker (devices' side)
    received: int  # telemetry the registrar opened and counted
    registered: int
    renewals: int
    rotations: int
    revocations: int
    errors: int


# ------------------------------------------------------------------------------- trend


@dataclass(frozen=True)
class Trend:
    """Least-squares fit of RSS against time over a window."""

    samples: int
    slope_mb_per_min: float
    stderr_mb_per_min: float
    change_mb: float  # the fitted change across the window
    noise_mb: float  # standard deviation of the residuals
    mean_mb: float
    verdict: str  # "no growth", "growth" or "too few samples"


def fit_trend(times_s: Sequence[float], values_mb: Sequence[float]) -> Trend:
    """Slope (MB/min) and its standard error; "growth" only if the slope is above two
    standard errors AND the fitted change over the window exceeds both twice the residual
    noise and 1 % of the mean (a step of the allocator is not a leak)."""
    n = len(times_s)
    if n < 3:
        return Trend(n, 0.0, 0.0, 0.0, 0.0, 0.0, "too few samples")
    mt, mv = sum(times_s) / n, sum(values_mb) / n
    sxx = sum((t - mt) ** 2 for t in times_s)
    if sxx == 0:
        return Trend(n, 0.0, 0.0, 0.0, 0.0, mv, "too few samples")
    slope = sum((t - mt) * (v - mv) for t, v in zip(times_s, values_mb, strict=True)) / sxx
    residuals = [v - (mv + slope * (t - mt)) for t, v in zip(times_s, values_mb, strict=True)]
    variance = sum(r * r for r in residuals) / (n - 2)
    stderr = math.sqrt(variance / sxx)
    noise = math.sqrt(variance)
    change = slope * (max(times_s) - min(times_s))
    growing = slope > 2 * stderr and change > max(2 * noise, 0.01 * mv)
    return Trend(
        n,
        round(slope * 60, 4),
        round(stderr * 60, 4),
        round(change, 3),
        round(noise, 3),
        round(mv, 2),
        "growth" if growing else "no growth",
    )


# ----------------------------------------------------------------------------- devices


@dataclass(eq=False)
class SoakDevice:
    """One device during the soak: its registration state (the device simulator's own
    :class:`~device_sim.client.DeviceClient`) and its live operational session."""

    client: DeviceClient
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    mqtt: LeanMqtt | None = None
    answers: asyncio.Queue[bytes] | None = None  # renewal answers while renewing
    revoked: bool = False

    @property
    def device_id(self) -> DeviceId:
        return self.client.device_id

    @property
    def registered(self) -> Registered:
        assert self.client.registered is not None
        return self.client.registered

    def topic(self, *levels: str) -> str:
        return device_topic(self.device_id, *levels)


@dataclass
class Counters:
    sent: int = 0
    in_flight: int = 0
    renewals: int = 0
    rotations: int = 0
    revocations: int = 0
    key_updates: int = 0
    key_acks: int = 0
    reconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    renewal_ms: list[float] = field(default_factory=list)
    rotation_s: list[tuple[float, float]] = field(default_factory=list)  # CLI, reach
    revocation_cut_s: list[float] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, site: BenchSite, registrar: RegistrarProcess):
        self.args = args
        self.site = site
        self.registrar = registrar
        self.operational: Endpoint = registrar.operational_endpoint
        self.devices: list[SoakDevice] = []
        self.c = Counters()
        self.t0 = time.monotonic()
        self.phase = "onboarding"
        self.stopping = False
        self.reading = os.urandom(args.size)
        self.keepalive = max(args.keepalive, math.ceil(args.interval * 2))
        self.samples: list[Sample] = []
        self.status: dict[str, Any] = {}
        self.broker_pid: int | None = None
        self.loadavg: list[float] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def error(self, kind: str, device: SoakDevice | None, detail: object) -> None:
        self.c.errors[kind] += 1
        if len(self.c.first_errors) < 20:
            who = device.device_id.value if device is not None else "-"
            self.c.first_errors.append(f"{kind} {who}: {detail!r}"[:300])
            log(f"ERROR {self.c.first_errors[-1]}")

    # -- registrar's status ----------------------------------------------------------------

    def read_status(self) -> dict[str, Any]:
        path = self.site.home / "run" / "status.json"
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if isinstance(doc, dict):
                self.status = doc
                if isinstance(doc.get("broker_pid"), int):
                    self.broker_pid = doc["broker_pid"]
        return self.status

    def received(self) -> int:
        return int(self.status.get("telemetry", {}).get("messages", 0))

    # -- sampling --------------------------------------------------------------------------

    def sample(self) -> Sample:
        status = self.read_status()
        pids = {"registrar": self.registrar.pid, "mosquitto": self.broker_pid, "bench": os.getpid()}
        rss: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for name, pid in pids.items():
            if pid is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                rss[name] = round(rss_mb(pid), 2)
                cpu[name] = round(process_cpu_seconds(pid), 3)
        regs = status.get("registrations", {})
        s = Sample(
            round(self.now(), 2),
            self.phase,
            rss,
            cpu,
            self.c.sent,
            self.received(),
            int(regs.get("ok", 0)),
            self.c.renewals,
            self.c.rotations,
            self.c.revocations,
            sum(self.c.errors.values()),
        )
        self.samples.append(s)
        return s

    async def sampler(self) -> None:
        while True:
            s = self.sample()
            mem = " ".join(f"{k} {v:.0f}" for k, v in s.rss_mb.items())
            log(
                f"[{s.t:7.1f} s {s.phase:10}] sent {s.sent} received {s.received} "
                f"registered {s.registered} renewals {s.renewals} rotations {s.rotations} "
                f"revocations {s.revocations} errors {s.errors} | RSS MB {mem}"
            )
            await asyncio.sleep(self.args.sample_every)

    # -- sessions --------------------------------------------------------------------------

    async def connect(self, d: SoakDevice) -> None:
        """The operational session with the current LDevID; subscribed to the device's
        key updates and renewal answers."""
        tls = d.client.operational_context()
        mqtt = await LeanMqtt.connect(
            self.operational.host,
            self.operational.port,
            tls,
            d.device_id.value,
            keepalive=self.keepalive,
            timeout=self.args.timeout,
        )
        mqtt.on_message = lambda topic, payload: self.message(d, topic, payload)
        mqtt.closed.add_done_callback(lambda _f: self.closed(d, mqtt))
        d.mqtt = mqtt
        await asyncio.wait_for(mqtt.subscribe(d.topic(KEYS_LEVEL), 1), self.args.timeout)
        await asyncio.wait_for(
            mqtt.subscribe(d.topic(*RENEWAL_RESPONSE_LEVELS), 1), self.args.timeout
        )

    def closed(self, d: SoakDevice, mqtt: LeanMqtt) -> None:
        """A session ended that the device did not close itself."""
        if d.mqtt is not mqtt:
            return
        d.mqtt = None
        if not d.revoked and not self.stopping:
            self.error("unexpected_disconnect", d, mqtt.closed.result())

    async def disconnect(self, d: SoakDevice) -> None:
        mqtt, d.mqtt = d.mqtt, None
        if mqtt is not None:
            await mqtt.disconnect()

    def message(self, d: SoakDevice, topic: str, payload: bytes) -> None:
        if topic == d.topic(KEYS_LEVEL):
            if not payload:
                return
            try:
                key, issued = d.registered.apply_key_update(d.device_id, payload)
            except TrustCoreError as exc:
                if exc.reason != "replayed":  # a retained update already applied: expected
                    self.error("key_update", d, exc)
                return
            self.c.key_updates += 1
            if d.mqtt is None:
                return
            ack = d.mqtt.publish_nowait(
                key_ack_topic(d.device_id), build_key_ack(key, d.device_id, issued), 1
            )
            ack.add_done_callback(lambda f: self.acked(d, f))
        elif topic == d.topic(*RENEWAL_RESPONSE_LEVELS) and d.answers is not None:
            d.answers.put_nowait(payload)

    def acked(self, d: SoakDevice, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            if not d.revoked and not self.stopping:
                self.error("key_ack", d, fut.exception() if not fut.cancelled() else "cancelled")
            return
        self.c.key_acks += 1

    # -- telemetry -------------------------------------------------------------------------

    async def telemetry(self, d: SoakDevice, first: float) -> None:
        loop = asyncio.get_running_loop()
        due = first
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due += self.args.interval
            if self.stopping or d.revoked:
                return
            async with d.lock:
                if self.stopping or d.revoked:
                    return
                self.c.in_flight += 1
                try:
                    if d.mqtt is None:  # lost earlier (counted then): the device reconnects
                        self.c.reconnects += 1
                        await self.connect(d)
                    mqtt = d.mqtt
                    assert mqtt is not None
                    topic = d.topic(TELEMETRY_LEVEL)
                    data = seal_payload(d.registered.current_key, topic, self.reading)
                    await asyncio.wait_for(mqtt.publish(topic, data, 1), self.args.timeout)
                    self.c.sent += 1
                except Exception as exc:
                    self.error("telemetry", d, exc)
                finally:
                    self.c.in_flight -= 1

    # -- renewal ---------------------------------------------------------------------------

    async def renew(self, d: SoakDevice) -> None:
        async with d.lock:
            if self.stopping or d.revoked or d.mqtt is None:
                return
            started = time.perf_counter()
            try:
                await self._renew(d)
            except Exception as exc:
                self.error("renewal", d, exc)
                return
            self.c.renewals += 1
            self.c.renewal_ms.append((time.perf_counter() - started) * 1000)

    async def _renew(self, d: SoakDevice) -> None:
        mqtt = d.mqtt
        assert mqtt is not None
        request, new_key = d.client.new_renewal_request()
        d.answers = asyncio.Queue()
        try:
            await asyncio.wait_for(
                mqtt.publish(d.topic(*RENEWAL_REQUEST_LEVELS), request, 1), self.args.timeout
            )
            deadline = time.monotonic() + self.args.timeout
            while True:
                left = deadline - time.monotonic()
                payload = await asyncio.wait_for(d.answers.get(), max(left, 0.01))
                try:
                    d.client.accept_renewal(request, new_key, payload)
                    break
                except TrustCoreError as exc:  # does not verify: not ours, keep waiting
                    log(f"{d.device_id}: ignored a renewal answer: {exc}")
        finally:
            d.answers = None
        await self.disconnect(d)
        await self.connect(d)  # with the new LDevID, before the registrar's hand-over cut

    async def renewals(self, until: float) -> None:
        rate = self.args.renewals_per_min
        if rate <= 0:
            return
        rng = random.Random(2)  # picks devices, not secrets
        pending: set[asyncio.Task[None]] = set()
        while self.now() + 60 / rate < until:
            await asyncio.sleep(60 / rate)
            picked = rng.sample(self.devices, min(8, len(self.devices)))
            candidates = [d for d in picked if not d.revoked]
            if candidates:
                task = asyncio.create_task(self.renew(candidates[0]))
                pending.add(task)
                task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    # -- revocation ------------------------------------------------------------------------

    async def cli(self, *args: str) -> dict[str, Any]:
        return await registrar_cli(self.site, *args)

    async def revoke(self, d: SoakDevice) -> None:
        async with d.lock:
            d.revoked = True  # from now on its session may end: expected
            mqtt = d.mqtt
            started = time.monotonic()
            try:
                out = await self.cli("revoke", d.device_id.value, "--reason", "decommissioned")
            except Exception as exc:
                self.error("revoke", d, exc)
                return
            if not out.get("live"):
                self.error("revoke", d, f"not applied live: {out}")
            if mqtt is None:
                self.error("revoke", d, "no live session to cut")
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(mqtt.closed), 10)
                    self.c.revocation_cut_s.append(round(time.monotonic() - started, 3))
                except TimeoutError:
                    self.error("revoked_not_cut", d, "session still open 10 s after revoke")
                    await self.disconnect(d)
            d.mqtt = None
            try:  # the revoked LDevID must not get back in
                again = await LeanMqtt.connect(
                    self.operational.host,
                    self.operational.port,
                    d.client.operational_context(),
                    d.device_id.value,
                    timeout=5,
                )
                await asyncio.wait_for(again.subscribe(d.topic(KEYS_LEVEL), 1), 5)
            except Exception:  # refused (TLS alert, CRL, block): as it must be
                self.c.revocations += 1
                self.c.events.append((self.now(), "revocation"))
            else:
                self.error("revoked_got_back_in", d, "connected with a revoked LDevID")
                await again.disconnect()

    async def revocations(self, victims: list[SoakDevice], start: float, length: float) -> None:
        for i, d in enumerate(victims):
            await asyncio.sleep(max(0.0, start + length * (i + 0.5) / len(victims) - self.now()))
            await self.revoke(d)

    # -- payload-key rotation --------------------------------------------------------------

    async def rotate(self) -> None:
        started = time.monotonic()
        before = self.read_status().get("payload_key")
        try:
            out = await self.cli("rotate-payload-key")
            new = bytes.fromhex(out["key_id"])
        except Exception as exc:
            # e.g. the CLI's own wait for the registrar's answer ran out: counted, and the
            # rotation is still followed through the registrar's status
            self.error("rotation", None, exc)
            changed = await self.status_key_change(before, started + self.args.rotation_timeout)
            if changed is None:
                return
            new = changed
        self.c.events.append((self.now(), "rotation"))
        applied = time.monotonic()  # the CLI returns once the registrar has pushed the updates
        deadline = applied + self.args.rotation_timeout
        while True:
            behind = [
                d for d in self.devices if not d.revoked and d.registered.current_key_id != new
            ]
            if not behind:
                break
            if time.monotonic() > deadline:
                self.error("rotation_incomplete", behind[0], f"{len(behind)} devices without it")
                return
            await asyncio.sleep(0.25)
        self.c.rotations += 1
        done = time.monotonic()
        self.c.rotation_s.append((round(applied - started, 2), round(done - applied, 2)))
        log(
            f"rotation to {new.hex()}: `registrar rotate-payload-key` {applied - started:.1f} s, "
            f"then every live device holds the key after {done - applied:.1f} s"
        )

    async def status_key_change(self, before: object, deadline: float) -> bytes | None:
        while time.monotonic() < deadline:
            key = self.read_status().get("payload_key")
            if isinstance(key, str) and key != before:
                return bytes.fromhex(key)
            await asyncio.sleep(0.5)
        self.error("rotation", None, "the registrar's payload key did not change")
        return None

    async def rotations(self, until: float) -> None:
        every = self.args.rotate_every
        if every <= 0:
            return
        start = self.now()
        k = 1
        while start + k * every < until:
            await asyncio.sleep(max(0.0, start + k * every - self.now()))
            await self.rotate()
            k += 1

    # -- the phases ------------------------------------------------------------------------

    async def open_sessions(self) -> None:
        gate = asyncio.Semaphore(self.args.connecting)
        done, total = 0, len(self.devices)

        async def one(d: SoakDevice) -> None:
            nonlocal done
            async with gate:
                try:
                    await self.connect(d)
                except Exception as exc:
                    self.error("connect", d, exc)
            done += 1
            if done % max(1, total // 10) == 0:
                log(f"  operational sessions: {done}/{total}")

        await asyncio.gather(*(one(d) for d in self.devices))

    async def soak(self, seconds: float, victims: list[SoakDevice]) -> None:
        self.phase = "soak"
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = len(self.devices)
        tasks = [
            asyncio.create_task(self.telemetry(d, start + self.args.interval * i / n))
            for i, d in enumerate(self.devices)
        ]
        until = self.now() + seconds
        await asyncio.gather(
            self.renewals(until),
            self.revocations(victims, self.now(), seconds),
            self.rotations(until),
            asyncio.sleep(max(0.0, until - self.now())),
        )
        self.phase = "drain"
        self.stopping = True
        while self.c.in_flight:
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Every message the broker acknowledged reaches the registrar (or not: counted)."""
        deadline = time.monotonic() + 60
        while self.received() < self.c.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            self.read_status()
        await asyncio.sleep(1.0)  # a late duplicate would show here
        self.read_status()
        received = self.received()
        if received != self.c.sent:
            self.error("telemetry_lost_or_duplicated", None, f"{self.c.sent} -> {received}")
        rejected = int(self.status.get("telemetry", {}).get("rejected", 0))
        if rejected:
            self.error("telemetry_rejected", None, f"{rejected} rejected by the registrar")


# ------------------------------------------------------------------------------ the run


async def registrar_cli(site: BenchSite, *args: str, passphrase: bool = True) -> dict[str, Any]:
    """The real ``registrar`` CLI on the site (a child process); its ``--json`` answer."""
    secret = ("--passphrase-file", str(site.passphrase_file)) if passphrase else ()
    proc = await asyncio.create_subprocess_exec(
        str(REGISTRAR),
        *args,
        *("--home", str(site.home), *secret, "--json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"registrar {args[0]} exited {proc.returncode}: {err.decode()}")
    answer = json.loads(out)
    assert isinstance(answer, dict)
    return answer


def raise_fd_limit(devices: int) -> int:
    """Each device holds a socket in this process and one in Mosquitto (a child of the
    registrar, a child of this process: the limit is inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, devices + 1024)) if hard != resource.RLIM_INFINITY else devices
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if devices + 256 > want:
        raise SystemExit(f"--devices {devices} needs more file descriptors than {want}")
    return want


def memory_summary(samples: list[Sample], start: float, end: float) -> dict[str, Any]:
    soak = [s for s in samples if start <= s.t <= end]
    half = [s for s in soak if s.t >= start + (end - start) / 2]
    out: dict[str, Any] = {}
    for name in PROCESSES:
        series = [(s.t, s.rss_mb[name]) for s in soak if name in s.rss_mb]
        window = [(s.t, s.rss_mb[name]) for s in half if name in s.rss_mb]
        if not series:
            continue
        trend = fit_trend([t for t, _ in window], [v for _, v in window])
        out[name] = {
            "start_mb": series[0][1],
            "end_mb": series[-1][1],
            "max_mb": max(v for _, v in series),
            "slope_mb_per_min": trend.slope_mb_per_min,
            "slope_stderr_mb_per_min": trend.stderr_mb_per_min,
            "change_mb": trend.change_mb,
            "noise_mb": trend.noise_mb,
            "trend": trend.verdict,
            "trend_samples": trend.samples,
        }
    return out


def cpu_summary(samples: list[Sample], start: float, end: float) -> dict[str, float]:
    soak = [s for s in samples if start <= s.t <= end]
    out: dict[str, float] = {}
    if len(soak) < 2:
        return out
    first, last = soak[0], soak[-1]
    for name in PROCESSES:
        if name in first.cpu_s and name in last.cpu_s:
            used = last.cpu_s[name] - first.cpu_s[name]
            out[name] = round(100 * used / (last.t - first.t), 1)
    return out


def draw(
    samples: list[Sample],
    events: list[tuple[float, str]],
    soak_window: tuple[float, float],
    png: Path,
    title: str,
    min_gap: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rates from the periodic samples only (the extra ones at phase changes are close to a
    # periodic one and would turn a few counts into a spike)
    rated = [samples[0]] if samples else []
    for s in samples[1:]:
        if s.t - rated[-1].t >= min_gap:
            rated.append(s)
    minutes = [s.t / 60 for s in rated]
    fig, (mem, bench, rate, cpu) = plt.subplots(
        4, 1, sharex=True, figsize=(8, 9), gridspec_kw={"height_ratios": [3, 2, 3, 2]}
    )
    colours = {"registrar": "tab:blue", "mosquitto": "tab:orange", "bench": "tab:green"}
    for ax, names in ((mem, ("registrar", "mosquitto")), (bench, ("bench",))):
        for name in names:
            pts = [(s.t / 60, s.rss_mb[name]) for s in samples if name in s.rss_mb]
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], label=name, color=colours[name], lw=1.2
            )
        ax.set_ylabel("RSS (MB)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=8)
    mem.set_title(title, fontsize=10)

    def per_s(values: list[int]) -> list[float]:
        out = [0.0]
        for (a, b), (sa, sb) in zip(pairwise(values), pairwise(rated), strict=True):
            out.append((b - a) / max(sb.t - sa.t, 1e-6))
        return out

    rate.plot(minutes, per_s([s.received for s in rated]), label="telemetry received / s")
    rate.plot(minutes, per_s([s.registered for s in rated]), label="registrations / s")
    rate.plot(
        minutes,
        [60 * v for v in per_s([s.renewals for s in rated])],
        label="renewals / min",
        linewidth=0.8,
    )
    rate.set_ylabel("throughput")
    rate.legend(loc="upper left", fontsize=8)
    for name in PROCESSES:
        pts = []
        for a, b in pairwise(rated):
            if name in a.cpu_s and name in b.cpu_s:
                pts.append((b.t / 60, 100 * (b.cpu_s[name] - a.cpu_s[name]) / (b.t - a.t)))
        cpu.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=colours[name], lw=1)
    cpu.set_ylabel("CPU (% of a core)")
    cpu.set_xlabel("minutes since the registrar started")
    cpu.legend(loc="upper left", fontsize=8)
    for ax in (mem, bench, rate, cpu):
        ax.axvspan(soak_window[0] / 60, soak_window[1] / 60, color="0.93", zorder=0)
        for t, kind in events:
            ax.axvline(
                t / 60,
                color="tab:red" if kind == "revocation" else "tab:purple",
                linewidth=0.6,
                linestyle=":" if kind == "revocation" else "--",
            )
        ax.grid(alpha=0.3)
    fig.text(
        0.01,
        0.005,
        "grey: soak phase; purple dashed: payload-key rotations; red dotted: revocations",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=72)
    plt.close(fig)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    fds = raise_fd_limit(args.devices)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        base = Path(tmp)
        t = time.perf_counter()
        site = build_commissioned_site(base / "world")
        # a device may renew at any moment (the bench paces the renewals)
        await registrar_cli(site, "ldevid-policy", "--min-interval-seconds", "0", passphrase=False)
        devices = site.factory_devices(args.devices)
        log(
            f"site commissioned, {len(devices)} devices made in "
            f"{time.perf_counter() - t:.1f} s (fd limit {fds})"
        )
        registrar = await RegistrarProcess.start(
            site,
            ["--broker", "mosquitto", "--registration-port", "0", "--operational-port", "0"],
            log_file=base / "registrar.log",
        )
        soak = Soak(args, site, registrar)
        sampler = asyncio.create_task(soak.sampler())
        code = -1
        try:
            # 1. onboarding: every device registers, then opens its operational session
            t = time.perf_counter()
            prepared: list[Prepared] = []
            outcomes = []
            registering = 0.0  # seconds in the waves (the requests are made in between)
            batches = range(0, len(devices), args.batch)
            for b, first in enumerate(batches, 1):
                # Each batch's requests are made just before it powers on: a request is
                # fresh for 300 s (stale_request), and making all 10,000 first took 446 s
                # on a loaded machine (every registration refused).
                batch = await asyncio.to_thread(prepare, devices[first : first + args.batch])
                prepared += batch
                started = time.perf_counter()
                _, out = await wave(
                    batch, registrar.registration_endpoint,
                    args.timeout, f"registration batch {b}/{len(batches)}", args.connecting,
                )  # fmt: skip
                registering += time.perf_counter() - started
                outcomes += out
            reg_rate = sum(o.finished is not None for o in outcomes) / max(registering, 1e-9)
            for p, o in zip(prepared, outcomes, strict=True):
                result = granted(p, o, (site.root,))
                if isinstance(result, str):
                    soak.error("registration", None, f"{p.device.device_id}: {result}")
                    continue
                g, key = result
                client = DeviceClient(p.device.credentials(), SoftwareKeys())
                client.registered = Registered(
                    ldevid=g.ldevid,
                    site_ca=g.site_ca,
                    ldevid_key=p.ldevid_key,
                    wrap_key=p.wrap_key,
                    payload_keys={key.key_id: key},
                    current_key_id=key.key_id,
                )
                soak.devices.append(SoakDevice(client))
            registered = len(soak.devices)
            del prepared, outcomes, devices
            log(f"{registered} registered ({reg_rate:.0f}/s); opening operational sessions")
            await soak.open_sessions()
            log(f"onboarding done in {time.perf_counter() - t:.1f} s")
            # 2. the soak
            victims = random.Random(1).sample(soak.devices, min(args.revocations, registered))
            soak_start = soak.now()
            soak.sample()
            soak.loadavg.append(round(os.getloadavg()[0], 2))
            await soak.soak(args.minutes * 60, victims)
            soak_end = soak.now()
            soak.loadavg.append(round(os.getloadavg()[0], 2))
            soak.sample()
            # 3. drain, stop, check the store
            await soak.drain()
            sampler.cancel()
            soak.sample()
            await asyncio.gather(*(soak.disconnect(d) for d in soak.devices))
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            code = await registrar.stop()
        if code != 0:
            soak.error("registrar_exit", None, f"exit code {code}")
        totals = await store_totals(str(site.home / "registrar.db"))
        expected_certs = registered + soak.c.renewals
        if (
            totals["devices"] != registered
            or totals["certificates"] != expected_certs
            or totals["unique_serials"] != totals["certificates"]
        ):
            soak.error(
                "store_mismatch",
                None,
                f"{totals}; expected {registered} devices, {expected_certs} certificates",
            )
        status = soak.status

    c = soak.c
    png = Path(args.png).resolve()
    draw(
        soak.samples,
        c.events,
        (soak_start, soak_end),
        png,
        f"soak: {args.devices} devices, Mosquitto + SQLite, {args.minutes:g} min, "
        f"telemetry every {args.interval:g} s per device",
        args.sample_every / 2,
    )
    errors = sum(c.errors.values())
    soak_s = soak_end - soak_start
    return {
        "devices": args.devices,
        "minutes": args.minutes,
        "soak_seconds": round(soak_s, 1),
        "errors": errors,
        "error_kinds": dict(c.errors),
        "first_errors": c.first_errors,
        "registrations": registered,
        "registrations_per_s": round(reg_rate, 1),
        "messages_sent": c.sent,
        "messages_received": soak.received(),
        "messages_per_s": round(c.sent / soak_s, 1) if soak_s > 0 else 0.0,
        "telemetry_interval_s": args.interval,
        "renewals": c.renewals,
        "renewal_ms_median": round(sorted(c.renewal_ms)[len(c.renewal_ms) // 2], 1)
        if c.renewal_ms
        else None,
        "rotations": c.rotations,
        # per rotation: the CLI (start-up, the registrar signing and publishing N updates),
        # then until every live device holds the key
        "rotation_seconds": c.rotation_s,
        "key_updates_applied": c.key_updates,
        "key_acks": c.key_acks,
        "revocations": c.revocations,
        # from starting `registrar revoke` to the broker closing the device's session
        "revocation_cut_seconds": c.revocation_cut_s,
        "reconnects": c.reconnects,
        "memory": memory_summary(soak.samples, soak_start, soak_end),
        # every sample: seconds since the registrar started, phase, RSS MB per process
        "memory_series": {
            "t_s": [s.t for s in soak.samples],
            "phase": [s.phase for s in soak.samples],
            **{n: [s.rss_mb.get(n) for s in soak.samples] for n in PROCESSES},
        },
        "soak_window_s": [round(soak_start, 1), round(soak_end, 1)],
        "cpu_percent": cpu_summary(soak.samples, soak_start, soak_end),
        # other work on the machine: 1-minute load average at the soak's start and end
        "loadavg": [soak.loadavg[0], soak.loadavg[-1]] if soak.loadavg else [],
        "samples": len(soak.samples),
        "sample_every_s": args.sample_every,
        "registrar_counts": {
            "registrations": status.get("registrations"),
            "key_updates": status.get("key_updates"),
            "superseded_sessions_cut": status.get("superseded_sessions_cut"),
            # CRLs signed (= broker reloads) for superseded LDevIDs: batched per window
            "superseded_crls_signed": status.get("superseded_crls_signed"),
            "revoked_devices": len(status.get("revoked_devices", [])),
        },
        "store_totals": totals,
        "registrar_exit": code,
        "png": str(png),
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak phase")
    parser.add_argument(
        "--interval", type=float, default=30.0, help="seconds between telemetry per device"
    )
    parser.add_argument("--size", type=int, default=64, help="telemetry plaintext bytes")
    parser.add_argument("--renewals-per-min", type=float, default=30.0)
    parser.add_argument("--revocations", type=int, default=5)
    parser.add_argument(
        "--rotate-every", type=float, default=240.0, help="seconds between payload-key rotations"
    )
    parser.add_argument(
        "--rotation-timeout",
        type=float,
        default=300.0,
        help="seconds for every live device to hold a rotated key",
    )
    parser.add_argument(
        "--keepalive",
        type=int,
        default=900,
        help="MQTT keep-alive of the devices' sessions, s (telemetry keeps them alive during "
        "the soak; this covers the wait between a device's connect and the soak's start)",
    )
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--connecting", type=int, default=64, help="handshakes in flight")
    parser.add_argument(
        "--batch",
        type=int,
        default=500,
        help="devices powered on at once during onboarding (batches one after another: a "
        "wave larger than the registrar serves within --timeout would time out)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per network step")
    parser.add_argument("--png", default="soak.png", help="where the curves go")
    parser.add_argument("--json", action="store_true", help="JSON on the last line only")
    args = parser.parse_args()
    if args.devices < 1 or args.minutes <= 0 or args.interval <= 0 or args.sample_every <= 0:
        parser.error("--devices, --minutes, --interval and --sample-every must be positive")
    if args.batch < 1 or args.connecting < 1:
        parser.error("--batch and --connecting must be at least 1")
    if args.revocations >= args.devices:
        parser.error("--revocations must leave devices alive")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
