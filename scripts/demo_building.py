"""The building half of the demo: a site is commissioned from an HQ bundle, the registrar
runs (embedded amqtt broker), the devices made at the factory register with their
TPM-held keys, reconnect with their secondary certificates, send AES-GCM telemetry that
the registrar decrypts, and one device is revoked and cut off while the others stay. Then
the counterfeit story: someone who owns the station box signs 3 extra factory certificates
with its TPM key (no audit record); they register; the site report reaches HQ, which finds
them in no audit log, revokes them in its signed list; the site imports it and they are cut
off while the genuine devices stay connected.

Every device's mutual TLS is its own: the IDevID with the factory key on the registration
listener, the LDevID with its key on the operational one, both keys inside the device's
swtpm (OpenSSL calls TPM2_Sign for each handshake, ``signers.tpm_tls``). So revocation
works at the handshake too: the revoked device's next TLS handshake is refused by the
broker's CRL check.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from device_sim.client import (
    DeviceClient,
    DeviceCredentials,
    SoftwareKeys,
    TpmKeys,
)
from device_sim.device import SimDevice
from registrar.site import SiteHome, SiteSecrets, load_commissioned_site
from signers.software import SoftwareKey
from signers.tpm import Tpm, TpmKey
from trustcore.endpoint import Endpoint
from trustcore.identity import DeviceId
from trustcore.profiles import (
    device_id_from_certificate,
    issue_factory_certificate,
)

Run = Callable[..., str]


async def _fleet(
    devices: list[SimDevice],
    root: x509.Certificate,
    reg: Endpoint,
    op: Endpoint,
    revoke: Callable[[str], str],
    counterfeit: Callable[[], Any],
    console: Any,
) -> dict[str, Any]:
    tpms = [Tpm(d.tcti) for d in devices]
    clients: list[DeviceClient] = []
    for dev, tpm in zip(devices, tpms, strict=True):
        cert = dev.certificate()
        assert cert is not None
        chain = (x509.load_pem_x509_certificate((dev.directory / "chain.pem").read_bytes()),)
        key = TpmKey.load(tpm, dev.directory / "device-key.tss.pem")
        device_id = device_id_from_certificate(cert)
        creds = DeviceCredentials(device_id, cert, chain, key, (root,))
        clients.append(DeviceClient(creds, TpmKeys(tpm)))
    started = time.perf_counter()
    await asyncio.gather(*(c.register(reg) for c in clients))
    register_s = time.perf_counter() - started
    console.print(f"{len(clients)} devices registered in {register_s:.2f} s")

    victim = clients[2]
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        sessions: dict[str, Any] = {}
        gone: dict[str, float] = {}

        async def live(client: DeviceClient) -> None:
            name = client.device_id.value
            try:
                async with client.operational(op) as session:
                    sessions[name] = session
                    seq = 0
                    while not stop.is_set():
                        await session.publish_telemetry(
                            json.dumps({"seq": seq, "temp_c": 21.5}).encode()
                        )
                        seq += 1
                        await asyncio.sleep(0.2)
            except aiomqtt.MqttError:  # the revoked device's session is cut
                gone[name] = time.perf_counter()

        for c in clients:
            group.create_task(live(c))
        while len(sessions) < len(clients):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        console.print(f"revoking {victim.device_id} while all {len(clients)} are connected")
        t0 = time.perf_counter()
        revoke(victim.device_id.value)
        while victim.device_id.value not in gone and time.perf_counter() - t0 < 10:
            await asyncio.sleep(0.02)
        cut_s = gone.get(victim.device_id.value, float("inf")) - t0
        refused = await _handshake_refused(op, victim.operational_context())
        console.print(
            f"{victim.device_id} reconnects with its TPM-held LDevID key: "
            + ("handshake refused (the broker's CRL lists it)" if refused else "ADMITTED")
        )
        await asyncio.sleep(1.0)
        still = [c.device_id.value for c in clients if c.device_id.value not in gone]
        fakes = await counterfeit()
        genuine_after = [c.device_id.value for c in clients if c.device_id.value not in gone]
        stop.set()  # the sessions end cleanly; the task group waits for them
    for tpm in tpms:
        tpm.close()
    return {
        "registered": len(clients),
        "register_s": register_s,
        "victim": victim.device_id.value,
        "cut_s": cut_s,
        "handshake_refused": refused,
        "still_connected": len(still),
        "counterfeit": fakes,
        "genuine_after": len(genuine_after),
    }


async def _handshake_refused(endpoint: Endpoint, ctx: ssl.SSLContext) -> bool:
    """True if a TLS 1.2 handshake with ``ctx`` fails: the certificate check refused it."""
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        _, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=ctx)
    except (ssl.SSLError, ConnectionError):
        return True
    writer.close()
    return False


def _mint_counterfeits(
    station_tcti: str, station_home: Path, station_ca: x509.Certificate, root: x509.Certificate,
    count: int,
) -> list[DeviceClient]:  # fmt: skip
    """An attacker who owns the station box uses its TPM key directly, outside the station
    software: valid factory certificates that no audit log records. They copy a genuine
    certificate's profile, CRL distribution point included; written to .demo/counterfeits/
    for the OpenSSL check at the end."""
    now = datetime.now(UTC)
    out = []
    work = station_home.parent
    genuine = x509.load_pem_x509_certificate(
        next((work / "devices").rglob("idevid.pem")).read_bytes()
    )
    extra: dict[str, Any] = {}
    try:
        crldp = genuine.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        issuer = crldp[0].crl_issuer
        if issuer and isinstance(issuer[0], x509.DirectoryName):
            extra["crl_issuer"] = issuer[0].value  # HQ's CRL signer names the CRL
    except x509.ExtensionNotFound:
        pass
    fakes_dir = work / "counterfeits"
    fakes_dir.mkdir(exist_ok=True)
    (fakes_dir / "station-ca.pem").write_bytes(station_ca.public_bytes(Encoding.PEM))
    with Tpm(station_tcti) as tpm:
        station_key = TpmKey.load(tpm, station_home / "station-ca.tss.pem")
        for n in range(count):
            key = SoftwareKey.ephemeral()
            device_id = DeviceId(f"TH-{900 + n:06d}")
            cert = issue_factory_certificate(
                station_ca, station_key.private_key(), key.public_key(), device_id=device_id,
                manufacturer="Acme Devices", not_before=now - timedelta(minutes=5), **extra,
            )  # fmt: skip
            (fakes_dir / f"{device_id.value}.pem").write_bytes(cert.public_bytes(Encoding.PEM))
            creds = DeviceCredentials(device_id, cert, (station_ca,), key, (root,))
            out.append(DeviceClient(creds, SoftwareKeys()))
    return out


async def _counterfeit_story(
    work: Path, run: Run, station_tcti: str, root: x509.Certificate, station_ca: x509.Certificate,
    reg: Endpoint, op: Endpoint, console: Any,
) -> dict[str, Any]:  # fmt: skip
    site, hq = work / "site", work / "hq"
    console.rule("[bold]13. A thief uses the station's TPM key outside its software: counterfeits")
    fakes = _mint_counterfeits(station_tcti, work / "station", station_ca, root, 3)
    await asyncio.gather(*(f.register(reg) for f in fakes))
    console.print(f"{len(fakes)} counterfeit devices (valid chain, no audit record) registered")
    cut: dict[str, float] = {}
    live = asyncio.Event()
    connected: set[str] = set()

    async def session(fake: DeviceClient) -> None:
        try:
            async with fake.operational(op) as s:
                connected.add(fake.device_id.value)
                while True:
                    await s.publish_telemetry(b'{"temp_c": 99}')
                    await asyncio.sleep(0.2)
        except aiomqtt.MqttError:
            cut[fake.device_id.value] = time.perf_counter()
        finally:
            live.set()

    tasks = [asyncio.create_task(session(f)) for f in fakes]
    while len(connected) < len(fakes):
        await asyncio.sleep(0.05)
    report = work / "site-report.sealed"
    await asyncio.to_thread(run, "registrar", "report", "--home", site, "--out", report)
    found = await asyncio.to_thread(
        run, "hq", "ingest-report", "--home", hq, report, "--json", expect=1, quiet=True
    )
    (work / "findings.json").write_text(found)
    findings = json.loads(found.strip().splitlines()[-1])
    flagged = sorted(f["device_id"] for f in findings["findings"] if f["kind"] == "counterfeit")
    console.print(f"HQ cross-check flags as counterfeit: {', '.join(flagged)}")
    await asyncio.to_thread(
        run, "hq", "revoke", "--home", hq, "--from-report", work / "findings.json",
        "--out", work / "revocations.sealed",
    )  # fmt: skip
    # Timed from the site's side: the sealed revocations travel from HQ to the building
    # (a file, any time later); the cut counts from the installer's import command.
    t0 = time.perf_counter()
    await asyncio.to_thread(
        run, "registrar", "import-revocations", "--home", site, work / "revocations.sealed"
    )
    while len(cut) < len(fakes) and time.perf_counter() - t0 < 15:
        await asyncio.sleep(0.05)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    worst = max(cut.values(), default=float("inf")) - t0
    return {"flagged": flagged, "cut": len(cut), "cut_s": worst}


def _operations(endpoint: dict[str, Any]) -> dict[str, Any]:
    """Read the registrar's Prometheus endpoint and health check, as a monitoring system
    would (docs/operations.md)."""
    import urllib.error
    import urllib.request

    base = f"http://{endpoint['host']}:{endpoint['port']}"
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as page:  # noqa: S310 - loopback
        text = page.read().decode()
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as page:  # noqa: S310
            health = json.loads(page.read())["status"]
    except urllib.error.HTTPError as exc:  # 503: a check failed
        health = json.loads(exc.read())["failing"]
    values = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
    prefix = "devtrust_registrar_"
    return {
        "registered": sum(float(v) for k, v in values if k == f"{prefix}registrations_total"),
        "refused": sum(float(v) for k, v in values if k.startswith(f"{prefix}refusals_total")),
        "health": health,
    }


def _tls_policy(endpoint: Endpoint) -> str:
    """What a plain `openssl s_client` gets from the registration listener: the version and
    suite it negotiates, and whether TLS 1.1 and a CBC suite are refused (docs/broker.md)."""

    def hello(*args: str) -> str:
        done = subprocess.run(  # noqa: S603 - fixed argv
            ["openssl", "s_client", "-connect", f"{endpoint.host}:{endpoint.port}", *args],  # noqa: S607
            input=b"", capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        out = done.stdout.decode(errors="replace")
        line = next((x for x in out.splitlines() if x.startswith("New, ")), "")
        return line.removeprefix("New, ").split(", Cipher is ")[0] if line else "?"

    best = hello()
    old = hello("-tls1_1")
    cbc = hello("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")
    refused = "refused" if old == cbc == "(NONE)" else "ACCEPTED"
    return f"{best} negotiated; TLS 1.1 and CBC {refused}"


def run_building(
    work: Path, run: Run, step: Callable[[str], None], summary: list[tuple[str, str, str]],
    station_tcti: str, console: Any,
) -> None:  # fmt: skip
    os.environ["DEVTRUST_SITE_PASSPHRASE"] = os.environ["DEVTRUST_HQ_PASSPHRASE"] + "-site"
    hq, site = work / "hq", work / "site"
    root = hq / "certs" / "root-ca.pem"

    step("10. Installer: the site registrar makes its site CA key; HQ signs it and bundles trust")
    run("registrar", "init", "--home", site, "--site-id", "site-01", "--root", root,
        "--org", "Tower One")  # fmt: skip
    enrolment = next(site.glob("*enrol*"))
    run("hq", "site", "enrol", "--home", hq, enrolment)
    run("hq", "site", "bundle", "--home", hq, "--site", "site-01",
        "--admit-station", "station-01", "--out", work / "site-bundle.sealed")  # fmt: skip
    run("registrar", "commission", "--home", site, work / "site-bundle.sealed")
    summary.append(("site commissioned", "site-01", "bundle verified; payload key kept sealed"))

    step("11. The registrar runs: embedded amqtt broker, two mutual-TLS listeners, and EST")
    log = (work / "registrar.log").open("wb")
    proc = subprocess.Popen(  # noqa: S603 - our own command
        [str(Path(sys.executable).parent / "registrar"), "run", "--home", str(site),
         "--registration-port", "0", "--operational-port", "0", "--est-port", "0",
         "--crl-check-interval", "5", "--metrics-port", "0"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        status = _wait_status(site, proc)
        reg = Endpoint(**status["listeners"]["registration"])
        op = Endpoint(**status["listeners"]["operational"])
        console.print(
            f"registration listener {reg.host}:{reg.port}, operational {op.host}:{op.port}"
        )
        _est_cacerts(Endpoint(**status["listeners"]["est"]), root, step, summary, console)
        policy = _tls_policy(reg)
        console.print(f"TLS policy (openssl s_client): {policy}")
        summary.append(("broker TLS policy", "1.2+ AEAD", policy))

        step("12. Devices register (TPM-signed requests), reconnect, send encrypted telemetry")
        devices = [SimDevice(d) for d in sorted((work / "devices").iterdir())]
        devices = [d for d in devices if d.certificate() is not None]
        commissioned = load_commissioned_site(SiteHome.open(site), SiteSecrets())
        station_ca = x509.load_pem_x509_certificate(
            (devices[0].directory / "chain.pem").read_bytes()
        )
        for d in devices:
            d.power_on()
        try:
            result = asyncio.run(
                _fleet(
                    devices, commissioned.root, reg, op,
                    lambda dev: run("registrar", "revoke", "--home", site, dev,
                                    "--reason", "key_compromise"),
                    lambda: _counterfeit_story(work, run, station_tcti, commissioned.root,
                                               station_ca, reg, op, console),
                    console,
                )
            )  # fmt: skip
        finally:
            for d in devices:
                d.power_off()
        status = json.loads(run("registrar", "status", "--home", site, "--json", quiet=True))
        ops = _operations(status["instance"]["metrics"])
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    instance = status.get("instance") or {}
    telemetry = instance.get("telemetry", {"messages": 0, "rejected": 0})
    messages = telemetry["messages"]
    registered, took = result["registered"], result["register_s"]
    rejected = telemetry["rejected"]
    cut, still = result["cut_s"], result["still_connected"]
    summary.append(("registered", f"{registered}", f"LDevID + wrapped AES key, {took:.2f} s"))
    summary.append(("encrypted telemetry", f"{messages} msgs", f"decrypted; {rejected} rejected"))
    summary.append(("revoked device", result["victim"], f"cut after {cut:.2f} s; {still} stay; "
                    "its TLS handshake refused (CRL)"))  # fmt: skip
    fakes = result["counterfeit"]
    summary.append(("counterfeit devices", f"{len(fakes['flagged'])} flagged",
                    f"HQ revoked them; cut {fakes['cut_s']:.2f} s after the site's import; "
                    f"{result['genuine_after']} genuine stay"))  # fmt: skip
    if len(fakes["flagged"]) != 3 or fakes["cut"] != 3 or fakes["cut_s"] > 5:
        raise SystemExit("demo failed: the counterfeit devices were not all found and cut off")
    if result["genuine_after"] != result["registered"] - 1:
        raise SystemExit("demo failed: a genuine device lost its session")
    if not result["handshake_refused"]:
        raise SystemExit("demo failed: the revoked LDevID still completes a TLS handshake")
    if not (result["cut_s"] < 5 and result["still_connected"] == result["registered"] - 1):
        raise SystemExit("demo failed: revocation did not cut exactly the revoked device")
    if messages == 0:
        raise SystemExit("demo failed: no telemetry reached the registrar")
    summary.append(("metrics, health", f"{ops['registered']:.0f} registrations",
                    f"{ops['refused']:.0f} refusals; /healthz {ops['health']}"))  # fmt: skip
    if ops["registered"] < registered:
        raise SystemExit("demo failed: /metrics does not count the registrations")


def _est_cacerts(
    est: Endpoint, root: Path, step: Callable[[str], None],
    summary: list[tuple[str, str, str]], console: Any,
) -> None:  # fmt: skip
    """EST (RFC 7030, docs/est.md): a plain curl, trusting only the manufacturer root, gets
    the site's CA certificates. (Enrolment with curl/pki needs the device key in a file:
    tests/registrar/test_est.py; these devices' keys stay in their TPMs.)"""
    step("11b. EST listener (RFC 7030): plain curl fetches the site CA certificates")
    url = f"https://{est.host}:{est.port}/.well-known/est/cacerts"
    console.print(f"[dim]$ curl --cacert hq/certs/root-ca.pem {url}[/dim]")
    fetched = subprocess.run(  # noqa: S603 - fixed argv, no shell
        ["curl", "-sS", "--cacert", str(root), url],  # noqa: S607 - curl from PATH
        capture_output=True,
        check=False,
    )
    if fetched.returncode != 0:
        raise SystemExit(f"demo failed: EST cacerts: {fetched.stderr.decode().strip()}")
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(fetched.stdout))
    for cert in certs:
        console.print(f"  {cert.subject.rfc4514_string()}")
    summary.append(("EST listener", f"{len(certs)} CA certs", "curl /cacerts (PKCS#7)"))


def _wait_status(site: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    path = site / "run" / "status.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("demo failed: the registrar stopped (see .demo/registrar.log)")
        try:
            doc = json.loads(path.read_text())
            if doc.get("connected"):
                return dict(doc)
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit("demo failed: the registrar did not come up (see .demo/registrar.log)")
