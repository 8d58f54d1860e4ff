"""One way the registrar serves HTTP in its event loop (aiohttp): the RabbitMQ auth backend
(:mod:`registrar.broker.rabbitmq_auth`), the operations listener
(:mod:`registrar.ops_server`) and the EST listener (:mod:`registrar.est`). The socket is
bound here, before aiohttp sees it, so that port 0 works and the chosen port is known."""

from __future__ import annotations

import socket
import ssl

from aiohttp import web

__all__ = ["start_http"]


async def start_http(
    app: web.Application,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 64,
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (IPv6 when ``host`` has a colon; 0: a free port).
    Returns the runner (``cleanup()`` stops it) and the port. ``OSError`` if it cannot
    bind: the caller says which listener failed."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ssl_context, backlog=backlog).start()
    return runner, int(sock.getsockname()[1])
