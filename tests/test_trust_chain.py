"""The host's attacks on the trust chain, each its own test: the enclave must use only the owners'
keys and the owner's model, answer only the data owners the model owner allows, and every result
must name the model that answered and bind the exact request it answers.

Real key brokers on loopback (simulated evidence, allowed by the owners' policies, which are written
from the model owner's signed release statement), and the enclave run as the host runs it:
`branchy-tee enclave run DIR --backend native -- predict ...`, i.e. `python -m
branchy_tee.runtime.predict` with the manifest's measured environment (BRANCHY_TEE_ENCLAVE=1).
"""

from __future__ import annotations

import json
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from branchy_tee import measured
from branchy_tee.attest.broker import Broker
from branchy_tee.attest.broker_server import serve_in_background, start_broker
from branchy_tee.attest.client import AttestedKeys
from branchy_tee.attest.identity import create_identity, identity_hex, load_identity, sign
from branchy_tee.attest.protocol import report_data
from branchy_tee.attest.providers import SimulatedProvider, simulated_mrenclave
from branchy_tee.cli import main
from branchy_tee.errors import AttestationError, BranchyError
from branchy_tee.fileio import read_key_file
from branchy_tee.seal.bundle import seal_model
from branchy_tee.seal.keys import key_id
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

    from branchy_tee.rundir import load_run

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
    from branchy_tee.seal.envelope import request_digest

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
    from branchy_tee.enclave.release import FIELDS, RELEASE_PURPOSE
    from branchy_tee.seal.bundle import canonical_json

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
    from branchy_tee.enclave.build import load_config

    cfg = load_config(world.enclave)
    release = json.loads(world.path("release.json").read_text())
    from branchy_tee.attest.providers import code_measurement

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
    assert "names a SIMULATED enclave" in capfd.readouterr().err and not (tmp_path / "p.toml").exists()


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
