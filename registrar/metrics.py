"""Prometheus metrics and the health verdict of a running registrar (docs/operations.md).

What this module owns: the metric names, the per-app :class:`~prometheus_client.
CollectorRegistry`, the latency histogram, and the pure step from a :class:`Readings`
snapshot to metric families and from :class:`HealthInputs` to a :class:`Health` verdict.
It does no I/O: :mod:`registrar.ops_server` serves the result, :mod:`registrar.app` (the
composition root) supplies the readings.

Why most counters are read at scrape time and not incremented on the request path: the
registration path is CPU-bound (bench/registration_cpu.py), and the registration service
keeps its answer counts anyway (``RegistrationService.stats``, ``registrar status``). A
collector turns those into counters when Prometheus asks, so a registration pays for one
histogram observation only (:class:`LatencyHistogram`: a bisect and two adds, about 0.5 µs,
where ``prometheus_client.Histogram.observe`` took about 8 µs with its lock and exemplar
handling). Each app has its own registry (several apps run in one test
process; the global default registry would mix them or refuse duplicate names).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from registrar.errors import ConfigError
from registrar.service import ANSWERED

__all__ = [
    "CONTENT_TYPE_LATEST",
    "PREFIX",
    "CrlReading",
    "Health",
    "HealthInputs",
    "LatencyHistogram",
    "Readings",
    "RegistrarMetrics",
    "decide_health",
    "metric_families",
]

PREFIX = "devtrust_registrar"
#: Registration / renewal latency buckets (seconds): about 2 ms of CPU per registration on
#: this machine type, group commit adds a few ms, a loaded site tens to hundreds.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class CrlReading:
    """One CRL the registrar enforces (``current/crls.pem``), by issuer."""

    issuer: str
    this_update: float  # POSIX seconds
    next_update: float | None


@dataclass(frozen=True, slots=True)
class Readings:
    """What the registrar knows at one moment; everything :func:`metric_families` needs."""

    now: float
    #: ``RegistrationService.stats``: :data:`registrar.service.ANSWERED` keys and refusal
    #: reason codes.
    answers: Mapping[str, int]
    connected_devices: int
    broker_connected: bool
    broker_restarts: int
    crls: tuple[CrlReading, ...]
    #: When the newest HQ revocation data stops being trusted (its ``issued`` plus the
    #: site's offline limit); None before the site is loaded.
    revocation_data_expires: float | None
    key_updates_sent: int
    key_updates_acknowledged: int
    telemetry_messages: int
    telemetry_rejected: int


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def metric_families(r: Readings) -> list[Metric]:
    """The scrape-time metrics of one :class:`Readings` (pure)."""
    answers = r.answers
    refusals = CounterMetricFamily(
        f"{PREFIX}_refusals",
        "Registration and renewal requests refused, by public reason code.",
        labels=["reason"],
    )
    for reason in sorted(answers):
        if reason not in ANSWERED:
            refusals.add_metric([reason], answers[reason])
    crl_age = GaugeMetricFamily(
        f"{PREFIX}_crl_age_seconds",
        "Seconds since the thisUpdate of each enforced CRL, by issuer.",
        labels=["issuer"],
    )
    crl_left = GaugeMetricFamily(
        f"{PREFIX}_crl_expiry_seconds",
        "Seconds until the nextUpdate of each enforced CRL (negative: stale, fail closed).",
        labels=["issuer"],
    )
    for crl in r.crls:
        crl_age.add_metric([crl.issuer], r.now - crl.this_update)
        if crl.next_update is not None:
            crl_left.add_metric([crl.issuer], crl.next_update - r.now)
    families: list[Metric] = [
        _counter(
            "registrations",
            "Registrations that issued an LDevID.",
            answers.get("ok", 0),
        ),
        _counter(
            "idempotent_answers",
            "Retried requests answered with the stored (or in-flight) answer.",
            answers.get("idempotent", 0),
        ),
        _counter("renewals", "LDevIDs renewed.", answers.get("renewed", 0)),
        refusals,
        _gauge(
            "connected_devices",
            "Live device sessions on the broker.",
            r.connected_devices,
        ),
        _gauge(
            "broker_connected",
            "1 while the registrar's own MQTT session is up.",
            1 if r.broker_connected else 0,
        ),
        _counter("broker_restarts", "Mosquitto restarts by the registrar.", r.broker_restarts),
        crl_age,
        crl_left,
        _counter(
            "key_updates_sent",
            "Payload-key updates published to devices.",
            r.key_updates_sent,
        ),
        _counter(
            "key_updates_acknowledged",
            "Payload-key updates devices proved they hold.",
            r.key_updates_acknowledged,
        ),
        _counter(
            "telemetry_messages",
            "Telemetry messages decrypted.",
            r.telemetry_messages,
        ),
        _counter(
            "telemetry_rejected",
            "Telemetry messages refused (do not open, retired key).",
            r.telemetry_rejected,
        ),
    ]
    if r.revocation_data_expires is not None:
        families.append(
            _gauge(
                "revocation_data_expiry_seconds",
                "Seconds until the HQ revocation data passes the site's offline limit "
                "(negative: new registrations are refused until a new bundle or list).",
                r.revocation_data_expires - r.now,
            )
        )
    return families


class LatencyHistogram:
    """Bucket counts and a sum, updated from the registrar's event loop only (no lock: one
    thread observes; a scrape runs in the same loop). Exposed as a Prometheus histogram."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ConfigError("latency bucket bounds must be increasing")
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """``(le, cumulative count)`` pairs ending with ``+Inf``, and the sum."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(str, self._bounds), "+Inf"), self._counts, strict=True):
            total += count
            out.append((bound, total))
        return out, self._sum


class _Collector(Collector):
    def __init__(self, read: Callable[[], Readings], latency: Mapping[str, LatencyHistogram]):
        self._read = read
        self._latency = latency

    def collect(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily(
            f"{PREFIX}_request_seconds",
            "Time from a request's arrival at the registrar to its answer, by kind.",
            labels=["kind"],
        )
        for kind, latency in self._latency.items():
            buckets, total = latency.cumulative()
            histogram.add_metric([kind], buckets, total)
        yield histogram
        yield from metric_families(self._read())


class RegistrarMetrics:
    """One registrar's registry: the latency histograms (observed on the request path)
    and the scrape-time collector over ``read``."""

    def __init__(self, read: Callable[[], Readings]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registration_latency = LatencyHistogram()
        self.renewal_latency = LatencyHistogram()
        latency = {"registration": self.registration_latency, "renewal": self.renewal_latency}
        self.registry.register(_Collector(read, latency))

    def exposition(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


# ------------------------------------------------------------------------------- health


@dataclass(frozen=True, slots=True)
class HealthInputs:
    """What the health verdict is made of; the app gathers it (the store ping is I/O)."""

    store_error: str | None  # None: the store answered
    broker_connected: bool
    #: Seconds until the HQ revocation data expires (negative: expired); None: unknown.
    revocation_data_left: float | None
    #: Issuers of HQ-signed CRLs (root, stations) past their nextUpdate.
    stale_crls: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    checks: Mapping[str, str]  # check -> "ok" or what failed
    failing: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "status": "ok" if self.ok else "failing",
            "failing": list(self.failing),
            "checks": dict(self.checks),
        }


def decide_health(inputs: HealthInputs) -> Health:
    """Healthy = the store answers, the registrar's own broker session is up, and the
    revocation data is not expired (fail closed: unknown revocation data is a failure)."""
    checks: dict[str, str] = {}
    checks["store"] = "ok" if inputs.store_error is None else inputs.store_error
    checks["broker"] = "ok" if inputs.broker_connected else "the registrar's MQTT session is down"
    left = inputs.revocation_data_left
    if left is None:
        checks["revocation_data"] = "not loaded"
    elif left < 0:
        checks["revocation_data"] = (
            f"HQ revocation data expired {-left:.0f} s ago: new registrations are refused"
        )
    elif inputs.stale_crls:
        checks["revocation_data"] = "stale CRL of " + "; ".join(inputs.stale_crls)
    else:
        checks["revocation_data"] = "ok"
    failing = tuple(name for name, state in checks.items() if state != "ok")
    return Health(not failing, checks, failing)
