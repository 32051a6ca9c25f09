"""Gramine packaging: the rendered manifest, `enclave build` / `make SGX=1` / `enclave run` against
stand-in Gramine tools (small scripts written here that record their arguments), and the native
backend end to end. Gramine itself is not needed (and not used even when installed)."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jinja2
import numpy as np
import pytest

from branchy_tee.cli import main
from branchy_tee.enclave import build as eb
from branchy_tee.enclave.launch import split_run_arguments
from branchy_tee.errors import UsageError

BROKER_M = "http://127.0.0.1:8101"
BROKER_M_IDENTITY = "5a" * 32
BROKER_D = "http://127.0.0.1:8102"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """A sealed LeNet-5 (1x28x28, 3 exits); keys; images for an encrypted request of 5 samples.

    The run directory is written directly (random weights) instead of by a training run: packaging
    does not care what the weights are, and this keeps the file well under its time budget."""
    from branchy_tee.models import create_model
    from branchy_tee.rundir import write_model_json, write_weights

    base = tmp_path_factory.mktemp("sealed")
    model = create_model("lenet5", num_classes=10, in_channels=1).eval()
    (base / "run").mkdir()
    write_weights(base / "run" / "model.safetensors", model)
    write_model_json(base / "run", {
        "arch": "lenet5", "config": {"num_classes": 10, "in_channels": 1}, "classes": [f"class-{i}" for i in range(10)],
        "dataset": "synthetic", "preprocessing": {"input_shape": [1, 28, 28], "scale": 1 / 255, "mean": [0.5], "std": [0.3]},
        "criterion": "entropy", "thresholds": [0.5, 0.5], "stage_flops": [235200, 480000, 96000],
        "head_flops": [16384, 26624, 21840],
    })  # fmt: skip
    (base / "keys").mkdir()
    assert main(["keygen", "--out", str(base / "keys" / "model.key")]) == 0
    assert main(["keygen", "--out", str(base / "keys" / "data.key")]) == 0
    assert main(["seal", str(base / "run"), "--key", str(base / "keys" / "model.key"), "--out", str(base / "model.btee")]) == 0
    np.save(base / "images.npy", np.random.RandomState(0).randint(0, 256, (5, 1, 28, 28)).astype(np.uint8))
    return base


@pytest.fixture
def no_gramine(tmp_path, monkeypatch):
    """A PATH on which no Gramine tool exists (even on a machine that has Gramine)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


HEADER = "#!" + sys.executable + "\nimport json, os, sys\nLOG = @LOG@\n" + (
    "def record(name, argv):\n"
    "    with open(LOG, 'a') as f:\n"
    "        f.write(json.dumps({'tool': name, 'argv': argv, 'cwd': os.getcwd()}) + '\\n')\n"
)
STANDINS = {
    "gramine-manifest": """
import jinja2
args, defines, files = sys.argv[1:], {}, []
i = 0
while i < len(args):
    if args[i].startswith('-D'):
        body = args[i][2:] or args[i + 1]
        i += 0 if args[i][2:] else 1
        key, _, value = body.partition('=')
        defines[key] = value
    else:
        files.append(args[i])
    i += 1
src, out = files
env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
env.globals['gramine'] = {'runtimedir': lambda libc='glibc': '/opt/standin-gramine/runtime/glibc'}
env.globals['env'] = os.environ
text = env.from_string(open(src).read()).render(**defines)
open(out, 'w').write(text)
record('gramine-manifest', args)
""",
    "gramine-sgx-sign": """
import argparse, hashlib
p = argparse.ArgumentParser()
p.add_argument('--key', '-k', required=True)
p.add_argument('--manifest', '-m', required=True)
p.add_argument('--output', '-o', required=True)
a = p.parse_args()
manifest = open(a.manifest, 'rb').read()
key = open(a.key, 'rb').read()
open(a.output, 'wb').write(manifest + b'\\n# signed by the stand-in\\n')
sig = a.manifest[: -len('.manifest')] + '.sig'
open(sig, 'wb').write(b'SIGSTRUCT' + hashlib.sha256(manifest).digest() + hashlib.sha256(key).digest())
record('gramine-sgx-sign', sys.argv[1:])
""",
    "gramine-sgx-sigstruct-view": """
data = open(sys.argv[-1], 'rb').read()
print('Attributes:')
print('    mr_signer: ' + data[41:73].hex())
print('    mr_enclave: ' + data[9:41].hex())
print('    isv_prod_id: 0')
print('    isv_svn: 0')
print('    debug_enclave: False')
record('gramine-sgx-sigstruct-view', sys.argv[1:])
""",
    "gramine-sgx": "record('gramine-sgx', sys.argv[1:])\n",
    "gramine-direct": "record('gramine-direct', sys.argv[1:])\n",
}


def install_standins(tmp_path) -> tuple[Path, Path]:
    """Write the stand-in tools into tmp_path/standin-bin; they log to tmp_path/gramine-calls.jsonl."""
    bindir, log = tmp_path / "standin-bin", tmp_path / "gramine-calls.jsonl"
    bindir.mkdir()
    for name, body in STANDINS.items():
        (bindir / name).write_text(HEADER.replace("@LOG@", repr(str(log))) + body)
        (bindir / name).chmod(0o755)
    return bindir, log


@pytest.fixture
def gramine(tmp_path, monkeypatch):
    """Stand-in Gramine tools first on PATH; returns a function giving the recorded calls."""
    bindir, log = install_standins(tmp_path)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")

    def calls(tool=None):
        lines = log.read_text().splitlines() if log.exists() else []
        return [c for c in map(json.loads, lines) if tool is None or c["tool"] == tool]

    return calls


def signing_key(tmp_path) -> Path:
    key = tmp_path / "enclave-key.pem"
    key.write_text("-----BEGIN RSA PRIVATE KEY-----\nstand-in\n-----END RSA PRIVATE KEY-----\n")
    return key


def build_args(sealed, out, *extra):
    return ["enclave", "build", "--bundle", str(sealed / "model.btee"), "--out", str(out),
            "--model-broker", BROKER_M, "--model-broker-identity", BROKER_M_IDENTITY, "--data-broker", BROKER_D,
            *extra]  # fmt: skip


def read_manifest(out) -> dict:
    return tomllib.loads((Path(out) / "branchy-tee.manifest").read_text())


def size_bytes(s: str) -> int:
    return int(s[:-1]) << {"K": 10, "M": 20, "G": 30}[s[-1]]


# --------------------------------------------------------------------------- the manifest
def test_rendered_manifest_has_the_required_settings(sealed, tmp_path, no_gramine, capsys):
    out = tmp_path / "enc"
    assert main(build_args(sealed, out)) == 0
    printed = capsys.readouterr()
    assert "NOT SIGNED" in printed.out and "nothing was signed" in printed.out
    assert "gramine-manifest is not installed" in printed.err
    assert (out / "Makefile").is_file() and (out / "branchy-tee.manifest.template").is_file()
    assert not (out / "branchy-tee.sig").exists() and not (out / "policy.toml").exists()
    assert (out / "branchy-tee.manifest").stat().st_mtime == 0  # `make` re-renders it with gramine-manifest

    m = read_manifest(out)
    cfg = json.loads((out / "enclave.json").read_text())
    python = os.path.realpath(sys.executable)
    launcher = out / "branchy-tee-predict"
    # Entry point: the generated script, run by the venv's (real) interpreter.
    assert m["libos"]["entrypoint"] == str(launcher)
    assert launcher.read_text().splitlines()[0] == f"#!{python}"
    assert os.access(launcher, os.X_OK)
    assert m["loader"]["insecure__use_cmdline_argv"] is True
    # The entry script works with the real interpreter and no venv activation, and host arguments
    # reach predict's parser, not the interpreter: `-c CODE` is an argument error, not code.
    env = {k: v for k, v in cfg["env"].items() if k not in ("LD_LIBRARY_PATH", "BRANCHY_TEE_ENCLAVE")}
    env["PATH"] = "/usr/bin:/bin"
    ran = subprocess.run([str(launcher), "--help"], env=env, capture_output=True, text=True)
    assert ran.returncode == 0 and "branchy-tee predict" in ran.stdout
    ran = subprocess.run([str(launcher), "-c", "print('injected')"], env=env, capture_output=True, text=True)
    assert ran.returncode == 2 and "injected" not in ran.stdout
    # Measured environment.
    env = m["loader"]["env"]
    assert env == cfg["env"]
    assert env["BRANCHY_TEE_ENCLAVE"] == "1" and env["BRANCHY_TEE_ATTEST"] == "gramine"
    assert env["BRANCHY_TEE_MODEL_BROKER"] == BROKER_M and env["BRANCHY_TEE_DATA_BROKERS"] == BROKER_D
    assert env["BRANCHY_TEE_MODEL_BROKER_IDENTITY"] == BROKER_M_IDENTITY
    header = json.loads((sealed / "model.btee" / "header.json").read_text())["header"]
    assert (env["BRANCHY_TEE_BUNDLE_ID"], env["BRANCHY_TEE_MODEL_KEY_ID"]) == (header["bundle_id"], header["key_id"])
    assert env["BRANCHY_TEE_ALLOW_PLAINTEXT"] == "0" and env["BRANCHY_TEE_MIN_MODEL_VERSION"] == "1"
    assert env["OMP_NUM_THREADS"] == "4" and env["LD_LIBRARY_PATH"].startswith("/lib:")
    # SGX settings, current syntax only.
    sgx = m["sgx"]
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["debug"] is False and sgx["edmm_enable"] is False
    assert sgx["max_threads"] >= 4
    assert not {"thread_num", "ra_client_spid", "ra_client_linkable"} & set(sgx)
    # Enclave size: a power of two, at least the documented rule.
    size = size_bytes(sgx["enclave_size"])
    assert size & (size - 1) == 0 and size >= 256 << 20
    rule = cfg["enclave_size_rule"]
    header = json.loads((sealed / "model.btee" / "header.json").read_text())["header"]
    plain = [s["plaintext_size"] for s in header["stages"]]
    weights = [s["weight_bytes"] for s in header["stages"]]
    assert rule["terms"]["weights"] == sum(plain) and rule["terms"]["loading"] >= max(plain)
    assert rule["need"] == sum(rule["terms"].values()) and size >= rule["need"]
    assert rule["need"] >= rule["terms"]["libraries"] + 2 * weights[0] + max(weights[1:])
    # Files: tmpfs /tmp; trusted code; allowed = only AEAD-protected bundle files and the data directory.
    assert {"type": "tmpfs", "path": "/tmp"} in m["fs"]["mounts"]
    trusted = set(m["sgx"]["trusted_files"])
    package_dir = Path(__import__("branchy_tee").__file__).resolve().parents[1]
    assert f"file:{python}" in trusted and f"file:{launcher}" in trusted
    assert any(package_dir == Path(t[5:].rstrip("/")) or Path(t[5:]) in package_dir.parents for t in trusted)
    bundle = sealed / "model.btee"
    allowed = m["sgx"]["allowed_files"]
    expected_bundle = {f"file:{bundle / 'header.json'}"} | {f"file:{bundle / s['file']}" for s in header["stages"]}
    assert set(allowed) == expected_bundle | {f"file:{out / 'io'}/"}
    for entry in allowed:
        path = Path(entry[len("file:"):])
        assert sealed / "keys" not in path.parents and path.suffix not in (".key", ".npy", ".py", ".so")
        assert not any(Path(t[5:].rstrip("/")) in path.parents for t in trusted if t.endswith("/"))


def test_switches_reach_the_manifest(sealed, tmp_path, no_gramine):
    out, ca = tmp_path / "enc", tmp_path / "brokers-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nstand-in\n-----END CERTIFICATE-----\n")
    assert main(build_args(sealed, out, "--broker-ca", str(ca), "--edmm", "--debug", "--threads", "6", "--allow-plaintext-result",
                           "--min-model-version", "3", "--attest", "simulated", "--isv-prod-id", "7", "--isv-svn", "2",
                           "--data-broker", "http://127.0.0.1:8103")) == 0  # fmt: skip
    m = read_manifest(out)
    assert m["sgx"]["edmm_enable"] is True and m["sgx"]["debug"] is True
    assert m["sgx"]["max_threads"] == 17 and m["loader"]["env"]["OMP_NUM_THREADS"] == "6"
    assert (m["sgx"]["isvprodid"], m["sgx"]["isvsvn"]) == (7, 2)
    env = m["loader"]["env"]
    assert env["BRANCHY_TEE_ALLOW_PLAINTEXT"] == "1" and env["BRANCHY_TEE_MIN_MODEL_VERSION"] == "3"
    assert env["BRANCHY_TEE_ATTEST"] == "simulated"
    assert env["BRANCHY_TEE_DATA_BROKERS"] == f"{BROKER_D},http://127.0.0.1:8103"
    assert env["BRANCHY_TEE_BROKER_CA"] == str(ca) and f"file:{ca}" in m["sgx"]["trusted_files"]
    assert f"file:{ca}" not in m["sgx"]["allowed_files"]


def test_missing_template_values_fail_loudly(sealed, tmp_path, no_gramine):
    out = tmp_path / "enc"
    assert main(build_args(sealed, out)) == 0
    defines = json.loads((out / "enclave.json").read_text())["defines"]
    eb.render_manifest(defines)  # complete: renders
    for name in ("enclave_size", "io_dirs", "launcher"):
        with pytest.raises(jinja2.exceptions.UndefinedError, match=name):
            eb.render_manifest({k: v for k, v in defines.items() if k != name})
    with pytest.raises(jinja2.exceptions.UndefinedError):
        eb._render("Makefile.template", defines=[])


def test_build_refuses_data_directories_that_overlap_code(sealed, tmp_path, no_gramine, capsys):
    package_dir = str(Path(__import__("branchy_tee").__file__).resolve().parents[1])
    assert main(build_args(sealed, tmp_path / "enc", "--io-dir", package_dir)) == 2
    assert "overlaps the trusted" in capsys.readouterr().err
    assert main(build_args(sealed, tmp_path / "enc", "--io-dir", str(tmp_path))) == 2  # would contain the launcher


# --------------------------------------------------------------------------- build / make / run with stand-in tools
def test_build_sgx_calls_the_gramine_tools(sealed, tmp_path, gramine, capsys):
    out, key = tmp_path / "enc", signing_key(tmp_path)
    assert main(build_args(sealed, out, "--sgx", "--signing-key", str(key), "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = json.loads((out / "enclave.json").read_text())
    [render] = gramine("gramine-manifest")
    assert render["cwd"] == str(out)
    assert render["argv"] == [f"-D{k}={v}" for k, v in cfg["defines"].items()] + [
        "branchy-tee.manifest.template", "branchy-tee.manifest"]  # fmt: skip
    # gramine-manifest and our own renderer agree on the same defines.
    assert (out / "branchy-tee.manifest").read_text() == eb.render_manifest(cfg["defines"], "/opt/standin-gramine/runtime/glibc")
    [sign] = gramine("gramine-sgx-sign")
    assert sign["argv"] == ["--key", str(key), "--manifest", "branchy-tee.manifest", "--output", "branchy-tee.manifest.sgx"]
    assert sign["cwd"] == str(out)
    [view] = gramine("gramine-sgx-sigstruct-view")
    assert view["argv"] == ["branchy-tee.sig"]
    sig = (out / "branchy-tee.sig").read_bytes()
    assert summary["signed"] and summary["mrenclave"] == sig[9:41].hex() and summary["mrsigner"] == sig[41:73].hex()
    assert not (out / "policy.toml").exists()  # owners never pin what the host printed
    # The model owner (having reproduced this build) signs a release statement; a data owner writes its policy.
    from branchy_tee.attest.identity import create_identity, identity_hex

    mo = identity_hex(create_identity(tmp_path / "mo.id"))
    assert main(["enclave", "release", str(out), "--identity", str(tmp_path / "mo.id"), "--model-key",
                 str(sealed / "keys" / "model.key"), "--model-broker-identity", BROKER_M_IDENTITY,
                 "--out", str(tmp_path / "r.json")]) == 0  # fmt: skip
    release = json.loads((tmp_path / "r.json").read_text())
    assert (release["mrenclave"], release["mrsigner"], release["attest"]) == (sig[9:41].hex(), sig[41:73].hex(), "gramine")
    assert release["model_broker_identity"] == BROKER_M_IDENTITY and release["model_owner"] == mo
    assert main(["enclave", "policy", "--release", str(tmp_path / "r.json"), "--model-owner", mo,
                 "--out", str(tmp_path / "p.toml")]) == 0  # fmt: skip
    policy = tomllib.loads((tmp_path / "p.toml").read_text())
    assert policy == {"allowed_mrenclave": [sig[9:41].hex()], "isv_prod_id": 0, "min_isv_svn": 0, "allow_debug": False,
                      "accepted_tcb_statuses": ["UpToDate"], "min_model_version": 1}  # fmt: skip


def test_make_sgx_in_the_build_directory(sealed, tmp_path, no_gramine, monkeypatch, capsys):
    if not shutil.which("make", path="/usr/bin:/bin:/usr/local/bin"):
        pytest.skip("make is not installed")
    out, key = tmp_path / "enc", signing_key(tmp_path)
    assert main(build_args(sealed, out, "--signing-key", str(key))) == 0  # no Gramine: rendered by branchy-tee
    defines = json.loads((out / "enclave.json").read_text())["defines"]
    # Now on a machine "with Gramine": the stand-ins, then the system's make.
    bindir, log = install_standins(tmp_path)
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin:/usr/local/bin"}
    done = subprocess.run(["make", "SGX=1"], cwd=out, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["tool"] for c in calls] == ["gramine-manifest", "gramine-sgx-sign", "gramine-sgx-sigstruct-view"]
    assert calls[0]["argv"] == [f"-D{k}={v}" for k, v in defines.items()] + ["branchy-tee.manifest.template", "branchy-tee.manifest"]
    assert calls[1]["argv"] == ["--key", str(key), "--manifest", "branchy-tee.manifest", "--output", "branchy-tee.manifest.sgx"]
    assert "mr_enclave" in done.stdout
    assert (out / "branchy-tee.manifest.sgx").is_file() and (out / "branchy-tee.sig").is_file()
    # Nothing to do a second time; then the policy snippet from the signature.
    again = subprocess.run(["make", "SGX=1"], cwd=out, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and len(log.read_text().splitlines()) == 3
    monkeypatch.setenv("PATH", env["PATH"])
    from branchy_tee.attest.identity import create_identity

    create_identity(tmp_path / "mo.id")
    capsys.readouterr()
    assert main(["enclave", "release", str(out), "--identity", str(tmp_path / "mo.id"), "--model-key",
                 str(sealed / "keys" / "model.key"), "--model-broker-identity", BROKER_M_IDENTITY,
                 "--out", str(tmp_path / "r.json"), "--json"]) == 0  # fmt: skip
    measured = json.loads(capsys.readouterr().out)
    assert measured["mrenclave"] == (out / "branchy-tee.sig").read_bytes()[9:41].hex()


def test_run_sgx_launches_gramine_sgx_with_the_manifest_and_predict_arguments(sealed, tmp_path, gramine, monkeypatch, capsys):
    out, key = tmp_path / "enc", signing_key(tmp_path)
    assert main(build_args(sealed, out, "--sgx", "--signing-key", str(key))) == 0
    monkeypatch.chdir(tmp_path)
    shutil.copy(sealed / "images.npy", tmp_path / "images.npy")
    rel_bundle = os.path.relpath(sealed / "model.btee", tmp_path)
    argv = ["--bundle", rel_bundle, "--input", "enc/io/req.bin", "--output", "enc/io/res.bin", "--batch", "8"]
    assert main(["enclave", "run", str(out), "--", "predict", *argv]) == 0
    assert main(["enclave", "run", str(out), "--backend", "sgx", "--", "predict", *argv]) == 0
    assert main(["enclave", "run", "--backend", "direct", str(out), "--", *argv]) == 0
    expected = ["./branchy-tee", f"--bundle={sealed / 'model.btee'}", f"--input={out / 'io' / 'req.bin'}",
                f"--output={out / 'io' / 'res.bin'}", "--batch-size=8"]  # fmt: skip
    sgx_runs = gramine("gramine-sgx")
    assert [c["argv"] for c in sgx_runs] == [expected, expected] and all(c["cwd"] == str(out) for c in sgx_runs)
    [direct] = gramine("gramine-direct")
    assert direct["argv"] == expected and direct["cwd"] == str(out)
    # What the enclave would refuse stops before Gramine starts.
    capsys.readouterr()
    refused = [
        [*argv, "--model-key", str(sealed / "keys" / "model.key")],  # key files
        ["--bundle", rel_bundle, "--input", "images.npy", "--output", "enc/io/res.bin"],  # outside the data directory
        ["--bundle", str(tmp_path), "--input", "enc/io/req.bin", "--output", "enc/io/res.bin"],  # another bundle
        [*argv, "--plaintext-result", "enc/io/result.txt"],  # not allowed at build time
    ]
    for bad in refused:
        assert main(["enclave", "run", str(out), "--", "predict", *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert len(gramine("gramine-sgx")) == 2


def test_run_sgx_without_gramine_is_a_one_line_error(sealed, tmp_path, no_gramine, capsys):
    out = tmp_path / "enc"
    assert main(build_args(sealed, out)) == 0
    capsys.readouterr()
    rc = main(["enclave", "run", str(out), "--backend", "sgx", "--", "predict", "--bundle", str(sealed / "model.btee"),
               "--input", str(out / "io" / "req.bin"), "--output", str(out / "io" / "res.bin")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "gramine-sgx not found" in err and "apt install gramine" in err and "gramine.readthedocs.io" in err


def test_native_backend_runs_predict_end_to_end(sealed, tmp_path, no_gramine, capsys):
    out = tmp_path / "enc"
    keys = sealed / "keys"
    assert main(build_args(sealed, out)) == 0
    req, res = out / "io" / "req.bin", out / "io" / "res.bin"
    assert main(["encrypt-input", str(sealed / "images.npy"), "--bundle", str(sealed / "model.btee"),
                 "--key", str(keys / "data.key"), "--out", str(req), "--request-id", "req-1"]) == 0  # fmt: skip
    rc = main(["enclave", "run", str(out), "--backend", "native", "--", "predict", "--bundle", str(sealed / "model.btee"),
               "--input", str(req), "--output", str(res), "--model-key", str(keys / "model.key"),
               "--data-key", str(keys / "data.key"), "--quiet"])  # fmt: skip
    assert rc == 0 and res.is_file()
    capsys.readouterr()
    assert main(["decrypt-result", str(res), "--key", str(keys / "data.key"), "--request", str(req), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert [r["index"] for r in records] == list(range(5))
    assert all(0 <= r["label"] < 10 and 0 <= r["exit"] < 3 for r in records)


# --------------------------------------------------------------------------- small parts
def test_sigstruct_view_output_formats():
    e, s = "ab" * 32, "cd" * 32
    plain = f"Attributes:\n    mr_signer: {s}\n    mr_enclave: {e}\n    isv_prod_id: 3\n    isv_svn: 1\n    debug_enclave: True\n"
    assert eb.parse_sigstruct_view(plain) == {"mrenclave": e, "mrsigner": s, "isv_prod_id": 3, "isv_svn": 1, "debug": True}
    toml = f'mr_signer = "{s}"\nmr_enclave = "{e}"\nisv_prod_id = 0\nisv_svn = 0\ndebug_enclave = false\n'
    assert eb.parse_sigstruct_view(toml)["mrenclave"] == e
    with pytest.raises(eb.BranchyError):
        eb.parse_sigstruct_view("nothing useful")


def test_run_argument_splitting():
    assert split_run_arguments(["--", "predict", "--bundle", "b"]) == ([], ["--bundle", "b"])
    assert split_run_arguments(["--backend", "native", "--", "--bundle", "b"]) == (["--backend", "native"], ["--bundle", "b"])
    assert split_run_arguments(["predict", "--bundle", "b"]) == ([], ["--bundle", "b"])
    assert split_run_arguments(["--bundle", "b"]) == ([], ["--bundle", "b"])
    assert split_run_arguments(["--backend=native", "predict", "--bundle", "b"]) == (["--backend=native"], ["--bundle", "b"])
    with pytest.raises(UsageError):
        split_run_arguments(["--", "train", "--epochs", "1"])
    with pytest.raises(UsageError):
        split_run_arguments([])


def test_enclave_size_is_a_power_of_two_rounding():
    assert eb.next_power_of_two(760 << 20) == 1 << 30
    assert eb.size_string(1 << 30) == "1G" and eb.size_string(512 << 20) == "512M"
