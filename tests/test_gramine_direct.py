"""The enclave under Gramine's own LibOS (gramine-direct): Gramine, not a stand-in, enforces the
manifest's file policy and hashes. A LeNet-5 enclave built with simulated attestation, a model
broker and a data broker on loopback, `enclave run --backend direct` as a host would type it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from branchy_tee.broker.server import start_broker
from branchy_tee.cli import main
from branchy_tee.demo.common import enclave_run, free_port
from branchy_tee.gramine import direct_peak
from branchy_tee.gramine.config import load_config
from branchy_tee.gramine.measure import parse_size
from branchy_tee.tee.attest.identity import create_identity, identity_hex
from branchy_tee.tee.attest.providers import code_measurement, simulated_mrenclave
from enclave_tools import gramine_direct
from runs import keygen, make_random_run

pytestmark = [pytest.mark.gramine, pytest.mark.enclave]

ENV_DIR = Path(__file__).resolve().parents[1] / ".enclave-env"


@dataclass
class World:
    d: Path
    enclave: Path
    policy: dict
    ids: dict[str, str]
    model_port: int

    def brokers(self):
        """The model owner's and the data owner's brokers (a context manager each)."""
        mo = start_broker(
            self.d / "mo.key",
            {**self.policy, "allowed_data_owners": [self.ids["do"]]},
            identity=self.d / "mo.id",
            port=self.model_port,
        )
        return mo, start_broker(self.d / "do.key", self.policy, identity=self.d / "do.id")


@pytest.fixture(scope="module")
def world(tmp_path_factory, enclave_env):
    d = tmp_path_factory.mktemp("direct")
    bindir = gramine_direct(tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as mp:
        # Gramine's tools (gramine-manifest runs with the first python3 on PATH: this one has its packages).
        mp.setenv("PATH", f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("XDG_CONFIG_HOME", str(d / "config"))
        make_random_run(d / "run", "lenet5")
        ids = {}
        for p in ("mo", "do"):
            keygen(d / f"{p}.key")
            ids[p] = identity_hex(create_identity(d / f"{p}.id"))
        assert main(["seal", str(d / "run"), "--key", str(d / "mo.key"), "--out", str(d / "model.btee")]) == 0
        port = free_port()
        (d / "io").mkdir()
        build = ["enclave", "build", "--bundle", str(d / "model.btee"), "--out", str(d / "enclave")]
        build += ["--attest", "simulated", "--env", str(ENV_DIR), "--enclave-size", "1G", "--io-dir", str(d / "io")]
        build += ["--allow-full-model"]  # (the memory-budget and stage-loading cases compare with it)
        build += ["--model-broker", f"http://127.0.0.1:{port}", "--model-broker-identity", ids["mo"]]
        assert main(build) == 0
        assert main([*build[:5], str(d / "enclave-serve"), *build[6:], "--serve"]) == 0
        allowed = []
        for e in ("enclave", "enclave-serve"):
            cfg = load_config(d / e)
            allowed.append(simulated_mrenclave(cfg.env, code_measurement(Path(cfg.package_dir) / "branchy_tee")).hex())
        policy = {"allowed_mrenclave": allowed, "allow_simulation": True}
        images = np.random.RandomState(0).randint(0, 256, (20, 1, 28, 28)).astype(np.uint8)
        np.save(d / "images.npy", images)
        request = ["encrypt-input", str(d / "images.npy"), "--bundle", str(d / "model.btee")]
        assert main([*request, "--key", str(d / "do.key"), "--out", str(d / "io" / "req.enc")]) == 0
        yield World(d, d / "enclave", policy, ids, port)


@pytest.fixture(autouse=True)
def _gramine_on_path(world, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(world.d / "config"))


def predict(world: World, data_broker: str, *extra: str, enclave: Path | None = None) -> int:
    """`enclave run --backend direct -- predict ...` for the data owner's request."""
    argv = ["enclave", "run", "--backend", "direct", str(enclave or world.enclave), "--", "predict"]
    argv += ["--bundle", str(world.d / "model.btee"), "--input", str(world.d / "io" / "req.enc")]
    argv += ["--data-broker", data_broker, "--quiet", *extra]
    return main(argv)


def test_predict_answers_end_to_end_under_gramine_direct(world, capfd):
    out = world.d / "io" / "res.enc"
    stats = world.d / "io" / "stats.json"
    mo, do = world.brokers()
    with mo, do:
        t = time.perf_counter()
        rc = predict(world, do.url, "--output", str(out), "--stats-json", str(stats), "--mprofile", str(world.d / "io"))
        seconds = time.perf_counter() - t
    assert rc == 0, capfd.readouterr().err
    s = json.loads(stats.read_text())
    assert s["samples"] == 20 and sum(s["exit_counts"]) == 20
    assert s["peak_rss_mib"] > 50  # /proc/self/statm inside the LibOS
    assert list((world.d / "io").glob("mprofile_*.dat"))
    capfd.readouterr()
    assert (
        main(
            [
                "decrypt-result",
                str(out),
                "--key",
                str(world.d / "do.key"),
                "--request",
                str(world.d / "io" / "req.enc"),
                "--json",
            ]
        )
        == 0
    )
    answers = json.loads(capfd.readouterr().out)
    assert len(answers["records"]) == 20
    print(f"predict under gramine-direct: {seconds:.1f} s, stages loaded {s['stages_loaded']}")


def gramine(world: World, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`gramine-direct ./branchy-tee ARGS` in the build directory, as the host may type it (no launcher
    checks first): what happens is Gramine's and the enclave's doing."""
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        ["gramine-direct", "./branchy-tee", *args],
        cwd=world.enclave,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _predict_args(world: World, data_broker: str, output: str, *extra: str, request: Path | None = None) -> list[str]:
    request = request or world.d / "io" / "req.enc"
    return [
        "--bundle",
        str(world.d / "model.btee"),
        "--input",
        str(request),
        "--output",
        str(world.d / "io" / output),
    ] + [
        "--data-broker",
        data_broker,
        "--quiet",
        *extra,
    ]


def _predict_with_brokers(world: World, output: str, *extra: str, request: Path | None = None):
    """predict under gramine-direct, with both brokers running."""
    mo, do = world.brokers()
    with mo, do:
        return gramine(world, *_predict_args(world, do.url, output, *extra, request=request))


def _error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """What the enclave printed besides the simulation warnings and its progress."""
    return [line for line in done.stdout.strip().splitlines() if not line.startswith(("!!", "[enclave]"))]


def test_a_trusted_file_changed_after_the_build_is_refused_by_gramine(world):
    """The entry script is hashed into the manifest: once the host changed it, Gramine does not run it."""
    launcher = Path(load_config(world.enclave).launcher)
    original = launcher.read_bytes()
    try:
        launcher.write_bytes(original + b"\nprint('the host ran its own code')\n")
        done = gramine(world, "--help")
    finally:
        launcher.write_bytes(original)
    assert done.returncode != 0 and "the host ran its own code" not in done.stdout
    assert gramine(world, "--help").returncode == 0  # (the unchanged script runs)


def test_a_file_outside_the_manifest_is_refused_by_gramine_in_one_line(world):
    """A file in the bundle's (mounted) folder that is not one of the bundle's files: Gramine denies
    it (EACCES), and predict says so in one line, with no traceback."""
    extra = world.d / "model.btee" / "extra.enc"
    shutil.copy(world.d / "io" / "req.enc", extra)
    try:
        done = _predict_with_brokers(world, "x.res", request=extra)
    finally:
        extra.unlink()
    err = _error_lines(done)
    assert done.returncode == 1 and len(err) == 1 and "Permission denied" in err[0], done.stdout
    assert "cannot read request" in err[0] and "Traceback" not in done.stdout


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("truncated", "tampered"),  # the request cut short by the host: refused as tampering
        ("--batch-size=0", "--batch-size"),  # predict's own argument checks, inside the LibOS
    ],
)
def test_bad_input_is_one_line_without_a_traceback_inside_the_libos(world, bad, expected):
    request = world.d / "io" / "cut.enc"
    request.write_bytes((world.d / "io" / "req.enc").read_bytes()[:-7])
    extra = [bad] if bad.startswith("--") else []
    done = _predict_with_brokers(world, "cut.res", *extra, request=request if not extra else None)
    err = _error_lines(done)
    assert done.returncode in (1, 2) and len(err) == 1 and expected in err[0], done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not (world.d / "io" / "cut.res").exists()


def test_the_hosts_environment_does_not_reach_the_enclave(world):
    """BRANCHY_TEE_ALLOW_PLAINTEXT=1 and PYTHONPATH in the host's environment: Gramine passes only the
    manifest's loader.env, so plaintext results stay refused (by the enclave itself, in one line)."""
    (world.d / "sitecustomize.py").write_text("print('host code ran in the enclave')\n")
    host = {
        "BRANCHY_TEE_ALLOW_PLAINTEXT": "1",
        "PYTHONPATH": str(world.d),
        "PYTHONSTARTUP": str(world.d / "sitecustomize.py"),
    }
    out = ["p.res", "--plaintext-result", str(world.d / "io" / "p.txt")]
    done = gramine(world, *_predict_args(world, "http://127.0.0.1:9", *out), env=host)
    assert done.returncode == 2 and "--plaintext-result is refused" in done.stdout, done.stdout
    assert "host code ran" not in done.stdout and not (world.d / "io" / "p.txt").exists()


def test_the_hosts_extra_arguments_reach_predicts_parser_not_python(world):
    """`-c CODE` after the entry script is predict's (unknown) option, never the interpreter's."""
    done = gramine(world, "-c", "print('host code')")
    assert done.returncode == 2 and "host code" not in done.stdout.replace("print('host code')", "")
    assert done.stdout.startswith("branchy-tee predict: error:"), done.stdout


def test_a_tampered_stage_is_refused_as_tampering(world, tmp_path, capfd):
    """The host flips one byte of a stage file the enclave may read: the AEAD check inside the LibOS
    refuses it, in one line, and no result is written."""
    stage = world.d / "model.btee" / "stage-01.bin"
    original = stage.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    try:
        stage.write_bytes(bytes(flipped))
        done = _predict_with_brokers(world, "t.res", "--full-model")  # every sample needs stage 1
    finally:
        stage.write_bytes(original)
    err = _error_lines(done)
    assert done.returncode == 1 and len(err) == 1 and "stage-01.bin" in err[0], done.stdout
    assert "tamper" in err[0].lower() or "authentic" in err[0].lower(), err[0]
    assert not (world.d / "io" / "t.res").exists()


def test_a_run_under_a_memory_budget_loads_and_evicts_inside_the_libos(world):
    stats = world.d / "io" / "budget.json"
    budget = ["--full-model", "--memory-budget", "0.28", "--batch-size", "1", "--stats-json", str(stats)]
    done = _predict_with_brokers(world, "b.res", *budget)
    assert done.returncode == 0, done.stdout
    s = json.loads(stats.read_text())
    weights = sum(
        e["weight_bytes"] for e in json.loads((world.d / "model.btee" / "header.json").read_text())["header"]["stages"]
    )
    assert s["resident_weights_peak_mib"] * 2**20 < weights  # never all stages at once
    assert s["evictions"] > 0 and s["stage_loads"] > len(s["stages_loaded"])


def test_the_enclave_size_is_derived_from_gramines_own_vm_peak_too(world, tmp_path, capsys):
    """Without --enclave-size the build also runs the stand-in inside gramine-direct: the Gramine
    process's VmPeak (the LibOS and PAL around the runtime) sizes the enclave beside the native run."""
    out = tmp_path / "sized"
    build = ["enclave", "build", "--bundle", str(world.d / "model.btee"), "--out", str(out), "--attest", "simulated"]
    assert main([*build, "--env", str(ENV_DIR), "--io-dir", str(world.d / "io"), "--batch-size", "32"]) == 0
    d = load_config(out).enclave_size_detail
    g = d["gramine_direct"]
    assert g is not None and g["samples"] == d["samples"] == 64
    assert g["vm_peak"] > 100 * 2**20  # the Gramine process itself (Python + ONNX Runtime alone are more)
    assert g["terms"]["gramine"] == direct_peak.SGX_ONLY_SHARE
    chosen = parse_size(load_config(out).enclave_size)
    assert chosen == max(d["enclave_size"], g["enclave_size"]) and chosen >= g["need"]
    printed = capsys.readouterr().out
    assert "under gramine-direct: VmPeak" in printed
    print(f"VmPeak native {d['vm_peak'] / 2**20:.0f} MiB, gramine-direct {g['vm_peak'] / 2**20:.0f} MiB")


def _host_files_with_a_private_key(roots: list[Path], since: float) -> list[str]:
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                f = Path(dirpath) / name
                try:
                    if f.stat().st_mtime >= since and f.stat().st_size < 1 << 20 and b"PRIVATE KEY" in f.read_bytes():
                        found.append(str(f))
                except OSError:
                    pass
    return found


def test_serve_answers_query_and_the_client_over_ra_tls_under_gramine_direct(world, tmp_path, capfd):
    """serve in gramine-direct; `query` and the Python Client verify its RA-TLS certificate (simulated
    evidence) and get answers; no file the host can see holds a TLS private key."""
    from branchy_tee.client import Client

    (tmp_path / "policy.toml").write_text(
        f"allowed_mrenclave = {json.dumps(world.policy['allowed_mrenclave'])}\nallow_simulation = true\n"
    )
    port = free_port()
    started = time.time()
    mo, _ = world.brokers()
    with mo:
        serve = ["serve", "--bundle", str(world.d / "model.btee"), "--listen", f"127.0.0.1:{port}", "--quiet"]
        argv = enclave_run(world.d / "enclave-serve", *serve, backend="direct")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline()
            while line.startswith("!!"):
                line = proc.stdout.readline()
            assert line.startswith("serving"), line
            url = f"https://127.0.0.1:{port}"
            query = ["query", url, str(world.d / "images.npy"), "--policy", str(tmp_path / "policy.toml")]
            capfd.readouterr()
            assert main([*query, "--identity", str(world.d / "do.id"), "--json"]) == 0
            assert len(json.loads(capfd.readouterr().out)) == 20
            with Client(url, policy=tmp_path / "policy.toml", identity=world.d / "do.id") as c:
                assert len(c.predict(np.load(world.d / "images.npy")[:3])) == 3
            leaked = _host_files_with_a_private_key([Path("/tmp"), world.d], started)
        finally:
            proc.terminate()
            proc.wait(60)
    assert leaked == []
