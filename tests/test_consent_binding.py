"""The consent binds, whoever signs: the enclave carries its measured settings digest in every
REPORTDATA (key requests and RA-TLS certificates), so a policy that pins only the signer (MRSIGNER,
``own_signing_key``) still refuses a build with settings it did not accept; the development key the
owners share is in the release statement and policies written with --allow-simulated pin it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import tomllib
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from branchy_tee.broker.server import start_broker
from branchy_tee.core.errors import AttestationError
from branchy_tee.core.keys import generate_key, key_id
from branchy_tee.gramine.config import load_config, settings_digest
from branchy_tee.gramine.release import policy_from_release, read_release
from branchy_tee.tee import measured
from branchy_tee.tee.attest.client import AttestedKeys
from branchy_tee.tee.attest.protocol import KeyRelease
from branchy_tee.tee.attest.providers import SimulatedProvider, code_measurement, simulated_mrenclave
from branchy_tee.tee.attest.ratls import make_server_certificate
from branchy_tee.verifier.policy import parse_policy
from branchy_tee.verifier.ratls import verify_server_certificate
from test_release_statement import owner, release  # noqa: F401 (a fixture)


def binding_of(statement: dict) -> str:
    """What the statement's loader.env values make the enclave put in REPORTDATA (as a policy pins it)."""
    env = {k.removeprefix("loader.env."): v for k, v in statement["measured"].items() if k.startswith("loader.env.")}
    return measured.settings_binding(env).hex()


def signer_only_policy(statement: dict, **kw) -> dict:
    """What an owner who signs its own enclaves writes: MRSIGNER (here the dev key's) and the settings
    of the one build it accepted."""
    return {
        "allowed_mrsigner": [statement["mrsigner"]],
        "own_signing_key": True,
        "allowed_settings": [binding_of(statement)],
        "allow_simulation": True,
        **kw,
    }


def honest_enclave(build_dir, url: str, broker: bytes) -> AttestedKeys:
    """The enclave's own code as it runs from ``build_dir``: its measured settings decide its REPORTDATA."""
    cfg = load_config(build_dir)
    env, code = cfg.env, code_measurement(Path(cfg.package_dir) / "branchy_tee")
    provider = SimulatedProvider(env[measured.DEV_KEY], mrenclave=simulated_mrenclave(env, code))
    return AttestedKeys("simulated", url, broker, [], provider=provider, settings=measured.settings_binding(env))


def test_a_signer_only_policy_refuses_a_build_with_settings_it_did_not_accept(owner):  # noqa: F811
    """The host presents a build of the same signer with plaintext results to a broker that pins
    MRSIGNER and the settings of the build its owner accepted: refused, naming allowed_settings."""
    accepted, base_dir = release(owner, "bind-base")
    _, plain_dir = release(owner, "bind-plain", "--allow-plaintext-result")
    key, me = generate_key(), Ed25519PrivateKey.generate()
    with start_broker([key], signer_only_policy(accepted), identity=me) as b:
        ok = honest_enclave(base_dir, b.url, b.broker.identity_bytes)
        assert ok.model_key(key_id(key)) == key
        with pytest.raises(AttestationError, match="allowed_settings: the enclave runs with measured settings"):
            honest_enclave(plain_dir, b.url, b.broker.identity_bytes).model_key(key_id(key))


def test_a_signer_only_policy_without_allowed_settings_is_refused(owner):  # noqa: F811
    accepted, _ = release(owner, "bind-base")
    doc = signer_only_policy(accepted)
    del doc["allowed_settings"]
    with pytest.raises(Exception, match="pin allowed_settings too"):
        parse_policy(doc)


def test_a_signer_only_client_refuses_a_server_with_other_settings(owner):  # noqa: F811
    accepted, base_dir = release(owner, "bind-base")
    _, plain_dir = release(owner, "bind-plain", "--allow-plaintext-result")
    policy = parse_policy(signer_only_policy(accepted))
    for build, good in ((base_dir, True), (plain_dir, False)):
        env = load_config(build).env
        _, cert = make_server_certificate(
            SimulatedProvider(env[measured.DEV_KEY]), settings=measured.settings_binding(env)
        )
        if good:
            verify_server_certificate(cert, policy)
        else:
            with pytest.raises(AttestationError, match="allowed_settings"):
                verify_server_certificate(cert, policy)


def test_the_settings_digest_covers_loader_env_but_not_the_dev_keys_place(owner):  # noqa: F811
    _, base_dir = release(owner, "bind-base")
    cfg = load_config(base_dir)
    assert settings_digest(cfg.replace(ld_library_path=cfg.ld_library_path + ":/opt")) != settings_digest(cfg)
    assert settings_digest(cfg.replace(dev_key="/elsewhere/k.key")) == settings_digest(cfg)
    # the enclave recomputes its binding from what it runs with: a value edited after the build (the
    # settings digest string left as it was) changes it
    assert measured.settings_binding({**cfg.env, measured.ALLOW_PLAINTEXT: "1"}) != measured.settings_binding(cfg.env)
    assert measured.settings_binding({measured.SETTINGS_DIGEST: "ab" * 32}) == bytes(32)  # not inside an enclave


def test_a_shared_dev_key_is_in_the_statement_and_policies_pin_it(owner, capsys):  # noqa: F811
    """Two owners build with one shared --dev-key file at different paths: one simulated measurement,
    the statement carries the key's public key, and a policy written from it refuses evidence signed
    by another development key (the host's own) even for the right measurement."""
    d = owner["d"]
    (d / "a").mkdir()
    (d / "b").mkdir()
    first = SimulatedProvider(d / "a" / "shared.key")
    shutil.copy(d / "a" / "shared.key", d / "b" / "shared.key")
    two, _ = release(owner, "dev-shared", "--dev-key", str(d / "b" / "shared.key"))  # the other owner's copy
    shutil.rmtree(d / "dev-shared")  # (the same build directory: its path is measured)
    (d / "dev-shared.json").unlink()
    one, dir_a = release(owner, "dev-shared", "--dev-key", str(d / "a" / "shared.key"))
    assert one["mrenclave"] == two["mrenclave"] and one["dev_public_key"] == first.public_key.hex()
    assert one["mrsigner"] == hashlib.sha256(first.public_key).hexdigest()

    statement = read_release(d / "dev-shared.json", owner["mo"])
    policy = parse_policy(tomllib.loads(policy_from_release(statement, consent=["simulated"])))
    assert policy.simulation_public_keys == {first.public_key}
    assert policy.allowed_settings == {bytes.fromhex(statement.settings_sha256)}
    env = load_config(dir_a).env
    key, me = generate_key(), Ed25519PrivateKey.generate()
    with start_broker([key], tomllib.loads(policy_from_release(statement, consent=["simulated"])), identity=me) as b:
        assert honest_enclave(dir_a, b.url, b.broker.identity_bytes).model_key(key_id(key)) == key
        code = code_measurement(Path(load_config(dir_a).package_dir) / "branchy_tee")
        hosts = SimulatedProvider(d / "host.key", mrenclave=simulated_mrenclave(env, code))  # its own dev key
        forged = AttestedKeys(
            "simulated", b.url, b.broker.identity_bytes, [], provider=hosts, settings=measured.settings_binding(env)
        )
        with pytest.raises(AttestationError, match="simulation_public_keys"):
            forged.model_key(key_id(key))


def test_a_key_release_signs_the_plaintext_consent():
    r = KeyRelease(b"\1" * 32, b"\2" * 40, b"\3" * 32, (), 0, None, False)
    assert r.message() != KeyRelease(b"\1" * 32, b"\2" * 40, b"\3" * 32, (), 0, None, True).message()
