"""The enclave under Gramine's LibOS (gramine-direct) beside the same enclave run natively, in one run.

On the showcase model (the demo's and `branchy-tee bench`'s cached MobileNet V1, trained on first use), with
simulated attestation and two key brokers on loopback, `enclave run --backend native|direct` runs
predict on 1, 256 and 1,024 test images, early exit and --full-model:

- start-up to first answer: the wall time of a one-image request (process start, attestation, keys,
  bundle, one answer);
- batch-1 latency: predict's own compute time for 2,000 images at --batch-size 1, per image (its
  statistics: inference less the on-demand stage loads, so without start-up, attestation, file I/O
  or decryption, which the start-up figure shows);
- batch-128 throughput: 10,000 images (the whole test split) at --batch-size 128 over that compute time;

Each figure is the best of --repeat runs, native and direct alternating, so that both backends see
the same machine load.
- VmPeak of the Gramine process (sampled from the host's /proc) on these requests, and the
  sgx.enclave_size that `enclave build` derived from its own native and gramine-direct runs
  (gramine/measure.py, gramine/direct_peak.py).

    .venv/bin/python scripts/bench_gramine.py [--gramine DIR] [--json runs/bench-gramine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from branchy_tee.broker.server import start_broker
from branchy_tee.cli import main
from branchy_tee.client.envelopes import seal_request
from branchy_tee.core.fileio import atomic_write_text, write_key_file
from branchy_tee.core.keys import generate_key
from branchy_tee.demo.common import enclave_run, free_port
from branchy_tee.evaluate.exits import load_split
from branchy_tee.gramine.config import load_config
from branchy_tee.gramine.direct_peak import run_sampling_vm_peak
from branchy_tee.gramine.measure import MIB
from branchy_tee.gramine.tools import use_gramine
from branchy_tee.models.rundir import read_model_card
from branchy_tee.seal.bundle import seal_run
from branchy_tee.tee.attest.identity import create_identity, identity_hex
from branchy_tee.tee.attest.providers import code_measurement, simulated_mrenclave
from branchy_tee.train.cache import DEFAULT_CACHE, cached_model, recipe

REPO = Path(__file__).resolve().parents[1]
SIZES = {"one": 1, "batch1": 2000, "batch128": 10000}


def _run(argv: list[str], env: dict) -> tuple[float, int]:
    """(wall seconds, the largest VmPeak in KiB of the process and its children, sampled from /proc)."""
    t = time.perf_counter()
    done, peak = run_sampling_vm_peak(argv, env=env)
    if done.returncode != 0:
        err = done.stderr.strip()
        raise SystemExit(f"{' '.join(argv[:6])} ... failed: {err.splitlines()[-1] if err else done.returncode}")
    return time.perf_counter() - t, peak // 1024


def _prepare(work: Path, run_dir: Path) -> dict:
    card = read_model_card(run_dir)
    key, data_key = generate_key(), generate_key()
    write_key_file(work / "mo.key", key)
    write_key_file(work / "do.key", data_key)
    seal_run(run_dir, key, work / "model.btee")
    (work / "io").mkdir()
    test = load_split(card, "test")
    for name, n in SIZES.items():
        x = torch.stack([test[i][0] for i in range(n)])
        (work / "io" / f"{name}.enc").write_bytes(seal_request(x, data_key))
    ids = {p: identity_hex(create_identity(work / f"{p}.id")) for p in ("mo", "do")}
    port = free_port()
    build = [
        "enclave",
        "build",
        "--bundle",
        str(work / "model.btee"),
        "--out",
        str(work / "enc"),
        "--attest",
        "simulated",
    ]
    build += ["--env", str(REPO / ".enclave-env"), "--io-dir", str(work / "io"), "--threads", "1", "--allow-full-model"]
    build += ["--model-broker", f"http://127.0.0.1:{port}", "--model-broker-identity", ids["mo"]]
    if main(build) != 0:
        raise SystemExit("enclave build failed")
    cfg = load_config(work / "enc")
    mrenclave = simulated_mrenclave(cfg.env, code_measurement(Path(cfg.package_dir) / "branchy_tee")).hex()
    return {
        "port": port,
        "ids": ids,
        "cfg": cfg,
        "policy": {"allowed_mrenclave": [mrenclave], "allow_simulation": True},
    }


def _measure(work: Path, backend: str, full: bool, data_broker: str) -> dict:
    out: dict = {}
    for name in SIZES:
        batch = 128 if name == "batch128" else 1
        stats = work / "io" / f"{backend}-{name}-{full}.json"
        argv = enclave_run(work / "enc", "predict", backend=backend)
        argv += ["--bundle", str(work / "model.btee"), "--input", str(work / "io" / f"{name}.enc")]
        argv += ["--output", str(work / "io" / f"{name}.res"), "--data-broker", data_broker, "--quiet"]
        argv += [
            "--batch-size",
            str(batch),
            "--threads",
            "1",
            "--stats-json",
            str(stats),
            *(["--full-model"] if full else []),
        ]
        (work / "io" / f"{name}.res").unlink(missing_ok=True)
        wall, peak = _run(argv, dict(os.environ))
        s = json.loads(stats.read_text())
        compute = s["inference_seconds"] - s["stage_load_seconds"]
        out[name] = {"wall_s": wall, "compute_s": compute, "vm_peak_mib": peak / 1024}
    return {
        "startup_to_first_answer_s": round(out["one"]["wall_s"], 3),
        "batch1_latency_ms": round(1000 * out["batch1"]["compute_s"] / SIZES["batch1"], 4),
        "batch128_samples_per_s": round(SIZES["batch128"] / out["batch128"]["compute_s"], 1),
        "vm_peak_mib": round(max(v["vm_peak_mib"] for v in out.values()), 1),
    }


def _best(runs: list[dict]) -> dict:
    return {
        "startup_to_first_answer_s": min(r["startup_to_first_answer_s"] for r in runs),
        "batch1_latency_ms": min(r["batch1_latency_ms"] for r in runs),
        "batch128_samples_per_s": max(r["batch128_samples_per_s"] for r in runs),
        "vm_peak_mib": max(r["vm_peak_mib"] for r in runs),
    }


def main_(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gramine", metavar="DIR", help="a Gramine installation (default: gramine-direct on PATH)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="the trained model's cache (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement, best kept (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    # Gramine's Python tools run with the first python3 on PATH: this one, which has their packages.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    use_gramine(args.gramine)
    run_dir = cached_model(args.cache_dir, recipe(quick=False), quiet=True)
    with tempfile.TemporaryDirectory(prefix="branchy-gramine-bench-") as tmp:
        work = Path(tmp)
        os.environ["XDG_CONFIG_HOME"] = str(work / "config")
        w = _prepare(work, run_dir)
        r: dict = {"model": str(run_dir), "native": {}, "direct": {}}
        with (
            start_broker(
                work / "mo.key",
                {**w["policy"], "allowed_data_owners": [w["ids"]["do"]]},
                identity=work / "mo.id",
                port=w["port"],
            ),
            start_broker(work / "do.key", w["policy"], identity=work / "do.id") as do,
        ):
            runs: dict = {}
            for i in range(args.repeat):
                for backend in ("native", "direct"):  # alternating, the same requests
                    for mode, full in (("early_exit", False), ("full_model", True)):
                        m = _measure(work, backend, full, do.url)
                        runs.setdefault((backend, mode), []).append(m)
                        print(f"[{i + 1}/{args.repeat}] {backend:>6} {mode:<10} {m}", flush=True)
            for (backend, mode), ms in runs.items():
                r[backend][mode] = _best(ms)
        detail = w["cfg"].enclave_size_detail
    for b in ("native", "direct"):
        e, f = r[b]["early_exit"], r[b]["full_model"]
        r[b]["batch1_speedup"] = round(f["batch1_latency_ms"] / e["batch1_latency_ms"], 3)
        r[b]["batch128_speedup"] = round(e["batch128_samples_per_s"] / f["batch128_samples_per_s"], 3)
    g = detail["gramine_direct"] or {}
    r["enclave_size"] = {
        "chosen": w["cfg"].enclave_size,
        "from_native_run": detail["enclave_size_str"],
        "native_vm_peak_mib": round(detail["vm_peak"] / MIB, 1),
        "from_gramine_direct_run": g.get("enclave_size_str"),
        "gramine_direct_vm_peak_mib": round(g["vm_peak"] / MIB, 1) if g else None,
        "detail": detail,
    }
    print(json.dumps({k: r[k] for k in ("native", "direct", "enclave_size")}, indent=1))
    if args.json:
        atomic_write_text(args.json, json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
