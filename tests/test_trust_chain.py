"""The host's attacks on the trust chain, each its own test: the enclave must use only the owners'
keys and the owner's model, answer only the data owners the model owner allows, and every result
must name the model that answered and bind the exact request it answers.

Real key brokers on loopback (simulated evidence, allowed by the owners' policies, which are written
from the model owner's signed release statement), and the enclave run as the host runs it:
`branchy-tee enclave run DIR --backend native -- predict ...`, i.e. `python -m
branchy_tee.tee.predict` with the manifest's measured environment (BRANCHY_TEE_ENCLAVE=1).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from branchy_tee.broker.broker import Broker, Refusal
from branchy_tee.broker.server import serve_in_background, start_broker
from branchy_tee.cli import main
from branchy_tee.core.errors import AttestationError, BranchyError, UsageError
from branchy_tee.core.fileio import read_key_file
from branchy_tee.core.keys import key_id
from branchy_tee.seal.bundle import seal_model
from branchy_tee.tee import measured
from branchy_tee.tee.attest.client import AttestedKeys
from branchy_tee.tee.attest.identity import create_identity, identity_hex, load_identity, parse_identity, sign, verify
from branchy_tee.tee.attest.protocol import (
    MAX_ALLOWED_DATA_OWNERS,
    RELEASE_PURPOSE,
    SUITE,
    key_info,
    pack_key,
    report_data,
)
from branchy_tee.tee.attest.providers import SimulatedProvider, simulated_mrenclave
from branchy_tee.verifier.policy import load_policy, parse_policy
from runs import keygen, make_random_run, mutate_bytes

PARTIES = ("mo", "do1", "do2", "host")
# `enclave build` with the session's enclave environment (conftest's enclave_env) and a given size:
# these tests are about trust, not about the measured enclave size (tests/test_enclave*.py).
BUILD = ("enclave", "build", "--env", str(Path(__file__).resolve().parents[1] / ".enclave-env"), "--enclave-size", "1G")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


def _simulated_policy(release, model_owner, out, *extra) -> int:
    """`enclave policy --allow-simulated`: a broker policy written from a release statement."""
    return _cli(
        "enclave",
        "policy",
        "--allow-simulated",
        "--release",
        release,
        "--model-owner",
        model_owner,
        *extra,
        "--out",
        out,
    )


@dataclass
class World:
    d: Path
    enclave: Path
    bundle: Path
    header: dict
    mo_port: int
    ids: dict  # party -> identity hex

    @property
    def mo_url(self) -> str:
        return f"http://127.0.0.1:{self.mo_port}"

    def path(self, name: str) -> Path:
        return self.d / name


@pytest.fixture(scope="module")
def world(tmp_path_factory, enclave_env) -> World:
    """A sealed LeNet-5, four parties with keys and identities, an enclave built for the bundle and the
    model owner's broker (simulated attestation), the model owner's release statement, both policies
    written from it, and one request per data owner."""
    d = tmp_path_factory.mktemp("trust")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(d / "config"))
        model, meta = make_random_run(d / "run", "lenet5")
        ids = {}
        for p in PARTIES:
            keygen(d / f"{p}.key")
            ids[p] = identity_hex(create_identity(d / f"{p}.id"))
        assert _cli("seal", d / "run", "--key", d / "mo.key", "--out", d / "model.btee") == 0
        port = _free_port()
        assert (
            _cli(
                *BUILD,
                "--bundle",
                d / "model.btee",
                "--out",
                d / "enclave",
                "--attest",
                "simulated",
                "--model-broker",
                f"http://127.0.0.1:{port}",
                "--model-broker-identity",
                ids["mo"],
                "--io-dir",
                d / "io",
            )
            == 0
        )
        # The model owner reproduces the build (here: the same one) and signs what it is.
        assert (
            _cli(
                "enclave",
                "release",
                d / "enclave",
                "--identity",
                d / "mo.id",
                "--model-key",
                d / "mo.key",
                "--out",
                d / "release.json",
            )
            == 0
        )
        assert _simulated_policy(d / "release.json", ids["mo"], d / "do-policy.toml") == 0
        assert (
            _simulated_policy(
                d / "release.json",
                ids["mo"],
                d / "mo-policy.toml",
                "--allowed-data-owner",
                ids["do1"],
                "--allowed-data-owner",
                ids["do2"],
            )
            == 0
        )
        import torch
        from safetensors.torch import save_file

        for i, owner in enumerate(("do1", "do2", "host"), 1):
            save_file({"x": torch.rand(3 + i, 1, 28, 28)}, str(d / f"x-{owner}.safetensors"))
            assert (
                _cli(
                    "encrypt-input",
                    d / f"x-{owner}.safetensors",
                    "--bundle",
                    d / "model.btee",
                    "--key",
                    d / f"{owner}.key",
                    "--out",
                    d / "io" / f"{owner}.req",
                    "--request-id",
                    f"req-{owner}",
                )
                == 0
            )
        header = json.loads((d / "model.btee" / "header.json").read_text())["header"]
        yield World(d, d / "enclave", d / "model.btee", header, port, ids)


@pytest.fixture(autouse=True)
def _dev_key(world, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(world.d / "config"))


@contextmanager
def brokers(world: World, mo_policy: str = "mo-policy.toml", data=("do1", "do2"), audit_dir: Path | None = None):
    """The model owner's broker at the measured address and the data owners' brokers, each with its
    identity and a policy from the release statement. Yields {party: handle}."""
    audit_dir = audit_dir or world.d
    with ExitStack() as stack:
        handles = {
            "mo": stack.enter_context(
                start_broker(
                    world.path("mo.key"),
                    world.path(mo_policy),
                    port=world.mo_port,
                    identity=world.path("mo.id"),
                    audit_log=audit_dir / "mo-audit.jsonl",
                )
            )
        }
        for owner in data:
            handles[owner] = stack.enter_context(
                start_broker(
                    world.path(f"{owner}.key"),
                    world.path("do-policy.toml"),
                    identity=world.path(f"{owner}.id"),
                    audit_log=audit_dir / f"{owner}-audit.jsonl",
                )
            )
        yield handles


def run_enclave(
    world: World, out: Path, owners, data_urls, *extra, bundle: Path | None = None, enclave: Path | None = None
) -> int:
    """`enclave run DIR --backend native -- predict ...` for the owners' requests; results in ``out``."""
    argv = [
        "enclave",
        "run",
        "--backend",
        "native",
        enclave or world.enclave,
        "--",
        "predict",
        "--bundle",
        bundle or world.bundle,
        "--quiet",
        "--threads",
        "1",
    ]
    for o in owners:
        argv += ["--input", world.d / "io" / f"{o}.req", "--output", out / f"{o}.res"]
    for u in data_urls:
        argv += ["--data-broker", u]
    return _cli(*argv, *extra)


def decrypt(world: World, result: Path, owner: str, request: Path, capfd) -> tuple[int, object]:
    capfd.readouterr()
    rc = _cli("decrypt-result", result, "--key", world.path(f"{owner}.key"), "--request", request, "--json")
    cap = capfd.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else cap.err)


def audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- the genuine flow
def test_genuine_flow_two_data_owners_each_result_names_the_model(world, tmp_path, capfd):
    out = tmp_path / "out"
    with brokers(world, audit_dir=tmp_path) as b:
        assert run_enclave(world, out, ("do1", "do2"), [b["do1"].url, b["do2"].url]) == 0, capfd.readouterr().err
    for owner, n in (("do1", 4), ("do2", 5)):
        rc, doc = decrypt(world, out / f"{owner}.res", owner, world.d / "io" / f"{owner}.req", capfd)
        assert rc == 0, doc
        assert len(doc["records"]) == n and doc["request_id"] == f"req-{owner}"
        assert (doc["bundle_id"], doc["model_version"], doc["model_key_id"]) == (
            world.header["bundle_id"],
            world.header["model_version"],
            world.header["key_id"],
        )
    # the model key went once to the enclave the release names; each data key once
    release = json.loads(world.path("release.json").read_text())
    for party in ("mo", "do1", "do2"):
        lines = audit(tmp_path / f"{party}-audit.jsonl")
        assert [ln["decision"] for ln in lines] == ["granted"], lines
        assert lines[0]["claims"]["mrenclave"] == release["mrenclave"]


# --------------------------------------------------------------------------- impersonating the model broker
class HostBroker(Broker):
    """A broker of the host's own making: it claims to release the measured model key id, but hands
    out the host's key, signed with the host's identity."""

    def __init__(self, world: World):
        host_key = read_key_file(world.path("host.key"))
        super().__init__([host_key], world.path("do-policy.toml"), identity=world.path("host.id"))
        self.keys = {world.header["key_id"]: host_key}


def test_host_broker_at_the_measured_model_broker_address_is_refused(world, tmp_path, capfd):
    genuine = start_broker(
        world.path("mo.key"), world.path("mo-policy.toml"), port=world.mo_port, identity=world.path("mo.id")
    )
    genuine.stop()  # the host stops the genuine broker and answers on its port
    with brokers(world, data=("do1",)) as b:  # (the genuine model broker of this helper is replaced below)
        b["mo"].stop()
        with serve_in_background(HostBroker(world), port=world.mo_port):
            out = tmp_path / "out"
            assert run_enclave(world, out, ("do1",), [b["do1"].url]) == 1
            err = capfd.readouterr().err
            assert f"answered with identity {world.ids['host']}, not the expected {world.ids['mo']}" in err
            assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1 and "Traceback" not in err
            assert nothing_written(out)
            # the data owner's key was never asked for
            assert b["do1"].broker.granted == 0


def test_host_resealed_model_with_its_own_key_and_broker_is_refused(world, tmp_path, capfd):
    """The host seals a model of its own (any weights, hence any function of the inputs) under its own
    key and serves that key honestly from its own broker at the measured address."""
    import torch

    from branchy_tee.models.rundir import load_run

    model, meta = load_run(world.path("run"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    host_bundle = tmp_path / "host.btee"
    seal_model(model, meta, read_key_file(world.path("host.key")), host_bundle)
    with ExitStack() as stack:
        stack.enter_context(
            serve_in_background(
                Broker(world.path("host.key"), world.path("do-policy.toml"), identity=world.path("host.id")),
                port=world.mo_port,
            )
        )
        do1 = stack.enter_context(
            start_broker(world.path("do1.key"), world.path("do-policy.toml"), identity=world.path("do1.id"))
        )
        out = tmp_path / "out"
        assert run_enclave(world, out, ("do1",), [do1.url], bundle=host_bundle) == 1
        err = capfd.readouterr().err
        assert "is not the measured bundle" in err and "another model is refused" in err
        assert nothing_written(out) and do1.broker.granted == 0


def test_enclave_built_without_a_model_broker_refuses_one_on_the_command_line(world, tmp_path, capfd):
    bare = tmp_path / "bare-enclave"
    assert (
        _cli(*BUILD, "--bundle", world.bundle, "--out", bare, "--attest", "simulated", "--io-dir", world.d / "io") == 0
    )
    capfd.readouterr()
    with brokers(world, data=("do1",)) as b:
        out = tmp_path / "out"
        rc = run_enclave(
            world,
            out,
            ("do1",),
            [b["do1"].url],
            "--attest",
            "simulated",
            "--model-broker",
            b["mo"].url,
            "--model-broker-identity",
            world.ids["mo"],
            enclave=bare,
        )
        assert rc == 2
        err = capfd.readouterr().err
        assert "the model broker comes only from its measured settings" in err and "refused" in err
        assert nothing_written(out) and b["mo"].broker.granted == 0
        # and without any command line it cannot run at all: it has no model broker
        assert run_enclave(world, out, ("do1",), [b["do1"].url], enclave=bare) == 2
        assert "built without a model broker" in capfd.readouterr().err


# --------------------------------------------------------------------------- who may query the model
def test_data_broker_not_on_the_allow_list_is_refused(world, tmp_path, capfd):
    """The host brings its own data key, request and broker (the mirror attack: a query oracle on the
    model owner's model). The model key is released to the enclave, but no result is produced."""
    with (
        brokers(world, data=(), audit_dir=tmp_path),
        start_broker(world.path("host.key"), world.path("do-policy.toml"), identity=world.path("host.id")) as hb,
    ):
        out = tmp_path / "out"
        assert run_enclave(world, out, ("host",), [hb.url]) == 1
        err = capfd.readouterr().err
        assert f"has identity {world.ids['host']}, which the model owner does not allow" in err
        assert nothing_written(out) and hb.broker.granted == 0  # refused before any evidence went to it
    release = json.loads(world.path("release.json").read_text())
    lines = audit(tmp_path / "mo-audit.jsonl")
    assert [(ln["decision"], ln["claims"]["mrenclave"]) for ln in lines] == [("granted", release["mrenclave"])]


def test_model_owner_policy_without_allowed_data_owners_uses_no_data_key(world, tmp_path, capfd):
    with brokers(world, mo_policy="do-policy.toml", audit_dir=tmp_path) as b:
        out = tmp_path / "out"
        assert run_enclave(world, out, ("do1",), [b["do1"].url, b["do2"].url]) == 1
        assert "allows no data owner to use this model" in capfd.readouterr().err
        assert nothing_written(out)
        assert b["do1"].broker.granted == b["do2"].broker.granted == 0
    assert audit(tmp_path / "do1-audit.jsonl") == [] and audit(tmp_path / "do2-audit.jsonl") == []


# --------------------------------------------------------------------------- results bind their request
def test_old_result_replayed_for_a_new_request_with_the_same_id_is_refused(world, tmp_path, capfd):
    out = tmp_path / "out"
    with brokers(world, data=("do1",)) as b:
        assert run_enclave(world, out, ("do1",), [b["do1"].url]) == 0
    old = out / "do1.res"
    # the data owner sends a new request, reusing the request id; the host answers with the old result
    new_req = tmp_path / "new.req"
    assert (
        _cli(
            "encrypt-input",
            world.path("x-do1.safetensors"),
            "--bundle",
            world.bundle,
            "--key",
            world.path("do1.key"),
            "--out",
            new_req,
            "--request-id",
            "req-do1",
        )
        == 0
    )
    rc, err = decrypt(world, old, "do1", new_req, capfd)
    assert rc == 1 and "answers another request" in err and "replayed" in err
    from branchy_tee.tee.sealed.envelope import request_digest

    assert (
        _cli(
            "decrypt-result",
            old,
            "--key",
            world.path("do1.key"),
            "--request-digest",
            request_digest(new_req.read_bytes()),
        )
        == 1
    )
    # the genuine pairing still opens
    assert _cli("decrypt-result", old, "--key", world.path("do1.key"), "--request", world.d / "io" / "do1.req") == 0
    # without the request (or its digest) no result is opened at all
    with pytest.raises(SystemExit) as e:
        main(["decrypt-result", str(old), "--key", str(world.path("do1.key"))])
    assert e.value.code == 2 and "one of the arguments --request --request-digest is required" in capfd.readouterr().err


# --------------------------------------------------------------------------- release statements
def test_release_statement_tampered_or_signed_by_another_identity_is_refused(world, tmp_path, capfd):
    good = json.loads(world.path("release.json").read_text())
    out = tmp_path / "p.toml"

    def policy(doc_or_bytes, owner=world.ids["mo"]) -> tuple[int, str]:
        f = tmp_path / "release.json"
        f.write_bytes(doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode())
        capfd.readouterr()
        rc = _simulated_policy(f, owner, out)
        return rc, capfd.readouterr().err

    assert policy(good)[0] == 0 and out.exists()
    out.unlink()
    flipped = dict(good, mrenclave=("0" if good["mrenclave"][0] != "0" else "1") + good["mrenclave"][1:])
    rc, err = policy(flipped)
    assert rc == 1 and "signature does not verify under the model owner's identity" in err
    rc, err = policy(dict(good, min_model_version=0))  # an attempt to allow rollback
    assert rc == 1 and "signature does not verify" in err
    raw = world.path("release.json").read_bytes()
    rc, err = policy(raw[:40] + bytes([raw[40] ^ 1]) + raw[41:])
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # the host signs a statement of its own (any content it likes), claiming to be the model owner or not
    from branchy_tee.core.strict import canonical_json
    from branchy_tee.gramine.release import FIELDS, RELEASE_PURPOSE

    host_statement = {k: good[k] for k in FIELDS} | {"model_owner": world.ids["host"], "mrenclave": "ab" * 32}
    signature = sign(load_identity(world.path("host.id")), RELEASE_PURPOSE, canonical_json(host_statement))
    host_doc = {**host_statement, "signature": signature.hex()}
    rc, err = policy(host_doc)
    assert rc == 1 and f"signed by '{world.ids['host']}', not by the model owner" in err
    rc, err = policy(dict(host_doc, model_owner=world.ids["mo"]))
    assert rc == 1 and "signature does not verify" in err
    assert not out.exists()


# --------------------------------------------------------------------------- simulated measurement
@pytest.mark.parametrize("name", measured.NAMES)
def test_every_measured_setting_changes_the_simulated_mrenclave(name):
    base = {n: "" for n in measured.NAMES}
    assert simulated_mrenclave({**base, name: "x"}) != simulated_mrenclave(base)


def test_release_names_the_measurement_of_the_built_enclave(world):
    """What the model owner signs is what the native enclave run reports (code + measured settings)."""
    from branchy_tee.gramine.build import load_config

    cfg = load_config(world.enclave)
    release = json.loads(world.path("release.json").read_text())
    from branchy_tee.tee.attest.providers import code_measurement

    # the code is the enclave environment's copy of branchy_tee (what `enclave run` runs), not this checkout
    code = code_measurement(Path(cfg.package_dir) / "branchy_tee")
    assert release["mrenclave"] == simulated_mrenclave(cfg.env, code).hex()
    assert (release["bundle_id"], release["model_key_id"], release["model_broker_identity"]) == (
        world.header["bundle_id"],
        world.header["key_id"],
        world.ids["mo"],
    )


# --------------------------------------------------------------------------- forged broker responses
@pytest.fixture(scope="module")
def signed_release(world):
    """One genuine signed key release (model broker, allow-list) and the enclave side that asked for it."""
    mo_key = read_key_file(world.path("mo.key"))
    sim = SimulatedProvider(world.d / "devkey")
    policy = {
        "allowed_mrenclave": [sim.mrenclave.hex()],
        "allow_simulation": True,
        "allowed_data_owners": [world.ids["do1"], world.ids["do2"]],
    }
    broker = Broker([mo_key], policy, identity=load_identity(world.path("mo.id")))
    client = AttestedKeys("simulated", "http://broker.invalid", bytes.fromhex(world.ids["mo"]), [], provider=sim)
    nonce = bytes.fromhex(broker.nonce()["nonce"])
    import base64

    body = {
        "evidence_type": "simulated",
        "key_ids": [key_id(mo_key)],
        "public_key": client.public_key.hex(),
        "nonce": nonce.hex(),
        "evidence": base64.b64encode(sim.evidence(report_data(client.public_key, nonce))).decode(),
    }
    doc = broker.request_keys(json.dumps(body).encode(), "test")
    broker.close()
    release = client.verify_release("u", doc, nonce, [key_id(mo_key)], client.model_broker_identity)
    return client, doc, nonce, key_id(mo_key), release


_EDIT = st.tuples(
    st.sampled_from(["xor", "delete", "insert", "set"]), st.integers(0, 10_000), st.binary(min_size=1, max_size=4)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(_EDIT, min_size=1, max_size=3))
def test_forged_or_truncated_signed_responses_are_refused(signed_release, edits):
    """Any change to a signed key release's bytes is refused, unless it changes nothing the enclave acts
    on (JSON whitespace, member order, hex case, base64 padding bits...)."""
    client, doc, nonce, kid, release = signed_release
    raw = mutate_bytes(json.dumps(doc).encode(), edits)
    try:
        forged = json.loads(raw)
        if not isinstance(forged, dict):
            raise ValueError
    except (ValueError, RecursionError):
        return  # not JSON: the client's transport refuses it (tests/security covers that path)
    try:
        got = client.verify_release("u", forged, nonce, [kid], client.model_broker_identity)
    except AttestationError:
        return
    assert got == release  # accepted only if it says exactly what the broker signed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reordered_or_dropped_members_of_signed_responses_are_refused(signed_release, data):
    client, doc, nonce, kid, release = signed_release
    forged = json.loads(json.dumps(doc))
    op = data.draw(st.sampled_from(["drop", "swap", "owners", "version", "identity", "nonce"]))
    names = sorted(n for n in forged if n not in ("protocol", "suite"))  # (unsigned, unused by the enclave)
    if op == "drop":
        forged.pop(data.draw(st.sampled_from(names)))
    elif op == "swap":
        a, b = data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True))
        forged[a], forged[b] = forged[b], forged[a]
    elif op == "owners":  # add, drop or replace an allowed data owner
        owners = forged["allowed_data_owners"]
        choice = data.draw(st.sampled_from(["add", "drop", "replace"]))
        if choice == "add":
            owners.append("ab" * 32)
        elif choice == "drop":
            owners.pop(data.draw(st.integers(0, len(owners) - 1)))
        else:
            owners[0] = "cd" * 32
    elif op == "version":
        forged["min_model_version"] = data.draw(st.integers(0, 2**40).filter(lambda v: v != doc["min_model_version"]))
    elif op == "identity":  # the host's own identity with the genuine signature
        forged["identity"] = "ef" * 32
    else:
        nonce = bytes(len(nonce))  # a response to another exchange
    with pytest.raises(AttestationError):
        client.verify_release("u", forged, nonce, [kid], client.model_broker_identity)


def test_cli_surfaces_are_one_line(world, tmp_path, capfd):
    """keygen --identity never overwrites; bad identities are one-line usage errors."""
    assert _cli("keygen", "--identity", "--out", world.path("mo.id")) == 1
    assert "refusing to overwrite an identity" in capfd.readouterr().err
    assert _cli(*BUILD, "--bundle", world.bundle, "--out", tmp_path / "e", "--model-broker", "http://127.0.0.1:1") == 2
    assert "--model-broker needs --model-broker-identity" in capfd.readouterr().err
    assert _simulated_policy(world.path("release.json"), "xyz", tmp_path / "p.toml") == 2
    err = capfd.readouterr().err
    assert "is not an identity" in err and len(err.strip().splitlines()) == 1


def test_release_is_refused_for_an_enclave_that_pins_another_model_or_broker(world, tmp_path, capfd):
    """The model owner's `enclave release` checks what the build pins against its own model key and
    identity, whatever the (possibly host-made) build directory claims."""
    keygen(tmp_path / "other.key")
    out = tmp_path / "r.json"
    assert (
        _cli(
            "enclave",
            "release",
            world.enclave,
            "--identity",
            world.path("mo.id"),
            "--model-key",
            tmp_path / "other.key",
            "--out",
            out,
        )
        == 1
    )
    assert "it would serve another model" in capfd.readouterr().err
    assert (
        _cli(
            "enclave",
            "release",
            world.enclave,
            "--identity",
            world.path("host.id"),
            "--model-key",
            world.path("mo.key"),
            "--out",
            out,
        )
        == 1
    )
    assert f"trusts model broker identity {world.ids['mo']}, not {world.ids['host']}" in capfd.readouterr().err
    assert not out.exists()
    # and a data owner writes a policy for a simulated enclave only when it says so
    assert (
        _cli(
            "enclave",
            "policy",
            "--release",
            world.path("release.json"),
            "--model-owner",
            world.ids["mo"],
            "--out",
            tmp_path / "p.toml",
        )
        == 1
    )
    assert "did not consent to simulated attestation" in capfd.readouterr().err and not (tmp_path / "p.toml").exists()


def test_decrypt_result_can_require_the_released_bundle(world, tmp_path, capfd):
    out = tmp_path / "out"
    with brokers(world, data=("do1",)) as b:
        assert run_enclave(world, out, ("do1",), [b["do1"].url]) == 0
    argv = ["decrypt-result", out / "do1.res", "--key", world.path("do1.key"), "--request", world.d / "io" / "do1.req"]
    assert _cli(*argv, "--expect-bundle", world.header["bundle_id"]) == 0
    assert _cli(*argv, "--expect-bundle", "0" * 32) == 1
    assert "not the expected '00000000" in capfd.readouterr().err


def test_a_broker_that_drips_its_answer_is_cut_off(tmp_path):
    """The enclave's timeout holds for the whole answer, not per byte."""
    import threading
    import time

    stop = threading.Event()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def drip():
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b" ")
            except OSError:
                break
            time.sleep(0.2)
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    client = AttestedKeys(
        "simulated", url, bytes.fromhex("ab" * 32), [], provider=SimulatedProvider(tmp_path / "k"), timeout=1.5
    )
    t0 = time.monotonic()
    with pytest.raises(BranchyError, match="no complete answer within 1.5 s"):
        client.offer(url)
    assert time.monotonic() - t0 < 5
    stop.set()
    srv.close()


# ------------------------------------------------ attacks from the review of the chain (issue 12)
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

    from branchy_tee.models.rundir import load_run

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
    from branchy_tee.gramine import release as release_mod

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
