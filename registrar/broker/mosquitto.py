"""The production broker: a Mosquitto 2.0 process the registrar owns.

:class:`MosquittoBroker` implements :class:`registrar.broker.Broker`: its lifecycle (render
``broker_config`` into a private work directory, run ``mosquitto -c FILE`` on chosen
ports, restart it on the same ports if it dies) and revocation:

* ``reload_crls`` writes the per-listener CRL files into the work directory (atomically)
  and sends SIGHUP; Mosquitto 2.0 then rebuilds each listener's TLS context, re-reading
  certificate, key, CAs and CRL, and re-reads the ACL files. It returns only after the
  reload has run. Reloads are coalesced, and skipped when nothing changed: every SIGHUP
  costs Mosquitto memory while connections made before it stay open (docs/broker.md,
  "Reloads").
* ``disconnect`` kicks through the dynamic-security plugin on a third, admin-only listener
  (:mod:`registrar.broker.mosquitto_dynsec`).
* ``block`` adds ``topic deny #`` for the identity to both listeners' ACL files, reloads,
  then kicks.

Its parts, one duty each: :mod:`registrar.broker.mosquitto_process` (the user it runs as,
its command line, and the FIFO through which the server key reaches it: the key never
touches the disk in clear), :mod:`registrar.broker.mosquitto_dynsec` (the admin session and
the plugin's document), :mod:`registrar.broker.mosquitto_log` (its stderr: live sessions,
clone signals, ACL denials, refused handshakes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

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
from registrar.broker.mosquitto_dynsec import DynsecAdmin, dynsec_document
from registrar.broker.mosquitto_log import SessionLog
from registrar.broker.mosquitto_process import (
    KEY_LOADS_RELOAD,
    KEY_LOADS_START,
    KeyPipe,
    ProcessOwner,
    free_ports,
    launch_argv,
)
from registrar.errors import BrokerError
from signers.child_env import child_env
from signers.errors import SignerError
from signers.private_files import write_private_file
from trustcore.errors import InvalidValueError

log = logging.getLogger(__name__)

_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: Mosquitto's database file in its persistence directory (its fixed default name).
DATABASE = "mosquitto.db"


def _check_identity(identity: str) -> str:
    if not isinstance(identity, str) or _IDENTITY.fullmatch(identity) is None:
        raise BrokerError(f"bad identity {identity!r}")
    return identity


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
        self._log = SessionLog()
        self._blocked: set[str] = set()
        self._key_pipe: KeyPipe | None = None
        self._admin = DynsecAdmin()
        # One reload at a time: two overlapping ones would re-arm the key pipe under each
        # other (SIGHUPs coalesce), so one waits in vain and its disarm stalls the other.
        self._reload_lock = asyncio.Lock()
        self._reload_requests = 0  # reload_crls calls so far
        self._reload_covered = 0  # calls whose files a finished reload has installed
        self._installed: dict[str, bytes] = {}  # the public files Mosquitto last loaded
        self._sighups = 0
        self._ports: tuple[int, int, int] | None = None
        self._config: MosquittoConfig | None = None
        self._runtime: Path | None = None
        self._admin_user = ""
        self._owned_runtime: Path | None = None
        #: The registrar's persistent session is in Mosquitto's database file (save_sessions).
        self._sessions_saved = False

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
    def admin_endpoint(self) -> Endpoint:
        """The admin listener (loopback; the registrar's dynsec session only)."""
        if self._ports is None:
            raise BrokerError("the broker is not started")
        return Endpoint("127.0.0.1", self._ports[2])

    @property
    def admin_reconnects(self) -> int:
        """Times the dynsec admin session was reopened after a failure."""
        return self._admin.reconnects

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
        return list(self._log.clone_signals)

    def connected_devices(self) -> int:
        # not the random dynamic-security admin user (no "@" in it), nor service identities
        return sum(n for name, n in self.live_sessions().items() if is_device_identity(name))

    @property
    def acl_denials(self) -> int:
        """ACL denials Mosquitto logged since this object was made (each is also a warning
        in the registrar's log: who, what, which topic)."""
        return self._log.acl_denials

    def live_sessions(self) -> dict[str, int]:
        """Identity → number of live sessions, as Mosquitto's log reported them."""
        return {k: v for k, v in self._log.sessions.items() if k != self._admin_user}

    # ------------------------------------------------------------------------ lifecycle

    def _prepare_workdir(self, owner: ProcessOwner) -> Path:
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

    def _trust_files(self) -> dict[str, bytes]:
        """The public per-listener files, rendered from the site's current state: server
        certificate, CA bundles, CRLs and ACLs (file name -> content)."""
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
        return files

    def _install(self, workdir: Path, files: dict[str, bytes], owner: ProcessOwner) -> None:
        for name, data in files.items():
            self._write_private(workdir / name, data, owner)

    def _write_private(self, target: Path, data: bytes, owner: ProcessOwner) -> None:
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
        owner = ProcessOwner.for_process(self._run_user)
        key = self._decrypt_key()  # before any directory exists: a bad passphrase leaves none
        workdir = self._runtime = self._prepare_workdir(owner)
        # A fresh broker starts with no sessions and no retained messages (the registrar
        # publishes again what devices need); only revive() loads the saved database.
        (workdir / DATABASE).unlink(missing_ok=True)
        self._sessions_saved = False
        last_error: BrokerError | None = None
        try:
            self._key_pipe = KeyPipe(workdir / "server-key.fifo", key, owner)
            for _attempt in range(3):  # a free port can be taken between choosing and binding
                try:
                    await self._start_once(workdir, owner)
                    return
                except BrokerError as exc:
                    last_error = exc
                    await self._shutdown_process()
                    if "Address already in use" not in "\n".join(self._log.tail_lines):
                        break
        except BaseException:
            await self.stop()  # no process, FIFO or temporary directory is left behind
            raise
        await self.stop()
        assert last_error is not None
        raise last_error

    async def _start_once(self, workdir: Path, owner: ProcessOwner) -> None:
        host = self._settings.host
        fixed = (self._settings.registration_port, self._settings.operational_port)
        hosts = [host for port in fixed if not port] + ["127.0.0.1"]
        chosen = iter(free_ports(hosts, avoid={port for port in fixed if port}))
        reg, op = (port or next(chosen) for port in fixed)
        admin = next(chosen)
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
            persistence_dir=workdir,
        )
        # Random and containing ":", so no certificate CN can be this name by design or luck.
        admin_user = self._admin_user = f"devtrust:admin:{secrets.token_hex(8)}"
        admin_password = secrets.token_urlsafe(32)
        document = json.dumps(dynsec_document(admin_user, admin_password)).encode()
        files = self._trust_files()
        self._install(workdir, files, owner)
        self._write_private(workdir / "dynamic-security.json", document, owner)
        conf = workdir / "mosquitto.conf"
        self._write_private(conf, render_mosquitto_conf(self._config).encode(), owner)

        assert self._key_pipe is not None
        loaded = self._key_pipe.arm(KEY_LOADS_START)
        self._log.tail_lines.clear()
        self._log.sessions.clear()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *launch_argv(self._executable, conf, owner),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=child_env(),  # allow-list: no passphrase reaches the broker
            )
        except OSError as exc:
            raise BrokerError(f"cannot run {self._executable}: {exc}") from exc
        self._log_task = asyncio.create_task(self._log.read(self._process))
        deadline = time.monotonic() + self._start_timeout
        try:
            await self._wait_event(loaded, deadline, "load its key")
        finally:
            self._key_pipe.disarm()
        await self._admin.connect(
            admin, admin_user, admin_password, deadline, failure=self._exited_because
        )
        self._installed = files
        self._ports = (reg, op, admin)
        log.info("mosquitto %s listening: registration %s, operational %s", self.pid, reg, op)

    def save_sessions(self) -> bool:
        """Have Mosquitto write its database (SIGUSR1) once after a fresh start, when the
        registrar's persistent session has subscribed and before devices publish: a
        Mosquitto restarted after a crash (:meth:`revive`) loads it and queues device
        messages for the registrar from its first second, where it would otherwise drop
        them until the registrar subscribed again. Written as the registrar first connects,
        the file holds that session and practically nothing else (docs/broker.md, "What a
        Mosquitto crash loses"). True if the signal was sent now."""
        process = self._process
        if self._sessions_saved or process is None or process.returncode is not None:
            return False
        process.send_signal(signal.SIGUSR1)
        self._sessions_saved = True
        return True

    async def _wait_event(self, event: threading.Event, deadline: float, what: str) -> None:
        while not event.is_set():
            if self._process is None or self._process.returncode is not None:
                raise BrokerError(f"mosquitto exited before it could {what}: {self._tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not {what} in time: {self._tail()}")
            await asyncio.sleep(0.002)

    def _tail(self) -> str:
        return self._log.tail()

    def _exited_because(self) -> str | None:
        if self._process is None or self._process.returncode is not None:
            return f"mosquitto exited: {self._tail()}"
        return None

    async def stop(self) -> None:
        await self._admin.close()
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
        into its ACL files). False if it is running. It loads the database saved by
        :meth:`save_sessions`: the registrar's session and subscriptions, no device session
        and no retained message. Retained messages are gone: the registrar reconnects and
        re-sends what it owes (pending payload-key updates, see
        ``registrar.key_distribution``)."""
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
        await self._admin.close()  # its broker is gone
        await self._shutdown_process()
        self._settings = dataclasses.replace(
            self._settings, registration_port=registration, operational_port=operational
        )
        await self._start_once(self._runtime, ProcessOwner.for_process(self._run_user))
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
        self._log.sessions.clear()

    # ------------------------------------------------------------------------ revocation

    @property
    def sighups(self) -> int:
        """Reloads (SIGHUPs) sent to Mosquitto since this object was made."""
        return self._sighups

    async def reload_crls(self) -> None:
        """Install the current CRLs (and ACLs) and SIGHUP; return once the reload has run.

        "Has run" is observed, not guessed: during the reload Mosquitto reads the key FIFO
        twice per device listener, and loads that listener's CRL right after; its main loop
        is single threaded, so a dynsec round trip answered after those reads comes after
        the whole reload.

        Reloads are coalesced (each one costs Mosquitto memory: see docs/broker.md,
        "Reloads"). Calls that arrive while a reload runs wait for it and are then served
        together by ONE more reload, which renders the files after all of them arrived; a
        reload whose rendered files equal the ones Mosquitto already loaded sends no
        SIGHUP at all (nothing it would re-read has changed).
        """
        self._reload_requests += 1
        ticket = self._reload_requests
        async with self._reload_lock:
            if self._reload_covered >= ticket:
                return  # a reload that rendered the files after this call has run
            covers = self._reload_requests
            process, pipe, config = self._process, self._key_pipe, self._config
            if process is None or pipe is None or config is None or process.returncode is not None:
                raise BrokerError("the broker is not running")
            self._config = dataclasses.replace(config, blocked=frozenset(self._blocked))
            assert self._runtime is not None
            files = self._trust_files()
            if files == self._installed:
                self._reload_covered = covers
                return
            self._install(self._runtime, files, ProcessOwner.for_process(self._run_user))
            loaded = pipe.arm(KEY_LOADS_RELOAD)
            try:
                process.send_signal(signal.SIGHUP)
                self._sighups += 1
                await self._wait_event(loaded, time.monotonic() + 5, "reload")
            finally:
                pipe.disarm()
            await self._admin.command({"command": "getDefaultACLAccess"})
            self._installed = files
            self._reload_covered = covers

    async def disconnect(self, identity: str) -> int:
        """Kick the live session of ``identity`` (at most one: the client id is the
        identity) and return how many were cut.

        dynsec can only kick usernames it knows, so the identity is created there first
        (with no role: the plugin sits on the admin listener only and grants nothing).
        ``disableClient`` kicks; ``enableClient`` undoes the flag, which would only matter
        for password logins anyway.
        """
        identity = _check_identity(identity)
        before = self._log.sessions.get(identity, 0)
        ended = self._log.watch(identity)
        try:
            create = {"command": "createClient", "username": identity}
            await self._admin.checked(create, tolerate="already exists")
            await self._admin.checked({"command": "disableClient", "username": identity})
            await self._admin.checked({"command": "enableClient", "username": identity})
            if before and not await self._log.wait_gone(identity, ended, 5):
                raise BrokerError(f"the session of {identity} was not cut in 5 s")
        finally:
            self._log.unwatch(identity)
        return before

    def connection_mark(self, identity: str) -> int:
        return self._log.connect_seq

    async def cut_superseded(self, identity: str, serials: frozenset[int], mark: int) -> int:
        """Mosquitto 2.0.11 cannot tell which certificate a session uses: see
        :meth:`registrar.broker.Broker.cut_superseded` for why a connection after ``mark``
        means nothing is left to cut. Otherwise the live session (if any) is kicked; the
        device reconnects with its new certificate (the old one is on the CRL)."""
        identity = _check_identity(identity)
        sessions = self._log
        if sessions.last_connect.get(identity, 0) > mark or not sessions.sessions.get(identity, 0):
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
