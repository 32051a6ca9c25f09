"""The enclave itself, checked as far as this machine allows without SGX: what its environment holds,
the manifest rendered by Gramine's own tooling of every supported release (../shared/gramine-tools),
reproducible hashed manifests from two fresh checkouts, the measured enclave size, and the run-time
file policy, emulated: the entry script runs natively under strace with only the manifest's
environment, and every file it opens must be one the manifest lets the enclave open."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from branchy_tee.gramine.env import enclave_files
from branchy_tee.gramine.libraries import GRAMINE_GLIBC
from enclave_tools import (
    ENCLAVE_ENV,
    REPO,
    SUPPORTED_GRAMINE,
    encrypt_sealed_images,
    gramine_direct,
    gramine_release,
    install_gramine_manifest,
)

pytestmark = pytest.mark.gramine  # Gramine's manifest renderers (../shared/gramine-tools)

# test_enclave.py's: the same loader.env, so the build reuses the memory measured there.
BROKERS = [
    "--model-broker",
    "http://127.0.0.1:8101",
    "--model-broker-identity",
    "5a" * 32,
    "--data-broker",
    "http://127.0.0.1:8102",
]
MAX_TRUSTED_FILES = 10_000
MAX_MANIFEST_BYTES = 3_000_000


def build(
    sealed: Path,
    out: Path,
    bindir: Path,
    *extra: str,
    cwd: Path | None = None,
    env_dir: Path = ENCLAVE_ENV,
    pythonpath: Path | None = None,
    signer: Path | None = None,
) -> subprocess.CompletedProcess:
    """`branchy-tee enclave build` in a process of its own, with ``bindir`` (Gramine's gramine-manifest)
    first on PATH, then ``signer`` (a Gramine bin/ with gramine-sgx-sign); with ``pythonpath``,
    branchy_tee is imported from that checkout's src."""
    path = os.pathsep.join([str(bindir), *([str(signer), str(Path(sys.executable).parent)] if signer else [])])
    env = {**os.environ, "PATH": f"{path}{os.pathsep}{os.environ['PATH']}"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    argv = [
        sys.executable,
        "-c",
        "import sys; from branchy_tee.cli import main; sys.exit(main())",
        "enclave",
        "build",
        "--bundle",
        str(sealed / "model.btee"),
        "--out",
        str(out),
        "--env",
        str(env_dir),
        *BROKERS,
        "--json",
        *extra,
    ]
    return subprocess.run(argv, cwd=cwd or out.parent, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def built(sealed, enclave_env, tmp_path_factory):
    """An enclave built for the sealed LeNet-5 with Gramine 1.9's gramine-manifest, its size measured."""
    base = tmp_path_factory.mktemp("built")
    bindir = base / "bin"
    install_gramine_manifest(bindir, "1.9")
    done = build(sealed, base / "enc", bindir)
    assert done.returncode == 0, done.stderr
    out = base / "enc"
    return {
        "out": out,
        "summary": json.loads(done.stdout),
        "cfg": json.loads((out / "enclave.json").read_text()),
        "manifest": tomllib.loads((out / "branchy-tee.manifest").read_text()),
    }


# --------------------------------------------------------------------------- the environment
def test_the_enclave_environment_holds_only_what_the_enclave_runs(enclave_env):
    home = Path(enclave_env.home_lib)
    names = set(enclave_env.packages)
    assert {"onnxruntime", "numpy", "safetensors", "cryptography"} <= names
    assert not names & {"torch", "pillow", "matplotlib", "aiohttp", "tqdm", "psutil", "pytest", "hypothesis", "pip"}
    assert all("==" in r for r in enclave_env.requirements) and enclave_env.unpinned == []
    # Our package: exactly the modules the entry point can import, none of the owner's tools.
    ours = sorted(
        p.relative_to(home / "site-packages").as_posix()
        for p in (home / "site-packages" / "branchy_tee").rglob("*")
        if p.is_file()
    )
    assert ours == enclave_files() and "branchy_tee/tee/predict.py" in ours
    assert not any(
        m in f
        for f in ours
        for m in ("models/", "train/", "evaluate/", "export/", "seal/", "gramine/", "broker/", "verifier/", "cli/")
    )
    # The standard library without other environments' packages, test suites and tools; nothing
    # that is not run: no bytecode, stubs, headers, tests.
    top = set(os.listdir(home))
    assert {"os.py", "json", "ssl.py", "lib-dynload", "site-packages"} <= top
    assert not top & {"test", "idlelib", "tkinter", "ensurepip", "turtledemo", "lib2to3"} and not any(
        t.startswith("config-") for t in top
    )
    assert not any(n.startswith(("_test", "_tkinter")) for n in os.listdir(home / "lib-dynload"))
    for root, dirs, files in os.walk(home):
        assert not {"__pycache__", "tests", "test"} & set(dirs), root
        assert not [f for f in files if f.endswith((".pyc", ".pyi", ".h", ".hpp", ".cuh"))], root
    assert sum(len(f) for _r, _d, f in os.walk(home)) < MAX_TRUSTED_FILES - 100


# --------------------------------------------------------------------------- Gramine's own renderer
@pytest.mark.parametrize("release", SUPPORTED_GRAMINE)
def test_every_supported_gramine_renders_the_manifest_without_a_warning(built, release, tmp_path):
    tools = gramine_release(release)
    out = built["out"]
    argv = [
        sys.executable,
        str(tools / "gramine-manifest"),
        *(f"-D{k}={v}" for k, v in built["cfg"]["defines"].items()),
        str(out / "branchy-tee.manifest.template"),
        str(tmp_path / "rendered.manifest"),
    ]
    done = subprocess.run(argv, env={**os.environ, "PYTHONPATH": str(tools)}, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # the release's schema check: no error, no warning
    data = (tmp_path / "rendered.manifest").read_bytes()
    manifest = tomllib.loads(data.decode())
    trusted = manifest["sgx"]["trusted_files"]
    assert all(len(t["sha256"]) == 64 for t in trusted) and len(manifest["loader"]["entrypoint"]["sha256"]) == 64
    print(f"Gramine {release}: {len(trusted)} trusted files, hashed manifest {len(data):,} bytes")
    assert len(trusted) <= MAX_TRUSTED_FILES and len(data) <= MAX_MANIFEST_BYTES
    if release == "1.9":  # the build rendered with this very tool: same bytes, same figures printed
        assert data == (out / "branchy-tee.manifest").read_bytes()
        s = built["summary"]
        assert (s["trusted_files"], s["manifest_bytes"]) == (len(trusted), len(data))


def test_gramine_1_7_is_refused_in_one_line(sealed, enclave_env, tmp_path):
    install_gramine_manifest(tmp_path / "bin", "1.7")
    done = build(sealed, tmp_path / "enc", tmp_path / "bin", "--enclave-size", "1G")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = [ln for ln in done.stderr.splitlines() if "error" in ln]
    assert "Gramine 1.7 or older" in line and "1.8 or later" in line
    assert not (tmp_path / "enc" / "branchy-tee.manifest").exists()  # nothing half-made is left to sign


# --------------------------------------------------------------------------- reproducible measurement
def fresh_checkout(dest: Path) -> Path:
    """This working tree's files as a fresh clone has them: tracked and untracked, minus ignored ones
    (.venv, .enclave-env, caches): `git ls-files`. Copies carry new modification times."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / rel, dest / rel)
    return dest


@pytest.mark.slow
def _gramine_signer(tmp_path_factory) -> Path | None:
    """A Gramine bin/ whose gramine-sgx-sign runs here (it needs pyelftools), or None."""
    import importlib.util

    try:
        bindir = gramine_direct(tmp_path_factory.getbasetemp())
    except pytest.skip.Exception:
        return None
    if not (bindir / "gramine-sgx-sign").is_file() or importlib.util.find_spec("elftools") is None:
        return None
    return bindir


def test_two_fresh_checkouts_render_byte_identical_hashed_manifests(sealed, tmp_path, tmp_path_factory):
    if not shutil.which("git") or not (REPO / ".git").exists():
        pytest.skip("needs this repository's git checkout (git ls-files) to make fresh copies")
    install_gramine_manifest(tmp_path / "bin", "1.9")
    checkout, out = tmp_path / "checkout", tmp_path / "enc"
    rendered, size = [], []
    signer, sign = _gramine_signer(tmp_path_factory), []
    if signer:  # Gramine's own gramine-sgx-sign: the real MRENCLAVE of each build
        key = tmp_path / "signing-key.pem"
        subprocess.run([sys.executable, str(signer / "gramine-sgx-gen-private-key"), str(key)], check=True)
        sign = ["--sgx", "--signing-key", str(key)]
    for _ in range(2):  # one after the other at the same path, each with an environment of its own
        fresh_checkout(checkout)
        # The second build is the owner's rebuild (docs/sgx.md): the size from the first's enclave.json, not measured
        # again.
        done = build(
            sealed,
            out,
            tmp_path / "bin",
            *size,
            *sign,
            cwd=checkout,
            env_dir=checkout / ".enclave-env",
            pythonpath=checkout / "src",
            signer=signer,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["env"] == str(checkout / ".enclave-env")
        rendered.append(((out / "branchy-tee.manifest").read_bytes(), summary))
        size = ["--enclave-size", json.loads((out / "enclave.json").read_text())["enclave_size"]]
        shutil.rmtree(checkout)
        shutil.rmtree(out)
    (first, s1), (second, s2) = rendered
    assert first == second, "two fresh checkouts rendered different hashed manifests"
    assert s1["manifest_sha256"] == s2["manifest_sha256"]
    if signer:
        assert s1["signed"] and s1["mrenclave"] == s2["mrenclave"], (s1["mrenclave"], s2["mrenclave"])
        print(f"MRENCLAVE from gramine-sgx-sign, both checkouts: {s1['mrenclave']}")
    else:
        print("Gramine's gramine-sgx-sign (../shared/gramine) or pyelftools is missing: MRENCLAVE not computed")
    assert not s1["enclave_size_detail"]["given"] and s2["enclave_size_detail"]["given"]
    print(
        f"hashed manifest SHA-256 {s1['manifest_sha256']}, measured peak "
        f"{s1['enclave_size_detail']['vm_peak'] >> 20} MiB"
    )


# --------------------------------------------------------------------------- enclave size
def test_the_real_bundle_fits_the_measured_enclave_size(built, sealed, tmp_path):
    """The size was measured on a random stand-in of the bundle's architecture; the bundle itself, run
    the same way (full model, the build's batch size), peaks no higher than that measurement allows."""
    cfg, detail = built["cfg"], built["cfg"]["enclave_size_detail"]
    size = int(cfg["enclave_size"][:-1]) << {"M": 20, "G": 30}[cfg["enclave_size"][-1]]
    assert not detail["given"] and detail["need"] <= size and detail["terms"]["measured_peak"] == detail["vm_peak"]
    keys = sealed / "keys"
    req, res = tmp_path / "req.bin", tmp_path / "res.bin"
    assert encrypt_sealed_images(sealed, req) == 0
    from branchy_tee.gramine.measure import RUNNER, measurement_environment

    argv = [
        cfg["interpreter"],
        str(RUNNER),
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
        "--batch-size",
        str(cfg["batch_size"]),
        "--full-model",
        "--quiet",
    ]
    done = subprocess.run(argv, env=measurement_environment(cfg["env"]), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak = json.loads(done.stdout.splitlines()[-1])["VmPeak"]
    print(
        f"stand-in peak {detail['vm_peak'] >> 20} MiB, real bundle {peak >> 20} MiB, enclave size {cfg['enclave_size']}"
    )
    assert peak + detail["margin"] <= size and abs(peak - detail["vm_peak"]) < 64 << 20


# --------------------------------------------------------------------------- run-time file policy (emulated)
# Files a native run opens that the enclave sees otherwise (the emulation's mapping):
PSEUDO = ("/proc/", "/dev/attestation/", "/sys/devices/system/cpu/", "/sys/devices/system/node/")
PSEUDO_FILES = {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"}  # Gramine's own, in the enclave
# Host configuration the manifest does not mount: in the enclave these opens fail and glibc, OpenSSL
# and the OpenMP runtime use their built-in defaults (no loader cache, C locale, UTC, no user
# database, OpenSSL's default configuration, no CPU quota).
ABSENT = (
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/usr/share/locale/locale.alias",
    "/usr/lib/locale/",
    "/usr/lib/x86_64-linux-gnu/gconv/",
    "/usr/lib/ssl/openssl.cnf",
    "/sys/fs/cgroup/",
    "/sys/bus/pci/",
    "/etc/os-release",
)  # ONNX Runtime looks for GPUs and the OS name there
_CALL = re.compile(
    r'^\d+\s+(open|openat|openat2|creat|execve|execveat)\((?:(?:AT_FDCWD|\d+)<([^>]*)>, )?"([^"]*)"[^,]*, (.*)$'
)


def opened_files(trace: str) -> list[tuple[str, str, str]]:
    """(call, absolute path, flags) of every successful open/exec in an ``strace -f -y`` log."""
    found = []
    for line in trace.splitlines():
        m = _CALL.match(line)
        if m:
            call, base, path, rest = m.groups()
            found.append((call, os.path.normpath(os.path.join(base or "/", path)), rest))
    return found


def policy_violations(trace: str, manifest: dict, entry: str, extra_allowed: set[str]) -> list[str]:
    trusted = {t["uri"][len("file:") :] for t in manifest["sgx"]["trusted_files"]}
    allowed = [a[len("file:") :] for a in manifest["sgx"]["allowed_files"]]
    allowed_files = {a for a in allowed if not a.endswith("/")}
    allowed_dirs = [a.rstrip("/") for a in allowed if a.endswith("/")]
    mounts = [m["path"] for m in manifest["fs"]["mounts"] if m.get("type") != "tmpfs"]

    def under(path, dirs):
        return any(path == d or path.startswith(d + "/") for d in dirs)

    bad = []
    for call, path, flags in opened_files(trace):
        if call.startswith("execve"):
            ok = path == entry  # the entry script is the only program; the enclave starts no process
        elif "O_DIRECTORY" in flags:  # listing a mounted folder (the import system does): no file content
            ok = under(path, mounts + allowed_dirs) or (path + "/").startswith(ABSENT)
        elif "O_WRONLY" in flags or "O_RDWR" in flags or "O_CREAT" in flags or call == "creat":
            ok = under(path, allowed_dirs) or path in PSEUDO_FILES  # writes only where the host may read anyway
        else:
            ok = (
                path in trusted
                or path in allowed_files
                or under(path, allowed_dirs)
                or path in extra_allowed
                or path in PSEUDO_FILES
                or path.startswith(PSEUDO)
                or os.path.basename(path) in GRAMINE_GLIBC
                or path.startswith(ABSENT)
            )
        if not ok:
            bad.append(f"{call} {path} {flags[:60]}")
    return sorted(set(bad))


def test_the_entry_script_opens_only_what_the_manifest_allows(built, sealed, enclave_env):
    strace = shutil.which("strace")
    if not strace:
        pytest.skip("strace is not installed (`make test` installs it with apt where it can: scripts/ensure-strace.sh)")
    out, manifest = built["out"], built["manifest"]
    entry, env = str(out / "branchy-tee-predict"), dict(manifest["loader"]["env"])
    keys = sealed / "keys"
    req, res = out / "io" / "req.bin", out / "io" / "res.bin"
    assert encrypt_sealed_images(sealed, req, "strace") == 0
    predict = ["--bundle", str(sealed / "model.btee"), "--input", str(req), "--output", str(res)]
    key_files = ["--model-key", str(keys / "model.key"), "--data-key", str(keys / "data.key")]
    runs = {
        # Exactly the manifest's environment: the runtime starts, loads torch and everything it
        # imports, and stops at the attested key fetch (no broker and no /dev/attestation here).
        "manifest environment": (env, predict, 1, set()),
        # The same without BRANCHY_TEE_ENCLAVE, with key files in place of attested key release: the
        # whole run (decrypt the bundle, run every stage, seal the results).
        "whole run, key files": (
            {k: v for k, v in env.items() if k != "BRANCHY_TEE_ENCLAVE"},
            predict + key_files,
            0,
            {str(keys / "model.key"), str(keys / "data.key")},
        ),
    }
    for name, (run_env, argv, rc, extra) in runs.items():
        log = out / f"strace-{name.split()[0]}.log"
        done = subprocess.run(
            [
                strace,
                "-f",
                "-qq",
                "-y",
                "-o",
                str(log),
                "-e",
                "trace=open,openat,openat2,creat,execve,execveat",
                "-e",
                "status=successful",
                entry,
                *argv,
            ],
            env=run_env,
            cwd="/",
            capture_output=True,
            text=True,
        )
        assert done.returncode == rc, f"{name}: {done.stderr[-2000:]}"
        trace = log.read_text()
        assert len(opened_files(trace)) > 100, (
            name
        )  # the log is read correctly: the interpreter and runtime open hundreds
        bad = policy_violations(trace, manifest, entry, extra)
        assert bad == [], f"{name}: " + "; ".join(bad)
    assert res.is_file()
    # Nothing was written into the trusted environment (no .pyc at run time).
    assert not list(Path(enclave_env.home_lib).rglob("__pycache__"))


def test_the_policy_check_catches_what_the_enclave_may_not_open():
    manifest = {
        "sgx": {
            "trusted_files": [{"uri": "file:/env/lib/python3.11/os.py", "sha256": "0" * 64}],
            "allowed_files": ["file:/data/io/", "file:/data/model.btee/header.json"],
        },
        "fs": {"mounts": [{"path": "/env", "uri": "file:/env"}, {"path": "/data/io", "uri": "file:/data/io"}]},
    }
    trace = "\n".join(
        [
            '7 execve("/enc/branchy-tee-predict", ["/enc/branchy-tee-predict"], 0x7ffd /* 9 vars */) = 0',
            '7 openat(AT_FDCWD</>, "/env/lib/python3.11/os.py", O_RDONLY|O_CLOEXEC) = 3</env/lib/python3.11/os.py>',
            '7 openat(3</env/lib/python3.11>, "os.py", O_RDONLY|O_CLOEXEC) = 4</env/lib/python3.11/os.py>',
            '7 openat(AT_FDCWD</>, "/env/lib/python3.11", O_RDONLY|O_NONBLOCK|O_CLOEXEC|O_DIRECTORY) = '
            "3</env/lib/python3.11>",
            '7 openat(AT_FDCWD</>, "/data/io/.res.bin.x.tmp", O_RDWR|O_CREAT|O_EXCL|O_CLOEXEC, 0600) = '
            "3</data/io/.res.bin.x.tmp>",
            '7 openat(AT_FDCWD</>, "/lib/x86_64-linux-gnu/libc.so.6", O_RDONLY|O_CLOEXEC) = '
            "3</usr/lib/x86_64-linux-gnu/libc.so.6>",
            '7 openat(AT_FDCWD</>, "/proc/self/status", O_RDONLY|O_CLOEXEC) = 3</proc/1/status>',
            # what the enclave may not do:
            '7 openat(AT_FDCWD</>, "/env/lib/python3.11/__pycache__/os.cpython-311.pyc.1", O_WRONLY|O_CREAT|O_EXCL, '
            "0644) = 3</x>",
            '7 openat(AT_FDCWD</>, "/env/lib/python3.11/site-packages/other.py", O_RDONLY|O_CLOEXEC) = 3</x>',
            '7 openat(AT_FDCWD</>, "/home/user/.config/secrets", O_RDONLY|O_CLOEXEC) = 3</x>',
            '7 openat(AT_FDCWD</>, "/etc", O_RDONLY|O_DIRECTORY) = 3</etc>',
            '8 execve("/sbin/ldconfig", ["/sbin/ldconfig", "-p"], 0x7f /* 2 vars */) = 0',
        ]
    )
    bad = policy_violations(trace, manifest, "/enc/branchy-tee-predict", set())
    assert {b.split()[1] for b in bad} == {
        "/env/lib/python3.11/__pycache__/os.cpython-311.pyc.1",
        "/etc",
        "/sbin/ldconfig",
        "/env/lib/python3.11/site-packages/other.py",
        "/home/user/.config/secrets",
    }
