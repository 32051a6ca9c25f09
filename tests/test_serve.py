"""`branchy-tee serve` and the data owner's Client, on loopback: attested TLS verified by the client
(simulated evidence allowed by policy, refused when the policy forbids it or pins another
measurement), client certificates from identities matched against the model owner's allow-list,
batching across concurrent requests with each answer identical to predict's, the model owner's
metrics, renewal and revocation, two replicas with failover."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import numpy as np
import pytest
import torch

from branchy_tee.broker.server import start_broker
from branchy_tee.cli import main
from branchy_tee.client.online import Client
from branchy_tee.core.commandline import ArgumentParser
from branchy_tee.core.errors import AttestationError, BranchyError
from branchy_tee.tee.attest.identity import create_identity, identity_hex
from branchy_tee.tee.attest.providers import SimulatedProvider, simulated_mrenclave
from branchy_tee.tee.serve import server as srv
from runs import keygen, make_random_run, reference_decisions, set_thresholds, spreading_thresholds

PARTIES = ("mo", "do1", "do2", "stranger")


@pytest.fixture(scope="module", name="world")
def world_fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(d / "config"))
        model, meta = make_random_run(d / "run", "lenet5")
        torch.manual_seed(7)
        x = torch.rand(48, 1, 28, 28)
        xn = (x - 0.5) / 0.25
        thresholds = spreading_thresholds(d / "run", xn)
        set_thresholds(d / "run", thresholds)
        keygen(d / "mo.key")
        ids = {p: identity_hex(create_identity(d / f"{p}.id")) for p in PARTIES}
        assert main(["seal", str(d / "run"), "--key", str(d / "mo.key"), "--out", str(d / "model.btee")]) == 0
        labels, exits = reference_decisions(d / "run", xn, "entropy", thresholds)
        yield {
            "d": d,
            "ids": ids,
            "x": x.numpy(),
            "labels": labels.tolist(),
            "exits": exits.tolist(),
            "mrenclave": simulated_mrenclave().hex(),
        }


@pytest.fixture(autouse=True)
def _dev_key(world, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(world["d"] / "config"))


def do_policy(world, **kw) -> dict:
    return {"allowed_mrenclave": [world["mrenclave"]], "allow_simulation": True, **kw}


def serve_args(world, broker_url: str, *extra) -> object:
    p = ArgumentParser()
    srv.add_arguments(p)
    return p.parse_args(
        [
            "--bundle",
            str(world["d"] / "model.btee"),
            "--listen",
            "127.0.0.1:0",
            "--attest",
            "simulated",
            "--model-broker",
            broker_url,
            "--model-broker-identity",
            world["ids"]["mo"],
            "--quiet",
            "--threads",
            "1",
            "--timeout",
            "5",
            *extra,
        ]
    )


class Served:
    """A model broker and a server (in this process), stopped on exit."""

    def __init__(self, world, allowed=("do1", "do2"), extra=(), policy=None):
        self.world = world
        policy = policy or do_policy(world, allowed_data_owners=[world["ids"][p] for p in allowed])
        self.broker = start_broker(world["d"] / "mo.key", policy, identity=world["d"] / "mo.id")
        self.server, self._stop = srv.start(serve_args(world, self.broker.url, *extra))
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"

    def client(self, who="do1", policy=None, urls=None, **kw) -> Client:
        return Client(
            urls or self.url, policy=policy or do_policy(self.world), identity=self.world["d"] / f"{who}.id", **kw
        )

    def close(self):
        self._stop()
        self.broker.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_answers(world, results, lo=0):
    assert [r["label"] for r in results] == world["labels"][lo : lo + len(results)]
    assert [r["exit"] for r in results] == world["exits"][lo : lo + len(results)]


# --------------------------------------------------------------------------- attested TLS
def test_client_verifies_the_server_then_gets_predicts_answers(world):
    with Served(world) as s, s.client() as c:
        info = c.model_info()
        assert (
            info.arch == "lenet5"
            and info.model.bundle_id
            == json.loads((world["d"] / "model.btee" / "header.json").read_text())["header"]["bundle_id"]
        )
        results = c.predict(world["x"])
        check_answers(world, results)
        assert len(set(r["exit"] for r in results)) >= 2 and results[0]["model"]["model_version"] == 1
        assert c.verifications == 1  # one connection, verified once, kept alive
        c.predict(world["x"][:3])
        assert c.verifications == 1


def test_a_policy_that_forbids_simulation_or_pins_another_enclave_refuses_before_sending(world):
    with Served(world) as s:
        for policy, match in (
            (do_policy(world, allow_simulation=False), "simulated evidence refused"),
            (do_policy(world, allowed_mrenclave=["ab" * 32]), "allowed_mrenclave"),
        ):
            with s.client(policy=policy) as c, pytest.raises(AttestationError, match=match):
                c.predict(world["x"][:2])
        assert s.server.metrics.requests["ok"] == 0 and s.server.metrics.samples == 0


def test_evidence_copied_from_another_server_is_refused(world):
    """REPORTDATA must bind the key of the certificate in this handshake: a certificate whose
    evidence was made for another key (the host reusing a genuine quote) is refused."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from branchy_tee.tee.attest import ratls
    from branchy_tee.verifier import ratls as ratls_verify
    from branchy_tee.verifier.policy import parse_policy

    sim = SimulatedProvider()
    _, genuine = ratls.make_server_certificate(sim)
    evidence = (
        x509.load_der_x509_certificate(genuine).extensions.get_extension_for_oid(ratls.RATLS_QUOTE_OID).value.value
    )
    host_key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([])
    g = x509.load_der_x509_certificate(genuine)
    forged = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(host_key.public_key())
        .serial_number(1)
        .not_valid_before(g.not_valid_before_utc)
        .not_valid_after(g.not_valid_after_utc)
        .add_extension(x509.UnrecognizedExtension(ratls.RATLS_QUOTE_OID, evidence), critical=False)
        .sign(host_key, hashes.SHA256())
    ).public_bytes(serialization.Encoding.DER)
    policy = parse_policy(do_policy(world, allowed_mrenclave=[sim.mrenclave.hex()]))
    assert ratls_verify.verify_server_certificate(genuine, policy).mrenclave == sim.mrenclave
    with pytest.raises(AttestationError, match="does not bind the key of the certificate"):
        ratls_verify.verify_server_certificate(forged, policy)


def test_server_certificates_are_short_lived_and_the_client_checks_their_validity(world):
    """A certificate whose key leaked once must stop working: serve's certificates live 20 minutes
    from the enclave's clock, and the client refuses one that is expired, not yet valid, or valid
    longer (a host's own certificate with genuine-looking evidence, valid for years)."""
    import datetime

    from branchy_tee.tee.attest import ratls
    from branchy_tee.verifier import ratls as ratls_verify
    from branchy_tee.verifier.policy import parse_policy

    sim = SimulatedProvider()
    policy = parse_policy(do_policy(world, allowed_mrenclave=[sim.mrenclave.hex()]))
    now = datetime.datetime.now(datetime.timezone.utc)
    _, current = ratls.make_server_certificate(sim)
    ratls_verify.verify_server_certificate(current, policy)
    for when, why in ((now - datetime.timedelta(hours=1), "expired"), (now + datetime.timedelta(hours=1), "not yet")):
        _, cert = ratls.make_server_certificate(sim, now=when)
        with pytest.raises(AttestationError, match=why):
            ratls_verify.verify_server_certificate(cert, policy)


def test_the_client_shows_its_identity_only_to_the_attested_server(world):
    """A server that answers the data owner's URL without the attested key (the host's own TLS
    server asking for client certificates) never receives the data owner's certificate: the client
    verifies the attestation on a connection without one, then pins exactly that certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(minutes=10))
        .sign(key, hashes.SHA256())
    )
    pem = world["d"] / "host-tls.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=cert.public_bytes(serialization.Encoding.PEM).decode())
    seen: list = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(2.0)

    def host_server() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:  # (the timeout: the client has given up)
                return
            try:
                with ctx.wrap_socket(raw, server_side=True) as tls:
                    seen.append(tls.getpeercert(binary_form=True))
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                seen.append("tls error")

    host = threading.Thread(target=host_server, daemon=True)
    host.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    with Client(url, policy=do_policy(world), identity=world["d"] / "do1.id", retries=1) as c:
        with pytest.raises(AttestationError):
            c.predict(world["x"][:1])
    host.join(10)
    listener.close()
    assert seen and all(s is None or s == "tls error" for s in seen), seen  # never a client certificate


def test_the_server_makes_a_new_tls_key_at_every_renewal(world):
    with Served(world, extra=("--renew", "0.2")) as s:
        first = s.server.context
        deadline = time.time() + 10
        while s.server.context is first and time.time() < deadline:
            time.sleep(0.05)
        assert s.server.context is not first
        with s.client("do1") as c:
            check_answers(world, c.predict(world["x"][:2]))


# --------------------------------------------------------------------------- who may query
def test_identities_not_on_the_allow_list_are_refused(world):
    with Served(world) as s:
        with s.client("stranger") as c, pytest.raises(BranchyError, match="does not accept your identity"):
            c.predict(world["x"][:2])
        with s.client("do2") as c:  # on the list
            check_answers(world, c.predict(world["x"][:4]))
        assert s.server.metrics.samples == 4


def test_a_connection_kept_alive_is_judged_against_the_allow_list_at_every_request(world):
    """The server reads a connection's identity once; whether it may ask is decided per request."""
    with Served(world) as s, s.client("do1") as c:
        check_answers(world, c.predict(world["x"][:2]))
        s.server.allowed = frozenset({bytes.fromhex(world["ids"]["do2"])})  # what a renewal does
        with pytest.raises(BranchyError, match=f"identity {world['ids']['do1']} is not allowed"):
            c.predict(world["x"][:2])
        assert c.verifications == 1  # the same connection, refused


def test_a_forged_anchor_in_the_clients_chain_does_not_help(world, tmp_path):
    """A stranger sends a certificate 'issued' by an allowed identity's anchor name plus its own
    self-made anchor with that name: OpenSSL uses the server's anchor, so the handshake fails."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from branchy_tee.tee.attest import ratls

    stranger = Ed25519PrivateKey.generate()
    allowed_hex = world["ids"]["do1"]
    fake_anchor = ratls.identity_anchor(bytes.fromhex(allowed_hex), stranger)  # right name, key irrelevant
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ratls.identity_name(allowed_hex))
        .public_key(stranger.public_key())
        .serial_number(2)
        .not_valid_before(ratls.NOT_BEFORE)
        .not_valid_after(ratls.NOT_AFTER)
        .sign(stranger, None)
    )
    pem = stranger.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "c.pem").write_bytes(pem + leaf.public_bytes(serialization.Encoding.PEM) + fake_anchor)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(tmp_path / "c.pem")
    with Served(world) as s:
        port = s.server.server_address[1]
        with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as tls:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                tls.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n")
                assert tls.recv(100) == b""  # closed without an answer
                raise ConnectionError


def test_metrics_are_for_the_model_owner_only(world):
    with Served(world) as s:
        with s.client("do1") as c:
            c.predict(world["x"][:5])
            with pytest.raises(BranchyError, match="this endpoint is for the model owner"):
                c._request("GET", "/v1/metrics")
        with s.client("mo") as c:
            status, data, _ = c._call(c.replicas[0], "GET", "/v1/metrics", None, "")
        text = data.decode()
        assert status == 200 and 'branchy_tee_requests_total{outcome="ok"} 1' in text
        assert "branchy_tee_samples_total 5" in text and 'branchy_tee_request_seconds{quantile="0.5"}' in text
        counts = [
            int(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("branchy_tee_exit_samples_total{")
        ]
        assert counts == np.bincount(world["exits"][:5], minlength=3).tolist()


# --------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_each_gets_its_own_answers(world):
    with Served(world, extra=("--max-batch", "48", "--max-wait-ms", "200")) as s:
        results, errors = {}, []

        def one(i, who):
            try:
                with s.client(who) as c:
                    results[i] = c.predict(world["x"][i * 6 : i * 6 + 6])
            except BaseException as e:  # noqa: BLE001 -- reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=one, args=(i, ("do1", "do2")[i % 2])) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in range(8):
            check_answers(world, results[i], i * 6)
        assert s.server.batcher.batches < 8  # several requests shared a batch


def test_a_request_that_stops_waiting_strands_no_request_behind_it():
    """A request whose thread gives up while the engine is busy leaves the queue: the next request
    in line is still woken to run its own batch when the engine is free."""
    from branchy_tee.tee.serve.batching import Batcher

    release = threading.Event()

    def answer(x):
        if x[0, 0] == 0:
            release.wait(10)
        return x[:, 0].tolist()

    b = Batcher(answer, max_batch=1, max_wait=0.0)
    first = b.submit(np.zeros((1, 1), np.float32))
    got = {}
    leader = threading.Thread(target=lambda: got.setdefault("first", first.wait(10)))
    leader.start()
    while b.waiting:  # the first request's thread is running it
        time.sleep(0.01)
    impatient = b.submit(np.ones((1, 1), np.float32))
    patient = b.submit(np.full((1, 1), 2, np.float32))
    waiter = threading.Thread(target=lambda: got.setdefault("patient", patient.wait(10)))
    waiter.start()
    with pytest.raises(TimeoutError):
        impatient.wait(0.2)
    release.set()
    leader.join(10)
    waiter.join(10)
    assert got == {"first": [0.0], "patient": [2.0]} and b.batches == 2
    b.stop(5)


def test_the_client_sends_a_small_request_in_one_write(world, monkeypatch):
    """Headers and body in one TLS record: one read for the server instead of two."""
    with Served(world) as s, s.client() as c:
        c.model_info()
        writes = []
        conn = c.replicas[0].conn
        real = conn.sock.sendall
        monkeypatch.setattr(conn.sock, "sendall", lambda data: (writes.append(len(data)), real(data))[1])
        check_answers(world, c.predict(world["x"][:2]))
        assert len(writes) == 1 and writes[0] > 2 * 28 * 28 * 4


def test_the_benchmarks_batched_clients_send_batches_that_are_answered_whole(world):
    """`bench --serve`'s batched load shape: every request carries its images and is one engine batch."""
    from branchy_tee.bench.serve import worker

    (world["d"] / "bench-policy.toml").write_text(
        f'allowed_mrenclave = ["{world["mrenclave"]}"]\nallow_simulation = true\n'
    )
    np.save(world["d"] / "bench-images.npy", (world["x"] - 0.5) / 0.25)
    with Served(world, extra=("--max-batch", "8")) as s:
        out = worker(
            s.url,
            str(world["d"] / "bench-policy.toml"),
            str(world["d"] / "do1.id"),
            2,
            1.0,
            time.time() + 1.0,
            str(world["d"] / "bench-images.npy"),
            per_request=8,
        )
    assert not out["errors"] and len(out["latencies"]) > 1
    ok = s.server.metrics.requests["ok"]
    assert s.server.metrics.samples == 8 * ok and s.server.batcher.batches == ok  # one whole batch each


def test_bad_requests_are_one_line_4xx_and_the_server_keeps_serving(world):
    from safetensors.numpy import save

    with Served(world, extra=("--max-body", "100000", "--max-request-samples", "10")) as s, s.client() as c:
        r = c.replicas[0]
        for body, status, match in (
            (b"not safetensors", 400, "not a safetensors payload"),
            (save({"inputs": np.zeros((2, 1, 27, 28), np.float32)}), 400, "the model takes (N, 1, 28, 28)"),
            (save({"inputs": np.zeros((2, 1, 28, 28), np.float64)}), 400, "expected float32"),
            (save({"inputs": np.full((2, 1, 28, 28), np.nan, np.float32)}), 400, "NaN"),
            (save({"inputs": np.zeros((11, 1, 28, 28), np.float32)}), 400, "1 to 10 samples"),
            (b"x" * 200_000, 413, "over 100000 bytes"),
        ):
            got, data, _ = c._call(r, "POST", "/v1/predict", body, "application/octet-stream")
            doc = json.loads(data)
            assert got == status and match in doc["error"] and "\n" not in doc["error"], doc
        check_answers(world, c.predict(world["x"][:3]))


def test_malformed_tls_and_http_and_slow_clients(world):
    with Served(world) as s:
        port = s.server.server_address[1]
        for junk in (b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 1000):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(junk)
                raw.settimeout(10)
                try:
                    raw.recv(100)
                except (ConnectionError, socket.timeout):
                    pass
        # a client that connects and says nothing is dropped after --timeout (5 s), holding only its thread
        idle = socket.create_connection(("127.0.0.1", port))
        with s.client() as c:
            check_answers(world, c.predict(world["x"][:2]))
        idle.close()
        assert s.server.metrics.tls_failures >= 3


def test_many_concurrent_connections(world):
    n = 64
    with Served(world, extra=("--max-wait-ms", "5")) as s:
        errors, done = [], []

        def one(i):
            try:
                with s.client(("do1", "do2")[i % 2]) as c:
                    check_answers(world, c.predict(world["x"][i % 40 : i % 40 + 2]), i % 40)
                done.append(i)
            except BaseException as e:  # noqa: BLE001
                errors.append(repr(e)[:200])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(done) == n, errors[:3]


# --------------------------------------------------------------------------- renewal, replicas
def test_renewal_follows_the_model_owners_allow_list_and_revocation(world):
    with Served(world, extra=("--renew", "0.3")) as s:
        with s.client("do1") as c:
            c.predict(world["x"][:2])
        port = int(s.broker.url.rsplit(":", 1)[1])
        s.broker.stop()
        # the model owner removes data owner 1
        s.broker = start_broker(
            world["d"] / "mo.key",
            do_policy(world, allowed_data_owners=[world["ids"]["do2"]]),
            identity=world["d"] / "mo.id",
            port=port,
        )
        deadline = time.time() + 20
        while s.server.allowed != {bytes.fromhex(world["ids"]["do2"])} and time.time() < deadline:
            time.sleep(0.1)
        with s.client("do1") as c, pytest.raises(BranchyError, match="does not accept your identity"):
            c.predict(world["x"][:2])
        with s.client("do2") as c:
            check_answers(world, c.predict(world["x"][:2]))
        # the model owner revokes the deployment (its broker refuses this enclave): no more answers
        s.broker.stop()
        s.broker = start_broker(
            world["d"] / "mo.key",
            do_policy(world, allowed_mrenclave=["ab" * 32]),
            identity=world["d"] / "mo.id",
            port=port,
        )
        deadline = time.time() + 20
        while s.server.state != "revoked" and time.time() < deadline:
            time.sleep(0.1)
        assert s.server.state == "revoked"
        with s.client("do2") as c, pytest.raises(BranchyError, match="no server answered|revoked"):
            c.predict(world["x"][:2])


def test_two_replicas_with_failover(world):
    with Served(world) as a, Served(world) as b:
        with a.client(urls=[a.url, b.url]) as c:
            for i in range(4):  # round robin: both replicas answer, each verified once
                check_answers(world, c.predict(world["x"][i : i + 2]), i)
            assert c.verifications == 2
            a.close()  # one replica goes away
            for i in range(3):
                check_answers(world, c.predict(world["x"][i : i + 2]), i)
        assert b.server.metrics.requests["ok"] >= 5


def test_cli_query(world, capfd):
    with Served(world) as s:
        pol = world["d"] / "do-policy.toml"
        pol.write_text(f'allowed_mrenclave = ["{world["mrenclave"]}"]\nallow_simulation = true\n')
        np.save(world["d"] / "x.npy", (world["x"][:3] * 255).astype(np.uint8))
        capfd.readouterr()
        query = ["query", s.url, str(world["d"] / "x.npy"), "--policy", str(pol), "--identity"]
        assert main([*query, str(world["d"] / "do1.id"), "--json"]) == 0
        out = json.loads(capfd.readouterr().out)
        assert len(out) == 3 and {"label", "class_name", "confidence", "exit", "model"} <= set(out[0])
        assert {r["attestation"] for r in out} == {"simulated"}
        assert main([*query, str(world["d"] / "do1.id")]) == 0
        said = capfd.readouterr().out
        assert "attestation SIMULATED" in said and "attestation verified" not in said  # never dressed up as a TEE
        assert main([*query, str(world["d"] / "stranger.id")]) == 1
        err = capfd.readouterr().err
        assert "does not accept your identity" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- a server killed under load
def _start_server_process(world, broker_url: str, port: int):
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "branchy_tee.cli",
        "serve",
        "--bundle",
        str(world["d"] / "model.btee"),
        "--listen",
        f"127.0.0.1:{port}",
        "--attest",
        "simulated",
        "--model-broker",
        broker_url,
        "--model-broker-identity",
        world["ids"]["mo"],
        "--threads",
        "1",
        "--quiet",
    ]
    log = world["d"] / f"serve-{port}-{time.monotonic_ns()}.log"  # why, should it not start (seen once under load)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving lenet5"), (line, log.read_text()[-2000:])
    return proc


def test_server_killed_under_load_gives_clear_errors_never_wrong_answers_and_clients_go_on(world):
    import signal

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = do_policy(world, allowed_data_owners=[world["ids"]["do1"], world["ids"]["do2"]])
    with start_broker(world["d"] / "mo.key", policy, identity=world["d"] / "mo.id") as broker:
        proc = _start_server_process(world, broker.url, port)
        url = f"https://127.0.0.1:{port}"
        stop, phase = threading.Event(), {"restarted": False}
        stats = {"ok_before": 0, "ok_after": 0, "errors": 0, "wrong": 0, "unclear": []}
        lock = threading.Lock()

        def load(who, i):
            with Client(url, policy=do_policy(world), identity=world["d"] / f"{who}.id", timeout=10, retries=1) as c:
                while not stop.is_set():
                    lo = (i * 4) % 40
                    try:
                        results = c.predict(world["x"][lo : lo + 4])
                    except BranchyError as e:
                        with lock:
                            stats["errors"] += 1
                            if "\n" in str(e):
                                stats["unclear"].append(str(e))
                        time.sleep(0.05)
                        continue
                    ok = [r["label"] for r in results] == world["labels"][lo : lo + 4] and [
                        r["exit"] for r in results
                    ] == world["exits"][lo : lo + 4]
                    with lock:
                        stats["wrong"] += not ok
                        stats["ok_after" if phase["restarted"] else "ok_before"] += ok
                    i += 1
                with lock:
                    stats.setdefault("verifications", []).append(c.verifications)

        threads = [threading.Thread(target=load, args=(("do1", "do2")[i % 2], i)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # clients meet the dead server
        proc = _start_server_process(world, broker.url, port)
        phase["restarted"] = True
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # graceful: finishes what it accepted
    assert stats["wrong"] == 0 and not stats["unclear"], stats
    assert stats["ok_before"] > 0 and stats["ok_after"] > 0 and stats["errors"] > 0, stats
    assert all(v >= 2 for v in stats["verifications"]), stats  # every client re-attested the new server


@pytest.mark.parametrize("renew", ["inf", "nan", "1e9", "301", "0", "-1"])
def test_the_hosts_renewal_period_is_capped_by_the_enclave(world, renew, capsys):
    """`--renew 1e9` would keep a revoked data owner answered for ever, `inf` killed the renewal thread
    and `nan` renewed in a busy loop: each is refused in one line before anything starts."""
    argv = [
        "--bundle",
        str(world["d"] / "model.btee"),
        "--listen",
        "127.0.0.1:0",
        "--attest",
        "simulated",
        "--quiet",
        "--renew",
        renew,
    ]
    assert srv.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--renew" in err and "300" in err


def test_a_revoked_data_owner_is_refused_within_the_answer_budget_whatever_the_period(world, monkeypatch):
    """The host passes the longest period (300 s) and the model owner removes data owner 1: after at
    most Renewal.MAX_REQUESTS answers the server stops, renews at once, and refuses data owner 1."""
    from branchy_tee.tee.serve.renewal import Renewal

    monkeypatch.setattr(Renewal, "MAX_REQUESTS", 5)
    with Served(world, extra=("--renew", "300")) as s:
        port = int(s.broker.url.rsplit(":", 1)[1])
        s.broker.stop()
        s.broker = start_broker(
            world["d"] / "mo.key",
            do_policy(world, allowed_data_owners=[world["ids"]["do2"]]),
            identity=world["d"] / "mo.id",
            port=port,
        )
        answered = 0
        with s.client("do1") as c:
            for _ in range(20):
                try:
                    c.predict(world["x"][:1])
                    answered += 1
                except BranchyError:
                    break
        assert answered <= 5
        assert s.server.allowed == {bytes.fromhex(world["ids"]["do2"])}
        with s.client("do2") as c:
            check_answers(world, c.predict(world["x"][:2]))


def test_a_model_broker_gone_for_good_stops_the_answers_after_a_grace(world):
    with Served(world, extra=("--renew", "0.2")) as s:
        with s.client("do1") as c:
            check_answers(world, c.predict(world["x"][:2]))
            s.broker.stop()  # unreachable, not refusing: tolerated for Renewal.GRACE renewals
            deadline = time.time() + 20
            while s.server.state != "revoked" and time.time() < deadline:
                time.sleep(0.1)
            assert s.server.state == "revoked"
            with pytest.raises(BranchyError):
                c.predict(world["x"][:2])


# --------------------------------------------------------------------------- the enclave build runs serve
def test_enclave_built_with_serve_answers_a_data_owner_whose_policy_comes_from_the_release(
    world, tmp_path, enclave_env
):
    """`enclave build --serve` (measured: the model broker, its identity, the bundle), the model owner's
    release statement, a data owner's policy from it, `enclave run --backend native -- serve`, and the
    data owner's client verifying that enclave's RA-TLS certificate against that policy."""
    import subprocess
    import sys

    from branchy_tee.core.fileio import read_key_file
    from branchy_tee.gramine.build import BuildOptions, build
    from branchy_tee.gramine.release import write_policy_from_release, write_release
    from branchy_tee.tee.attest.identity import load_identity

    d = world["d"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        broker_port, serve_port = sock.getsockname()[1], None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        serve_port = sock.getsockname()[1]
    broker_url = f"http://127.0.0.1:{broker_port}"
    build(
        BuildOptions(
            bundle=str(d / "model.btee"),
            out=str(tmp_path / "enc"),
            attest="simulated",
            serve=True,
            model_broker=broker_url,
            model_broker_identity=world["ids"]["mo"],
            env=enclave_env.dir,
            enclave_size="1G",
            io_dirs=[str(tmp_path / "io")],
        )
    )
    # threads: predict's and Gramine's own, one per connection, the batcher and the key renewal, and
    # the intra-op pool of each stage's session (4 compute threads by default: 3 pool threads each)
    import tomllib

    from branchy_tee.gramine.build import GRAMINE_HELPER_THREADS, SERVER_THREADS
    from branchy_tee.tee.sealed.aead import MAX_DECRYPT_WORKERS
    from branchy_tee.tee.sealed.bundle import read_header_unverified

    stages = len(read_header_unverified(d / "model.btee").stages)
    manifest = tomllib.loads((tmp_path / "enc" / "branchy-tee.manifest").read_text())
    assert manifest["sgx"]["max_threads"] == (
        4 + GRAMINE_HELPER_THREADS + MAX_DECRYPT_WORKERS - 1 + 3 * stages + 64 + SERVER_THREADS
    )
    write_release(tmp_path / "enc", load_identity(d / "mo.id"), tmp_path / "release.json", read_key_file(d / "mo.key"))
    write_policy_from_release(
        tmp_path / "release.json",
        world["ids"]["mo"],
        tmp_path / "mo.toml",
        allowed_data_owners=[world["ids"]["do1"]],
        consent=["simulated"],
    )
    write_policy_from_release(
        tmp_path / "release.json", world["ids"]["mo"], tmp_path / "do.toml", consent=["simulated"]
    )
    with start_broker(d / "mo.key", tmp_path / "mo.toml", identity=d / "mo.id", port=broker_port):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "branchy_tee.cli",
                "enclave",
                "run",
                "--backend",
                "native",
                str(tmp_path / "enc"),
                "--",
                "serve",
                "--bundle",
                str(d / "model.btee"),
                "--listen",
                f"127.0.0.1:{serve_port}",
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            assert line.startswith("serving lenet5"), line + proc.stderr.read()
            with Client(f"https://127.0.0.1:{serve_port}", policy=tmp_path / "do.toml", identity=d / "do1.id") as c:
                check_answers(world, c.predict(world["x"][:6]))
            # the same enclave, with a policy that pins the measurement of another build: refused
            with (
                Client(f"https://127.0.0.1:{serve_port}", policy=do_policy(world), identity=d / "do1.id") as c,
                pytest.raises(AttestationError, match="allowed_mrenclave"),
            ):
                c.predict(world["x"][:1])
        finally:
            proc.terminate()
            assert proc.wait(30) == 0


def test_the_client_takes_paths_pil_images_and_arrays_mixed_and_refuses_others(world, tmp_path):
    """`Client.predict` on a mixed list raised a raw numpy ValueError."""
    from PIL import Image

    pixels = (np.asarray(world["x"][:2, 0]) * 255).round().astype(np.uint8)
    Image.fromarray(pixels[0]).save(tmp_path / "a.png")
    pil = Image.fromarray(pixels[1])
    with Served(world) as s, s.client("do1") as c:
        one_by_one = [c.predict(tmp_path / "a.png")[0], c.predict(pil)[0], c.predict(world["x"][2])[0]]
        mixed = c.predict([str(tmp_path / "a.png"), pil, world["x"][2]])
        assert [r["label"] for r in mixed] == [r["label"] for r in one_by_one]
        assert len(c.predict([world["x"][3, 0], world["x"][4, 0]])) == 2  # grey images as 2-D arrays, as before
        with pytest.raises(BranchyError, match=r"images\[1\] is a dict: give image paths, PIL images or arrays"):
            c.predict([tmp_path / "a.png", {"not": "an image"}])
        with pytest.raises(BranchyError, match=r"more than 2x apart\); give --resize"):
            c.predict(Image.new("L", (300, 200)))
