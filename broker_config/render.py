"""Render Mosquitto's configuration and ACL from typed settings (pure: text in, text out).

Values are checked before substitution: Mosquitto's configuration format is line based, so
a path or host containing a newline, or an identity containing whitespace, would let one
setting inject another (``allow_anonymous true``...). Such values are refused, never
escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import PurePath
from string import Template

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker_config.tls_policy import MIN_TLS_VERSION, TLS12_CIPHERS, TLS13_CIPHERSUITES
from trustcore.errors import InvalidValueError
from trustcore.topics import DEVICE_PREFIX, REGISTRATION_PREFIX, REQUEST_LEVEL, RESPONSE_LEVEL

#: Debian's path of the dynamic-security plugin shipped with mosquitto 2.0.
DYNSEC_PLUGIN = PurePath("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")

_HOST = re.compile(r"[A-Za-z0-9.:\-]{1,253}")
#: A device id (trustcore.identity.DeviceId) or the registrar's identity, which adds "@".
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
#: Registrar instances one site may run on one broker; each has its own identity.
MAX_REGISTRAR_INSTANCES = 16


def instance_identity(base: str, instance: int) -> str:
    """The broker identity (certificate CN, and client id under ``use_username_as_clientid``)
    of registrar instance ``instance`` of a site whose registrar is ``base``
    (``registrar@site``): ``base`` itself for the first, ``registrar.<n>@site`` for the
    others. A second session with one client id is a takeover, so instances need distinct
    names; "@" is in no device id, so no device certificate can carry one of them."""
    if not isinstance(instance, int) or not 1 <= instance <= MAX_REGISTRAR_INSTANCES:
        raise InvalidValueError(f"instance must be 1..{MAX_REGISTRAR_INSTANCES}, not {instance!r}")
    if instance == 1:
        return base
    name, at, domain = base.partition("@")
    if not at:
        raise InvalidValueError(f"registrar identity {base!r} has no '@'")
    return f"{name}.{instance}@{domain}"


def registrar_identities(base: str) -> tuple[str, ...]:
    """Every identity the operational ACL grants the registrar's topics."""
    return tuple(instance_identity(base, n) for n in range(1, MAX_REGISTRAR_INSTANCES + 1))


@dataclass(frozen=True)
class MosquittoConfig:
    """Everything the templates need. Paths are absolute; ports are real (non-zero) ports
    chosen by the caller, because Mosquitto cannot report a port it picked itself."""

    host: str
    registration_port: int
    operational_port: int
    admin_port: int
    server_cert: PurePath
    server_key: PurePath
    registration_cas: PurePath
    operational_cas: PurePath
    registration_crl: PurePath
    operational_crl: PurePath
    registration_acl: PurePath
    operational_acl: PurePath
    dynsec_config: PurePath
    registrar_identity: str
    blocked: frozenset[str] = frozenset()
    run_user: str = "mosquitto"
    dynsec_plugin: PurePath = DYNSEC_PLUGIN
    max_packet_size: int = 1 << 20
    #: Trace ACL denials (Mosquitto's debug log level: about 4 lines per routed QoS 1
    #: message, which the registrar reads and drops at about 2 us a line).
    log_acl_denials: bool = True
    #: Where Mosquitto keeps ``mosquitto.db`` (sessions, subscriptions, queued and retained
    #: messages), written only on SIGUSR1 and at exit (``autosave_interval 0``): the
    #: registrar saves it once its own persistent session has subscribed, so a Mosquitto
    #: restarted after a crash queues for the registrar from its first second
    #: (docs/broker.md, "What a Mosquitto crash loses"). None: no persistence.
    persistence_dir: PurePath | None = None

    def __post_init__(self) -> None:
        if _HOST.fullmatch(self.host) is None:
            raise InvalidValueError(f"bad listener host {self.host!r}")
        ports = (self.registration_port, self.operational_port, self.admin_port)
        for port in ports:
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise InvalidValueError(f"bad port {port!r}: must be 1..65535")
        if len(set(ports)) != len(ports):
            raise InvalidValueError("the three listeners need three different ports")
        for name in (
            "server_cert",
            "server_key",
            "registration_cas",
            "operational_cas",
            "registration_crl",
            "operational_crl",
            "registration_acl",
            "operational_acl",
            "dynsec_config",
            "dynsec_plugin",
        ):
            _check_path(name, getattr(self, name))
        if self.persistence_dir is not None:
            _check_path("persistence_dir", self.persistence_dir)
        if (
            _IDENTITY.fullmatch(self.registrar_identity) is None
            or "@" not in self.registrar_identity
        ):
            raise InvalidValueError(f"bad registrar identity {self.registrar_identity!r}")
        registrars = registrar_identities(self.registrar_identity)
        for name in self.blocked:
            if _IDENTITY.fullmatch(name) is None or name in registrars:
                raise InvalidValueError(f"bad blocked identity {name!r}")
        if _USER.fullmatch(self.run_user) is None:
            raise InvalidValueError(f"bad run_user {self.run_user!r}")
        if not 1024 <= self.max_packet_size <= 268_435_455:
            raise InvalidValueError("max_packet_size must be 1024..268435455")


def _check_path(name: str, path: PurePath) -> None:
    text = str(path)
    if not path.is_absolute():
        raise InvalidValueError(f"{name} must be an absolute path, not {text!r}")
    if any(c in text for c in "\r\n\x00") or text != text.strip():
        raise InvalidValueError(f"{name} contains a line break, NUL or edge whitespace")


def _template(name: str) -> Template:
    return Template(resources.files("broker_config").joinpath("templates", name).read_text())


def render_mosquitto_conf(config: MosquittoConfig) -> str:
    """The text of ``mosquitto.conf`` for ``config``."""
    return _template("mosquitto.conf.tmpl").substitute(
        host=config.host,
        registration_port=config.registration_port,
        operational_port=config.operational_port,
        admin_port=config.admin_port,
        server_cert=config.server_cert,
        server_key=config.server_key,
        registration_cas=config.registration_cas,
        operational_cas=config.operational_cas,
        registration_crl=config.registration_crl,
        operational_crl=config.operational_crl,
        registration_acl=config.registration_acl,
        operational_acl=config.operational_acl,
        dynsec_plugin=config.dynsec_plugin,
        dynsec_config=config.dynsec_config,
        max_packet_size=config.max_packet_size,
        run_user=config.run_user,
        acl_denial_log="log_type debug" if config.log_acl_denials else "# ACL denial trace off",
        persistence=_persistence(config.persistence_dir),
        tls_version=MIN_TLS_VERSION,
        tls12_ciphers=TLS12_CIPHERS,
        tls13_ciphersuites=TLS13_CIPHERSUITES,
    )


def _persistence(directory: PurePath | None) -> str:
    if directory is None:
        return "persistence false"
    # The trailing "/" is required: Mosquitto prepends the location to the file name.
    return f"persistence true\npersistence_location {directory}/\nautosave_interval 0"


def _blocked_section(config: MosquittoConfig) -> str:
    # A "deny" line in a user's own section wins over every pattern (Mosquitto 2.0 checks
    # the user's lines first and stops at a deny).
    return "".join(f"user {name}\ntopic deny #\n\n" for name in sorted(config.blocked))


def render_registration_acl(config: MosquittoConfig) -> str:
    """ACL of the registration listener: each device's request/response pair only."""
    return _template("registration_acl.tmpl").substitute(
        blocked=_blocked_section(config),
        register=REGISTRATION_PREFIX,
        request=REQUEST_LEVEL,
        response=RESPONSE_LEVEL,
    )


def render_operational_acl(config: MosquittoConfig) -> str:
    """ACL of the operational listener: the grants of every registrar instance identity
    (:func:`registrar_identities`), then ``devices/<id>/#``."""
    grants = "".join(
        f"user {name}\n"
        f"topic readwrite {REGISTRATION_PREFIX}/#\n"
        f"topic readwrite {DEVICE_PREFIX}/#\n\n"
        for name in registrar_identities(config.registrar_identity)
    )
    return _template("operational_acl.tmpl").substitute(
        registrars=grants, blocked=_blocked_section(config), devices=DEVICE_PREFIX
    )


@dataclass(frozen=True)
class ListenerTrust:
    """The PEM files each device listener needs, derived from the site's bundles."""

    registration_cas: bytes
    operational_cas: bytes
    registration_crls: bytes
    operational_crls: bytes


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


def _blocks(pem: bytes, label: bytes) -> list[bytes]:
    return [m.group(0) for m in _PEM_BLOCK.finditer(pem) if m.group(1) == label]


def listener_trust(registration_cas: bytes, operational_cas: bytes, crls: bytes) -> ListenerTrust:
    """Split the site's trust material per listener so that each listener admits leaves of
    its own issuers only.

    Mosquitto checks the leaf against the listener's CRL file (``X509_V_FLAG_CRL_CHECK``),
    and OpenSSL fails a leaf whose issuer has no CRL there. So the registration listener
    gets only the CRLs of the issuing CAs in ``registration_cas`` (the station CAs) and the
    operational listener only those of ``operational_cas`` (the site CA): a secondary
    certificate presented with its chain on the registration listener, or a factory
    certificate on the operational listener, is refused although both chains end at the
    same root. The operational CA file also carries the root(s) found in
    ``registration_cas``, because OpenSSL without partial-chain mode needs a self-signed
    anchor above the site CA. Raises ``InvalidValueError`` for unusable input: an empty
    bundle, a CA without a CRL (every leaf of it would be refused), unparsable PEM.
    """
    try:
        reg_certs = x509.load_pem_x509_certificates(registration_cas)
        op_certs = x509.load_pem_x509_certificates(operational_cas)
        crl_blocks = [(b, x509.load_pem_x509_crl(b)) for b in _blocks(crls, b"X509 CRL")]
    except ValueError as exc:
        raise InvalidValueError(f"unreadable CA bundle or CRL file: {exc}") from exc
    roots = [c for c in reg_certs if c.issuer == c.subject]
    reg_issuers = [c for c in reg_certs if c.issuer != c.subject]
    if not roots or not reg_issuers:
        raise InvalidValueError("registration CAs need a self-signed root and station CAs")
    if not op_certs:
        raise InvalidValueError("operational CAs are empty")

    def crls_of(issuers: list[x509.Certificate], listener: str) -> bytes:
        chosen = []
        for ca in issuers:
            found = [block for block, crl in crl_blocks if crl.issuer == ca.subject]
            if not found:
                raise InvalidValueError(
                    f"no CRL of {ca.subject.rfc4514_string()} for the {listener} listener"
                )
            chosen.extend(found)
        return b"".join(chosen)

    pem = serialization.Encoding.PEM
    op_anchor = [c for c in roots if c not in op_certs]
    return ListenerTrust(
        registration_cas=b"".join(c.public_bytes(pem) for c in reg_certs),
        operational_cas=b"".join(c.public_bytes(pem) for c in (*op_certs, *op_anchor)),
        registration_crls=crls_of(reg_issuers, "registration"),
        operational_crls=crls_of([c for c in op_certs if c.issuer != c.subject], "operational"),
    )
