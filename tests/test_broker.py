"""Key broker over real HTTP on loopback: grants, every refusal (a clear 4xx, and the broker keeps
serving), real SGX quotes through the DCAP path, nonces, audit log, TLS, concurrency, the CLI."""

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from branchy_tee.broker.broker import Broker, load_keystore
from branchy_tee.broker.server import start_broker
from branchy_tee.cli import main
from branchy_tee.core.errors import AttestationError, BranchyError
from branchy_tee.core.fileio import write_key_file
from branchy_tee.core.keys import generate_key, key_id
from branchy_tee.tee.attest.client import AttestedKeys
from branchy_tee.tee.attest.identity import create_identity, identity_hex
from branchy_tee.tee.attest.identity import verify as verify_signature
from branchy_tee.tee.attest.protocol import RELEASE_PURPOSE, SUITE, KeyRelease, key_info, report_data, unpack_key
from branchy_tee.tee.attest.providers import GramineProvider, SimulatedProvider
from branchy_tee.verifier.policy import load_policy

PHALA_NOW = datetime(2025, 6, 20, tzinfo=timezone.utc)
PHALA1_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MOBILECOIN_MRENCLAVE = "1dd0df84810e53e26b2b167dfe0f97cc4364085fe0bd41d5e18a759c21d5c189"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SRC = Path(__file__).resolve().parents[1] / "src"


def call(url: str, method: str = "GET", body=None, raw: bytes | None = None, headers=None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with DIRECT.open(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def new_keypair():
    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_request(
    url: str,
    provider,
    kids,
    *,
    pk: bytes | None = None,
    bind_pk: bytes | None = None,
    nonce: bytes | None = None,
    evidence: bytes | None = None,
    etype: str | None = None,
    **extra,
) -> dict:
    """A POST /v1/keys body with a fresh nonce; ``bind_pk`` puts another key into REPORTDATA."""
    if nonce is None:
        nonce = bytes.fromhex(call(url + "/v1/nonce")[1]["nonce"])
    pk = pk or new_keypair()[1]
    if evidence is None:
        evidence = provider.evidence(report_data(bind_pk or pk, nonce))
    return {
        "evidence_type": etype or provider.evidence_type,
        "evidence": base64.b64encode(evidence).decode(),
        "public_key": pk.hex(),
        "nonce": nonce.hex(),
        "key_ids": list(kids),
        **extra,
    }


@pytest.fixture
def sim(tmp_path) -> SimulatedProvider:
    return SimulatedProvider(tmp_path / "devkey")


@pytest.fixture
def keys() -> list[bytes]:
    return [generate_key() for _ in range(3)]


def sim_policy(sim, **kw) -> dict:
    return {"allowed_mrenclave": [sim.mrenclave.hex()], "allow_simulation": True, **kw}


def client(b, provider, **kw) -> AttestedKeys:
    """The enclave side for broker ``b`` (a handle), expecting its identity as the model broker's."""
    return AttestedKeys(
        provider.evidence_type if provider.evidence_type == "simulated" else "gramine",
        b.url,
        b.broker.identity_bytes,
        [b.url],
        provider=provider,
        **kw,
    )


def audit_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_no_key_material(path, keys):
    data = Path(path).read_bytes()
    for k in keys:
        for form in (
            k,
            k.hex().encode(),
            k.hex().upper().encode(),
            base64.b64encode(k),
            base64.urlsafe_b64encode(k),
            base64.b64encode(k).rstrip(b"="),
        ):
            assert form not in data


# --------------------------------------------------------------------------- grants
def test_health_nonce_and_grant(tmp_path, sim, keys):
    audit = tmp_path / "audit.jsonl"
    me = Ed25519PrivateKey.generate()  # the broker is its own (only) allowed data owner here
    policy = sim_policy(sim, min_model_version=4, allowed_data_owners=[identity_hex(me)])
    with start_broker(keys, policy, audit_log=audit, identity=me) as b:
        assert b.url.startswith("http://127.0.0.1:") and b.port > 0
        assert call(b.url + "/v1/health") == (200, {"status": "ok", "protocol": "branchy-tee/v1", "keys": 3})
        st, n1 = call(b.url + "/v1/nonce")
        n2 = call(b.url + "/v1/nonce")[1]
        assert st == 200 and len(bytes.fromhex(n1["nonce"])) == 40 and n1["nonce"] != n2["nonce"]
        assert n1["expires_in"] == 60 and sorted(n1["key_ids"]) == sorted(map(key_id, keys))
        assert n1["identity"] == identity_hex(me) and call(b.url + "/v1/identity")[1]["identity"] == identity_hex(me)
        # the raw protocol, checked by hand
        sk, pk = new_keypair()
        body = key_request(b.url, sim, [key_id(keys[0]), key_id(keys[1])], pk=pk)
        st, out = call(b.url + "/v1/keys", "POST", body)
        assert st == 200 and out["min_model_version"] == 4 and set(out["keys"]) == {key_id(keys[0]), key_id(keys[1])}
        assert out["identity"] == identity_hex(me) and out["allowed_data_owners"] == [identity_hex(me)]
        nonce = bytes.fromhex(body["nonce"])
        release, signature = KeyRelease.parse(out, nonce, pk)
        assert verify_signature(me.public_key().public_bytes_raw(), RELEASE_PURPOSE, release.message(), signature)
        for k in keys[:2]:
            ct = base64.b64decode(out["keys"][key_id(k)])
            assert unpack_key(SUITE.decrypt(ct, sk, info=key_info(key_id(k), nonce))) == (k, 4)
            with pytest.raises(InvalidTag):  # info binds the key id and the nonce
                SUITE.decrypt(ct, sk, info=key_info(key_id(keys[2]), nonce))
        # the enclave-side client
        ak = client(b, sim, min_version=1)
        assert ak.model_key(key_id(keys[2])) == keys[2]
        assert ak.data_keys([key_id(keys[0])]) == {key_id(keys[0]): keys[0]}
        assert ak.min_model_version() == 4 and ak.sources[key_id(keys[0])] == b.url
    lines = audit_lines(audit)
    assert [ln["decision"] for ln in lines] == ["granted"] * 3
    assert lines[0]["claims"]["mrenclave"] == sim.mrenclave.hex() and lines[0]["remote"] == "127.0.0.1"
    assert lines[0]["key_ids"] == [key_id(keys[0]), key_id(keys[1])] and lines[0]["min_model_version"] == 4
    assert_no_key_material(audit, keys)


def test_policy_key_ids_limit_what_is_released(sim, keys):
    with start_broker(keys, sim_policy(sim, key_ids=[key_id(keys[0])])) as b:
        assert call(b.url + "/v1/nonce")[1]["key_ids"] == [key_id(keys[0])]
        st, out = call(b.url + "/v1/keys", "POST", key_request(b.url, sim, [key_id(keys[1])]))
        assert (st, out["code"]) == (403, "key_not_released") and key_id(keys[1]) in out["error"]
        ak = client(b, sim)
        with pytest.raises(
            BranchyError, match=f"model key broker {b.url} does not release model key id {key_id(keys[1])}"
        ):
            ak.model_key(key_id(keys[1]))
        assert ak.model_key(key_id(keys[0])) == keys[0]


# --------------------------------------------------------------------------- refusals
def test_refusals_are_clear_4xx_and_the_broker_keeps_serving(tmp_path, sim, keys):
    audit = tmp_path / "audit.jsonl"
    kid = key_id(keys[0])
    with start_broker(keys, sim_policy(sim), audit_log=audit) as b:
        url = b.url + "/v1/keys"
        good = key_request(b.url, sim, [kid])
        cases = [
            (call(url, "POST", raw=b"{not json"), 400, "bad_request", "not JSON"),
            (call(url, "POST", raw=b"[1, 2]"), 400, "bad_request", "must be a JSON object"),
            (
                call(url, "POST", {**good, "evidence": "%%%not base64%%%"}),
                400,
                "bad_request",
                "'evidence' is not valid base64",
            ),
            (call(url, "POST", {**good, "evidence": ""}), 400, "bad_request", "'evidence' is empty"),
            (call(url, "POST", {**good, "public_key": "zz" * 32}), 400, "bad_request", "'public_key' is not hex"),
            (
                call(url, "POST", {**good, "public_key": "00" * 32}),
                400,
                "bad_request",
                "not a usable X25519 public key",
            ),
            (call(url, "POST", {**good, "nonce": "00"}), 400, "bad_request", "'nonce' must be 40 bytes"),
            (call(url, "POST", {**good, "key_ids": []}), 400, "bad_request", "'key_ids' must be a list"),
            (call(url, "POST", {**good, "key_ids": ["../../etc/passwd"]}), 400, "bad_request", "is not a key id"),
            (call(url, "POST", {**good, "evidence_type": "sev"}), 400, "bad_request", "'evidence_type' must be one of"),
            (call(url, "POST", {**good, "protocol": "branchy-tee/v0"}), 400, "bad_request", "unsupported protocol"),
            (call(url, "POST", {**good, "collateral": "x"}), 400, "bad_request", "'collateral' must be a JSON object"),
            (
                call(url, "POST", {**good, "key_ids": ["0123456789abcdef"]}),
                404,
                "unknown_key_id",
                "no key with id 0123456789abcdef",
            ),
            (call(url, "POST", raw=b"x" * (100 * 1024)), 413, "too_large", "over 65536 bytes"),
        ]
        for (status, out), want_status, code, reason in cases:
            assert (status, out["code"]) == (want_status, code), out
            assert reason in out["error"] and "\n" not in out["error"]
        # a body over the limit without Content-Length (chunked) is cut off while reading
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=20)
        conn.request(
            "POST",
            "/v1/keys",
            body=iter([b"x" * 8192] * 12),
            headers={"Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["code"] == "too_large"
        conn.close()
        # routing errors are JSON too (not decisions: not audited)
        assert call(b.url + "/v1/nothing") == (404, {"error": "Not Found", "code": "http"})
        assert call(url)[0] == 405
        # none of that consumed the good request's nonce
        st, out = call(url, "POST", good)
        assert st == 200 and list(out["keys"]) == [kid]
        assert call(b.url + "/v1/health")[0] == 200
    lines = audit_lines(audit)
    assert len(lines) == len(cases) + 2  # one per decision: the cases, the chunked one, the grant
    assert [ln["decision"] for ln in lines].count("granted") == 1
    assert all(ln["reason"] for ln in lines if ln["decision"] == "refused")
    assert_no_key_material(audit, keys)


def test_simulation_refused_unless_the_policy_allows_it(sim, keys, capsys, monkeypatch):
    from branchy_tee.tee.attest import providers

    with start_broker(keys, {"allowed_mrenclave": [sim.mrenclave.hex()]}) as b:
        st, out = call(b.url + "/v1/keys", "POST", key_request(b.url, sim, [key_id(keys[0])]))
        assert (st, out["code"]) == (403, "policy_refused") and "allow_simulation = false" in out["error"]
        with pytest.raises(
            AttestationError, match=f"key broker {b.url} refused: policy refused: simulated evidence refused"
        ):
            client(b, sim).model_key(key_id(keys[0]))
    assert "SIMULATED ATTESTATION EVIDENCE ACCEPTED" not in capsys.readouterr().err
    monkeypatch.setattr(providers, "_explained", False)  # (as in a new process)
    with start_broker(keys, sim_policy(sim)) as b:
        client(b, sim).model_key(key_id(keys[0]))
        client(b, sim).model_key(key_id(keys[0]))
    err = capsys.readouterr().err
    assert err.count("WARNING: SIMULATED ATTESTATION") == 1  # once per process (here: the policy allows it)


def test_wrong_code_measurement_or_dev_key(tmp_path, sim, keys):
    other = SimulatedProvider(tmp_path / "other-devkey")
    policy = {"allowed_mrenclave": ["00" * 32], "allow_simulation": True}
    with start_broker(keys, policy) as b:
        st, out = call(b.url + "/v1/keys", "POST", key_request(b.url, sim, [key_id(keys[0])]))
        assert st == 403 and f"MRENCLAVE {sim.mrenclave.hex()} is not allowed" in out["error"]
    with start_broker(keys, sim_policy(sim, allowed_mrsigner=[sim.mrsigner.hex()])) as b:
        st, out = call(b.url + "/v1/keys", "POST", key_request(b.url, other, [key_id(keys[0])]))
        assert st == 403 and "allowed_mrsigner" in out["error"]


def test_replayed_forged_and_foreign_nonces(sim, keys):
    kid = key_id(keys[0])
    with start_broker(keys, sim_policy(sim)) as b, start_broker(keys, sim_policy(sim)) as restarted:
        body = key_request(b.url, sim, [kid])
        assert call(b.url + "/v1/keys", "POST", body)[0] == 200
        st, out = call(b.url + "/v1/keys", "POST", body)
        assert (st, out["code"]) == (403, "nonce_replayed") and "already used" in out["error"]
        # a nonce this broker instance never issued: forged, or from before a restart
        st, out = call(b.url + "/v1/keys", "POST", key_request(b.url, sim, [kid], nonce=os.urandom(40)))
        assert (st, out["code"]) == (403, "nonce_unknown")
        st, out = call(restarted.url + "/v1/keys", "POST", key_request(b.url, sim, [kid]))
        assert (st, out["code"]) == (403, "nonce_unknown") and "before a restart" in out["error"]
        assert call(b.url + "/v1/health")[0] == 200


def test_expired_nonce_with_injected_clock(sim, keys):
    now = [1_700_000_000.0]
    with start_broker(keys, sim_policy(sim), clock=lambda: now[0], nonce_ttl=60) as b:
        body = key_request(b.url, sim, [key_id(keys[0])])
        now[0] += 61
        st, out = call(b.url + "/v1/keys", "POST", body)
        assert (st, out["code"]) == (403, "nonce_expired") and "61 s old, lifetime 60 s" in out["error"]
        body = key_request(b.url, sim, [key_id(keys[0])])
        now[0] += 59
        assert call(b.url + "/v1/keys", "POST", body)[0] == 200
        assert b.broker.nonces.used_count == 1


def test_report_data_must_bind_the_public_key_and_nonce(sim, keys):
    kid = key_id(keys[0])
    with start_broker(keys, sim_policy(sim)) as b:
        # evidence over another public key (e.g. a host replaying an enclave's evidence with its own key)
        body = key_request(b.url, sim, [kid], bind_pk=new_keypair()[1])
        st, out = call(b.url + "/v1/keys", "POST", body)
        assert (st, out["code"]) == (403, "binding_mismatch") and "REPORTDATA does not bind" in out["error"]
        # evidence over another nonce
        other_nonce = bytes.fromhex(call(b.url + "/v1/nonce")[1]["nonce"])
        sk, pk = new_keypair()
        body = key_request(b.url, sim, [kid], pk=pk, evidence=sim.evidence(report_data(pk, other_nonce)))
        assert call(b.url + "/v1/keys", "POST", body)[1]["code"] == "binding_mismatch"
        # the refused request used up its nonce: fixing the evidence does not help
        body["evidence"] = base64.b64encode(sim.evidence(report_data(pk, bytes.fromhex(body["nonce"])))).decode()
        assert call(b.url + "/v1/keys", "POST", body)[1]["code"] == "nonce_replayed"


def test_audit_failure_releases_nothing(sim, keys):
    with start_broker(keys, sim_policy(sim)) as b:

        def broken(record):
            raise OSError(28, "No space left on device")

        b.broker.audit = broken
        st, out = call(b.url + "/v1/keys", "POST", key_request(b.url, sim, [key_id(keys[0])]))
        assert (st, out["code"]) == (500, "audit_failed") and "keys" not in out


# --------------------------------------------------------------------------- real SGX quotes (DCAP path)
# A real quote cannot bind a fresh nonce, so over HTTP these end in a policy refusal or a binding
# refusal; which one shows that chain, signatures, collateral and policy were all evaluated.
def quote_policy(sgx_quotes_dir, **kw) -> dict:
    return {
        "allowed_mrenclave": [PHALA1_MRENCLAVE],
        "collateral": str(sgx_quotes_dir / "phala-1.collateral.json"),
        **kw,
    }


def post_quote(b, quote: bytes, kid: str, **extra) -> tuple[int, dict]:
    body = key_request(b.url, None, [kid], evidence=quote, etype="dcap", **extra)
    return call(b.url + "/v1/keys", "POST", body)


def test_real_quote_refused_by_tcb_status_then_by_binding(tmp_path, sgx_quotes_dir, keys):
    quote = (sgx_quotes_dir / "phala-1.quote.bin").read_bytes()
    kid = key_id(keys[0])
    audit = tmp_path / "audit.jsonl"
    clock = lambda: PHALA_NOW.timestamp()  # noqa: E731 -- inside the collateral's validity
    with start_broker(keys, quote_policy(sgx_quotes_dir), clock=clock, audit_log=audit) as b:
        st, out = post_quote(b, quote, kid)
        assert (st, out["code"]) == (403, "policy_refused")
        assert (
            "TCB status is ConfigurationAndSWHardeningNeeded (advisories INTEL-SA-00289, INTEL-SA-00615)"
            in out["error"]
        )
    ok = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]
    with start_broker(keys, quote_policy(sgx_quotes_dir, accepted_tcb_statuses=ok), clock=clock, audit_log=audit) as b:
        st, out = post_quote(b, quote, kid)
        assert (st, out["code"]) == (403, "binding_mismatch")  # everything else passed
    lines = audit_lines(audit)
    assert [ln["code"] for ln in lines] == ["policy_refused", "binding_mismatch"]
    assert lines[1]["claims"]["mrenclave"] == PHALA1_MRENCLAVE
    assert lines[1]["claims"]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"


def test_real_debug_quote_and_tdx_quote(sgx_quotes_dir, keys):
    kid = key_id(keys[0])
    mob = (sgx_quotes_dir / "mobilecoin-1.quote.bin").read_bytes()
    policy = {"allowed_mrenclave": [MOBILECOIN_MRENCLAVE], "require_collateral": False}
    with start_broker(keys, policy, clock=lambda: datetime(2023, 5, 1, tzinfo=timezone.utc).timestamp()) as b:
        st, out = post_quote(b, mob, kid)
        assert st == 403 and "DEBUG mode" in out["error"]
    # TDX quote, collateral sent along with the request (the policy has none of its own)
    tdx = (sgx_quotes_dir / "phala-2.quote.bin").read_bytes()
    col = json.loads((sgx_quotes_dir / "phala-2.collateral.json").read_text())
    with start_broker(keys, {"allowed_mrenclave": [PHALA1_MRENCLAVE]}, clock=lambda: PHALA_NOW.timestamp()) as b:
        st, out = post_quote(b, tdx, kid, collateral=col)
        assert st == 403 and "TDX quote; this policy accepts SGX enclaves only" in out["error"]


def test_collateral_sent_by_the_host_is_ignored_unless_the_policy_accepts_it(sgx_quotes_dir, keys):
    """The host picks which Intel-signed collateral it sends (an old one, from before a TCB recovery,
    can make a platform look up to date): a broker uses its own unless the policy accepts the
    client's, and then only at or above a minimum TCB evaluation data number (phala-1's is 17)."""
    kid = key_id(keys[0])
    quote = (sgx_quotes_dir / "phala-1.quote.bin").read_bytes()
    col = json.loads((sgx_quotes_dir / "phala-1.collateral.json").read_text())
    policy = {"allowed_mrenclave": [PHALA1_MRENCLAVE]}
    clock = lambda: PHALA_NOW.timestamp()  # noqa: E731
    with start_broker(keys, policy, clock=clock) as b:
        for extra in ({}, {"collateral": col}):  # sent or not: ignored, so no TCB status
            st, out = post_quote(b, quote, kid, **extra)
            assert st == 403 and "require_collateral" in out["error"], out
    with pytest.raises(BranchyError, match="accept_client_collateral = true needs min_tcb_evaluation_data_number"):
        start_broker(keys, {**policy, "accept_client_collateral": True})
    accepting = {
        **policy,
        "accept_client_collateral": True,
        "accepted_tcb_statuses": ["ConfigurationAndSWHardeningNeeded"],
    }
    with start_broker(keys, {**accepting, "min_tcb_evaluation_data_number": 18}, clock=clock) as b:
        st, out = post_quote(b, quote, kid, collateral=col)
        assert (st, out["code"]) == (
            403,
            "policy_refused",
        ) and "evaluation data number is 17, below the policy minimum 18" in out["error"]
    with start_broker(keys, {**accepting, "min_tcb_evaluation_data_number": 17}, clock=clock) as b:
        st, out = post_quote(b, quote, kid, collateral=col)  # the collateral is used: the next check fails
        assert (st, out["code"]) == (403, "binding_mismatch")
    # at the real current time the 2025 collateral has expired
    with start_broker(keys, {**accepting, "min_tcb_evaluation_data_number": 17}) as b:
        st, out = post_quote(b, quote, kid, collateral=col)
        assert (st, out["code"]) == (403, "evidence_invalid") and "expired" in out["error"]
    lenient = {**accepting, "min_tcb_evaluation_data_number": 17, "stale_collateral": "warn"}
    with start_broker(keys, lenient) as b:
        st, out = post_quote(b, quote, kid, collateral=col)
        assert (st, out["code"]) == (403, "binding_mismatch")


def test_gramine_evidence_with_spliced_report_data_fails_the_quote_signature(tmp_path, sgx_quotes_dir, keys):
    """The gramine provider on a fake /dev/attestation whose 'quote' carries our REPORTDATA, spliced
    into a real quote: the broker's quote verification catches it (the signature covers REPORTDATA)."""
    real = (sgx_quotes_dir / "phala-1.quote.bin").read_bytes()
    d = tmp_path / "attestation"
    d.mkdir()
    (d / "attestation_type").write_text("dcap")

    class Splicing(GramineProvider):  # plays Gramine: the quote answers the report data just written
        def evidence(self, rd):
            (d / "quote").write_bytes(real[:368] + rd + real[432:])
            return super().evidence(rd)

    clock = lambda: PHALA_NOW.timestamp()  # noqa: E731
    policy = quote_policy(sgx_quotes_dir, accepted_tcb_statuses=["ConfigurationAndSWHardeningNeeded"])
    with start_broker(keys, policy, clock=clock) as b:
        ak = client(b, Splicing(d))
        with pytest.raises(
            AttestationError,
            match=rf"key broker {b.url} refused: evidence does not verify: "
            r"quote signature \(attestation key\) does not verify \(HTTP 403\)",
        ):
            ak.model_key(key_id(keys[0]))
        written = (d / "user_report_data").read_bytes()
        assert len(written) == 64 and written[32:] == bytes(32)  # SHA-256(label || pk || nonce) || 0^32


# --------------------------------------------------------------------------- concurrency
def test_200_concurrent_key_requests(tmp_path, sim, keys):
    n = 200
    kid = key_id(keys[0])
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)
    lock = threading.Lock()

    def one(b):
        ak = client(b, sim, timeout=60)
        barrier.wait()
        t0 = time.perf_counter()
        try:
            assert ak.model_key(kid) == keys[0]
        except BaseException as e:  # noqa: BLE001 -- collected and reported below
            with lock:
                errors.append(e)
            return
        with lock:
            latencies.append(time.perf_counter() - t0)

    audit = tmp_path / "audit.jsonl"
    with start_broker(keys, sim_policy(sim), audit_log=audit) as b:
        threads = [threading.Thread(target=one, args=(b,)) for _ in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        assert b.broker.granted == n and b.broker.refused == 0
    assert not errors, errors[:3]
    lines = audit_lines(audit)  # one whole line per decision, none torn by concurrent writers
    assert (
        len(lines) == n and {ln["decision"] for ln in lines} == {"granted"} and len({ln["nonce"] for ln in lines}) == n
    )
    assert_no_key_material(audit, keys)
    lat = sorted(latencies)
    p50, p99 = lat[n // 2], lat[int(n * 0.99) - 1]
    print(
        f"\n200 concurrent attested key requests (nonce + simulated evidence + POST + HPKE open): "
        f"{n / wall:.0f} requests/s, wall {wall:.2f} s, p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms"
    )


# --------------------------------------------------------------------------- keystore, TLS, lifecycle, CLI
def test_keystore_loading(tmp_path, keys):
    ks = tmp_path / "ks"
    ks.mkdir()
    for i, k in enumerate(keys):
        write_key_file(ks / f"k{i}.key", k)
    (ks / "notes.txt").write_text("ignored")
    assert load_keystore(ks) == {key_id(k): k for k in keys}
    assert load_keystore(ks / "k1.key") == {key_id(keys[1]): keys[1]}
    os.chmod(ks / "k2.key", 0o644)
    with pytest.raises(BranchyError, match="accessible by others"):
        load_keystore(ks)
    with pytest.raises(BranchyError, match="holds no \\*.key files"):
        load_keystore(tmp_path)
    with pytest.raises(BranchyError, match="not found"):
        load_keystore(tmp_path / "missing")
    with pytest.raises(BranchyError, match="releases key id\\(s\\) 0123456789abcdef, which the keystore does not hold"):
        Broker(keys, {"allowed_mrenclave": ["00" * 32], "key_ids": ["0123456789abcdef"]})


def _self_signed(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test broker")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls(tmp_path, sim, keys):
    cert, key = _self_signed(tmp_path)
    with start_broker(keys, sim_policy(sim), tls_cert=cert, tls_key=key) as b:
        assert b.url.startswith("https://127.0.0.1:")
        ak = client(b, sim, ca_file=str(cert))
        assert ak.model_key(key_id(keys[0])) == keys[0]
        with pytest.raises(BranchyError, match=f"key broker {b.url} is unreachable: .*CERTIFICATE_VERIFY_FAILED"):
            client(b, sim).model_key(key_id(keys[0]))


def test_plain_http_on_a_public_address_warns(sim, keys, capsys):
    with start_broker(keys, {"allowed_mrenclave": ["00" * 32]}, host="0.0.0.0"):
        pass
    assert "serving plain HTTP on non-loopback address 0.0.0.0" in capsys.readouterr().err


def test_stopped_or_missing_broker_is_named(sim, keys):
    b = start_broker(keys, sim_policy(sim))
    url = b.url
    b.stop()
    b.stop()  # idempotent
    with pytest.raises(BranchyError, match=f"key broker {url} is unreachable"):
        client(b, sim).model_key(key_id(keys[0]))
    with pytest.raises(BranchyError, match="is not an http:// or https:// URL"):
        AttestedKeys("simulated", "file:///etc/passwd", bytes(32), [url], provider=sim)


def test_an_https_url_at_a_plain_http_broker_says_what_is_wrong(sim, keys):
    """The README once gave https:// URLs for brokers that serve plain HTTP: WRONG_VERSION_NUMBER, no hint."""
    with start_broker(keys, sim_policy(sim)) as b:
        https = b.url.replace("http://", "https://")
        ak = AttestedKeys("simulated", https, b.broker.identity_bytes, [https], provider=sim)
        with pytest.raises(BranchyError, match="is the broker serving plain HTTP\\? give an http:// URL"):
            ak.model_key(key_id(keys[0]))


def test_cli_key_broker(tmp_path, sim, keys, capsys):
    ks = tmp_path / "ks"
    ks.mkdir()
    for i, k in enumerate(keys[:2]):
        write_key_file(ks / f"k{i}.key", k)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'allowed_mrenclave = ["{sim.mrenclave.hex()}"]\nallow_simulation = true\nmin_model_version = 2\n'
    )
    audit = tmp_path / "audit.jsonl"
    assert main(["keygen", "--identity", "--out", str(tmp_path / "broker.id")]) == 0
    identity = capsys.readouterr().out.strip().splitlines()[-1]
    assert identity.startswith("identity: ") and len(identity.split()[1]) == 64
    assert oct((tmp_path / "broker.id").stat().st_mode & 0o777) == "0o600"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "branchy_tee.cli",
            "key-broker",
            "--keys",
            str(ks),
            "--policy",
            str(policy),
            "--identity",
            str(tmp_path / "broker.id"),
            "--listen",
            "127.0.0.1:0",
            "--audit-log",
            str(audit),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("key broker listening on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[-1]
        assert not url.endswith(":0")
        assert proc.stdout.readline().split() == ["identity", identity.split()[1]]
        assert call(url + "/v1/health")[1]["keys"] == 2
        assert call(url + "/v1/identity")[1]["identity"] == identity.split()[1]
        ak = AttestedKeys("simulated", url, bytes.fromhex(identity.split()[1]), [url], provider=sim)
        assert ak.model_key(key_id(keys[1])) == keys[1] and ak.min_model_version() == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped (1 granted, 0 refused)" in err and "SIMULATED ATTESTATION ALLOWED" in err
    assert len(audit_lines(audit)) == 1


def test_cli_key_broker_errors(tmp_path, capsys, keys):
    ks = tmp_path / "ks"
    ks.mkdir()
    write_key_file(ks / "a.key", keys[0])
    create_identity(tmp_path / "b.id")
    ident = ["--identity", str(tmp_path / "b.id")]
    policy = tmp_path / "policy.toml"
    policy.write_text('allowed_mrenclave = ["' + "00" * 32 + '"]\nallow_simulaton = true\n')
    assert main(["key-broker", "--keys", str(ks), "--policy", str(policy), "--listen", "127.0.0.1:0", *ident]) == 1
    err = capsys.readouterr().err
    assert "unknown setting 'allow_simulaton' (did you mean 'allow_simulation'?)" in err and len(err.splitlines()) == 1
    assert main(["key-broker", "--keys", str(ks), "--policy", str(policy), "--listen", "nowhere", *ident]) == 2
    assert "--listen expects HOST:PORT" in capsys.readouterr().err
    policy.write_text('allowed_mrenclave = ["' + "00" * 32 + '"]\n')
    assert (
        main(
            [
                "key-broker",
                "--keys",
                str(ks),
                "--policy",
                str(policy),
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                "x.pem",
                *ident,
            ]
        )
        == 2
    )
    assert "give both --tls-cert and --tls-key" in capsys.readouterr().err
    os.chmod(ks / "a.key", 0o640)
    assert main(["key-broker", "--keys", str(ks), "--policy", str(policy), "--listen", "127.0.0.1:0", *ident]) == 1
    assert "accessible by others" in capsys.readouterr().err
    os.chmod(ks / "a.key", 0o600)
    # an identity is required, and must be a private Ed25519 PEM file
    with pytest.raises(SystemExit) as e:
        main(["key-broker", "--keys", str(ks), "--policy", str(policy), "--listen", "127.0.0.1:0"])
    assert e.value.code == 2 and "the following arguments are required: --identity" in capsys.readouterr().err
    assert (
        main(
            [
                "key-broker",
                "--keys",
                str(ks),
                "--policy",
                str(policy),
                "--listen",
                "127.0.0.1:0",
                "--identity",
                str(ks / "a.key"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "is not an unencrypted PEM private key" in err and len(err.splitlines()) == 1
    # a policy that pins only MRSIGNER: the host signs the enclave with its own key, so the broker refuses to start
    policy.write_text('allowed_mrsigner = ["' + "11" * 32 + '"]\n')
    assert main(["key-broker", "--keys", str(ks), "--policy", str(policy), "--listen", "127.0.0.1:0", *ident]) == 1
    err = capsys.readouterr().err
    assert "pins only allowed_mrsigner" in err and "own_signing_key = true" in err and len(err.splitlines()) == 1
    policy.write_text('allowed_mrsigner = ["' + "11" * 32 + '"]\nown_signing_key = true\n')
    with pytest.raises(BranchyError, match="pin allowed_settings too"):  # one signer signs builds of any settings
        load_policy(policy)
    policy.write_text(
        'allowed_mrsigner = ["' + "11" * 32 + '"]\nown_signing_key = true\nallowed_settings = ["' + "22" * 32 + '"]\n'
    )
    assert load_policy(policy).allowed_mrsigner == {bytes.fromhex("11" * 32)}


# --------------------------------------------------------------------------- collateral chosen by the host
def test_host_cannot_skip_the_minimum_tcb_evaluation_number_by_sending_no_collateral(sgx_quotes_dir):
    """`accept_client_collateral = true` with `min_tcb_evaluation_data_number` exists so that the host
    cannot pick old Intel-signed collateral (phala-1's is number 17; the minimum here is 18). With
    `require_collateral = false` (the setting for a broker without a collateral file) the host sends
    no collateral at all: the TCB status is unknown, the minimum is not checked, and the quote is
    accepted: the oldest possible choice passes where number 17 is refused."""
    from branchy_tee.core.keys import generate_key

    key = generate_key()
    quote = (sgx_quotes_dir / "phala-1.quote.bin").read_bytes()
    col = json.loads((sgx_quotes_dir / "phala-1.collateral.json").read_text())
    policy = {
        "allowed_mrenclave": [PHALA1_MRENCLAVE],
        "accept_client_collateral": True,
        "min_tcb_evaluation_data_number": 18,
        "require_collateral": False,
        "accepted_tcb_statuses": ["UpToDate", "ConfigurationAndSWHardeningNeeded"],
    }
    try:
        handle = start_broker([key], policy, clock=lambda: PHALA_NOW.timestamp())
    except BranchyError:
        return  # the policy is refused at broker start: also a fix
    with handle as b:
        st, out = post_quote(b, quote, key_id(key), collateral=col)
        assert (st, out["code"]) == (403, "policy_refused") and "below the policy minimum 18" in out["error"]
        st, out = post_quote(b, quote, key_id(key))  # no collateral
        assert (st, out["code"]) == (403, "policy_refused"), (
            f"without collateral the quote passed the policy (it failed only at {out['code']}): the minimum TCB "
            "evaluation data number is skipped when the host sends none"
        )
