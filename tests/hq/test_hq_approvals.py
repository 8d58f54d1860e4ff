"""HQ quorum approvals: the CLI flow with files (approver keys, the approver set, requests,
signing, gated entitlements), the online endpoint on a real loopback server, and the gates
for station CA revocation and payload-key export."""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hq.approval_server import running_server
from hq.approvals import (
    EXPORT_PAYLOAD_KEY,
    REVOKE_STATION_CA,
    QuorumRefused,
    add_approver,
    authorize,
    authorize_station_ca_revocation,
    bundle_from_db,
    create_request,
    revoke_station_ca_params,
    site_bundle_params,
)
from hq.home import HqHome
from hq.site import SiteBundleRequest, build_site_bundle
from signers.software import SoftwareKey
from tests.fixtures.hq import (
    ENV,
    SoftStation,
    bootstrap_approvers,
    configure_quorum,
    entitle_args,
    run_hq,
)
from tests.fixtures.softhsm import SoftHsmToken
from trustcore.keys import key_id
from trustcore.quorum import Approval, ApprovalRequest, encode_bundle, sign_approval

APPROVER_ENV = {**ENV, "DEVTRUST_APPROVER_PASSPHRASE": "approver secret"}


@pytest.fixture(scope="module")
def hq_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hq-template")
    home = base / "hq"
    r = run_hq("init", "--home", str(home), "--org", "Acme")
    assert r.exit_code == 0, r.output
    station = SoftStation("station-a")
    (base / "a.enrol").write_bytes(station.enrolment())
    r = run_hq("enrol-station", "--home", str(home), str(base / "a.enrol"))
    assert r.exit_code == 0, r.output
    return home


@pytest.fixture
def home(hq_template: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "hq"
    shutil.copytree(hq_template, dest)
    return dest


# ------------------------------------------------------------------------------- CLI flow


def test_cli_flow_with_files_gates_a_large_entitlement(home: Path, tmp_path: Path) -> None:
    def hq(*args: str) -> Any:
        return run_hq(*args, env=APPROVER_ENV)

    pubs = []
    for i in range(3):
        r = hq(
            "approval", "approver", "init",
            "--keystore", str(tmp_path / f"a{i}.key"),
            "--public-out", str(tmp_path / f"a{i}.pub"),
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert "approver key id" in r.output and "BEGIN PUBLIC KEY" in r.output
        pubs.append(tmp_path / f"a{i}.pub")
    # Bootstrap: the first approver needs nobody; the second needs the first.
    r = hq("approval", "approver", "add", "--home", str(home), "--name", "alice",
           "--public-key", str(pubs[0]))  # fmt: skip
    assert r.exit_code == 0, r.output
    r = hq("approval", "approver", "add", "--home", str(home), "--name", "bob",
           "--public-key", str(pubs[1]))  # fmt: skip
    assert r.exit_code == 1 and "insufficient" in r.output

    def request(out: Path, operation: str, *params: str) -> None:
        args = ["approval", "request", "--home", str(home), "--operation", operation,
                "--requested-by", "ops", "--out", str(out)]  # fmt: skip
        for p in params:
            args += ["--param", p]
        res = hq(*args)
        assert res.exit_code == 0, res.output

    def sign(request_file: Path, who: int, out: Path) -> Any:
        key = str(tmp_path / f"a{who}.key")
        return hq("approval", "sign", str(request_file), "--keystore", key,
                  "--out", str(out), "--yes")  # fmt: skip

    from hq.approvals import add_approver_params

    pub_bob = serialization.load_pem_public_key(pubs[1].read_bytes())
    assert isinstance(pub_bob, ec.EllipticCurvePublicKey)
    bob_der = add_approver_params("bob", pub_bob)["public_key"]
    request(tmp_path / "add-bob.req", "add_approver", "name=bob",
            f"key_id={key_id(pub_bob).hex()}", f"public_key=hex:{bob_der.hex()}")  # fmt: skip
    r = sign(tmp_path / "add-bob.req", 0, tmp_path / "add-bob.a0")
    assert r.exit_code == 0, r.output
    # The review table shows the operation and every parameter.
    assert "add_approver" in r.output and key_id(pub_bob).hex()[:24] in r.output
    r = hq("approval", "approver", "add", "--home", str(home), "--name", "bob",
           "--public-key", str(pubs[1]), "--approvals", str(tmp_path / "add-bob.req"),
           "--approvals", str(tmp_path / "add-bob.a0"))  # fmt: skip
    assert r.exit_code == 0, r.output
    # A key that is not named by the request cannot sign it.
    r = sign(tmp_path / "add-bob.req", 2, tmp_path / "x")
    assert r.exit_code == 1 and "unknown_approver" in r.output

    configure_quorum(home, m=2, entitlement_quota_above=100)
    out = tmp_path / "small.ent"
    r = run_hq(*entitle_args(home, "station-a", out, **{"--quota": "50"}))
    assert r.exit_code == 0, r.output  # below the threshold: no quorum needed
    big = entitle_args(home, "station-a", tmp_path / "big.ent", **{"--quota": "500"})
    r = run_hq(*big)
    assert r.exit_code == 1 and "insufficient" in r.output
    assert not (tmp_path / "big.ent").exists()

    opts = dict(zip(big[3::2], big[4::2], strict=False))  # the last token is a flag
    from datetime import datetime

    nb = int(datetime.fromisoformat(opts["--not-before"]).timestamp())
    na = int(datetime.fromisoformat(opts["--not-after"]).timestamp())
    params = [
        "station_id=station-a", "product=thermo", "total_quota=500", "daily_limit=10",
        "day_timezone=UTC", f"not_before={nb}", f"not_after={na}",
        "id_prefix=dev-", "id_first=1", "id_last=100", "id_digits=4",
    ]  # fmt: skip
    request(tmp_path / "big.req", "issue_entitlement", *params)
    assert sign(tmp_path / "big.req", 0, tmp_path / "big.a0").exit_code == 0
    # One approval of two: still refused, and the reason says so.
    r = run_hq(
        *big, "--approvals", str(tmp_path / "big.req"), "--approvals", str(tmp_path / "big.a0")
    )
    assert r.exit_code == 1 and "insufficient" in r.output
    assert sign(tmp_path / "big.req", 1, tmp_path / "big.a1").exit_code == 0
    r = hq("approval", "bundle", str(tmp_path / "big.req"), str(tmp_path / "big.a0"),
           str(tmp_path / "big.a1"), "--out", str(tmp_path / "big.bundle"))  # fmt: skip
    assert r.exit_code == 0, r.output
    # The approvals are for quota 500: they do not authorise 900.
    r = run_hq(*entitle_args(home, "station-a", tmp_path / "x.ent", **{"--quota": "900"}),
               "--approvals", str(tmp_path / "big.bundle"))  # fmt: skip
    assert r.exit_code == 1 and "wrong_operation" in r.output
    r = run_hq(*big, "--approvals", str(tmp_path / "big.bundle"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "big.ent").exists()
    # Used once: the same bundle cannot authorise a second entitlement.
    again = entitle_args(home, "station-a", tmp_path / "again.ent", **{"--quota": "500"})
    r = run_hq(*again, "--approvals", str(tmp_path / "big.bundle"))
    assert r.exit_code == 1 and "replayed" in r.output


# --------------------------------------------------------------------------- the endpoint


def _http(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_http_endpoint_verifies_approvals_on_receipt(home: Path) -> None:
    hq = configure_quorum(home, m=2)
    keys = bootstrap_approvers(hq, 3)
    outsider = SoftwareKey.ephemeral()
    params = revoke_station_ca_params("station-a")
    request = create_request(hq, REVOKE_STATION_CA, params, requested_by="ops")
    with running_server(hq) as server:
        port = server.server_address[1]
        assert server.server_address[0] == "127.0.0.1"
        status, body = _http(port, "GET", "/requests")
        assert status == 200
        listed = json.loads(body)
        mine = [r for r in listed if r["request_id"] == request.request_id.hex()]
        assert mine and mine[0]["operation"] == REVOKE_STATION_CA and mine[0]["approvals"] == 0
        assert mine[0]["params"] == {"station_id": "station-a"}
        status, body = _http(port, "GET", f"/requests/{request.request_id.hex()}")
        assert status == 200 and ApprovalRequest.decode(body) == request

        # An approver fetches, reviews and signs on their own machine, then posts.
        fetched = ApprovalRequest.decode(body)
        a0 = sign_approval(fetched, keys[0], now=fetched.created).encode()
        status, body = _http(port, "POST", "/approvals", a0)
        assert status == 201, body
        assert json.loads(body)["approvals"] == 1
        # The signature is the authentication: an outsider's is refused.
        bad = sign_approval(fetched, outsider, now=fetched.created).encode()
        status, body = _http(port, "POST", "/approvals", bad)
        assert status == 403 and json.loads(body)["error"] == "unknown_approver"
        # A tampered approval (someone else's signature bytes) is refused.
        a1 = sign_approval(fetched, keys[1], now=fetched.created)
        forged = Approval(
            a1.request_digest, a1.request_id, a1.approver, a1.public_key_der,
            a1.signed_at, a1.expires, keys[2].sign(a1.signed_bytes()),
        )  # fmt: skip
        status, body = _http(port, "POST", "/approvals", forged.encode())
        assert status == 403 and json.loads(body)["error"] == "bad_signature"
        # An approval for a request HQ never wrote.
        stray = ApprovalRequest(
            b"\x01" * 16, REVOKE_STATION_CA, params, request.approvers, 2,
            request.created, request.expires, "nobody",
        )  # fmt: skip
        status, body = _http(
            port, "POST", "/approvals", sign_approval(stray, keys[1], now=stray.created).encode()
        )
        assert status == 404 and json.loads(body)["error"] == "unknown_request"
        status, body = _http(port, "POST", "/approvals", b"\xa0garbage")
        assert status == 400 and json.loads(body)["error"] == "malformed"
        status, body = _http(
            port, "POST", "/approvals", b"x" * 10, {"Content-Length": str(10_000_000)}
        )
        assert status == 413 and json.loads(body)["error"] == "oversized"
        status, _ = _http(port, "GET", "/nothing")
        assert status == 404

        status, body = _http(port, "POST", "/approvals", a1.encode())
        assert status == 201 and json.loads(body)["approvals"] == 2

        # HQ bundles what it received and the revocation gate accepts it, once.
        bundle = bundle_from_db(hq, request.request_id)
        decision = authorize_station_ca_revocation(hq, "station-a", [bundle])
        assert set(decision.approvers) == {key_id(k.public_key()) for k in keys[:2]}
        status, body = _http(port, "POST", "/approvals", a0)
        assert status == 409 and json.loads(body)["error"] == "replayed"
        status, body = _http(port, "GET", "/requests")
        assert request.request_id.hex() not in body.decode()  # no longer pending
    with pytest.raises(QuorumRefused) as info:
        authorize_station_ca_revocation(hq, "station-a", [bundle])
    assert info.value.reason == "replayed"


# ------------------------------------------------------------------------------ the gates


def test_station_ca_revocation_is_always_gated(home: Path) -> None:
    hq = HqHome.open(home)  # no quorum section in hq.json, no approvers
    with pytest.raises(QuorumRefused) as info:
        authorize_station_ca_revocation(hq, "station-a", [])
    assert info.value.reason == "insufficient"
    hq = configure_quorum(home, m=2)
    keys = bootstrap_approvers(hq, 3)
    request = create_request(hq, REVOKE_STATION_CA, revoke_station_ca_params("station-b"),
                             requested_by="ops")  # fmt: skip
    approvals = [sign_approval(request, k, now=request.created) for k in keys[1:]]
    evidence = [encode_bundle(request, approvals)]
    with pytest.raises(QuorumRefused) as info:  # approved for station-b, not station-a
        authorize_station_ca_revocation(hq, "station-a", evidence)
    assert info.value.reason == "wrong_operation"
    with pytest.raises(QuorumRefused) as info:
        authorize_station_ca_revocation(hq, "station-b", [encode_bundle(request, approvals[:1])])
    assert info.value.reason == "insufficient"
    assert authorize_station_ca_revocation(hq, "station-b", evidence).operation == REVOKE_STATION_CA


def test_payload_key_export_gate_in_site_bundles(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hq.home import HqSecrets

    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", ENV["DEVTRUST_HQ_PASSPHRASE"])
    secrets = HqSecrets()
    request = SiteBundleRequest(site_id="site-a")
    # Not configured: the bundle goes ahead (and fails later, on the unknown site).
    with pytest.raises(Exception) as info:
        build_site_bundle(HqHome.open(home), request, secrets)
    assert getattr(info.value, "reason", "") == "unknown_site"
    hq = configure_quorum(home, m=2, export_payload_key=True)
    keys = bootstrap_approvers(hq, 2)
    with pytest.raises(QuorumRefused) as refused:
        build_site_bundle(hq, request, secrets)
    assert refused.value.reason == "insufficient"
    req = create_request(hq, EXPORT_PAYLOAD_KEY, site_bundle_params("site-a"), requested_by="ops")
    bundle = encode_bundle(req, [sign_approval(req, k, now=req.created) for k in keys])
    # Approved: the gate passes and the builder reaches its own checks (site not enrolled).
    with pytest.raises(Exception) as info:
        build_site_bundle(hq, request, secrets, approvals=[bundle])
    assert getattr(info.value, "reason", "") == "unknown_site"
    # The failed build consumed nothing: the approvals still authorise the export once.
    assert authorize(hq, EXPORT_PAYLOAD_KEY, site_bundle_params("site-a"), [bundle]) is not None
    with pytest.raises(QuorumRefused) as refused:
        authorize(hq, EXPORT_PAYLOAD_KEY, site_bundle_params("site-a"), [bundle])
    assert refused.value.reason == "replayed"


def test_adding_an_approver_needs_the_existing_quorum(home: Path) -> None:
    hq = configure_quorum(home, m=2)
    keys = bootstrap_approvers(hq, 3)
    newcomer = SoftwareKey.ephemeral()
    with pytest.raises(QuorumRefused) as info:
        add_approver(hq, "mallory", newcomer.public_key())
    assert info.value.reason == "insufficient"
    from hq.approvals import ADD_APPROVER, add_approver_params, approvers

    req = create_request(hq, ADD_APPROVER, add_approver_params("dave", newcomer.public_key()),
                         requested_by="ops")  # fmt: skip
    one = encode_bundle(req, [sign_approval(req, keys[0], now=req.created)])
    with pytest.raises(QuorumRefused) as info:
        add_approver(hq, "dave", newcomer.public_key(), [one])
    assert info.value.reason == "insufficient"
    # The approvals name "dave": they cannot add the key under another name.
    two = encode_bundle(req, [sign_approval(req, k, now=req.created) for k in keys[:2]])
    with pytest.raises(QuorumRefused) as info:
        add_approver(hq, "eve", newcomer.public_key(), [two])
    assert info.value.reason == "wrong_operation"
    add_approver(hq, "dave", newcomer.public_key(), [two])
    assert [r.name for r in approvers(hq)] == [f"approver-{i}" for i in range(3)] + ["dave"]


def test_an_approver_key_in_a_pkcs11_token_signs(
    home: Path,
    tmp_path: Path,
    softhsm_token: SoftHsmToken,
) -> None:
    token = softhsm_token
    env = {**ENV, "DEVTRUST_APPROVER_PIN": token.pin}
    where = ["--pkcs11-module", token.module, "--pkcs11-token", token.label,
             "--pkcs11-key", "carol"]  # fmt: skip
    r = run_hq("approval", "approver", "init", *where, "--public-out", str(tmp_path / "c.pub"),
               env=env)  # fmt: skip
    assert r.exit_code == 0, r.output
    public = serialization.load_pem_public_key((tmp_path / "c.pub").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    hq = configure_quorum(home, m=1)
    add_approver(hq, "carol", public)
    request = create_request(hq, REVOKE_STATION_CA, revoke_station_ca_params("station-a"),
                             requested_by="ops")  # fmt: skip
    (tmp_path / "r.req").write_bytes(request.encode())
    r = run_hq("approval", "sign", str(tmp_path / "r.req"), *where, "--out",
               str(tmp_path / "r.carol"), "--yes", env=env)  # fmt: skip
    assert r.exit_code == 0, r.output
    approval = Approval.decode((tmp_path / "r.carol").read_bytes())
    assert approval.approver == key_id(public)
    evidence = [(tmp_path / "r.req").read_bytes(), (tmp_path / "r.carol").read_bytes()]
    assert authorize_station_ca_revocation(hq, "station-a", evidence).approvers == (key_id(public),)
