"""``branchy-tee demo``: every party of a secure early-exit deployment, played on this machine.

1. The model owner trains a multi-exit model on Fashion-MNIST with distillation, calibrates its exit
   thresholds (1 point accuracy budget), evaluates it and seals it.
2. Every owner makes its Ed25519 identity; the host builds the enclave for the bundle, measuring the
   model broker's address and identity and the bundle; the model owner (who would reproduce the build)
   signs a release statement; each data owner writes its broker's policy from that statement, and the
   model owner its own, allowing data owners A and B.
3. Each data owner encrypts its half of the test images with its own key.
4. Three key brokers start on loopback, each with its owner's identity. Attestation is SIMULATED
   (there is no SGX here), and every party says so loudly.
5. The enclave (``enclave run --backend native``: the runtime with the manifest's measured settings, in
   a separate process) attests to each broker, accepts only releases signed by the identities it
   trusts, and answers both requests with batched early exit and on-demand stage loading.
6. Each data owner decrypts its own results, bound to its request and naming the model that answered;
   neither can read the other's. For comparison the enclave answers once more with the full model,
   and latency/throughput of early exit vs the full forward are measured in process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .errors import BranchyError

DEMO_MODEL = {"net": "mobilenetv1", "model_config": {"width_mult": 0.25}, "epochs": 2, "lr": 3e-3, "batch_size": 128}
QUICK_MODEL = {"net": "lenet5", "model_config": {}, "epochs": 1, "lr": 3e-3, "batch_size": 50}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def step(n: int, total: int, who: str, what: str) -> None:
    say(f"\n[{n}/{total}] {who}: {what}")


def _predict_cmd(d: Path, urls: dict, tag: str, extra: list[str]) -> list[str]:
    """The host's command: the enclave built in d/enclave runs predict (natively: no SGX here)."""
    cmd = [sys.executable, "-m", "branchy_tee.cli", "enclave", "run", "--backend", "native", str(d / "enclave"), "--",
           "predict", "--bundle", str(d / "model.btee")]  # fmt: skip
    for who in ("do-a", "do-b"):
        cmd += ["--input", str(d / "io" / f"{who}-request.enc"), "--output", str(d / "io" / f"{who}-result{tag}.enc"),
                "--data-broker", urls[who]]  # fmt: skip
    return cmd + ["--stats-json", str(d / "io" / f"stats{tag}.json"), *extra]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_enclave(cmd: list[str], env: dict, label: str) -> dict:
    """Run the enclave runtime as its own process, showing its log (simulated-attestation warnings
    included) as it goes."""
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) as proc:
        for line in proc.stderr:
            say(f"    | {line.rstrip()}")
    if proc.returncode != 0:
        raise BranchyError(f"the enclave runtime failed ({label}); see its log above")
    return json.loads(Path(cmd[cmd.index("--stats-json") + 1]).read_text())


def _trust_setup(d: Path, identities: dict, mo_url: str, mo_key: bytes, say) -> dict:
    """Host: build the enclave; model owner: sign the release; owners: policies from it. Returns it."""
    from .enclave.build import BuildOptions, build
    from .enclave.release import write_policy_from_release, write_release

    built = build(BuildOptions(bundle=str(d / "model.btee"), out=str(d / "enclave"), attest="simulated",
                               model_broker=mo_url, model_broker_identity=identities["mo"][1],
                               io_dirs=[str(d / "io")], threads=2))  # fmt: skip
    say(f"    host: enclave built in enclave/ for bundle {built['bundle_id']}; measured: model broker {mo_url}, "
        f"its identity {identities['mo'][1][:16]}..., minimum model version {built['min_model_version']}")
    release = write_release(d / "enclave", identities["mo"][0], d / "mo" / "release.json", mo_key)
    say(f"    model owner: reproduces the build and signs mo/release.json (MRENCLAVE {release['mrenclave'][:16]}..., simulated)")
    allowed = [identities["do-a"][1], identities["do-b"][1]]
    write_policy_from_release(d / "mo" / "release.json", identities["mo"][1], d / "mo" / "policy.toml",
                              allowed_data_owners=allowed, allow_simulated=True)  # fmt: skip
    for who in ("do-a", "do-b"):
        write_policy_from_release(d / "mo" / "release.json", identities["mo"][1], d / who / "policy.toml",
                                  allow_simulated=True)  # fmt: skip
    say("    data owners A and B: verify the release under the model owner's identity and write their brokers' policies;\n"
        "    the model owner's policy allows exactly A and B to use the model (allowed_data_owners)")
    return release


def _read_mprofile(path: str) -> tuple[list[float], list[float]]:
    t, mib = [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("MEM "):
            _, m, ts = line.split()
            mib.append(float(m))
            t.append(float(ts))
    return [x - t[0] for x in t], mib


def run_demo(out: str | os.PathLike = "runs/demo", quick: bool = False, data_dir=None, epochs: int | None = None) -> dict:
    """Run the whole flow in ``out`` (which must not exist or be empty); return the summary."""
    from .attest.broker_server import start_broker
    from .attest.identity import create_identity, identity_hex
    from .bench import bench_early_exit
    from .data import fashion_mnist_available, load_dataset
    from .data.preprocess import tensor_to_inputs
    from .errors import IntegrityError
    from .evaluate.exits import evaluate_run
    from .evaluate.plots import plot_accuracy_vs_cost, plot_memory_timeline
    from .fileio import atomic_write_bytes, atomic_write_text, write_key_file
    from .rundir import read_model_json
    from .seal.bundle import seal_run
    from .seal.envelope import MODEL_FIELDS, open_result, request_digest, seal_request
    from .seal.keys import generate_key, key_id
    from .train.trainer import TrainConfig, fit

    t_start = time.time()
    d = Path(out)
    if d.exists() and any(d.iterdir()):
        raise BranchyError(f"{d} already exists and is not empty; remove it or choose another --out")
    for sub in ("mo", "do-a", "do-b", "io", "brokers"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    total = 8
    spec = dict(QUICK_MODEL if quick else DEMO_MODEL)
    if epochs:
        spec["epochs"] = epochs
    have_fmnist = fashion_mnist_available(data_dir)
    dataset = "fashion-mnist" if have_fmnist and not quick else "synthetic"
    if not have_fmnist:
        say("NOTICE: Fashion-MNIST was not found (install the Debian package dataset-fashion-mnist, or pass --data-dir);\n"
            "        the demo uses the synthetic data set instead. The flow is the same; the figures are not comparable.")
    synthetic = {"channels": 1, "size": 28, **({"n": 600} if quick else {})} if dataset == "synthetic" else {}

    # ------------------------------------------------------------------ model owner
    step(1, total, "model owner", f"train {spec['net']} {spec['model_config'] or ''} on {dataset} with distillation from "
                                  f"the final exit ({spec['epochs']} epoch(s)), then calibrate the exits (1 point budget)")
    run_dir = d / "mo" / "run"
    trained = fit(TrainConfig(net=spec["net"], model_config=dict(spec["model_config"]), dataset=dataset, data_dir=data_dir,
                              epochs=spec["epochs"], lr=spec["lr"], batch_size=spec["batch_size"], num_workers=0,
                              out=str(run_dir), max_accuracy_drop=0.01, synthetic=synthetic))  # fmt: skip
    cal = trained["calibration"]

    step(2, total, "model owner", "evaluate every exit on the test split")
    report = evaluate_run(run_dir, data_dir=data_dir, max_batches=1 if quick else None, latency_reps=3 if quick else 20)
    plot_acc = plot_accuracy_vs_cost(report, d / "accuracy_vs_cost.png")

    step(3, total, "model owner", "seal the model: one AES-256-GCM file per stage, authenticated header")
    mo_key = generate_key()
    write_key_file(d / "mo" / "model.key", mo_key)
    meta = read_model_json(run_dir)
    header = seal_run(run_dir, mo_key, d / "model.btee", version=1)
    say(f"    {d / 'model.btee'}: {len(header['stages'])} stage files, model key id {key_id(mo_key)}")

    # ------------------------------------------------------------------ whom the enclave trusts
    step(4, total, "everyone", "identities, the enclave build, the model owner's signed release, the brokers' policies")
    identities = {}
    for who in ("mo", "do-a", "do-b"):
        key = create_identity(d / who / "identity.pem")
        identities[who] = (key, identity_hex(key))
        say(f"    {who}: identity {identities[who][1]} ({who}/identity.pem)")
    mo_url = f"http://127.0.0.1:{_free_port()}"
    release = _trust_setup(d, identities, mo_url, mo_key, say)

    # ------------------------------------------------------------------ data owners
    step(5, total, "data owners A and B", "each encrypts its half of the test images with its own key")
    test = load_dataset(dataset, "test", data_dir, synthetic=synthetic or None)
    n = 64 if quick else len(test)
    halves = {"do-a": slice(0, n // 2), "do-b": slice(n // 2, n)}
    keys, truth = {}, {}
    for who, sl in halves.items():
        keys[who] = generate_key()
        write_key_file(d / who / "data.key", keys[who])
        x = tensor_to_inputs(test.images[sl], meta["preprocessing"], f"{who} images")
        truth[who] = test.labels[sl]
        atomic_write_bytes(d / "io" / f"{who}-request.enc", seal_request(x, keys[who], request_id=f"{who}-request-1"))
        say(f"    data owner {who[-1].upper()}: {len(x)} images -> io/{who}-request.enc (key id {key_id(keys[who])})")

    # ------------------------------------------------------------------ brokers and the enclave
    step(6, total, "key brokers", "the model owner and each data owner start a key broker on loopback, with their identities")
    # The simulated provider's dev key lives under XDG_CONFIG_HOME: keep the demo's in the demo directory.
    env = dict(os.environ, XDG_CONFIG_HOME=str((d / "config").resolve()), OMP_NUM_THREADS=str(torch.get_num_threads()))
    say("    ATTESTATION IS SIMULATED here (no SGX on this machine): evidence is signed by a local development key and\n"
        "    the brokers accept it only because their policies say allow_simulation = true. Never do this in production.")
    handles = []
    try:
        urls = {}
        for who, k in (("mo", mo_key), ("do-a", keys["do-a"]), ("do-b", keys["do-b"])):
            port = int(mo_url.rsplit(":", 1)[1]) if who == "mo" else 0  # the model broker at its measured address
            handles.append(start_broker({key_id(k): k}, d / who / "policy.toml", port=port, identity=identities[who][0],
                                        audit_log=d / "brokers" / f"{who}-audit.jsonl"))  # fmt: skip
            urls[who] = handles[-1].url
            say(f"    {who} broker at {urls[who]} (audit log brokers/{who}-audit.jsonl)")
        step(7, total, "enclave (native backend)", "attest to the three brokers, accept only releases signed by the "
                                                   "identities it trusts, answer both requests with batched early exit, "
                                                   "loading later stages only when needed")  # fmt: skip
        stats = _run_enclave(_predict_cmd(d, urls, "", ["--mprofile", str(d / "io")]), env, "early exit")
        say("    ... and once more with the full model, for comparison")
        full = _run_enclave(_predict_cmd(d, urls, "-full", ["--full-model", "--quiet", "--mprofile", str(d / "io" / "full")]),
                            env, "full model")  # fmt: skip
    finally:
        for h in handles:
            h.stop()
        say("    key brokers stopped")

    # ------------------------------------------------------------------ data owners read their results
    step(8, total, "data owners A and B", "each decrypts its own results, bound to its request, and sees which model answered")
    per_owner = {}
    for who in halves:
        mine = request_digest((d / "io" / f"{who}-request.enc").read_bytes())
        header, records = open_result((d / "io" / f"{who}-result.enc").read_bytes(), keys[who], f"{who}-result.enc", mine)
        answered_by = {k: header[k] for k in MODEL_FIELDS}
        if answered_by["bundle_id"] != release["bundle_id"]:
            raise BranchyError(f"{who}: the result names bundle {answered_by['bundle_id']}, not the released one")
        labels = torch.tensor([r["label"] for r in records])
        acc = float((labels == truth[who]).float().mean())
        lines = ["index\tlabel\tclass_name\tconfidence\texit"]
        lines += [f"{r['index']}\t{r['label']}\t{r['class_name']}\t{r['confidence']:.4f}\t{r['exit']}" for r in records]
        atomic_write_text(d / who / "result.txt", "\n".join(lines) + "\n", mode=0o600)
        other = "do-b" if who == "do-a" else "do-a"
        try:
            open_result((d / "io" / f"{other}-result.enc").read_bytes(), keys[who], f"{other}-result.enc", mine)
            isolated = False
        except IntegrityError:
            isolated = True
        per_owner[who] = {"samples": len(records), "accuracy": acc, "result_txt": str(d / who / "result.txt"),
                          "cannot_read_other_owner": isolated, "answered_by": answered_by, "records": records}  # fmt: skip
        say(f"    data owner {who[-1].upper()}: {len(records)} answers from bundle {answered_by['bundle_id'][:12]}... "
            f"v{answered_by['model_version']}, accuracy {100 * acc:.2f}% -> {who}/result.txt; opening {other}'s result "
            f"with its key: {'refused, as it must be' if isolated else 'SUCCEEDED (bug!)'}")

    say("\n    measuring batch-1 latency and batch-128 throughput, early exit vs the full model ...")
    timing = bench_early_exit(run_dir, quick=quick, samples=200 if quick else 2000, data_dir=data_dir)
    mem_plot = plot_memory_timeline({"early exit (staged loading)": _read_mprofile(stats["mprofile"]),
                                     "full model": _read_mprofile(full["mprofile"])},
                                    d / "memory_timeline.png", title="enclave runtime: resident memory")  # fmt: skip
    summary = {
        "dataset": dataset, "model": f"{meta['arch']} {meta['config']}", "exits": report["exits"],
        "final_accuracy": report["final_accuracy"], "calibrated": report["calibrated"], "oracle": report["oracle"],
        "enclave": {"early_exit": stats, "full_model": full}, "timing": timing, "data_owners": per_owner,
        "files": {"result_txt": [per_owner[w]["result_txt"] for w in halves], "mprofile": [stats["mprofile"], full["mprofile"]],
                  "accuracy_plot": str(plot_acc), "memory_plot": str(mem_plot), "bundle": str(d / "model.btee"),
                  "release": str(d / "mo" / "release.json")},
        "release": {k: release[k] for k in ("mrenclave", "bundle_id", "model_version", "model_owner", "model_broker_identity")},
        "seconds": round(time.time() - t_start, 1),
    }  # fmt: skip
    atomic_write_text(d / "summary.json", json.dumps(summary, indent=1) + "\n")
    say(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    cal, full_acc = s["calibrated"], s["final_accuracy"]
    t, e, f = s["timing"], s["enclave"]["early_exit"], s["enclave"]["full_model"]
    lines = ["", "=" * 78, f"branchy-tee demo: {s['model']} on {s['dataset']}  ({s['seconds']:.0f} s)", "=" * 78]
    lines.append("accuracy per exit (test):  " + "  ".join(f"exit {x['index']}: {100 * x['accuracy']:.2f}%" for x in s["exits"]))
    lines.append(f"calibrated early exit:     {100 * cal['accuracy']:.2f}% vs final exit {100 * full_acc:.2f}% "
                 f"({100 * (cal['accuracy'] - full_acc):+.2f} points)")
    lines.append("exit distribution (enclave): " + " / ".join(f"{c}" for c in e["exit_counts"])
                 + f" samples; stages loaded {e['stages_loaded']}")
    lines.append(f"batch-1 latency:           {t['latency_ms_early_exit']:.3f} ms early exit vs {t['latency_ms_full']:.3f} ms "
                 f"full model ({t['latency_speedup']:.2f}x)")
    lines.append(f"batch-128 throughput:      {t['throughput_early_exit']:.0f} vs {t['throughput_full']:.0f} samples/s "
                 f"({t['throughput_speedup']:.2f}x)")
    lines.append(f"enclave peak RSS:          {e['peak_rss_mib']:.0f} MiB staged vs {f['peak_rss_mib']:.0f} MiB full model "
                 f"({e['peak_rss_mib'] / f['peak_rss_mib']:.2f}x); resident weights {e['resident_weights_peak_mib']:.2f} vs "
                 f"{f['resident_weights_peak_mib']:.2f} MiB")
    if f["resident_weights_peak_mib"] < 0.05 * f["peak_rss_mib"]:
        lines.append("                           (this model's weights are a small part of the process: Python and torch "
                     "dominate; 'branchy-tee bench' measures ResNet-152)")
    for who, o in s["data_owners"].items():
        lines.append(f"data owner {who[-1].upper()}:              {o['samples']} answers, accuracy {100 * o['accuracy']:.2f}%, "
                     f"result.txt (decrypted by the data owner): {o['result_txt']}")
    files = s["files"]
    lines.append(f"memory traces (mprof):     {', '.join(files['mprofile'])}")
    lines.append(f"plots:                     {files['accuracy_plot']}, {files['memory_plot']}")
    lines.append("attestation was SIMULATED (no SGX here); see README 'Running on real SGX'.")
    return "\n".join(lines)
