"""The production broker: a Mosquitto 2.0 process the registrar owns.

:class:`MosquittoBroker` implements :class:`registrar.broker.Broker`. It renders
``broker_config`` into a private work directory, runs ``mosquitto -c FILE`` on chosen
ports, and drives revocation:

* ``reload_crls`` writes the per-listener CRL files into the work directory (atomically)
  and sends SIGHUP; Mosquitto 2.0 then rebuilds each listener's TLS context, re-reading
  certificate, key, CAs and CRL, and re-reads the ACL files. It returns only after the
  reload has run (see ``reload_crls``).
* ``disconnect`` kicks through the dynamic-security plugin, loaded on a third, admin-only
  listener on 127.0.0.1 with a random username and password held in memory only (the
  plugin's JSON file, mode 0600 in the private directory, stores a salted PBKDF2 hash).
* ``block`` adds ``topic deny #`` for the identity to both listeners' ACL files, reloads,
  then kicks.

**The server key never touches the disk in clear.** ``BrokerTls.server_key`` is encrypted
PKCS#8; Mosquitto cannot be given a passphrase non-interactively. ``keyfile`` therefore
names a FIFO (named pipe, mode 0600) that a thread of this process feeds with the decrypted
PEM from memory, once per open, and only while a load is expected (start and SIGHUP). The
FIFO is replaced by a fresh one after every open so one open always gets exactly one copy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives import serialization

from broker_config.render import (
    MosquittoConfig,
    listener_trust,
    registrar_identities,
    render_mosquitto_conf,
    render_operational_acl,
    render_registration_acl,
)
from registrar.broker import REGISTRAR_IDENTITY, BrokerSettings, Endpoint, is_device_identity
from registrar.errors import BrokerError
from signers.child_env import child_env
from signers.errors import SignerError
from signers.private_files import write_private_file
from trustcore.errors import InvalidValueError

log = logging.getLogger(__name__)

_CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: How often Mosquitto 2.0.11 opens the keyfile (measured, see docs/broker.md): once per
#: mTLS listener at start, twice per mTLS listener on SIGHUP. Serving fewer would leave
#: Mosquitto blocked on the FIFO (a reload that never ends: detected, BrokerError).
_KEY_LOADS_START = 2
_KEY_LOADS_RELOAD = 4

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


def _check_identity(identity: str) -> str:
    if not isinstance(identity, str) or _IDENTITY.fullmatch(identity) is None:
        raise BrokerError(f"bad identity {identity!r}")
    return identity


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class _Owner:
    """Who the Mosquitto process runs as: started as root it drops to ``run_user``, and
    the files it reads after that (keys, CRL, dynsec JSON) must belong to that user."""

    name: str
    uid: int
    gid: int

    @classmethod
    def for_process(cls, run_user: str) -> _Owner:
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(run_user)
            except KeyError as exc:
                raise BrokerError(f"user {run_user!r} for mosquitto does not exist") from exc
            return cls(run_user, entry.pw_uid, entry.pw_gid)
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_name, os.geteuid(), os.getegid())

    def own(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


def _launch_argv(executable: str, conf: Path, owner: _Owner) -> list[str]:
    """``mosquitto -c CONF``, under ``setpriv --pdeathsig TERM`` when it exists: Mosquitto
    then ends with the registrar that owns it, even a registrar killed with SIGKILL (an
    orphan would keep the site's ports, and its kick password died with the registrar).
    As root, setpriv also switches to ``run_user`` first: Mosquitto's own switch would
    clear the parent-death signal (Linux clears it on a credential change)."""
    setpriv = shutil.which("setpriv")
    argv = [executable, "-c", str(conf)]
    if setpriv is None:
        return argv
    if os.geteuid() == 0:
        ids = ["--reuid", str(owner.uid), "--regid", str(owner.gid), "--init-groups"]
        return [setpriv, *ids, "--pdeathsig", "TERM", *argv]
    return [setpriv, "--pdeathsig", "TERM", *argv]


class _KeyPipe:
    """Serves the decrypted server key through a FIFO, once per open, while armed.

    Why a FIFO: the key exists in clear only in this process's memory and in Mosquitto's;
    nothing readable remains on any file system. Why "armed" windows: outside start and
    reload nobody should read the key, so nobody is served (another process of the same
    user opening the FIFO meanwhile just blocks). Why a fresh FIFO after each open: while
    one reader still holds the pipe, a second writer open would succeed too and append a
    second copy; renaming a new FIFO over the path gives every open its own pipe.
    """

    def __init__(self, path: Path, pem: bytes, owner: _Owner) -> None:
        self.path = path
        self._pem = bytearray(pem)
        self._owner = owner
        self._lock = threading.Lock()
        self._expected = 0
        self._served = 0
        self._done = threading.Event()
        self._closed = False
        self._wake = threading.Event()
        self._replace()
        self._thread = threading.Thread(target=self._run, name="mosquitto-keypipe", daemon=True)
        self._thread.start()

    @property
    def served(self) -> int:
        return self._served

    def _replace(self) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.mkfifo(tmp, 0o600)
        self._owner.own(tmp)
        tmp.replace(self.path)

    def arm(self, loads: int) -> threading.Event:
        """Serve the next ``loads`` opens; the returned event is set after the last one."""
        with self._lock:
            self._expected, self._served = loads, 0
            self._done = threading.Event()
            self._wake.set()
            return self._done

    def disarm(self) -> None:
        with self._lock:
            self._expected = 0
            self._wake.clear()

    def _run(self) -> None:
        while not self._closed:
            if not self._wake.wait(0.2):
                continue
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENOENT):  # no reader yet
                    time.sleep(0.0005)
                    continue
                log.error("key pipe failed: %s", exc)
                return
            try:
                self._replace()
                os.set_blocking(fd, True)
                os.write(fd, self._pem)
            except OSError as exc:
                log.warning("key pipe reader went away: %s", exc)
            finally:
                os.close(fd)
            with self._lock:
                self._served += 1
                if self._served >= self._expected:
                    self._expected = 0
                    self._wake.clear()
                    self._done.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=2)
        for i in range(len(self._pem)):  # best effort: Python may hold other copies
            self._pem[i] = 0
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _pbkdf2_entry(password: str) -> dict[str, Any]:
    """dynsec's password format: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
    }


def dynsec_document(admin_user: str, admin_password: str) -> dict[str, Any]:
    """The plugin's initial state: one admin limited to the control topic. The plugin is
    loaded on the admin listener only (``per_listener_settings true``), so it grants
    nothing on the device listeners; it is there for its kick (``disableClient``)."""

    def acl(acltype: str) -> dict[str, Any]:
        return {"acltype": acltype, "topic": "$CONTROL/dynamic-security/#", "allow": True}

    return {
        "clients": [
            {
                "username": admin_user,
                "textName": "devtrust registrar",
                **_pbkdf2_entry(admin_password),
                "roles": [{"rolename": "admin"}],
            }
        ],
        "groups": [],
        "roles": [
            {
                "rolename": "admin",
                "acls": [
                    acl("publishClientSend"),
                    acl("publishClientReceive"),
                    acl("subscribePattern"),
                    acl("unsubscribePattern"),
                ],
            }
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


class MosquittoBroker:
    """A Mosquitto process owned by the registrar (see the module docstring).

    ``executable`` and ``run_user`` are settings for unusual installations; tests use the
    defaults. ``log_acl_denials`` (default on) turns on Mosquitto's debug log, the only
    level at which 2.0.11 reports ACL denials; a site at full telemetry rate may turn it off
    (see docs/broker.md for its cost). Only loopback or the configured host is listened
    on; never port 1883 unless asked for explicitly.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        registrar_identity: str = REGISTRAR_IDENTITY,
        executable: str = "mosquitto",
        run_user: str = "mosquitto",
        start_timeout: float = 10.0,
        log_acl_denials: bool = True,
    ) -> None:
        self._settings = settings
        self._registrar_identity = _check_identity(registrar_identity)
        self._executable = executable
        self._run_user = run_user
        self._start_timeout = start_timeout
        self._log_acl_denials = log_acl_denials
        self._process: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._log_tail: deque[str] = deque(maxlen=200)
        # Only identities with a live session, or one a kick is waiting on, are kept: the
        # bookkeeping must not grow with every device the site ever saw.
        self._sessions: dict[str, int] = {}
        self._connect_seq = 0  # connections logged so far, all identities
        self._last_connect: dict[str, int] = {}  # live identity -> seq of its last connect
        self._gone_watch: dict[str, int] = {}  # identity being kicked -> sessions ended since
        self._watchers: dict[str, int] = {}  # identity -> kicks waiting on it
        self._session_changed = asyncio.Event()
        self._clone_signals: list[str] = []
        self._acl_denials = 0
        self._blocked: set[str] = set()
        self._key_pipe: _KeyPipe | None = None
        self._admin: aiomqtt.Client | None = None
        self._admin_stack: contextlib.AsyncExitStack | None = None
        self._admin_reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # One reload at a time: two overlapping ones would re-arm the key pipe under each
        # other (SIGHUPs coalesce), so one waits in vain and its disarm stalls the other.
        self._reload_lock = asyncio.Lock()
        self._ports: tuple[int, int, int] | None = None
        self._config: MosquittoConfig | None = None
        self._runtime: Path | None = None
        self._admin_user = ""
        self._owned_runtime: Path | None = None

    # ------------------------------------------------------------------------ properties

    def _endpoint(self, index: int) -> Endpoint:
        if self._ports is None:
            raise BrokerError("the broker is not started")
        return Endpoint(self._settings.host, self._ports[index])

    @property
    def registration_endpoint(self) -> Endpoint:
        return self._endpoint(0)

    @property
    def operational_endpoint(self) -> Endpoint:
        return self._endpoint(1)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def key_loads(self) -> int:
        """How many times Mosquitto read the key since the last start or reload."""
        return self._key_pipe.served if self._key_pipe else 0

    @property
    def clone_signals(self) -> list[str]:
        """Identities whose session was replaced by a second one with the same identity
        (the certificate is in use twice: a clone signal for the registrar to log)."""
        return list(self._clone_signals)

    def connected_devices(self) -> int:
        # not the random dynamic-security admin user (no "@" in it), nor service identities
        return sum(n for name, n in self.live_sessions().items() if is_device_identity(name))

    @property
    def acl_denials(self) -> int:
        """ACL denials Mosquitto logged since this object was made (each is also a warning
        in the registrar's log: who, what, which topic)."""
        return self._acl_denials

    def live_sessions(self) -> dict[str, int]:
        """Identity → number of live sessions, as Mosquitto's log reported them."""
        return {k: v for k, v in self._sessions.items() if k != self._admin_user}

    # ------------------------------------------------------------------------ lifecycle

    def _prepare_workdir(self, owner: _Owner) -> Path:
        """The private directory Mosquitto reads from: ``settings.workdir`` (mode 0700),
        or, when the registrar runs as root and Mosquitto drops to ``run_user``, a fresh
        0700 directory owned by that user under ``workdir``'s file system root for
        temporary files (the user cannot traverse an arbitrary root-owned ``workdir``)."""
        workdir = self._settings.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o700)
        if os.geteuid() == 0:
            runtime = Path(tempfile.mkdtemp(prefix="devtrust-mosquitto-"))
            owner.own(runtime)
            (workdir / "runtime-dir").write_text(f"{runtime}\n")  # for operators
            self._owned_runtime = runtime
            return runtime
        return workdir

    @property
    def runtime_dir(self) -> Path | None:
        """Where the rendered configuration, ACLs, CRLs and the key FIFO are (while running)."""
        return self._runtime

    def _write_trust(self, workdir: Path, owner: _Owner) -> None:
        """(Re)write the public per-listener files: CA bundles, CRLs and ACLs."""
        tls = self._settings.tls
        try:
            trust = listener_trust(
                tls.registration_cas.read_bytes(),
                tls.operational_cas.read_bytes(),
                tls.crl_file.read_bytes(),
            )
        except (OSError, InvalidValueError) as exc:
            raise BrokerError(f"unusable CA bundles or CRL file: {exc}") from exc
        assert self._config is not None
        files = {
            "server.pem": tls.server_cert.read_bytes(),
            "registration_cas.pem": trust.registration_cas,
            "operational_cas.pem": trust.operational_cas,
            "registration_crl.pem": trust.registration_crls,
            "operational_crl.pem": trust.operational_crls,
            "registration.acl": render_registration_acl(self._config).encode(),
            "operational.acl": render_operational_acl(self._config).encode(),
        }
        for name, data in files.items():
            self._write_private(workdir / name, data, owner)

    def _write_private(self, target: Path, data: bytes, owner: _Owner) -> None:
        """Atomically (Mosquitto may read the target at any moment), mode 0600, owned by
        the broker's user; not fsynced: rendered again from the site's state at every
        start and reload."""
        try:
            write_private_file(target, data, overwrite=True, sync=False, prepare=owner.own)
        except SignerError as exc:
            raise BrokerError(exc.message) from exc

    def _decrypt_key(self) -> bytes:
        tls = self._settings.tls
        try:
            key = serialization.load_pem_private_key(
                tls.server_key.read_bytes(), password=tls.server_key_passphrase
            )
        except (OSError, ValueError, TypeError) as exc:
            raise BrokerError(f"cannot decrypt the broker key {tls.server_key}") from exc
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    async def start(self) -> None:
        if self._process is not None:
            raise BrokerError("the broker is already running")
        owner = _Owner.for_process(self._run_user)
        key = self._decrypt_key()  # before any directory exists: a bad passphrase leaves none
        workdir = self._runtime = self._prepare_workdir(owner)
        last_error: BrokerError | None = None
        try:
            self._key_pipe = _KeyPipe(workdir / "server-key.fifo", key, owner)
            for _attempt in range(3):  # a free port can be taken between choosing and binding
                try:
                    await self._start_once(workdir, owner)
                    return
                except BrokerError as exc:
                    last_error = exc
                    await self._shutdown_process()
                    if "Address already in use" not in "\n".join(self._log_tail):
                        break
        except BaseException:
            await self.stop()  # no process, FIFO or temporary directory is left behind
            raise
        await self.stop()
        assert last_error is not None
        raise last_error

    async def _start_once(self, workdir: Path, owner: _Owner) -> None:
        host = self._settings.host
        reg = self._settings.registration_port or _free_port(host)
        op = self._settings.operational_port or _free_port(host)
        admin = _free_port("127.0.0.1")
        self._config = MosquittoConfig(
            host=host,
            registration_port=reg,
            operational_port=op,
            admin_port=admin,
            server_cert=workdir / "server.pem",
            server_key=workdir / "server-key.fifo",
            registration_cas=workdir / "registration_cas.pem",
            operational_cas=workdir / "operational_cas.pem",
            registration_crl=workdir / "registration_crl.pem",
            operational_crl=workdir / "operational_crl.pem",
            registration_acl=workdir / "registration.acl",
            operational_acl=workdir / "operational.acl",
            dynsec_config=workdir / "dynamic-security.json",
            registrar_identity=self._registrar_identity,
            blocked=frozenset(self._blocked),
            run_user=owner.name,
            log_acl_denials=self._log_acl_denials,
        )
        # Random and containing ":", so no certificate CN can be this name by design or luck.
        admin_user = self._admin_user = f"devtrust:admin:{secrets.token_hex(8)}"
        admin_password = secrets.token_urlsafe(32)
        document = json.dumps(dynsec_document(admin_user, admin_password)).encode()
        self._write_trust(workdir, owner)
        self._write_private(workdir / "dynamic-security.json", document, owner)
        conf = workdir / "mosquitto.conf"
        self._write_private(conf, render_mosquitto_conf(self._config).encode(), owner)

        assert self._key_pipe is not None
        loaded = self._key_pipe.arm(_KEY_LOADS_START)
        self._log_tail.clear()
        self._sessions.clear()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *_launch_argv(self._executable, conf, owner),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=child_env(),  # allow-list: no passphrase reaches the broker
            )
        except OSError as exc:
            raise BrokerError(f"cannot run {self._executable}: {exc}") from exc
        self._log_task = asyncio.create_task(self._read_log(self._process))
        deadline = time.monotonic() + self._start_timeout
        try:
            await self._wait_event(loaded, deadline, "load its key")
        finally:
            self._key_pipe.disarm()
        await self._connect_admin(admin, admin_user, admin_password, deadline)
        self._ports = (reg, op, admin)
        log.info("mosquitto %s listening: registration %s, operational %s", self.pid, reg, op)

    async def _wait_event(self, event: threading.Event, deadline: float, what: str) -> None:
        while not event.is_set():
            if self._process is None or self._process.returncode is not None:
                raise BrokerError(f"mosquitto exited before it could {what}: {self._tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not {what} in time: {self._tail()}")
            await asyncio.sleep(0.002)

    def _tail(self) -> str:
        return " | ".join(list(self._log_tail)[-8:]) or "(no output)"

    async def _read_log(self, process: asyncio.subprocess.Process) -> None:
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
                self._log_line(raw.decode("utf-8", "replace").rstrip())
        if pending:
            self._log_line(pending.decode("utf-8", "replace").rstrip())

    def _log_line(self, line: str) -> None:
        """One line of Mosquitto's log: ACL denials, refused handshakes, sessions."""
        if line.startswith(_CHATTER):
            if match := _DENIED.match(line):
                self._acl_denials += 1
                log.warning(
                    "ACL denied %s from %s on topic %r",
                    match.group(1),
                    match.group(2),
                    match.group(3),
                )
            return
        self._log_tail.append(line)
        log.debug("mosquitto: %s", line)
        if match := _TLS_REFUSED.match(line):
            log.warning("mosquitto refused a TLS handshake from %s: %s", *match.groups())
        elif match := _CONNECTED.match(line):
            name = match.group(1)
            self._sessions[name] = self._sessions.get(name, 0) + 1
            self._connect_seq += 1
            self._last_connect[name] = self._connect_seq
        elif match := _TAKEOVER.match(line):
            name = match.group(1)
            self._clone_signals.append(name)
            log.warning("second session for identity %s: clone signal", name)
            self._sessions[name] = max(self._sessions.get(name, 1) - 1, 0)
        elif match := _GONE.match(line):
            name = match.group(1) or match.group(2)
            if name in self._gone_watch:
                self._gone_watch[name] += 1
            left = self._sessions.get(name, 1) - 1
            if left > 0:
                self._sessions[name] = left
            else:
                self._sessions.pop(name, None)
                self._last_connect.pop(name, None)
        self._session_changed.set()

    async def _connect_admin(self, port: int, user: str, password: str, deadline: float) -> None:
        while True:
            stack = contextlib.AsyncExitStack()
            client = aiomqtt.Client(
                "127.0.0.1",
                port,
                username=user,
                password=password,
                identifier=user,
                protocol=aiomqtt.ProtocolVersion.V311,
                timeout=5,
            )
            try:
                await stack.enter_async_context(client)
                break
            except aiomqtt.MqttError as exc:
                await stack.aclose()
                if self._process is None or self._process.returncode is not None:
                    raise BrokerError(f"mosquitto exited: {self._tail()}") from exc
                if time.monotonic() > deadline:
                    raise BrokerError(f"mosquitto admin listener not ready: {exc}") from exc
                await asyncio.sleep(0.01)
        self._admin, self._admin_stack = client, stack
        await client.subscribe(_CONTROL_TOPIC + "/response", qos=1)
        self._admin_reader = asyncio.create_task(self._read_responses(client))
        await self._command({"command": "getDefaultACLAccess"})  # round trip: ready

    async def _read_responses(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                try:
                    payload = message.payload
                    assert isinstance(payload, bytes | bytearray)
                    responses = json.loads(payload)["responses"]
                except (ValueError, KeyError, TypeError, AssertionError):
                    log.warning("unreadable dynsec response")
                    continue
                for response in responses:
                    future = self._pending.pop(str(response.get("correlationData")), None)
                    if future is not None and not future.done():
                        future.set_result(response)

    async def _command(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one dynsec command and return its response (``error`` key on failure)."""
        if self._admin is None:
            raise BrokerError("the broker is not started")
        correlation = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        body = json.dumps({"commands": [{**command, "correlationData": correlation}]})
        try:
            await self._admin.publish(_CONTROL_TOPIC, body, qos=1)
            return await asyncio.wait_for(future, 5)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise BrokerError(f"dynsec command {command['command']} failed: {exc}") from exc
        finally:
            self._pending.pop(correlation, None)

    async def _checked(self, command: dict[str, Any], *, tolerate: str = "") -> None:
        response = await self._command(command)
        error = response.get("error")
        if error and not (tolerate and tolerate in str(error)):
            raise BrokerError(f"dynsec {command['command']}: {error}")

    async def stop(self) -> None:
        if self._admin_reader is not None:
            self._admin_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._admin_reader
            self._admin_reader = None
        if self._admin_stack is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._admin_stack.aclose()
            self._admin_stack, self._admin = None, None
        await self._shutdown_process()
        if self._key_pipe is not None:
            await asyncio.to_thread(self._key_pipe.close)
            self._key_pipe = None
        self._ports = None
        if self._owned_runtime is not None:
            shutil.rmtree(self._owned_runtime, ignore_errors=True)
            self._owned_runtime = None
        self._runtime = None

    @property
    def exited(self) -> bool:
        """True when the Mosquitto process died (crash, kill) after a successful start."""
        process = self._process
        return self._ports is not None and process is not None and process.returncode is not None

    async def revive(self) -> bool:
        """Restart a Mosquitto that died, on the same ports, with the same blocks (rendered
        into its ACL files). False if it is running. Its retained messages and sessions are
        gone: the registrar's session reconnects and re-sends what it owes (pending
        payload-key updates, see ``registrar.key_distribution``)."""
        if not self.exited:
            return False
        assert self._process is not None and self._ports is not None and self._runtime is not None
        log.error(
            "mosquitto %s exited (code %s): restarting it on the same ports | %s",
            self._process.pid,
            self._process.returncode,
            self._tail(),
        )
        registration, operational, _admin = self._ports
        if self._admin_reader is not None:
            self._admin_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._admin_reader
            self._admin_reader = None
        if self._admin_stack is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):  # its broker is gone
                await self._admin_stack.aclose()
            self._admin_stack, self._admin = None, None
        await self._shutdown_process()
        self._settings = dataclasses.replace(
            self._settings, registration_port=registration, operational_port=operational
        )
        await self._start_once(self._runtime, _Owner.for_process(self._run_user))
        return True

    async def _shutdown_process(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._log_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._log_task
            self._log_task = None
        self._sessions.clear()

    # ------------------------------------------------------------------------ revocation

    async def reload_crls(self) -> None:
        """Install the current CRLs (and ACLs) and SIGHUP; return once the reload has run.

        "Has run" is observed, not guessed: during the reload Mosquitto reads the key FIFO
        twice per device listener, and loads that listener's CRL right after; its main loop
        is single threaded, so a dynsec round trip answered after those reads comes after
        the whole reload. Concurrent callers (a revocation during a burst of renewals) are
        served one after the other.
        """
        async with self._reload_lock:
            process, pipe, config = self._process, self._key_pipe, self._config
            if process is None or pipe is None or config is None or process.returncode is not None:
                raise BrokerError("the broker is not running")
            self._config = dataclasses.replace(config, blocked=frozenset(self._blocked))
            assert self._runtime is not None
            self._write_trust(self._runtime, _Owner.for_process(self._run_user))
            loaded = pipe.arm(_KEY_LOADS_RELOAD)
            try:
                process.send_signal(signal.SIGHUP)
                await self._wait_event(loaded, time.monotonic() + 5, "reload")
            finally:
                pipe.disarm()
            await self._command({"command": "getDefaultACLAccess"})

    async def _wait_gone(self, identity: str, ended_before: int, timeout: float) -> None:
        """Wait until Mosquitto logged the end of a session of ``identity`` since its
        watch began (a reconnect that follows at once, e.g. before the CRL is updated, does
        not count as "still connected")."""
        deadline = time.monotonic() + timeout
        while self._gone_watch.get(identity, 0) <= ended_before:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"the session of {identity} was not cut in {timeout} s")
            self._session_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._session_changed.wait(), remaining)

    async def disconnect(self, identity: str) -> int:
        """Kick the live session of ``identity`` (at most one: the client id is the
        identity) and return how many were cut.

        dynsec can only kick usernames it knows, so the identity is created there first
        (with no role: the plugin sits on the admin listener only and grants nothing).
        ``disableClient`` kicks; ``enableClient`` undoes the flag, which would only matter
        for password logins anyway.
        """
        identity = _check_identity(identity)
        before = self._sessions.get(identity, 0)
        ended = self._gone_watch.setdefault(identity, 0)
        self._watchers[identity] = self._watchers.get(identity, 0) + 1
        try:
            create = {"command": "createClient", "username": identity}
            await self._checked(create, tolerate="already exists")
            await self._checked({"command": "disableClient", "username": identity})
            await self._checked({"command": "enableClient", "username": identity})
            if before:
                await self._wait_gone(identity, ended, 5)
        finally:
            self._watchers[identity] -= 1
            if not self._watchers[identity]:
                del self._watchers[identity], self._gone_watch[identity]
        return before

    def connection_mark(self, identity: str) -> int:
        return self._connect_seq

    async def cut_superseded(self, identity: str, serials: frozenset[int], mark: int) -> int:
        """Mosquitto 2.0.11 cannot tell which certificate a session uses: see
        :meth:`registrar.broker.Broker.cut_superseded` for why a connection after ``mark``
        means nothing is left to cut. Otherwise the live session (if any) is kicked; the
        device reconnects with its new certificate (the old one is on the CRL)."""
        identity = _check_identity(identity)
        if self._last_connect.get(identity, 0) > mark or not self._sessions.get(identity, 0):
            return 0
        cut = await self.disconnect(identity)
        if cut:
            log.warning("cut the session of %s still on a superseded LDevID", identity)
        return cut

    async def block(self, identity: str) -> None:
        """Deny ``identity`` everything on both listeners, then cut its session.

        Both ACL files get ``user <identity>`` / ``topic deny #``, which Mosquitto checks
        before any pattern. A certificate that still verifies can complete a TLS handshake
        and CONNECT again (nothing in Mosquitto 2.0.11 refuses a verified certificate
        client by name), but can then neither publish, subscribe nor receive anything; the
        CRL is what refuses the handshake. Blocks are kept in memory: after a restart of
        this object the registrar re-applies them from its store.
        """
        identity = _check_identity(identity)
        if identity in registrar_identities(self._registrar_identity):
            raise BrokerError("refusing to block a registrar instance's identity")
        self._blocked.add(identity)
        await self.reload_crls()
        await self.disconnect(identity)
