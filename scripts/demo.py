"""The end-to-end demo on the embedded defaults: HQ → factory → HQ (and, as the product
grows, the building). Every step runs the real command a user would type; the demo only
supplies the simulated hardware (swtpm TPMs for the station and the devices).

Run with ``make demo``. Everything is written under ``.demo/`` (recreated each run).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from device_sim.device import vendor_ca_pem
from device_sim.swtpm import Swtpm, provision_ek_certificate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_building import run_building
from demo_later import run_years_later

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent
console = Console()
summary: list[tuple[str, str, str]] = []


def run(*args: object, expect: int = 0, quiet: bool = False) -> str:
    """Run one of the project's commands, show it, and return its standard output."""
    argv = [str(a) for a in args]
    shown = " ".join(a if len(a) < 60 else "…" + a[-40:] for a in argv)
    console.print(f"[dim]$ {shown.replace(str(WORK) + '/', '')}[/dim]")
    done = subprocess.run(  # noqa: S603 - our own commands, argv list, no shell
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=WORK, check=False
    )
    if done.returncode != expect:
        console.print(done.stdout, done.stderr, style="red")
        raise SystemExit(f"demo step failed: {shown} (exit {done.returncode})")
    if not quiet and done.stdout.strip():
        console.print(done.stdout.rstrip())
    if done.stderr.strip() and expect != 0:
        console.print(done.stderr.rstrip(), style="yellow")
    return done.stdout


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def main() -> None:
    started = time.perf_counter()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    os.environ["DEVTRUST_HQ_PASSPHRASE"] = secrets.token_urlsafe(24)
    os.environ.setdefault("TSS2_LOG", "all+NONE")

    step("1. HQ: manufacturer root CA and role keys (encrypted keystore)")
    run("hq", "init", "--home", WORK / "hq", "--org", "Acme Devices")
    root = WORK / "hq" / "certs" / "root-ca.pem"

    step("2. TPM vendor: an EK certificate authority for the device TPMs (swtpm_localca)")
    provision_ek_certificate(WORK / "vendor-probe-tpm", ca_dir=WORK / "tpm-vendor")
    (WORK / "tpm-vendor.pem").write_bytes(vendor_ca_pem(WORK / "tpm-vendor"))

    station_tpm = Swtpm(WORK / "station-tpm").start()
    try:
        _factory_and_hq(station_tpm, root)
        run_building(WORK, run, step, summary, station_tpm.tcti, console)
        run_years_later(WORK, step, summary, station_tpm.tcti, console)
        _openssl_years_later(root)
    finally:
        station_tpm.stop()
    _summary(started)


def _factory_and_hq(station_tpm: Swtpm, root: Path) -> None:
    step("3. Factory station: CA and transport keys created inside the station TPM")
    run(
        "factory-station", "init", "--home", WORK / "station", "--station-id", "station-01",
        "--tcti", station_tpm.tcti, "--root", root, "--tpm-vendor-ca", WORK / "tpm-vendor.pem",
        "--enrolment-out", WORK / "enrolment.cbor",
    )  # fmt: skip

    step("4. HQ enrols the station and issues an entitlement (quota 20, 10 per day)")
    run("hq", "enrol-station", "--home", WORK / "hq", WORK / "enrolment.cbor")
    # A tampered request (the CSR's signature algorithm OID one byte off) is refused in one
    # line, exit 1, nothing stored: hostile input never ends in a traceback (docs/hq.md).
    oid = bytes.fromhex("06082a8648ce3d040302")  # ecdsa-with-SHA256
    tampered = (WORK / "enrolment.cbor").read_bytes().replace(oid, oid[:-1] + b"\x09", 1)
    (WORK / "enrolment-tampered.cbor").write_bytes(tampered)
    run("hq", "enrol-station", "--home", WORK / "hq", WORK / "enrolment-tampered.cbor", expect=1)
    summary.append(("tampered enrolment", "refused", "malformed, one line, no traceback"))
    now = datetime.now(UTC)
    # A product secret (e.g. a firmware-update HMAC key) that every device gets in its TPM.
    fw_key = secrets.token_bytes(32)
    (WORK / "fw-key.bin").write_bytes(fw_key)
    run(
        "hq", "entitle", "--home", WORK / "hq", "--station", "station-01",
        "--product", "thermostat", "--quota", "20", "--daily-limit", "10",
        "--timezone", "UTC", "--not-before", (now - timedelta(hours=1)).isoformat(),
        "--not-after", (now + timedelta(days=30)).isoformat(), "--id-prefix", "TH-",
        "--id-first", "0", "--id-last", "999", "--id-digits", "6",
        "--secret", f"fw-key=@{WORK / 'fw-key.bin'}",
        "--out", WORK / "entitlement.sealed",
    )  # fmt: skip
    run("factory-station", "import-entitlement", "--home", WORK / "station",
        WORK / "entitlement.sealed")  # fmt: skip
    summary.append(("entitlement", "imported", "signed by HQ, opened in the station TPM"))

    step("5. Provision 10 devices, each with its own TPM (swtpm + EK certificate)")
    out = run(
        "device-sim", "build-fleet", "--station", WORK / "station", "--keys", "tpm",
        "--count", "10", "--out", WORK / "devices", "--ek-ca-dir", WORK / "tpm-vendor",
        "--workers", "2",
    )  # fmt: skip
    summary.append(("devices provisioned", "10", out.strip().splitlines()[-1]))

    step("5b. A device proves it holds the product secret: HMAC inside its own TPM")
    challenge = secrets.token_bytes(16)
    mac = run("device-sim", "secret-hmac", WORK / "devices" / "dev-00000", "--name", "fw-key",
              "--challenge", challenge.hex())  # fmt: skip
    expected = hmac.new(fw_key, challenge, hashlib.sha256).hexdigest()
    if mac.strip() != expected:
        raise SystemExit("demo failed: the device's TPM HMAC does not match the secret")
    console.print("HQ checks it with the secret it issued: match")
    summary.append(("product secret", "in device TPM", "imported HMAC key, proven by HMAC"))

    step("6. An 11th device the same day is refused by the entitlement's daily limit")
    run(
        "device-sim", "build-fleet", "--station", WORK / "station", "--keys", "tpm",
        "--count", "1", "--out", WORK / "devices", "--ek-ca-dir", WORK / "tpm-vendor", expect=2,
    )  # fmt: skip
    summary.append(("11th device", "refused", "over_daily_limit, no counter slot used"))

    step("7. Audit log exported (signed in the station TPM, encrypted to HQ)")
    run("factory-station", "export-audit", "--home", WORK / "station",
        "--out", WORK / "audit-1.sealed")  # fmt: skip

    step("8. HQ verifies the chain of the audit log and reconciles it with the entitlement")
    run("hq", "ingest-audit", "--home", WORK / "hq", WORK / "audit-1.sealed")
    run("hq", "ingest-audit", "--home", WORK / "hq", WORK / "audit-1.sealed", expect=2)
    summary.append(("audit export", "clean", "chain intact, policy held; replay refused"))

    step("9. OpenSSL checks every factory certificate against the root and the station CA")
    certs = sorted((WORK / "devices").rglob("idevid.pem"))
    ok = 0
    for cert in certs:
        argv = ["/usr/bin/openssl", "verify", "-x509_strict", "-purpose", "sslclient"]
        argv += ["-CAfile", str(root), "-untrusted", str(cert.parent / "chain.pem"), str(cert)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
        ok += done.returncode == 0
    console.print(f"openssl verify: {ok} of {len(certs)} factory certificates OK")
    summary.append(("openssl verify", f"{ok}/{len(certs)}", "IDevID chain to the root"))

    if ok != len(certs) or len(certs) != 10:
        raise SystemExit("demo failed: not every factory certificate verified")


def _openssl_years_later(root: Path) -> None:
    """Standard tools agree: every factory certificate the demo made verifies five years
    from now (the station CA outlives its entitlement), and a counterfeit HQ revoked is
    reported revoked with HQ's indirect CRL (docs/pki.md)."""
    step("15. OpenSSL, five years from now, and on the counterfeits HQ revoked")
    later = int((datetime.now(UTC) + timedelta(days=5 * 365)).timestamp())
    certs = sorted((WORK / "devices").rglob("idevid.pem"))
    ok = 0
    for cert in certs:
        argv = ["/usr/bin/openssl", "verify", "-attime", str(later), "-purpose", "sslclient"]
        argv += ["-CAfile", str(root), "-untrusted", str(cert.parent / "chain.pem"), str(cert)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
        ok += done.returncode == 0 and done.stdout.strip().endswith("OK")
    console.print(f"openssl verify -attime +5 years: {ok} of {len(certs)} factory certificates OK")
    summary.append(("openssl at +5 years", f"{ok}/{len(certs)}", "every factory certificate OK"))
    if ok != len(certs) or not certs:
        raise SystemExit("demo failed: a factory certificate does not verify at +5 years")
    revoked = _counterfeits_revoked(root)
    summary.append(("openssl -crl_check_all", f"{revoked} revoked",
                    "counterfeits HQ revoked, with HQ's indirect CRL"))  # fmt: skip


def _counterfeits_revoked(root: Path) -> int:
    """``openssl verify -extended_crl -crl_check_all`` on each counterfeit HQ revoked, with
    the root CRL and the HQ indirect CRL its revocation list carries."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from trustcore.revocation import open_revocation_list

    root_cert = x509.load_pem_x509_certificate(root.read_bytes())
    hq_list = open_revocation_list(
        (WORK / "revocations.sealed").read_bytes(), root=root_cert, now=datetime.now(UTC),
        root_crl=None, not_older_than=None,
    )  # fmt: skip
    if hq_list.hq_crl is None or hq_list.crl_signer is None or hq_list.root_crl is None:
        raise SystemExit("demo failed: HQ's revocation list carries no indirect CRL")
    files = WORK / "openssl"
    files.mkdir(exist_ok=True)
    pems = {
        "crl-signer.pem": x509.load_der_x509_certificate(hq_list.crl_signer),
        "root-crl.pem": x509.load_der_x509_crl(hq_list.root_crl),
        "hq-indirect-crl.pem": x509.load_der_x509_crl(hq_list.hq_crl),
    }
    for name, obj in pems.items():
        (files / name).write_bytes(obj.public_bytes(Encoding.PEM))
    revoked = 0
    fakes = sorted((WORK / "counterfeits").glob("TH-*.pem"))
    for fake in fakes:
        argv = ["/usr/bin/openssl", "verify", "-extended_crl", "-crl_check_all"]
        argv += ["-CAfile", str(root), "-untrusted", str(WORK / "counterfeits" / "station-ca.pem")]
        argv += ["-untrusted", str(files / "crl-signer.pem")]
        argv += ["-CRLfile", str(files / "root-crl.pem"), "-CRLfile"]
        argv += [str(files / "hq-indirect-crl.pem"), str(fake)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
        said = (done.stdout + done.stderr).strip().splitlines()
        console.print(f"{fake.name}: {said[-2] if len(said) > 1 else said[-1]}")
        revoked += "certificate revoked" in done.stdout + done.stderr
    if revoked != len(fakes) or not fakes:
        raise SystemExit("demo failed: openssl did not report the counterfeits as revoked")
    return revoked


def _summary(started: float) -> None:
    table = Table(title=f"devtrust demo — {time.perf_counter() - started:.1f} s")
    table.add_column("step")
    table.add_column("result", style="bold green")
    table.add_column("detail")
    for row in summary:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
