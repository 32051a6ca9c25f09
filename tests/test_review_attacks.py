"""Attacks from the security review of the trust chain (issue 12) that succeeded: each test shows
one and fails until it is fixed. Same setting as ``test_trust_chain``: real key brokers on loopback,
simulated evidence where policies allow it, the enclave run as `enclave run DIR --backend native`.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

import test_trust_chain
from branchy_tee import measured
from branchy_tee.attest.broker import Broker, Refusal
from branchy_tee.attest.broker_server import serve_in_background, start_broker
from branchy_tee.attest.client import AttestedKeys
from branchy_tee.attest.identity import parse_identity, verify
from branchy_tee.attest.policy import load_policy, parse_policy
from branchy_tee.attest.protocol import MAX_ALLOWED_DATA_OWNERS, RELEASE_PURPOSE, SUITE, key_info, pack_key, report_data
from branchy_tee.attest.providers import SimulatedProvider
from branchy_tee.errors import AttestationError, BranchyError, UsageError
from branchy_tee.fileio import read_key_file
from branchy_tee.seal.bundle import seal_model
from branchy_tee.seal.keys import key_id
from test_trust_chain import BUILD, _cli, _free_port, _simulated_policy, nothing_written, run_enclave

# The trust-chain tests' world (model, owners, brokers' keys, built enclave), shared by these attacks.
world = test_trust_chain.world


def _doctored_copy(world, dest: Path, **env_changes) -> dict:
    """A copy of the enclave build directory whose enclave.json the host has edited: the measured
    environment (``env``, what the enclave runs with and what the simulated measurement covers)
    changed, the top-level settings (what `enclave release` copies into the statement) left alone."""
    shutil.copytree(world.enclave, dest)
    cfg = json.loads((dest / "enclave.json").read_text())
    cfg["env"].update(env_changes)
    (dest / "enclave.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return cfg


def _simulated_key_request(broker: Broker, provider: SimulatedProvider, kid: str) -> bytes:
    client = AttestedKeys("simulated", "http://broker.invalid", bytes(range(32)), [], provider=provider)
    nonce = bytes.fromhex(broker.nonce()["nonce"])
    return json.dumps(
        {
            "evidence_type": "simulated",
            "key_ids": [kid],
            "public_key": client.public_key.hex(),
            "nonce": nonce.hex(),
            "evidence": base64.b64encode(provider.evidence(report_data(client.public_key, nonce))).decode(),
        }
    ).encode()


# --------------------------------------------------------------------------- release statements
def test_release_statement_names_what_its_measurement_pins(world, tmp_path, capfd):
    """`enclave release` takes the statement's bundle id, model broker and its identity from
    enclave.json's top-level members, but the measurement from its ``env`` (simulated; for SGX from
    the .sig file), and never checks that they agree. The host edits ``env`` in the build directory
    (its own model broker, identity and bundle); the model owner runs `enclave release` on it (the
    host's `enclave build` output tells it to) and signs a statement that names the model owner's
    broker and bundle over a measurement that pins the host's. The data owner's policy, written
    from that statement, then releases its data key to an enclave that runs the host's model:
    issue 12's attack, again."""
    import torch

    from branchy_tee.rundir import load_run

    host_key = read_key_file(world.path("host.key"))
    model, meta = load_run(world.path("run"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    host_bundle = tmp_path / "host.btee"
    header = seal_model(model, meta, host_key, host_bundle)
    port = _free_port()
    doctored = tmp_path / "enclave"
    _doctored_copy(
        world,
        doctored,
        **{
            measured.MODEL_BROKER: f"http://127.0.0.1:{port}",
            measured.MODEL_BROKER_IDENTITY: world.ids["host"],
            measured.BUNDLE_ID: header.bundle_id,
            measured.MODEL_KEY_ID: header.key_id,
        },
    )

    release = tmp_path / "release.json"
    if (
        _cli(
            "enclave",
            "release",
            doctored,
            "--identity",
            world.path("mo.id"),
            "--model-key",
            world.path("mo.key"),
            "--out",
            release,
        )
        != 0
    ):
        return  # refused: the statement would not have described its measurement
    statement = json.loads(release.read_text())
    assert (statement["model_broker_identity"], statement["bundle_id"]) == (world.ids["mo"], world.header["bundle_id"])
    policy = tmp_path / "do1-policy.toml"
    assert _simulated_policy(release, world.ids["mo"], policy) == 0
    capfd.readouterr()

    host_policy = {
        "allowed_mrenclave": [statement["mrenclave"]],
        "allow_simulation": True,
        "allowed_data_owners": [world.ids["do1"]],
    }
    with (
        serve_in_background(Broker([host_key], host_policy, identity=world.path("host.id")), port=port),
        start_broker(world.path("do1.key"), policy, identity=world.path("do1.id")) as do1,
    ):
        out = tmp_path / "out"
        rc = run_enclave(world, out, ("do1",), [do1.url], bundle=host_bundle, enclave=doctored)
        granted = do1.broker.granted
    assert (rc, granted) == (1, 0) and nothing_written(out), (
        "the data owner's broker released its key to an enclave that trusts the host's model broker and serves the "
        f"host's bundle {header.bundle_id}, because the model owner signed a statement naming bundle "
        f"{statement['bundle_id']} and broker identity {statement['model_broker_identity']} over that enclave's "
        f"measurement {statement['mrenclave']}"
    )


def test_release_statement_text_cannot_add_settings_to_a_data_owners_policy(world, tmp_path, monkeypatch):
    """`enclave policy` writes the statement's ``model_broker`` (checked only to be a string) into a TOML
    comment. A newline in it ends the comment: whoever controls that text (the host, through
    enclave.json's top-level ``model_broker`` of a directory the model owner signs; or a dishonest
    model owner) adds settings to the data owner's policy, which is then said to release keys "only
    to MRENCLAVE ...". Here: ``allow_simulation = true`` on a release for real SGX, after which a
    process that is no enclave gets the data owner's key with self-signed simulated evidence."""
    from branchy_tee.enclave import release as release_mod

    mrenclave = "ab" * 32
    monkeypatch.setattr(
        release_mod,
        "read_measurements",
        lambda d: {  # a stand-in for gramine-sgx-sigstruct-view
            "mrenclave": mrenclave,
            "mrsigner": "cd" * 32,
            "isv_prod_id": 0,
            "isv_svn": 0,
            "debug": False,
        },
    )
    d = tmp_path / "enclave"
    shutil.copytree(world.enclave, d)
    cfg = json.loads((d / "enclave.json").read_text())
    cfg.update(attest="gramine", model_broker=f"{cfg['model_broker']}\nallow_simulation = true\n#")
    (d / "enclave.json").write_text(json.dumps(cfg))
    release = tmp_path / "release.json"
    if (
        _cli(
            "enclave",
            "release",
            d,
            "--identity",
            world.path("mo.id"),
            "--model-key",
            world.path("mo.key"),
            "--out",
            release,
        )
        != 0
    ):
        return  # refused at signing
    policy = tmp_path / "do1-policy.toml"
    if _simulated_policy(release, world.ids["mo"], policy) != 0:
        return  # refused when writing the policy
    broker = Broker(world.path("do1.key"), load_policy(policy), identity=world.path("do1.id"))
    try:
        impostor = SimulatedProvider(tmp_path / "any-dev-key", mrenclave=bytes.fromhex(mrenclave))
        with pytest.raises(Refusal, match="simulated evidence refused"):
            broker.request_keys(
                _simulated_key_request(broker, impostor, key_id(read_key_file(world.path("do1.key")))), "host"
            )
    finally:
        broker.close()


# --------------------------------------------------------------------------- identities
def test_small_order_identities_are_refused(world, tmp_path):
    """Ed25519 as ``cryptography`` (OpenSSL) verifies it does not refuse small-order public keys:
    under the identity ``01 00...00`` (the neutral point) the signature ``01 00...00 || 0...0``
    verifies for every message, and under ``00...00`` (a point of order 4) the signature of 64
    zero bytes verifies for about one message in four. Such an identity is accepted everywhere one
    is pinned (`--model-broker-identity`, `allowed_data_owners`, `--model-owner`), and then anyone
    signs for it: here an enclave pinned to it takes the host's key as the model key."""
    neutral = "01" + "00" * 31
    fake_signature = bytes.fromhex(neutral) + bytes(32)
    assert not any(
        verify(bytes.fromhex(neutral), RELEASE_PURPOSE, f"message {i}".encode(), fake_signature) for i in range(8)
    ), "a made-up signature verifies under the neutral-point identity"
    for weak in (neutral, "00" * 32):
        with pytest.raises(UsageError):
            parse_identity(weak)
        with pytest.raises(BranchyError):
            parse_policy({"allowed_mrenclave": ["ab" * 32], "allowed_data_owners": [weak]})
        assert (
            _cli(
                *BUILD,
                "--bundle",
                world.bundle,
                "--out",
                tmp_path / "e",
                "--attest",
                "simulated",
                "--model-broker",
                "http://127.0.0.1:1",
                "--model-broker-identity",
                weak,
            )
            == 2
        )

    # What the enclave does with it: a release the host made up, with the made-up signature.
    sim = SimulatedProvider(tmp_path / "devkey")
    client = AttestedKeys("simulated", "http://broker.invalid", bytes.fromhex(neutral), [], provider=sim)
    host_key = read_key_file(world.path("host.key"))
    kid, nonce = key_id(host_key), bytes(40)
    forged = {
        "identity": neutral,
        "min_model_version": 0,
        "allowed_data_owners": [world.ids["host"]],
        "signature": fake_signature.hex(),
        "keys": {
            kid: base64.b64encode(
                SUITE.encrypt(pack_key(host_key, 0), client._sk.public_key(), info=key_info(kid, nonce))
            ).decode()
        },
    }
    with pytest.raises(AttestationError):
        client.verify_release("http://broker.invalid", forged, nonce, [kid], bytes.fromhex(neutral))


# --------------------------------------------------------------------------- policy vs. enclave limits
def test_a_policy_the_broker_accepts_gives_releases_the_enclave_accepts(world, tmp_path):
    """The enclave refuses a release with more than MAX_ALLOWED_DATA_OWNERS allowed data owners
    ("malformed key release"), but a policy may list any number: the model owner's broker starts,
    signs, and every enclave run fails with a message that names neither the cause nor the limit."""
    owners = [f"{i:064x}" for i in range(1, MAX_ALLOWED_DATA_OWNERS + 2)]
    sim = SimulatedProvider(tmp_path / "devkey")
    settings = {"allowed_mrenclave": [sim.mrenclave.hex()], "allow_simulation": True, "allowed_data_owners": owners}
    try:
        policy = parse_policy(settings)
    except BranchyError:
        return  # refused where the model owner can see why
    mo_key = read_key_file(world.path("mo.key"))
    broker = Broker([mo_key], policy, identity=world.path("mo.id"))
    try:
        client = AttestedKeys("simulated", "http://broker.invalid", bytes.fromhex(world.ids["mo"]), [], provider=sim)
        nonce = bytes.fromhex(broker.nonce()["nonce"])
        body = {
            "evidence_type": "simulated",
            "key_ids": [key_id(mo_key)],
            "public_key": client.public_key.hex(),
            "nonce": nonce.hex(),
            "evidence": base64.b64encode(sim.evidence(report_data(client.public_key, nonce))).decode(),
        }
        doc = broker.request_keys(json.dumps(body).encode(), "test")
    finally:
        broker.close()
    client.verify_release("u", doc, nonce, [key_id(mo_key)], client.model_broker_identity)


# --------------------------------------------------------------------------- build vs. enclave
@pytest.mark.parametrize("url", ["http://ex\u00e4mple.test:1", "http://a\x01b.test:1"])
def test_build_refuses_a_model_broker_url_the_enclave_refuses(world, tmp_path, url):
    """`enclave build` measures a model-broker URL that the enclave's own check refuses (non-ASCII,
    control characters; the latter also make the manifest's TOML string invalid): an enclave that can
    never run, found out only at the first run, after the owners wrote policies for its MRENCLAVE."""
    assert (
        _cli(
            *BUILD,
            "--bundle",
            world.bundle,
            "--out",
            tmp_path / "e",
            "--attest",
            "simulated",
            "--model-broker",
            url,
            "--model-broker-identity",
            world.ids["mo"],
        )
        == 2
    )


# --------------------------------------------------------------------------- collateral chosen by the host
def test_host_cannot_skip_the_minimum_tcb_evaluation_number_by_sending_no_collateral(sgx_quotes_dir):
    """`accept_client_collateral = true` with `min_tcb_evaluation_data_number` exists so that the host
    cannot pick old Intel-signed collateral (phala-1's is number 17; the minimum here is 18). With
    `require_collateral = false` (the setting for a broker without a collateral file) the host sends
    no collateral at all: the TCB status is unknown, the minimum is not checked, and the quote is
    accepted: the oldest possible choice passes where number 17 is refused."""
    from branchy_tee.seal.keys import generate_key
    from test_broker import PHALA1_MRENCLAVE, PHALA_NOW, post_quote

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
