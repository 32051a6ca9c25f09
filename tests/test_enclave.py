"""Gramine packaging: the rendered manifest, `enclave build` / `make SGX=1` / `enclave run` with
Gramine's real gramine-manifest (from ../shared/gramine-tools) and stand-ins for the tools that need
SGX (small scripts written here that record their arguments), and the native backend end to end.
An installed Gramine is never used. Real-tool checks of the enclave itself: test_enclave_gramine.py."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import tomllib

from branchy_tee.cli import main
from branchy_tee.core.errors import BranchyError, UsageError
from branchy_tee.gramine import build as eb
from branchy_tee.gramine.launch import split_run_arguments
from branchy_tee.gramine.release import read_release
from branchy_tee.gramine.tools import parse_sigstruct_view
from branchy_tee.tee import measured
from enclave_tools import ENCLAVE_ENV, encrypt_sealed_images, install_gramine_manifest

BROKER_M = "http://127.0.0.1:8101"
BROKER_M_IDENTITY = "5a" * 32
BROKER_D = "http://127.0.0.1:8102"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def no_gramine(tmp_path, monkeypatch, enclave_env):
    """A PATH on which no Gramine tool exists (even on a machine that has Gramine): only ldd, which
    the build runs on the enclave environment."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    (empty / "ldd").symlink_to(shutil.which("ldd"))
    monkeypatch.setenv("PATH", str(empty))
    return empty


HEADER = (
    "#!"
    + sys.executable
    + "\nimport json, os, sys\nLOG = @LOG@\n"
    + (
        "def record(name, argv):\n"
        "    with open(LOG, 'a') as f:\n"
        "        f.write(json.dumps({'tool': name, 'argv': argv, 'cwd': os.getcwd()}) + '\\n')\n"
    )
)
STANDINS = {
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
assert sys.argv[1:3] == ['--output-format', 'json']
print(json.dumps({'mr_signer': data[41:73].hex(), 'mr_enclave': data[9:41].hex(), 'isv_prod_id': 0, 'isv_svn': 0,
                  'debug_enclave': False}, indent=4))
record('gramine-sgx-sigstruct-view', sys.argv[1:])
""",
    "gramine-sgx": "record('gramine-sgx', sys.argv[1:])\n",
    "gramine-direct": "record('gramine-direct', sys.argv[1:])\n",
}


def install_standins(tmp_path) -> tuple[Path, Path]:
    """Write the stand-in tools and Gramine 1.9's real gramine-manifest into tmp_path/standin-bin;
    they log to tmp_path/gramine-calls.jsonl."""
    bindir, log = tmp_path / "standin-bin", tmp_path / "gramine-calls.jsonl"
    install_gramine_manifest(bindir, "1.9", log)
    for name, body in STANDINS.items():
        (bindir / name).write_text(HEADER.replace("@LOG@", repr(str(log))) + body)
        (bindir / name).chmod(0o755)
    return bindir, log


@pytest.fixture
def gramine(tmp_path, monkeypatch, enclave_env):
    """Gramine's gramine-manifest and stand-ins for its SGX tools first on PATH; returns a function
    giving the recorded calls."""
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


def build_args(sealed, out, *extra, measure=False):
    """`enclave build` for the sealed bundle with the shared enclave environment. Without ``measure``
    the size is given (--enclave-size 1G), which skips the memory measurement."""
    return [
        "enclave",
        "build",
        "--bundle",
        str(sealed / "model.btee"),
        "--out",
        str(out),
        "--env",
        str(ENCLAVE_ENV),
        "--model-broker",
        BROKER_M,
        "--model-broker-identity",
        BROKER_M_IDENTITY,
        "--data-broker",
        BROKER_D,
        *([] if measure else ["--enclave-size", "1G"]),
        *extra,
    ]


def test_a_serve_build_measures_its_caps_and_sizes_the_enclave_for_them(sealed, tmp_path, no_gramine, capsys):
    """serve's in-flight bytes, queue and connections were host flags the enclave was never sized for:
    the build now measures them (the host may only lower them) and adds the in-flight cap to the size."""
    out = tmp_path / "enc"
    argv = build_args(sealed, out, "--serve", "--max-inflight-mib", "32", "--max-queue", "9", measure=True)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    cfg = json.loads((out / "enclave.json").read_text())
    assert cfg["env"]["BRANCHY_TEE_SERVE_CAPS"] == "max_connections=64,max_inflight_mib=32,max_queue=9"
    terms = cfg["enclave_size_detail"]["terms"]
    assert terms["inflight_requests"] == 32 << 20 and cfg["enclave_size_detail"]["need"] == sum(terms.values())
    assert size_bytes(cfg["enclave_size"]) >= sum(terms.values())
    assert "serve: in-flight 32 MiB (the queue's waiting requests counted in it)" in printed
    assert f"<= sgx.enclave_size {cfg['enclave_size']}" in printed


def read_manifest(out) -> dict:
    return tomllib.loads((Path(out) / "branchy-tee.manifest").read_text())


def size_bytes(s: str) -> int:
    return int(s[:-1]) << {"K": 10, "M": 20, "G": 30}[s[-1]]


# --------------------------------------------------------------------------- the manifest
def test_rendered_manifest_has_the_required_settings(sealed, tmp_path, no_gramine, enclave_env, capsys):
    out = tmp_path / "enc"
    assert main(build_args(sealed, out, measure=True)) == 0
    printed = capsys.readouterr()
    assert "NOT SIGNED" in printed.out and "nothing was signed" in printed.out
    assert "gramine-manifest is not installed" in printed.err
    assert "measured peak" in printed.out and "sgx.enclave_size" in printed.out and "trusted files" in printed.out
    assert (out / "Makefile").is_file() and (out / "branchy-tee.manifest.template").is_file()
    assert not (out / "branchy-tee.sig").exists() and not (out / "policy.toml").exists()
    assert (out / "branchy-tee.manifest").stat().st_mtime == 0  # `make` re-renders it with gramine-manifest

    m = read_manifest(out)
    cfg = json.loads((out / "enclave.json").read_text())
    python = enclave_env.python
    launcher = out / "branchy-tee-predict"
    # Entry point: the generated script, run by the system's (real) interpreter with the enclave
    # environment as its Python home.
    assert m["libos"]["entrypoint"] == str(launcher)
    assert launcher.read_text().splitlines()[0] == f"#!{python}" and python == os.path.realpath(python)
    assert os.access(launcher, os.X_OK)
    assert m["loader"]["insecure__use_cmdline_argv"] is True
    # The entry script works with exactly the manifest's environment (no venv, no PATH), and host
    # arguments reach predict's parser, not the interpreter: `-c CODE` is an argument error, not code.
    env = {k: v for k, v in cfg["env"].items() if k != "BRANCHY_TEE_ENCLAVE"}
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
    assert (
        env["PYTHONHOME"] == enclave_env.dir
        and env["MALLOC_ARENA_MAX"] == "1"
        and env["PYTHONDONTWRITEBYTECODE"] == "1"
    )
    # SGX settings, current syntax only.
    sgx = m["sgx"]
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["debug"] is False and sgx["edmm_enable"] is False and sgx["use_exinfo"] is False
    assert sgx["max_threads"] >= 4 and m["sys"]["disallow_subprocesses"] is True
    assert not {"thread_num", "ra_client_spid", "ra_client_linkable"} & set(sgx)
    # Enclave size: the smallest power of two that holds the runtime's measured peak plus the margin.
    size = size_bytes(sgx["enclave_size"])
    detail = cfg["enclave_size_detail"]
    assert detail["given"] is False and detail["samples"] == 128 and detail["batch_size"] == 64
    assert detail["terms"]["measured_peak"] == detail["vm_peak"] > 100 << 20  # torch alone maps more
    assert detail["terms"]["gramine"] == 128 << 20 and detail["need"] == sum(detail["terms"].values())
    assert size & (size - 1) == 0 and max(256 << 20, size // 2) < detail["need"] <= size
    # Files: tmpfs /tmp; trusted = the interpreter, its libraries, the enclave environment's library
    # folder and the entry script; allowed = only AEAD-protected bundle files and the data directory.
    assert {"type": "tmpfs", "path": "/tmp"} in m["fs"]["mounts"]
    trusted = set(m["sgx"]["trusted_files"])
    assert {f"file:{python}", f"file:{launcher}", f"file:{enclave_env.home_lib}/"} <= trusted
    assert {f"file:{lib}" for lib in cfg["libs"]} <= trusted and cfg["libs"]
    assert not any("site-packages" in t and not t.startswith(f"file:{enclave_env.dir}/") for t in trusted)
    assert not any(os.path.basename(t) in ("libc.so.6", "libm.so.6") for t in trusted)  # Gramine's own glibc
    assert cfg["defines"]["libs"].count("libpython") <= 1
    bundle = sealed / "model.btee"
    header = json.loads((bundle / "header.json").read_text())["header"]
    allowed = m["sgx"]["allowed_files"]
    expected_bundle = {f"file:{bundle / 'header.json'}"} | {f"file:{bundle / s['file']}" for s in header["stages"]}
    assert set(allowed) == expected_bundle | {f"file:{out / 'io'}/"}
    for entry in allowed:
        path = Path(entry[len("file:") :])
        assert sealed / "keys" not in path.parents and path.suffix not in (".key", ".npy", ".py", ".so")
        assert not any(Path(t[5:].rstrip("/")) in path.parents for t in trusted if t.endswith("/"))


def test_switches_reach_the_manifest(sealed, tmp_path, no_gramine):
    out, ca = tmp_path / "enc", tmp_path / "brokers-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nstand-in\n-----END CERTIFICATE-----\n")
    assert (
        main(
            build_args(
                sealed,
                out,
                "--broker-ca",
                str(ca),
                "--edmm",
                "--debug",
                "--threads",
                "6",
                "--allow-plaintext-result",
                "--min-model-version",
                "3",
                "--attest",
                "simulated",
                "--isv-prod-id",
                "7",
                "--isv-svn",
                "2",
                "--data-broker",
                "http://127.0.0.1:8103",
                "--enclave-size",
                "2G",
            )
        )
        == 0
    )
    m = read_manifest(out)
    assert m["sgx"]["edmm_enable"] is True and m["sgx"]["use_exinfo"] is True and m["sgx"]["debug"] is True
    assert m["sgx"]["enclave_size"] == "2G"
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


@pytest.mark.parametrize("option", ["--io-dir", "--stats-dir"])
@pytest.mark.parametrize(
    "folder, said",
    [
        ("/tmp", "in-memory /tmp"),
        ("/", "in-memory /tmp"),
        (measured.SECRETS_DIR, f"in-memory {measured.SECRETS_DIR}"),
        ("/dev", "Gramine's /dev"),
        ("/proc/self", "inside Gramine's /proc"),
        ("/sys/kernel", "inside Gramine's /sys"),
    ],
)
def test_build_refuses_a_data_directory_over_enclave_memory(sealed, tmp_path, no_gramine, option, folder, said, capsys):
    """The host proposes `--io-dir /tmp` (or /, the secrets tmpfs, Gramine's pseudo-filesystems): the
    manifest would mount a host folder where the enclave keeps memory-only files (serve's TLS private
    key) or Gramine's own. Refused in one line; below /tmp is fine."""
    assert main(build_args(sealed, tmp_path / "enc", option, folder)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err


def test_the_tls_key_tmpfs_is_enclave_memory_and_nothing_covers_it(sealed, tmp_path, no_gramine):
    """The manifest mounts the fixed secrets folder as a tmpfs; no host-backed mount is at, above or
    below it (the TLS key is written there inside the enclave: tee/serve/https.py)."""
    assert main(build_args(sealed, tmp_path / "enc", "--io-dir", str(tmp_path / "io"), "--serve")) == 0
    mounts = tomllib.loads((tmp_path / "enc" / "branchy-tee.manifest").read_text())["fs"]["mounts"]
    secrets = [m for m in mounts if m["path"] == measured.SECRETS_DIR]
    assert secrets == [{"type": "tmpfs", "path": measured.SECRETS_DIR}]
    for m in mounts:
        if m.get("type") != "tmpfs":
            p, s = Path(m["path"]), Path(measured.SECRETS_DIR)
            assert p != s and p not in s.parents and s not in p.parents, m


def test_build_refuses_data_directories_that_overlap_code(sealed, tmp_path, no_gramine, enclave_env, capsys):
    assert main(build_args(sealed, tmp_path / "enc", "--io-dir", enclave_env.site_packages)) == 2
    assert "overlaps the trusted" in capsys.readouterr().err
    assert main(build_args(sealed, tmp_path / "enc", "--io-dir", str(tmp_path))) == 2  # would contain the launcher
    for bad in (["--enclave-size", "768M"], ["--enclave-size", "64M"], ["--enclave-size", "lots"]):
        assert main(build_args(sealed, tmp_path / "enc", *bad)) == 1
        assert "--enclave-size" in capsys.readouterr().err


def test_entry_script_first_line_fits_gramines_limit():
    python = "/opt/" + "p" * 236 + "/bin/python3"  # "#!" + 253 + newline = 256 bytes: fits
    assert eb.entry_script(python).startswith(f"#!{python}\n")
    with pytest.raises(UsageError, match="257 bytes"):
        eb.entry_script(python.replace("/opt/", "/opt/x"))


# --------------------------------------------------------------------------- build / make / run with stand-in tools
def test_build_sgx_calls_the_gramine_tools(sealed, tmp_path, gramine, capsys):
    out, key = tmp_path / "enc", signing_key(tmp_path)
    assert main(build_args(sealed, out, "--sgx", "--signing-key", str(key), "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = json.loads((out / "enclave.json").read_text())
    [render] = gramine("gramine-manifest")
    assert render["cwd"] == str(out)
    assert render["argv"] == [f"-D{k}={v}" for k, v in cfg["defines"].items()] + [
        "branchy-tee.manifest.template",
        "branchy-tee.manifest",
    ]
    # Gramine's renderer hashed every trusted file; the build reports what it rendered.
    rendered = (out / "branchy-tee.manifest").read_bytes()
    manifest = tomllib.loads(rendered.decode())
    assert summary["rendered_by"] == "gramine-manifest" and summary["manifest_bytes"] == len(rendered)
    assert summary["manifest_sha256"] == hashlib.sha256(rendered).hexdigest()
    assert summary["trusted_files"] == len(manifest["sgx"]["trusted_files"])
    assert (
        all(len(t["sha256"]) == 64 for t in manifest["sgx"]["trusted_files"])
        and manifest["loader"]["entrypoint"]["sha256"]
    )
    [sign] = gramine("gramine-sgx-sign")
    assert sign["argv"] == [
        "--key",
        str(key),
        "--manifest",
        "branchy-tee.manifest",
        "--output",
        "branchy-tee.manifest.sgx",
    ]
    assert sign["cwd"] == str(out)
    [view] = gramine("gramine-sgx-sigstruct-view")
    assert view["argv"] == ["--output-format", "json", "branchy-tee.sig"]
    sig = (out / "branchy-tee.sig").read_bytes()
    assert summary["signed"] and summary["mrenclave"] == sig[9:41].hex() and summary["mrsigner"] == sig[41:73].hex()
    assert not (out / "policy.toml").exists()  # owners never pin what the host printed
    # The model owner (having reproduced this build) signs a release statement; a data owner writes its policy.
    from branchy_tee.tee.attest.identity import create_identity, identity_hex

    mo = identity_hex(create_identity(tmp_path / "mo.id"))
    assert (
        main(
            [
                "enclave",
                "release",
                str(out),
                "--identity",
                str(tmp_path / "mo.id"),
                "--model-key",
                str(sealed / "keys" / "model.key"),
                "--model-broker-identity",
                BROKER_M_IDENTITY,
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    release = json.loads((tmp_path / "r.json").read_text())
    assert (release["mrenclave"], release["mrsigner"], release["attest"]) == (
        sig[9:41].hex(),
        sig[41:73].hex(),
        "gramine",
    )
    assert release["model_broker_identity"] == BROKER_M_IDENTITY and release["model_owner"] == mo
    assert (
        main(
            [
                "enclave",
                "policy",
                "--release",
                str(tmp_path / "r.json"),
                "--model-owner",
                mo,
                "--out",
                str(tmp_path / "p.toml"),
            ]
        )
        == 0
    )
    policy = tomllib.loads((tmp_path / "p.toml").read_text())
    assert policy == {
        "allowed_mrenclave": [sig[9:41].hex()],
        "isv_prod_id": 0,
        "min_isv_svn": 0,
        "allow_debug": False,
        "accepted_tcb_statuses": ["UpToDate"],
        "min_model_version": 1,
        "allowed_settings": [read_release(tmp_path / "r.json", mo).settings_sha256],
    }


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
    assert calls[0]["argv"] == [f"-D{k}={v}" for k, v in defines.items()] + [
        "branchy-tee.manifest.template",
        "branchy-tee.manifest",
    ]
    assert calls[1]["argv"] == [
        "--key",
        str(key),
        "--manifest",
        "branchy-tee.manifest",
        "--output",
        "branchy-tee.manifest.sgx",
    ]
    assert "mr_enclave" in done.stdout
    assert hashlib.sha256((out / "branchy-tee.manifest").read_bytes()).hexdigest() in done.stdout  # to compare builds
    assert (out / "branchy-tee.manifest.sgx").is_file() and (out / "branchy-tee.sig").is_file()
    # Nothing to do a second time; then the policy snippet from the signature.
    again = subprocess.run(["make", "SGX=1"], cwd=out, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and len(log.read_text().splitlines()) == 3
    monkeypatch.setenv("PATH", env["PATH"])
    from branchy_tee.tee.attest.identity import create_identity

    create_identity(tmp_path / "mo.id")
    capsys.readouterr()
    assert (
        main(
            [
                "enclave",
                "release",
                str(out),
                "--identity",
                str(tmp_path / "mo.id"),
                "--model-key",
                str(sealed / "keys" / "model.key"),
                "--model-broker-identity",
                BROKER_M_IDENTITY,
                "--out",
                str(tmp_path / "r.json"),
                "--json",
            ]
        )
        == 0
    )
    measured = json.loads(capsys.readouterr().out)
    assert measured["mrenclave"] == (out / "branchy-tee.sig").read_bytes()[9:41].hex()


def test_run_sgx_launches_gramine_sgx_with_the_manifest_and_predict_arguments(
    sealed, tmp_path, gramine, monkeypatch, capsys
):
    out, key = tmp_path / "enc", signing_key(tmp_path)
    assert main(build_args(sealed, out, "--sgx", "--signing-key", str(key))) == 0
    monkeypatch.chdir(tmp_path)
    shutil.copy(sealed / "images.npy", tmp_path / "images.npy")
    rel_bundle = os.path.relpath(sealed / "model.btee", tmp_path)
    argv = ["--bundle", rel_bundle, "--input", "enc/io/req.bin", "--output", "enc/io/res.bin", "--batch", "8"]
    assert main(["enclave", "run", str(out), "--", "predict", *argv]) == 0
    assert main(["enclave", "run", str(out), "--backend", "sgx", "--", "predict", *argv]) == 0
    assert main(["enclave", "run", "--backend", "direct", str(out), "--", *argv]) == 0
    expected = [
        "./branchy-tee",
        f"--bundle={sealed / 'model.btee'}",
        f"--input={out / 'io' / 'req.bin'}",
        f"--output={out / 'io' / 'res.bin'}",
        "--batch-size=8",
    ]
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
    rc = main(
        [
            "enclave",
            "run",
            str(out),
            "--backend",
            "sgx",
            "--",
            "predict",
            "--bundle",
            str(sealed / "model.btee"),
            "--input",
            str(out / "io" / "req.bin"),
            "--output",
            str(out / "io" / "res.bin"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "gramine-sgx not found" in err and "apt install gramine" in err and "gramine.readthedocs.io" in err


def test_native_backend_runs_predict_end_to_end(sealed, tmp_path, no_gramine, capsys):
    out = tmp_path / "enc"
    keys = sealed / "keys"
    assert main(build_args(sealed, out)) == 0
    req, res = out / "io" / "req.bin", out / "io" / "res.bin"
    assert encrypt_sealed_images(sealed, req, "req-1") == 0
    rc = main(
        [
            "enclave",
            "run",
            str(out),
            "--backend",
            "native",
            "--",
            "predict",
            "--bundle",
            str(sealed / "model.btee"),
            "--input",
            str(req),
            "--output",
            str(res),
            "--model-key",
            str(keys / "model.key"),
            "--data-key",
            str(keys / "data.key"),
            "--quiet",
        ]
    )
    assert rc == 0 and res.is_file()
    capsys.readouterr()
    assert main(["decrypt-result", str(res), "--key", str(keys / "data.key"), "--request", str(req), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert [r["index"] for r in records] == list(range(5))
    assert all(0 <= r["label"] < 10 and 0 <= r["exit"] < 3 for r in records)


# --------------------------------------------------------------------------- small parts
def test_sigstruct_view_json_output():
    e, s = "ab" * 32, "cd" * 32
    view = {"mr_signer": s, "mr_enclave": e, "isv_prod_id": 3, "isv_svn": 1, "debug_enclave": True}
    assert parse_sigstruct_view(json.dumps(view, indent=4)) == {
        "mrenclave": e,
        "mrsigner": s,
        "isv_prod_id": 3,
        "isv_svn": 1,
        "debug": True,
    }
    for bad in (
        "Attributes:\n    mr_enclave: " + e,
        json.dumps({**view, "mr_enclave": "ab"}),
        json.dumps({**view, "isv_svn": "1"}),
        json.dumps({k: v for k, v in view.items() if k != "debug_enclave"}),
    ):
        with pytest.raises(BranchyError, match="JSON"):
            parse_sigstruct_view(bad)


def test_ldd_output_is_read_into_normalised_paths():
    from branchy_tee.gramine.libraries import parse_ldd

    out = (
        "/e/numpy/_core/_multiarray.so:\n\tlinux-vdso.so.1 (0x00007ffd)\n\tlibz.so.1 => "
        "/lib/x86_64-linux-gnu/libz.so.1 (0x7f)\n"
        "\tlibq.so => not found\n\tlibo.so => /e/numpy/_core/../../numpy.libs/libo.so "
        "(0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n"
    )
    assert parse_ldd(out) == {"/lib/x86_64-linux-gnu/libz.so.1", "/e/numpy.libs/libo.so", "/lib64/ld-linux-x86-64.so.2"}


def test_run_argument_splitting():
    assert split_run_arguments(["--", "predict", "--bundle", "b"]) == ([], "predict", ["--bundle", "b"])
    assert split_run_arguments(["--backend", "native", "--", "--bundle", "b"]) == (
        ["--backend", "native"],
        "predict",
        ["--bundle", "b"],
    )
    assert split_run_arguments(["predict", "--bundle", "b"]) == ([], "predict", ["--bundle", "b"])
    assert split_run_arguments(["--bundle", "b"]) == ([], "predict", ["--bundle", "b"])
    assert split_run_arguments(["--backend=native", "predict", "--bundle", "b"]) == (
        ["--backend=native"],
        "predict",
        ["--bundle", "b"],
    )
    assert split_run_arguments(["--", "serve", "--bundle", "b"]) == ([], "serve", ["--bundle", "b"])
    with pytest.raises(UsageError, match="only predict or serve run in the enclave"):
        split_run_arguments(["--", "train", "--epochs", "1"])
    with pytest.raises(UsageError, match="nothing to run"):
        split_run_arguments([])


def test_enclave_size_is_a_power_of_two_rounding():
    from branchy_tee.gramine import measure

    assert measure.next_power_of_two(760 << 20) == 1 << 30
    assert measure.size_string(1 << 30) == "1G" and measure.size_string(512 << 20) == "512M"
    assert measure.parse_size("2G") == 2 << 30 and measure.parse_size("512m") == 512 << 20
