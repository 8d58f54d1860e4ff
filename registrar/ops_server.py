"""The registrar's operations listener: ``GET /metrics`` (Prometheus text format) and
``GET /healthz`` (200 or 503 JSON), one aiohttp server in the registrar's event loop.

What this module owns: the HTTP side only. The metrics come from a
:class:`registrar.metrics.RegistrarMetrics` registry and the health verdict from a coroutine
the app supplies (:meth:`registrar.app.RegistrarApp.health`). It listens on loopback by
default: the endpoint is unauthenticated and tells who is connected and which CRLs are
stale, so exposing it on the site LAN (``--metrics-host``) is an operator's decision.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from registrar.errors import ConfigError
from registrar.http_listener import start_http
from registrar.metrics import CONTENT_TYPE_LATEST, Health, RegistrarMetrics
from trustcore.endpoint import Endpoint

log = logging.getLogger(__name__)

__all__ = ["OpsServer"]


class OpsServer:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`endpoint` once started."""

    def __init__(
        self,
        metrics: RegistrarMetrics,
        health: Callable[[], Awaitable[Health]],
        endpoint: Endpoint,
    ) -> None:
        self._metrics = metrics
        self._health = health
        self._wanted = endpoint
        self._runner: web.AppRunner | None = None
        self._endpoint: Endpoint | None = None

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise ConfigError("the metrics listener is not started")
        return self._endpoint

    async def _metrics_page(self, _request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _health_page(self, _request: web.Request) -> web.Response:
        verdict = await self._health()
        return web.Response(
            text=json.dumps(verdict.to_json(), sort_keys=True) + "\n",
            status=200 if verdict.ok else 503,
            content_type="application/json",
        )

    async def start(self) -> None:
        host, port = self._wanted.host, self._wanted.port
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/healthz", self._health_page)
        try:
            runner, bound = await start_http(app, host, port)
        except OSError as exc:
            raise ConfigError(
                f"the metrics listener cannot listen on {host}:{port}: {exc}"
            ) from exc
        self._runner = runner
        self._endpoint = Endpoint(host, bound)
        log.info("metrics and health on http://%s:%d/", host, self._endpoint.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
