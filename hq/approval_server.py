"""``hq approval serve``: the online approval endpoint. Approvers fetch open requests and
post their approvals over HTTP; every approval is verified on receipt
(:func:`hq.approvals.record_approval`) and only for requests this HQ wrote. Owns the HTTP
handler, :class:`ApprovalServer` and running it in a thread; no decision is made here.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from hq.approvals import (
    QuorumRefused,
    pending_requests,
    record_approval,
    request_summary,
    stored_request,
)
from hq.errors import HqError
from hq.home import HqHome
from trustcore.quorum import MAX_APPROVAL_SIZE

__all__ = ["MAX_POST_BODY", "ApprovalServer", "make_server", "running_server"]

#: Largest POST body the endpoint reads: one approval.
MAX_POST_BODY: Final = MAX_APPROVAL_SIZE


class _Handler(BaseHTTPRequestHandler):
    server: ApprovalServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: Any) -> None:
        self._send(status, (json.dumps(obj, sort_keys=True) + "\n").encode(), "application/json")

    def _error(self, status: HTTPStatus, reason: str, message: str) -> None:
        self._json(status, {"error": reason, "message": message})

    def do_GET(self) -> None:
        home = self.server.home
        try:
            if self.path == "/requests":
                self._json(
                    HTTPStatus.OK,
                    [request_summary(r, n) for r, n in pending_requests(home)],
                )
                return
            if self.path.startswith("/requests/"):
                try:
                    rid = bytes.fromhex(self.path.removeprefix("/requests/"))
                except ValueError:
                    self._error(HTTPStatus.BAD_REQUEST, "malformed", "request id is hex")
                    return
                request = stored_request(home, rid)
                if request is None:
                    self._error(HTTPStatus.NOT_FOUND, "unknown_request", "no such request")
                    return
                self._send(HTTPStatus.OK, request.encode(), "application/cbor")
                return
            self._error(HTTPStatus.NOT_FOUND, "not_found", "GET /requests or /requests/<id>")
        except HqError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, exc.reason, "HQ error")

    def do_POST(self) -> None:
        if self.path != "/approvals":
            self._error(HTTPStatus.NOT_FOUND, "not_found", "POST /approvals")
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "malformed", "Content-Length required")
            return
        length = int(length_text)
        if length > MAX_POST_BODY:
            # Do not read it: a bounded server never buffers what it will refuse.
            self.close_connection = True
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "oversized", f"at most {MAX_POST_BODY} bytes"
            )
            return
        body = self.rfile.read(length)
        try:
            request, count = record_approval(self.server.home, body)
        except QuorumRefused as exc:
            status = {
                "unknown_request": HTTPStatus.NOT_FOUND,
                "malformed": HTTPStatus.BAD_REQUEST,
                "replayed": HTTPStatus.CONFLICT,
                "expired": HTTPStatus.GONE,
            }.get(exc.reason, HTTPStatus.FORBIDDEN)
            self._error(status, exc.reason, str(exc.args[0]))
            return
        except HqError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, exc.reason, "HQ error")
            return
        self._json(
            HTTPStatus.CREATED,
            {"request_id": request.request_id.hex(), "approvals": count, "m": request.m},
        )


class ApprovalServer(ThreadingHTTPServer):
    """The online approval endpoint: ``GET /requests`` lists open requests (JSON),
    ``GET /requests/<id>`` returns one request (CBOR) for review and signing, ``POST
    /approvals`` takes one approval (CBOR, at most :data:`MAX_POST_BODY` bytes).

    No passwords or sessions: an approval is accepted only if it is signed by a key its
    request names, for a request this HQ wrote and that is still open. Listing is public to
    whoever reaches the socket, so the default bind is loopback (reach it over SSH or a
    reverse proxy with TLS)."""

    daemon_threads = True

    def __init__(self, home: HqHome, address: tuple[str, int], *, verbose: bool = False) -> None:
        self.home = home
        self.verbose = verbose
        super().__init__(address, _Handler)


def make_server(
    home: HqHome, host: str = "127.0.0.1", port: int = 8765, *, verbose: bool = False
) -> ApprovalServer:
    """Bind the endpoint (``port`` 0 picks a free one: see ``server_address``)."""
    try:
        return ApprovalServer(home, (host, port), verbose=verbose)
    except OSError as exc:
        raise HqError(f"cannot listen on {host}:{port}: {exc}", reason="io_error") from exc


@contextlib.contextmanager
def running_server(
    home: HqHome, host: str = "127.0.0.1", port: int = 0
) -> Iterator[ApprovalServer]:
    """The endpoint in a background thread for the duration of the block."""
    server = make_server(home, host, port)
    thread = threading.Thread(target=server.serve_forever, name="hq-approvals", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
