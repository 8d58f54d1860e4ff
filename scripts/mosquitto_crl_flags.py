"""Which CRL checks does Mosquitto apply with ``crlfile``: the leaf only, or the whole chain
(X509_V_FLAG_CRL_CHECK_ALL)? An experiment, not product code (results: docs/broker.md and
/work/shared/PLATFORM-NOTES.md). Run as root (Mosquitto drops to the user ``mosquitto``):

    .venv/bin/python scripts/mosquitto_crl_flags.py

It makes a throwaway root -> site CA -> leaf chain in a private temporary directory (the
throwaway keys live only there and are removed at the end), starts Mosquitto once per CRL
file variant and connects with ``mosquitto_pub``.
"""

# ruff: noqa
import datetime as dt, subprocess, socket, time, os, sys, tempfile, shutil

_tmp = tempfile.mkdtemp(prefix="crl-flags-")
os.chmod(_tmp, 0o755)
os.chdir(_tmp)
from pathlib import Path
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

now = dt.datetime.now(dt.UTC)
D = dt.timedelta(days=1)


def key():
    return ec.generate_private_key(ec.SECP256R1())


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def cert(subj, pub, issuer, ikey, ca, san=None, serial=None):
    b = (
        x509.CertificateBuilder()
        .subject_name(name(subj))
        .issuer_name(name(issuer))
        .public_key(pub)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - D)
        .not_valid_after(now + 300 * D)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return b.sign(ikey, hashes.SHA256())


def crl(issuer, ikey, revoked=(), stale=False):
    b = x509.CertificateRevocationListBuilder().issuer_name(name(issuer))
    if stale:
        b = b.last_update(now - 30 * D).next_update(now - D)
    else:
        b = b.last_update(now - D).next_update(now + 7 * D)
    for s in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now - D).build()
        )
    return b.sign(ikey, hashes.SHA256())


pem = lambda o: o.public_bytes(serialization.Encoding.PEM)
rk, ck, lk, sk = key(), key(), key(), key()
root = cert("Root", rk.public_key(), "Root", rk, True)
ca = cert("Site CA", ck.public_key(), "Root", rk, True)
# a self-signed certificate with the site CA's name and key (an operational anchor)
anchor = cert("Site CA", ck.public_key(), "Site CA", ck, True)
leaf = cert("dev-1", lk.public_key(), "Site CA", ck, False)
server = cert("localhost", sk.public_key(), "Site CA", ck, False, san="localhost")
kpem = lambda k: k.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
Path("root.pem").write_bytes(pem(root))
Path("ca.pem").write_bytes(pem(ca))
Path("anchor.pem").write_bytes(pem(anchor))
Path("leaf.pem").write_bytes(pem(leaf) + pem(ca))
Path("leaf.key").write_bytes(kpem(lk))  # scratch keys, deleted after
Path("server.pem").write_bytes(pem(server) + pem(ca))
Path("server.key").write_bytes(kpem(sk))
import pwd

_u = pwd.getpwnam("mosquitto")
os.chmod("leaf.key", 0o600)
os.chmod("server.key", 0o600)
os.chown("server.key", _u.pw_uid, _u.pw_gid)

cases = {
    "A site CA CRL only (no root CRL), cafile root+CA": (
        pem(root) + pem(ca),
        pem(crl("Site CA", ck)),
    ),
    "B site CA CRL fresh + root CRL STALE": (
        pem(root) + pem(ca),
        pem(crl("Site CA", ck)) + pem(crl("Root", rk, stale=True)),
    ),
    "C site CA REVOKED in fresh root CRL, site CA CRL fresh": (
        pem(root) + pem(ca),
        pem(crl("Site CA", ck)) + pem(crl("Root", rk, [ca.serial_number])),
    ),
    "D site CA CRL STALE (sanity)": (pem(root) + pem(ca), pem(crl("Site CA", ck, stale=True))),
    "E leaf revoked in site CA CRL (sanity)": (
        pem(root) + pem(ca),
        pem(crl("Site CA", ck, [leaf.serial_number])),
    ),
    "F no CRL at all for site CA, root CRL only (sanity)": (
        pem(root) + pem(ca),
        pem(crl("Root", rk)),
    ),
    "G cafile = self-signed site CA anchor only, site CA CRL only": (
        pem(anchor),
        pem(crl("Site CA", ck)),
    ),
}


def port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


for label, (cas, crls) in cases.items():
    Path("cas.pem").write_bytes(cas)
    Path("crl.pem").write_bytes(crls)
    p = port()
    Path("m.conf").write_text(f"""per_listener_settings true
listener {p} 127.0.0.1
allow_anonymous false
cafile {Path("cas.pem").resolve()}
certfile {Path("server.pem").resolve()}
keyfile {Path("server.key").resolve()}
crlfile {Path("crl.pem").resolve()}
require_certificate true
use_identity_as_username true
log_dest stderr
log_type all
""")
    m = subprocess.Popen(
        ["mosquitto", "-c", "m.conf"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", p), 0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    r = subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "localhost",
            "-p",
            str(p),
            "--cafile",
            "root.pem",
            "--cert",
            "leaf.pem",
            "--key",
            "leaf.key",
            "-t",
            "t",
            "-m",
            "x",
            "-q",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    m.terminate()
    err = m.communicate(timeout=5)[1]
    why = [l for l in err.splitlines() if "OpenSSL" in l or "rror" in l or "ertificate" in l][:2]
    print(
        f"{label}: {'ACCEPTED' if r.returncode == 0 else 'REFUSED'} {r.stderr.strip()[:80]} | broker: {why}"
    )
for f in ("leaf.key", "server.key"):
    os.unlink(f)
os.chdir("/")
shutil.rmtree(_tmp, ignore_errors=True)
