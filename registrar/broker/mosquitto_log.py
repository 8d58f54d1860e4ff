"""Mosquitto's stderr, read by the registrar: who is connected, clone signals, ACL
denials and refused TLS handshakes.

Mosquitto 2.0.11 has no API for its live sessions, so :class:`SessionLog` keeps them from
its connection log lines (``connection_messages true``, log type ``notice``): identity ->
number of live sessions, a sequence number per connect (for
:meth:`registrar.broker.Broker.cut_superseded`), and what a kick waits on (the end of a
session of one identity). Only identities with a live session, or one a kick is waiting
on, are kept: the bookkeeping does not grow with every device the site ever saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque

# The broker's log lines keep the name operators filter on (one logger per backend).
log = logging.getLogger("registrar.broker.mosquitto")

# Mosquitto's connection log lines (log_type notice, connection_messages true).
_CONNECTED = re.compile(r"^New client connected from \S+ as (\S+) \(")
_GONE = re.compile(
    r"^(?:Client (\S+?) (?:disconnected|closed its connection|has exceeded timeout"
    r"|been disconnected)"
    r"|Socket error on client (\S+?), disconnecting)"
)
_TAKEOVER = re.compile(r"^Client (\S+) already connected, closing old connection")
#: An ACL denial (debug level in 2.0.11): "Denied PUBLISH from dev-a (d0, q1, r0, m1,
#: 'devices/dev-b/t', ... (1 bytes))".
_DENIED = re.compile(r"^Denied (\S+) from (\S+) \(.*?'(.*)', \.\.\. \(\d+ bytes\)\)$")
#: A refused TLS handshake: "Client connection from 127.0.0.1 failed: error:0A000086:SSL
#: routines::certificate verify failed."
_TLS_REFUSED = re.compile(r"^Client connection from (\S+) failed: (.*?)\.?$")
#: Per-packet debug chatter: dropped unread (a line per packet at full message rate).
_CHATTER = ("Received ", "Sending ", "\t", "Denied ")
_CHATTER_BYTES = tuple(c.encode() for c in _CHATTER)


class SessionLog:
    """What Mosquitto's log said (see the module docstring)."""

    def __init__(self) -> None:
        self.tail_lines: deque[str] = deque(maxlen=200)
        #: identity -> live sessions
        self.sessions: dict[str, int] = {}
        self.connect_seq = 0  # connections logged so far, all identities
        self.last_connect: dict[str, int] = {}  # live identity -> seq of its last connect
        self._gone_watch: dict[str, int] = {}  # identity being kicked -> sessions ended since
        self._watchers: dict[str, int] = {}  # identity -> kicks waiting on it
        self._session_changed = asyncio.Event()
        self.clone_signals: list[str] = []
        self.acl_denials = 0

    def tail(self) -> str:
        """The last lines Mosquitto wrote, for error messages."""
        return " | ".join(list(self.tail_lines)[-8:]) or "(no output)"

    async def read(self, process: asyncio.subprocess.Process) -> None:
        """Mosquitto's stderr, line by line, read in chunks: with the ACL-denial trace on
        Mosquitto writes a debug line per packet (about a dozen per registration), and a
        ``readline`` per line cost the registrar more than the line's own handling. The
        per-packet chatter is dropped on its first bytes, before any decoding."""
        assert process.stderr is not None
        pending = b""
        while chunk := await process.stderr.read(1 << 16):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for raw in lines:
                if raw.startswith(_CHATTER_BYTES) and not raw.startswith(b"Denied "):
                    continue
                self.line(raw.decode("utf-8", "replace").rstrip())
        if pending:
            self.line(pending.decode("utf-8", "replace").rstrip())

    def line(self, line: str) -> None:
        """One line of Mosquitto's log: ACL denials, refused handshakes, sessions."""
        if line.startswith(_CHATTER):
            if match := _DENIED.match(line):
                self.acl_denials += 1
                log.warning(
                    "ACL denied %s from %s on topic %r",
                    match.group(1),
                    match.group(2),
                    match.group(3),
                )
            return
        self.tail_lines.append(line)
        log.debug("mosquitto: %s", line)
        if match := _TLS_REFUSED.match(line):
            log.warning("mosquitto refused a TLS handshake from %s: %s", *match.groups())
        elif match := _CONNECTED.match(line):
            name = match.group(1)
            self.sessions[name] = self.sessions.get(name, 0) + 1
            self.connect_seq += 1
            self.last_connect[name] = self.connect_seq
        elif match := _TAKEOVER.match(line):
            name = match.group(1)
            self.clone_signals.append(name)
            log.warning("second session for identity %s: clone signal", name)
            self.sessions[name] = max(self.sessions.get(name, 1) - 1, 0)
        elif match := _GONE.match(line):
            name = match.group(1) or match.group(2)
            if name in self._gone_watch:
                self._gone_watch[name] += 1
            left = self.sessions.get(name, 1) - 1
            if left > 0:
                self.sessions[name] = left
            else:
                self.sessions.pop(name, None)
                self.last_connect.pop(name, None)
        self._session_changed.set()

    def watch(self, identity: str) -> int:
        """Start counting the ends of ``identity``'s sessions; returns the count so far
        (pass it to :meth:`wait_gone`, and call :meth:`unwatch` once done)."""
        ended = self._gone_watch.setdefault(identity, 0)
        self._watchers[identity] = self._watchers.get(identity, 0) + 1
        return ended

    def unwatch(self, identity: str) -> None:
        self._watchers[identity] -= 1
        if not self._watchers[identity]:
            del self._watchers[identity], self._gone_watch[identity]

    async def wait_gone(self, identity: str, ended_before: int, timeout: float) -> bool:
        """Wait until Mosquitto logged the end of a session of ``identity`` since its
        watch began (a reconnect that follows at once, e.g. before the CRL is updated, does
        not count as "still connected"). False if that did not happen in ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._gone_watch.get(identity, 0) <= ended_before:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._session_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._session_changed.wait(), remaining)
        return True
