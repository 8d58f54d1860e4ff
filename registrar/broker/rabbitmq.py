"""The clustered broker tier: RabbitMQ 3.10 nodes with the MQTT plugin, configured by us.

What this module owns (the HTTP auth backend the nodes call is
:mod:`registrar.broker.rabbitmq_auth`; the AMQP request source is
:mod:`registrar.channel_amqp`):

* **rendering** (pure): per node a ``rabbitmq.conf``, an ``advanced.config`` and an
  ``enabled_plugins`` file (:func:`render_node`), and the environment that runs a node
  from them (:func:`node_environment`). Devices speak MQTT 3.1.1 over mutual TLS on one
  ``mqtts`` listener per node; the certificate CN is the MQTT username
  (``mqtt.ssl_cert_login``); every connect, vhost, queue and topic decision is made live by
  the registrar over HTTP (``rabbitmq_auth_backend_http``, the only auth backend).
* **CRLs** (:func:`write_crl_hash_dir`): an OpenSSL-style hash directory per node
  (``<subject hash>.r<n>``), which Erlang's ``ssl_crl_hash_dir`` re-reads on every
  handshake, so installing a new CRL needs no restart and no reload.
* **management** (:class:`RabbitManagement`): closes the live MQTT connections of an
  identity through ``DELETE /api/connections/username/<id>`` on whichever node answers
  (connection tracking is cluster-wide, so one live node is enough).
* :class:`RabbitMQTier`: what the registrar's revocation path needs from this tier
  (``reload_crls``, ``disconnect``, ``block``), the same verbs as the other backends.

Security decisions (details and measurements in ``docs/broker.md``, "RabbitMQ"):

* ``ssl_options`` live in ``advanced.config`` (rabbitmq.conf cannot express the CRL cache):
  ``verify_peer``, ``fail_if_no_peer_cert``, TLS 1.2/1.3 only, ``crl_check`` on the whole
  chain (a chain element without a CRL fails: fail closed).
* No plaintext key file: the broker key is written as encrypted PKCS#8 under a random
  per-render password that ``advanced.config`` (0600, private directory) carries. Erlang
  cannot be handed the password any other way here (measured: the ``prompt`` decoder fails
  with ``enotsup`` under ``-noinput``; a FIFO as passphrase file reads empty). Whoever can
  read the node's configuration directory can therefore use the key: protect it like
  the node's Erlang cookie (which grants the same and more).
* The cookie is random per cluster, in ``.erlang.cookie`` (0400) under the node's own HOME.
* The distribution and every listener bind to the configured host only; epmd is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker_config.tls_policy import TLS12_CIPHERS, TLS13_CIPHERSUITES
from registrar.broker import BrokerTls
from registrar.errors import BrokerError, ConfigError
from signers.child_env import child_env
from signers.errors import SignerError
from signers.private_files import write_private_file

#: Plugins a node needs: MQTT, the management API (for the live cut), the HTTP backend and
#: the event exchange (connection events: the registrar's table of live sessions).
PLUGINS = (
    "rabbitmq_management",
    "rabbitmq_mqtt",
    "rabbitmq_auth_backend_http",
    "rabbitmq_event_exchange",
)
#: Name of the quorum queue registration requests are consumed from.
REGISTRATION_QUEUE = "devtrust.registration.requests"

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}@[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
_HOST = re.compile(r"[0-9A-Za-z.:-]{1,253}")
_URL = re.compile(r"https?://[0-9A-Za-z.:\[\]-]+(?::[0-9]{1,5})?(/[A-Za-z0-9/_.-]*)?")
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def mqtt_to_amqp(topic: str) -> str:
    """The MQTT plugin's mapping of a topic (or filter) to a routing key: levels joined by
    ``.``, a ``.`` inside a level becomes ``/``, ``+`` becomes ``*``."""
    return ".".join("*" if level == "+" else level.replace(".", "/") for level in topic.split("/"))


def amqp_to_mqtt(routing_key: str) -> str:
    """The inverse of :func:`mqtt_to_amqp`."""
    levels = routing_key.split(".")
    return "/".join("+" if level == "*" else level.replace("/", ".") for level in levels)


def _port(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"bad {what} port {value!r}")
    return value


def _erlang_string(value: str | Path) -> str:
    """A double-quoted Erlang string; refuses anything that could break out of it."""
    text = str(value)
    if not text or any(c in text for c in '"\\\n\r\x00') or not text.isprintable():
        raise ConfigError(f"unsafe value for the RabbitMQ configuration: {text!r}")
    return f'"{text}"'


@dataclass(frozen=True)
class RabbitNode:
    """One cluster node: its Erlang name and the ports it listens on (``host`` only)."""

    name: str
    host: str
    amqp_port: int
    mqtts_port: int
    management_port: int
    dist_port: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _NODE_NAME.fullmatch(self.name) is None:
            raise ConfigError(f"bad node name {self.name!r}")
        if _HOST.fullmatch(self.host) is None:
            raise ConfigError(f"bad host {self.host!r}")
        ports = (self.amqp_port, self.mqtts_port, self.management_port, self.dist_port)
        for value, what in zip(ports, ("amqp", "mqtts", "management", "dist"), strict=True):
            _port(value, what)
        if len(set(ports)) != len(ports):
            raise ConfigError(f"node {self.name}: ports must differ")

    @property
    def short(self) -> str:
        return self.name.split("@", 1)[0]

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.management_port}"


@dataclass(frozen=True)
class RabbitMQConfig:
    """The whole tier. ``auth_url``: the registrar's HTTP auth backend (paths ``/user``,
    ``/vhost``, ``/resource``, ``/topic`` below it). ``server_key``: the encrypted PKCS#8
    file written by :func:`write_node_files`; ``key_password`` is its password."""

    nodes: tuple[RabbitNode, ...]
    auth_url: str
    vhost: str = "/"
    tls_versions: tuple[str, ...] = ("tlsv1.3", "tlsv1.2")

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("a RabbitMQ tier needs at least one node")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ConfigError("node names must be unique")
        if _URL.fullmatch(self.auth_url) is None:
            raise ConfigError(f"bad auth backend URL {self.auth_url!r}")
        if self.vhost != "/":
            raise ConfigError("only the default vhost '/' is supported")
        if not self.tls_versions or set(self.tls_versions) - {"tlsv1.2", "tlsv1.3"}:
            raise ConfigError("TLS versions: tlsv1.2 and/or tlsv1.3 only")

    def node(self, name: str) -> RabbitNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"no node {name!r}")


@dataclass(frozen=True)
class NodeFiles:
    """Where a node's rendered files are (all inside ``directory``, mode 0700)."""

    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "rabbitmq.conf"

    @property
    def advanced(self) -> Path:
        return self.directory / "advanced.config"

    @property
    def plugins(self) -> Path:
        return self.directory / "enabled_plugins"

    @property
    def crl_dir(self) -> Path:
        return self.directory / "crl"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def cas(self) -> Path:
        return self.directory / "cas.pem"

    @property
    def home(self) -> Path:
        """The node's HOME: holds ``.erlang.cookie``."""
        return self.directory / "home"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def logs(self) -> Path:
        return self.directory / "log"


def render_rabbitmq_conf(config: RabbitMQConfig, node: RabbitNode) -> str:
    """The new-style configuration of one node (everything that file format can say)."""
    peers = "\n".join(
        f"cluster_formation.classic_config.nodes.{i} = {n.name}"
        for i, n in enumerate(config.nodes, start=1)
    )
    base = config.auth_url.rstrip("/")
    return f"""\
# rabbitmq.conf of {node.name}, rendered by registrar.broker.rabbitmq -- do not edit by hand.
# Devices: MQTT 3.1.1 over mutual TLS only; identity = certificate CN; every decision is
# made by the registrar's HTTP auth backend. TLS options are in advanced.config.
listeners.tcp.default = {node.host}:{node.amqp_port}
listeners.ssl = none
management.tcp.ip = {node.host}
management.tcp.port = {node.management_port}
mqtt.listeners.tcp = none
mqtt.listeners.ssl.default = {node.host}:{node.mqtts_port}
mqtt.allow_anonymous = false
mqtt.ssl_cert_login = true
mqtt.vhost = {config.vhost}
mqtt.exchange = amq.topic
ssl_cert_login_from = common_name
auth_backends.1 = http
auth_http.http_method = post
auth_http.user_path = {base}/user
auth_http.vhost_path = {base}/vhost
auth_http.resource_path = {base}/resource
auth_http.topic_path = {base}/topic
loopback_users = none
cluster_formation.peer_discovery_backend = classic_config
{peers}
cluster_partition_handling = pause_minority
"""


def render_advanced_config(files: NodeFiles, config: RabbitMQConfig, key_password: str) -> str:
    """``ssl_options`` (certificate, encrypted key and its password, CAs, peer verification,
    versions, the AEAD suites of ``broker_config.tls_policy``, no session reuse, CRL hash
    directory). Mode 0600: it carries the key's password."""
    versions = ", ".join(f"'{v}'" for v in config.tls_versions)
    return f"""\
%% advanced.config rendered by registrar.broker.rabbitmq -- do not edit by hand.
[{{rabbit, [{{ssl_options, [
    {{certfile, {_erlang_string(files.server_cert)}}},
    {{keyfile, {_erlang_string(files.server_key)}}},
    {{password, {_erlang_string(key_password)}}},
    {{cacertfile, {_erlang_string(files.cas)}}},
    {{verify, verify_peer}},
    {{fail_if_no_peer_cert, true}},
    {{depth, 3}},
    {{versions, [{versions}]}},
    {{ciphers, {_erlang_string(TLS13_CIPHERSUITES + ":" + TLS12_CIPHERS)}}},
    {{honor_cipher_order, true}},
    {{reuse_sessions, false}},
    {{crl_check, true}},
    {{crl_cache, {{ssl_crl_hash_dir, {{internal, [{{dir, {_erlang_string(files.crl_dir)}}}]}}}}}}
]}}]}}].
"""


def render_enabled_plugins() -> str:
    return "[" + ",".join(PLUGINS) + "].\n"


def node_environment(files: NodeFiles, node: RabbitNode) -> dict[str, str]:
    """The environment that runs ``rabbitmq-server`` for ``node`` from its rendered files
    (a systemd unit sets the same variables). Nothing secret: the cookie is a file."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        "HOME": str(files.home),
        "LANG": "C.UTF-8",
        # Our own (empty) env file, so /etc/rabbitmq/rabbitmq-env.conf cannot rename us.
        "RABBITMQ_CONF_ENV_FILE": str(files.directory / "rabbitmq-env.conf"),
        "RABBITMQ_NODENAME": node.name,
        "RABBITMQ_CONFIG_FILE": str(files.conf),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(files.advanced),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(files.plugins),
        "RABBITMQ_MNESIA_BASE": str(files.data),
        "RABBITMQ_LOG_BASE": str(files.logs),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(files.directory / "plugins-expand"),
        "RABBITMQ_PID_FILE": str(files.directory / "rabbitmq.pid"),
        "RABBITMQ_DIST_PORT": str(node.dist_port),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
            "-kernel inet_dist_use_interface " + _erlang_ip(node.host)
        ),
        "RABBITMQ_CTL_DIST_PORT_MIN": str(node.dist_port + 1),
        "RABBITMQ_CTL_DIST_PORT_MAX": str(node.dist_port + 10),
    }


def _erlang_ip(host: str) -> str:
    parts = host.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise ConfigError(f"the distribution needs an IPv4 address, not {host!r}")
    return "{" + ",".join(parts) + "}"


def _write_private(target: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomic (a node may read ``target`` at any moment), private from the first byte; not
    fsynced: rendered again from the site's state at every start and reload."""
    try:
        write_private_file(target, data, overwrite=True, mode=mode, sync=False)
    except SignerError as exc:
        raise BrokerError(exc.message) from exc


@dataclass(frozen=True)
class SiteTls:
    """The site material every node needs (see :func:`write_node_files`)."""

    server_chain_pem: bytes  # broker certificate (site CA) followed by the site CA
    server_key: ec.EllipticCurvePrivateKey = field(repr=False)
    ca_bundle_pem: bytes  # manufacturer root, station CAs, site CA(s)
    crls_pem: bytes  # one CRL per issuing CA


def site_tls(tls: BrokerTls) -> SiteTls:
    """The node material from the site's broker files (the same files Mosquitto gets): the
    encrypted broker key is decrypted into memory only; one CA bundle for both
    hierarchies (RabbitMQ 3.10 has one ``ssl_options`` for all MQTT TLS listeners)."""
    try:
        key = serialization.load_pem_private_key(
            tls.server_key.read_bytes(), password=tls.server_key_passphrase
        )
        bundle = tls.registration_cas.read_bytes() + tls.operational_cas.read_bytes()
        chain, crls = tls.server_cert.read_bytes(), tls.crl_file.read_bytes()
    except (OSError, ValueError, TypeError) as exc:
        raise BrokerError(f"cannot read the site's broker files: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the broker key must be an EC private key")
    return SiteTls(server_chain_pem=chain, server_key=key, ca_bundle_pem=bundle, crls_pem=crls)


def parse_node(spec: str) -> RabbitNode:
    """``NAME@HOST,IP,AMQP,MQTTS,MANAGEMENT,DIST`` (the CLI's ``--node``)."""
    parts = spec.split(",")
    try:
        if len(parts) != 6:
            raise ValueError("six fields")
        amqp, mqtts, management, dist = (int(p) for p in parts[2:])
    except ValueError as exc:
        raise ConfigError(
            f"bad node {spec!r}: expected NAME@HOST,IP,AMQP,MQTTS,MANAGEMENT,DIST"
        ) from exc
    return RabbitNode(parts[0], parts[1], amqp, mqtts, management, dist)


def render_cluster(
    out: Path, config: RabbitMQConfig, tls: SiteTls, cookie: str | None = None
) -> dict[str, NodeFiles]:
    """``registrar broker-config rabbitmq``: every node's directory under ``out``."""
    cookie = cookie or secrets.token_hex(24)
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    files = {n.name: NodeFiles(out / n.short) for n in config.nodes}
    for node in config.nodes:
        write_node_files(files[node.name], config, node, tls, cookie)
    return files


def write_node_files(
    files: NodeFiles, config: RabbitMQConfig, node: RabbitNode, tls: SiteTls, cookie: str
) -> None:
    """Render everything ``node`` needs into ``files.directory`` (0700)."""
    key = tls.server_key
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the broker key must be an EC private key")
    if not re.fullmatch(r"[A-Za-z0-9]{20,255}", cookie):
        raise ConfigError("the Erlang cookie must be 20 or more letters and digits")
    for d in (files.directory, files.home, files.data, files.logs, files.crl_dir):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
    password = secrets.token_urlsafe(32)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )
    _write_private(files.server_key, encrypted)
    _write_private(files.server_cert, tls.server_chain_pem)
    _write_private(files.cas, tls.ca_bundle_pem)
    _write_private(files.conf, render_rabbitmq_conf(config, node).encode())
    _write_private(files.advanced, render_advanced_config(files, config, password).encode())
    _write_private(files.plugins, render_enabled_plugins().encode())
    _write_private(files.directory / "rabbitmq-env.conf", b"")
    cookie_file = files.home / ".erlang.cookie"
    with contextlib.suppress(FileNotFoundError):
        cookie_file.chmod(0o600)
    _write_private(cookie_file, cookie.encode(), 0o400)
    cookie_file.chmod(0o400)
    write_crl_hash_dir(files.crl_dir, tls.crls_pem)


# ------------------------------------------------------------------------------ CRLs

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.*?-----END X509 CRL-----\r?\n?", re.DOTALL)


def crl_subject_hash(crl_pem: bytes) -> str:
    """OpenSSL's issuer-name hash of a CRL (what ``ssl_crl_hash_dir`` looks files up by)."""
    try:
        out = subprocess.run(  # fixed argv, the CRL on stdin
            ["openssl", "crl", "-hash", "-noout"],  # noqa: S607
            input=crl_pem,
            capture_output=True,
            check=True,
            timeout=10,
            env=child_env(),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BrokerError(f"openssl could not hash a CRL: {exc}") from exc
    text = out.stdout.decode().strip()
    if re.fullmatch(r"[0-9a-f]{8}", text) is None:
        raise BrokerError(f"unexpected CRL hash {text!r}")
    return text


def write_crl_hash_dir(directory: Path, crls_pem: bytes) -> int:
    """Make ``directory`` hold exactly these CRLs as ``<hash>.r<n>`` files; return how many.

    Each file is replaced atomically, stale ones removed afterwards: a handshake running
    meanwhile sees either the old or the new CRL of an issuer, never none. A bundle that
    is not all CRLs is refused (nothing is changed)."""
    blocks = [m.group(0) for m in _PEM_CRL.finditer(crls_pem)]
    if not blocks:
        raise BrokerError("no CRL in the CRL bundle")
    for block in blocks:
        try:
            x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise BrokerError(f"unreadable CRL: {exc}") from exc
    wanted: dict[str, bytes] = {}
    for block in blocks:
        digest = crl_subject_hash(block)
        n = 0
        while f"{digest}.r{n}" in wanted:
            n += 1
        wanted[f"{digest}.r{n}"] = block
    directory.mkdir(parents=True, exist_ok=True)
    for name, block in wanted.items():
        _write_private(directory / name, block, 0o644)
    for stale in directory.iterdir():
        if stale.name not in wanted and not stale.name.startswith("."):
            stale.unlink()
    return len(wanted)


# ------------------------------------------------------------------------ management


def _check_identity(identity: str) -> str:
    if not isinstance(identity, str) or _IDENTITY.fullmatch(identity) is None:
        raise BrokerError(f"bad identity {identity!r}")
    return identity


class RabbitManagement:
    """The management HTTP API of the cluster, through whichever node answers first.

    Credentials: the registrar's own administrator, whom the registrar's auth backend
    admits with a password that exists only in the registrar's memory."""

    def __init__(
        self, nodes: Sequence[RabbitNode], username: str, password: str, *, timeout: float = 5
    ) -> None:
        if not nodes:
            raise ConfigError("no management endpoint")
        self._urls = tuple(n.management_url for n in nodes)
        self._headers = {"Authorization": aiohttp.encode_basic_auth(username, password)}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str) -> tuple[int, object]:
        errors: list[str] = []
        for url in self._urls:
            try:
                async with self._client().request(method, url + path) as response:
                    body: object = None
                    if response.content_type == "application/json":
                        body = await response.json()
                    if response.status >= 500:
                        errors.append(f"{url}: HTTP {response.status}")
                        continue
                    return response.status, body
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"{url}: {exc.__class__.__name__} {exc}")
        raise BrokerError("no RabbitMQ management endpoint answered: " + "; ".join(errors))

    async def connections(self, identity: str) -> list[dict[str, object]]:
        """Live connections of ``identity`` (cluster-wide connection tracking)."""
        path = f"/api/connections/username/{quote(_check_identity(identity), safe='')}"
        status, body = await self._request("GET", path)
        if status == 404:
            return []
        if status != 200 or not isinstance(body, list):
            raise BrokerError(f"listing the connections of {identity}: HTTP {status}")
        return [c for c in body if isinstance(c, dict)]

    async def close_connections(self, identity: str) -> int:
        """Close every live connection of ``identity`` on every node; return how many."""
        live = len(await self.connections(identity))
        path = f"/api/connections/username/{quote(_check_identity(identity), safe='')}"
        status, _ = await self._request("DELETE", path)
        if status not in (204, 404):
            raise BrokerError(f"closing the connections of {identity}: HTTP {status}")
        return live

    async def cluster_nodes(self) -> dict[str, bool]:
        """Node name → running, as the answering node sees the cluster."""
        status, body = await self._request("GET", "/api/nodes")
        if status != 200 or not isinstance(body, list):
            raise BrokerError(f"listing the cluster nodes: HTTP {status}")
        return {str(n.get("name")): bool(n.get("running")) for n in body if isinstance(n, dict)}


class RabbitMQTier:
    """The revocation verbs of the other brokers, for a RabbitMQ cluster.

    * ``reload_crls``: rewrites every node's CRL hash directory (read per handshake);
    * ``disconnect``: closes the identity's live connections through the management API;
    * ``block``: the auth backend refuses the identity from now on (connect and every
      topic), then its live connections are closed.
    """

    def __init__(
        self,
        config: RabbitMQConfig,
        node_files: dict[str, NodeFiles],
        crl_file: Path,
        management: RabbitManagement,
        blocked: set[str],
    ) -> None:
        self._config = config
        self._node_files = node_files
        self._crl_file = crl_file
        self._management = management
        self._blocked = blocked

    @property
    def crl_file(self) -> Path:
        """The site's CRL bundle that :meth:`reload_crls` installs on every node."""
        return self._crl_file

    async def reload_crls(self) -> None:
        try:
            data = self._crl_file.read_bytes()
        except OSError as exc:
            raise BrokerError(f"cannot read the CRL file: {exc}") from exc
        for files in self._node_files.values():
            await asyncio.to_thread(write_crl_hash_dir, files.crl_dir, data)

    async def disconnect(self, identity: str) -> int:
        return await self._management.close_connections(identity)

    async def block(self, identity: str) -> None:
        self._blocked.add(_check_identity(identity))
        await self.disconnect(identity)
