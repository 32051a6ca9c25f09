"""What the owners sign is everything the enclave does: the release statement carries every measured
value of the rendered manifest (checked here against the manifest by an independent walk), every
measured option changes it, the settings that hand the host something are named and need each
owner's consent, and statements of the older format are refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

from branchy_tee.cli import main
from branchy_tee.core.fileio import read_key_file
from branchy_tee.gramine.release import read_release
from branchy_tee.gramine.statement import DANGEROUS
from branchy_tee.tee import measured
from branchy_tee.tee.attest.identity import create_identity, identity_hex
from enclave_tools import install_gramine_manifest
from runs import keygen, make_random_run

ENV = str(Path(__file__).resolve().parents[1] / ".enclave-env")


@pytest.fixture(scope="module")
def owner(tmp_path_factory, enclave_env):
    d = tmp_path_factory.mktemp("statement")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(d / "config"))
        mp.setenv("PATH", "/usr/bin:/bin")  # branchy-tee renders the manifest itself: no Gramine needed here
        make_random_run(d / "run", "lenet5")
        keygen(d / "mo.key")
        mo = identity_hex(create_identity(d / "mo.id"))
        assert main(["seal", str(d / "run"), "--key", str(d / "mo.key"), "--out", str(d / "model.btee")]) == 0
        (d / "io").mkdir()
        yield {"d": d, "mo": mo, "mp": mp}


def release(owner, name: str, *options: str) -> tuple[dict, Path]:
    """Build with ``options`` (simulated attestation, the size given) and sign the release; (statement, build dir)."""
    d = owner["d"]
    out = d / name
    argv = ["enclave", "build", "--bundle", str(d / "model.btee"), "--out", str(out), "--env", ENV]
    argv += ["--attest", "simulated", "--enclave-size", "1G", "--io-dir", str(d / "io")]
    argv += ["--model-broker", "http://127.0.0.1:9", "--model-broker-identity", owner["mo"], *options]
    assert main(argv) == 0
    rel = d / f"{name}.json"
    argv = ["enclave", "release", str(out), "--identity", str(d / "mo.id"), "--model-key", str(d / "mo.key")]
    assert main([*argv, "--out", str(rel)]) == 0
    return json.loads(rel.read_text()), out


def _leaves(doc: Any, prefix: str = "") -> dict[str, Any]:
    """The test's own walk of a manifest: every table entry by dotted path, lists whole."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("renderer", ["branchy-tee", "gramine-manifest 1.9"])
def test_every_measured_value_has_its_counterpart_in_the_statement(owner, renderer, tmp_path, monkeypatch):
    """The rendered manifest (branchy-tee's rendering, or Gramine's own, hashed: loader.entrypoint and
    every trusted file with its SHA-256) walked independently: each value is in the statement."""
    if renderer != "branchy-tee":
        bindir = tmp_path / "bin"
        bindir.mkdir()
        install_gramine_manifest(bindir, "1.9")
        monkeypatch.setenv("PATH", f"{bindir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    statement, out = release(owner, f"plain-{renderer.split()[0]}")
    manifest = _leaves(tomllib.loads((out / "branchy-tee.manifest").read_text()))
    shown = statement["measured"]
    missing = sorted(set(manifest) - set(shown))
    assert not missing, f"measured but not in the release statement: {missing}"
    assert set(shown) == set(manifest)  # and nothing that is not measured
    for key, value in manifest.items():
        if key == "sgx.trusted_files":
            assert shown[key]["count"] == len(value)
        else:
            assert shown[key] == value, key
    # the settings the issue names, among them
    for name in measured.NAMES:
        assert f"loader.env.{name}" in shown or name in (measured.BROKER_CA, measured.SERVE_CAPS), name  # (serve)
    for key in ("libos.entrypoint", "loader.insecure__use_cmdline_argv", "sgx.enclave_size", "sgx.max_threads"):
        assert key in shown
    assert {"type": "tmpfs", "path": measured.SECRETS_DIR} in shown["fs.mounts"]
    assert shown[f"loader.env.{measured.DEV_KEY}"]  # the simulated build's development key file
    if renderer != "branchy-tee":  # Gramine's hashes are measured values too
        assert "loader.entrypoint.sha256" in shown and shown["sgx.trusted_files"]["count"] > 1000


@pytest.mark.parametrize(
    "option, changed",
    [
        (["--threads", "2"], "loader.env.OMP_NUM_THREADS"),
        (["--debug"], "sgx.debug"),
        (["--edmm"], "sgx.edmm_enable"),
        (["--isv-prod-id", "7"], "sgx.isvprodid"),
        (["--isv-svn", "3"], "sgx.isvsvn"),
        (["--allow-plaintext-result"], f"loader.env.{measured.ALLOW_PLAINTEXT}"),
        (["--allow-full-model"], f"loader.env.{measured.ALLOW_FULL_MODEL}"),
        (["--min-model-version", "2"], f"loader.env.{measured.MIN_MODEL_VERSION}"),
        (["--data-broker", "http://127.0.0.1:10"], f"loader.env.{measured.DATA_BROKERS}"),
        (["--serve"], f"loader.env.{measured.ENTRY}"),
        (["--enclave-size", "2G"], "sgx.enclave_size"),
        (["--max-connections", "9", "--serve"], "sgx.max_threads"),
        (["--max-inflight-mib", "9", "--serve"], f"loader.env.{measured.SERVE_CAPS}"),
        (["--max-queue", "9", "--serve"], f"loader.env.{measured.SERVE_CAPS}"),
    ],
)
def test_changing_any_measured_option_changes_the_statement(owner, option, changed):
    base, _ = release(owner, "base")
    other, _ = release(owner, "changed", *option)
    assert base["measured"].get(changed) != other["measured"][changed]
    assert base["mrenclave"] != other["mrenclave"]  # (simulated: the settings and the entry point are in it)


def test_the_settings_that_hand_the_host_something_need_each_owners_consent(owner, capsys):
    statement, _ = release(owner, "risky", "--allow-plaintext-result", "--allow-full-model")
    assert statement["dangerous"] == ["simulated", "plaintext-result", "full-model"]
    err = capsys.readouterr().err
    assert all(f"--allow-{n}" in err for n in statement["dangerous"])  # build and release warn
    d, rel = owner["d"], str(owner["d"] / "risky.json")
    policy = ["enclave", "policy", "--release", rel, "--model-owner", owner["mo"], "--out", str(d / "p.toml")]
    assert main([*policy, "--allow-simulated"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-plaintext-result" in err and "--allow-full-model" in err
    assert not (d / "p.toml").exists()
    assert main([*policy, "--allow-simulated", "--allow-plaintext-result", "--allow-full-model"]) == 0
    assert "Consented to: plaintext results" in (d / "p.toml").read_text()
    assert set(DANGEROUS) >= set(statement["dangerous"])


def test_an_edited_dangerous_list_or_measured_value_is_refused(owner):
    statement, _ = release(owner, "edited", "--allow-plaintext-result")
    for edit in (
        lambda s: s.update(dangerous=["simulated"]),  # hiding plaintext: the signature breaks
        lambda s: s["measured"].update({f"loader.env.{measured.ALLOW_PLAINTEXT}": "0"}),
    ):
        doc = json.loads(json.dumps(statement))
        edit(doc)
        path = owner["d"] / "edited-x.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(Exception, match="signature does not verify"):
            read_release(path, owner["mo"])


def test_a_statement_of_the_older_format_is_refused_in_one_line(owner, capsys):
    statement, _ = release(owner, "old")
    doc = {k: v for k, v in statement.items() if k not in ("measured", "dangerous")}
    doc["format"] = "branchy-tee/release/v1"
    path = owner["d"] / "old-v1.json"
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    argv = ["enclave", "policy", "--release", str(path), "--model-owner", owner["mo"], "--allow-simulated"]
    assert main([*argv, "--out", str(owner["d"] / "old.toml")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "older format branchy-tee/release/v1" in err


def test_predict_and_serve_builds_of_one_bundle_have_different_measurements(owner):
    predict, _ = release(owner, "p")
    serve, _ = release(owner, "s", "--serve")
    assert predict["mrenclave"] != serve["mrenclave"]
    assert read_key_file(owner["d"] / "mo.key")  # (the model owner's key signed both releases' checks)
