"""TLS policy of both brokers, proved with a real client (``openssl s_client``).

Both brokers must: refuse TLS 1.1 and CBC suites; accept TLS 1.3 and TLS 1.2 with
AES-GCM; not resume, after a revocation, a TLS session that a now-revoked certificate
opened; tell a refused client why with a TLS alert; and start their child processes with a
scrubbed environment (Mosquitto: ``/proc/PID/environ``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_config.tls_policy import TLS12_CIPHERS
from registrar.broker.embedded import EmbeddedBroker
from registrar.broker.mosquitto import MosquittoBroker
from registrar.errors import BrokerError
from tests.fixtures.mosquitto_site import CONNECT, ClientCert, Site, build_site
from tests.fixtures.pki import Pki, pem

CONNACK_OK = b"\x20\x02\x00\x00"
Broker = MosquittoBroker | EmbeddedBroker


@pytest.fixture(scope="module")
def site(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Site:
    return build_site(pki, tmp_path_factory.mktemp("tls-policy-site"))


@pytest.fixture(params=["mosquitto", "embedded"])
async def broker(request: pytest.FixtureRequest, site: Site) -> AsyncIterator[Broker]:
    site.write_crls()
    kind = MosquittoBroker if request.param == "mosquitto" else EmbeddedBroker
    b: Broker = kind(site.settings)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@dataclass(frozen=True)
class Handshake:
    connected: bool  # CONNACK 0 received over the TLS session
    version: str  # "TLSv1.3", "TLSv1.2", "(NONE)"
    cipher: str
    reused: bool
    output: str


_SESSION = re.compile(r"^(New|Reused), (\S+), Cipher is (\S+)", re.M)


async def s_client(
    site: Site, port: int, cert: ClientCert, *args: str, timeout: float = 8
) -> Handshake:
    """One ``openssl s_client`` connection that sends an MQTT CONNECT and waits for the
    CONNACK (accepted) or the end of the connection (refused)."""
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        str(site.root),
        "-cert",
        str(cert.cert),
        "-key",
        str(cert.key),
        "-nocommands",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(CONNECT)
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while CONNACK_OK not in out:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            rest, _ = await asyncio.wait_for(proc.communicate(), timeout)
            out += rest or b""
    text = out.decode("latin-1")
    session = _SESSION.search(text)
    kind, version, cipher = session.groups() if session else ("New", "(NONE)", "(NONE)")
    return Handshake(CONNACK_OK in out, version, cipher, kind == "Reused", text)


async def test_tls_versions_and_suites(
    site: Site, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registrar.broker")
    port = broker.operational_endpoint.port
    cert = site.ldevid["dev-a"]
    old = await s_client(site, port, cert, "-tls1_1")
    assert not old.connected and old.version == "(NONE)"
    assert re.search(r"alert protocol version|no protocols available", old.output), old.output
    if isinstance(broker, EmbeddedBroker):
        # the registrar's log says so, and why. (Mosquitto 2.0.11 writes its own line for
        # this refusal in about one run of three: docs/broker.md; the alert is what counts.)
        async with asyncio.timeout(5):
            while "refused a TLS handshake" not in caplog.text:
                await asyncio.sleep(0.01)
        assert re.search(r"unsupported.protocol", caplog.text, re.I), caplog.text
    cbc = await s_client(site, port, cert, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")
    assert not cbc.connected and "alert handshake failure" in cbc.output, cbc.output
    cbc256 = await s_client(site, port, cert, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384")
    assert not cbc256.connected
    gcm = await s_client(site, port, cert, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert gcm.connected and (gcm.version, gcm.cipher) == (
        "TLSv1.2",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
    )
    best = await s_client(site, port, cert)  # no preference from the client
    assert best.connected and best.version == "TLSv1.3", best.output
    assert best.cipher in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
    reg = await s_client(site, broker.registration_endpoint.port, site.idevid["dev-a"], "-tls1_1")
    assert not reg.connected  # the registration listener has the same policy


def test_policy_lists_only_aead_suites() -> None:
    for suite in TLS12_CIPHERS.split(":"):
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20-POLY1305" in suite)


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
async def test_a_revoked_ldevid_cannot_resume_its_session(
    site: Site, broker: Broker, version: str, tmp_path: Path
) -> None:
    port = broker.operational_endpoint.port
    cert, session = site.ldevid["dev-c"], tmp_path / "session.pem"
    first = await s_client(site, port, cert, version, "-sess_out", str(session))
    assert first.connected and not first.reused
    if isinstance(broker, EmbeddedBroker):
        # Nothing to resume at all: no ticket (TLS 1.3), an empty session id and no server
        # cache (TLS 1.2), so s_client has no resumable session to save.
        assert not session.exists()
    else:
        # Mosquitto 2.0.11 resumes (no setting turns it off) until its next reload ...
        again = await s_client(site, port, cert, version, "-sess_in", str(session))
        assert again.connected and again.reused, again.output
    site.write_crls(revoked=("dev-c",), number=2)
    await broker.reload_crls()  # ... which builds new TLS contexts: cache and ticket key gone
    try:
        if session.exists():
            resumed = await s_client(site, port, cert, version, "-sess_in", str(session))
        else:
            resumed = await s_client(site, port, cert, version)
        assert not resumed.reused and not resumed.connected, resumed.output
        assert "alert certificate revoked" in resumed.output, resumed.output
        other = await s_client(site, port, site.ldevid["dev-b"], version)
        assert other.connected  # everyone else still gets in
    finally:
        site.write_crls(number=3)


async def test_refused_handshake_gets_an_alert_and_a_log_line(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded broker sends the alert (asyncio used to drop it) and logs the reason."""
    site.write_crls(revoked=("dev-b",), number=4)
    broker = EmbeddedBroker(site.settings)
    await broker.start()
    try:
        with caplog.at_level(logging.WARNING, logger="registrar.broker.embedded"):
            port = broker.operational_endpoint.port
            for version in ("-tls1_2", "-tls1_3"):
                refused = await s_client(site, port, site.ldevid["dev-b"], version)
                assert not refused.connected
                assert "alert certificate revoked" in refused.output, refused.output
        assert "refused a TLS handshake: client certificate: certificate revoked" in caplog.text
    finally:
        await broker.stop()
        site.write_crls(number=5)


async def test_mosquitto_gets_no_secret_in_its_environment(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "site-passphrase-must-stay-home"
    for name in ("DEVTRUST_SITE_PASSPHRASE", "DEVTRUST_HQ_PASSPHRASE", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, secret)
    monkeypatch.setenv("SOME_UNKNOWN_SETTING", "x")
    site.write_crls(number=6)
    broker = MosquittoBroker(site.settings)
    await broker.start()
    try:
        assert broker.pid is not None
        # setpriv execs mosquitto in place: the pid is Mosquitto's own.
        assert Path(f"/proc/{broker.pid}/comm").read_text().strip() == "mosquitto"
        raw = Path(f"/proc/{broker.pid}/environ").read_bytes()
    finally:
        await broker.stop()
    env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if item)
    assert secret.encode() not in raw
    assert b"SOME_UNKNOWN_SETTING" not in env  # an allow-list, not a deny-list
    assert env[b"PATH"] == os.environ["PATH"].encode()


async def test_a_station_without_crl_is_explained_to_the_operator_and_the_device(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """HQ holds no CRL of the station: its devices are refused (fail closed) with an alert,
    and the registrar's log says why, at start and at each refusal."""
    site.write_crls(number=7)
    crls = site.settings.tls.crl_file.read_bytes()
    site.settings.tls.crl_file.write_bytes(crls.replace(pem(site.pki.station_crl), b""))
    broker = EmbeddedBroker(site.settings)
    try:
        with caplog.at_level(logging.WARNING, logger="registrar.broker.embedded"):
            await broker.start()
            port = broker.registration_endpoint.port
            refused = await s_client(site, port, site.idevid["dev-a"])
        assert not refused.connected and "alert unknown ca" in refused.output, refused.output
        assert "the registration listener refuses its devices" in caplog.text
        assert "the site holds no CRL of its issuer" in caplog.text
        # Mosquitto will not start on such a file at all, and says which CA lacks its CRL.
        with pytest.raises(BrokerError, match=r"no CRL of .* for the registration listener"):
            await MosquittoBroker(site.settings).start()
    finally:
        await broker.stop()
        site.write_crls(number=8)
