"""``branchy-tee bench``: the figures that say whether branchy-tee is secure *and* fast.

Every comparison is measured side by side in one run, on this machine:
- early exit vs the same model's full forward (a model trained on Fashion-MNIST, cached);
- the per-exit cost profile of all registered models (FLOPs and latency, random weights);
- peak RSS of ``predict`` when samples leave by exit 1 vs when the whole model is loaded
  (ResNet-152, random weights, one subprocess per measurement);
- AES-GCM decrypt+verify throughput of sealed stages; cold start sealed vs plain ``torch.load``;
- DCAP quote verification time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import BranchyError

# The early-exit benchmark model: deep enough that exit 0 is cheap, small enough to train here in
# about 15 minutes (MobileNetV1 at width 0.5, four epochs of Fashion-MNIST on two cores).
BENCH_MODEL = {"net": "mobilenetv1", "model_config": {"width_mult": 0.5}, "epochs": 4, "lr": 3e-3, "batch_size": 128}
QUICK_MODEL = {"net": "lenet5", "model_config": {}, "epochs": 1, "lr": 3e-3, "batch_size": 50}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _timer():
    t = [time.perf_counter()]
    yield t
    t.append(time.perf_counter() - t[0])


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}  # fmt: skip


# --------------------------------------------------------------------------- early exit vs full forward
def ensure_bench_model(cache_dir: Path, quick: bool) -> Path:
    """Train the benchmark model once and reuse it (the run directory is the cache)."""
    from .data import fashion_mnist_available
    from .train.trainer import TrainConfig, fit

    spec = QUICK_MODEL if quick else BENCH_MODEL
    dataset = "fashion-mnist" if fashion_mnist_available() and not quick else "synthetic"
    tag = "-".join([spec["net"], *(f"{k}{v}" for k, v in spec["model_config"].items()), dataset, f"e{spec['epochs']}"])
    run = cache_dir / tag
    if (run / "model.json").is_file() and json.loads((run / "model.json").read_text()).get("thresholds"):
        _log(f"reusing the cached benchmark model {run}")
        return run
    if dataset == "synthetic" and not quick:
        _log("Fashion-MNIST not found: training the benchmark model on synthetic data instead")
    _log(f"training the benchmark model {spec['net']} {spec['model_config']} on {dataset} for {spec['epochs']} epoch(s) -> {run}")
    fit(TrainConfig(net=spec["net"], model_config=dict(spec["model_config"]), dataset=dataset, epochs=spec["epochs"],
                    lr=spec["lr"], batch_size=spec["batch_size"], num_workers=0, out=str(run), quiet=True,
                    synthetic={"channels": 1, "size": 28, "n": 600} if quick else {}))  # fmt: skip
    return run


@torch.inference_mode()
def bench_early_exit(run_dir: Path, quick: bool, samples: int | None = None, data_dir=None) -> dict:
    from .evaluate.exits import collect_logits, decide, load_split, oracle
    from .rundir import load_run
    from .runtime.engine import early_exit

    model, meta = load_run(run_dir)
    test = load_split(meta, "test", data_dir=data_dir)
    n_acc = min(samples or (200 if quick else len(test)), len(test))
    x = torch.stack([test[i][0] for i in range(n_acc)])
    y = torch.tensor([test[i][1] for i in range(n_acc)])
    criterion, thresholds = meta["criterion"], meta["thresholds"]
    k_final = model.num_exits - 1

    def get_stage(k):
        return model.stages[k], model.exits[k]

    def full_forward(batch):
        h = batch
        for stage in model.stages:
            h = stage(h)
        return model.exits[k_final](h)

    # Accuracy of both on the test split (the engine is the enclave's own code path).
    early = early_exit(get_stage, model.num_exits, x, criterion, thresholds, batch_size=256)
    full_pred = torch.cat([full_forward(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    acc_early = float((early.labels == y).float().mean())
    acc_full = float((full_pred == y).float().mean())

    # Batch-1 latency, all measured sample by sample in one interleaved loop, so that drift of this
    # machine's speed hits every figure alike: the calibrated early exit, the full forward, and
    # (for the oracle) leaving at each exit k through the same engine, stages and heads on the way.
    from .runtime.criteria import always_exit_threshold, never_exit_threshold

    forced = [[never_exit_threshold(criterion)] * k + [always_exit_threshold(criterion)] * (k_final - k)
              for k in range(model.num_exits)]  # fmt: skip
    n_lat = 60 if quick else 1000
    t_early, t_full, t_exit = [], [], [[] for _ in forced]
    for i in range(min(n_lat, len(x))):
        xi = x[i : i + 1]
        t = time.perf_counter()
        early_exit(get_stage, model.num_exits, xi, criterion, thresholds, batch_size=1)
        t_early.append(time.perf_counter() - t)
        t = time.perf_counter()
        full_forward(xi)
        t_full.append(time.perf_counter() - t)
        for k, th in enumerate(forced):
            t = time.perf_counter()
            early_exit(get_stage, model.num_exits, xi, criterion, th, batch_size=1)
            t_exit[k].append(time.perf_counter() - t)

    # Batch-128 throughput over the same samples, given as one request as predict gets them (so the
    # engine can refill the later stages' batches), against the full forward batch by batch.
    def throughput(fn) -> float:
        t = time.perf_counter()
        fn()
        return len(x) / (time.perf_counter() - t)

    def full_batches():
        for i in range(0, len(x), 128):
            full_forward(x[i : i + 128])

    reps = 1 if quick else 3
    tp_early, tp_full = 0.0, 0.0
    for _ in range(reps):  # interleaved, like the latencies
        tp_early = max(tp_early, throughput(lambda: early_exit(get_stage, model.num_exits, x, criterion, thresholds, 128)))
        tp_full = max(tp_full, throughput(full_batches))

    # The oracle: each sample at its cheapest correct exit, costed with the latencies above.
    logits, labels = collect_logits(model, torch.utils.data.TensorDataset(x, y), show=False)
    orc = oracle(logits, labels, list(range(model.num_exits)))
    per_exit = [statistics.mean(ts) for ts in t_exit]
    oracle_latency = sum(f * t for f, t in zip(orc["exit_fractions"], per_exit))
    mean_early, mean_full = statistics.mean(t_early), statistics.mean(t_full)
    exit_idx, _ = decide(logits, criterion, thresholds)
    return {
        "model": f"{meta['arch']} {meta['config']} trained on {meta['dataset']} ({run_dir})",
        "test_samples": len(x),
        "accuracy_full": acc_full,
        "accuracy_early_exit": acc_early,
        "accuracy_drop_pp": 100 * (acc_full - acc_early),
        "exit_fractions": (torch.bincount(exit_idx, minlength=model.num_exits).float() / len(x)).tolist(),
        "latency_ms_full": 1000 * mean_full,
        "latency_ms_early_exit": 1000 * mean_early,
        "latency_speedup": mean_full / mean_early,
        "throughput_full": tp_full,
        "throughput_early_exit": tp_early,
        "throughput_speedup": tp_early / tp_full,
        "oracle_accuracy": orc["accuracy"],
        "oracle_latency_ms": 1000 * oracle_latency,
        "oracle_speedup": mean_full / oracle_latency,
        "fraction_of_oracle_speedup": (mean_full / mean_early) / (mean_full / oracle_latency),
        "exit_latency_ms": [1000 * t for t in per_exit],
    }


# --------------------------------------------------------------------------- per-exit profile of every model
@torch.inference_mode()
def bench_exit_profile(quick: bool) -> list[dict]:
    from .evaluate.exits import exit_latency_ms
    from .models import create_model, list_models
    from .models.cost import exit_flops

    rows = []
    for name in list_models():
        torch.manual_seed(0)
        model = create_model(name).eval()
        flops = exit_flops(model)
        lat = exit_latency_ms(model, (3, 32, 32), reps=2 if quick else 10, warmup=1 if quick else 2)
        rows.append({"model": name, "exits": model.num_exits, "exit_flops": flops, "exit_latency_ms": lat,
                     "first_exit_flops_fraction": flops[0] / flops[-1], "first_exit_latency_fraction": lat[0] / lat[-1]})
        _log(f"profile {name}: first exit at {flops[0] / flops[-1]:.3f} of the FLOPs, {lat[0] / lat[-1]:.3f} of the latency")
        del model
    return rows


# --------------------------------------------------------------------------- sealed bundles: memory, AEAD, cold start
def _random_bundle(work: Path, arch: str, config: dict, thresholds_for: dict[str, list[float]]) -> dict[str, Path]:
    """Seal one random-weight model several times, once per threshold setting."""
    from .fileio import write_key_file
    from .models import create_model
    from .models.cost import arch_part_flops
    from .seal.bundle import seal_model
    from .seal.keys import generate_key

    torch.manual_seed(0)
    model = create_model(arch, **config).eval()
    stage_flops, head_flops = arch_part_flops(arch, model.config, (3, 32, 32))
    meta = {"arch": arch, "config": model.config, "classes": [str(i) for i in range(10)],
            "preprocessing": {"input_shape": [3, 32, 32], "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3},
            "criterion": "entropy", "stage_flops": stage_flops, "head_flops": head_flops}  # fmt: skip
    key = generate_key()
    write_key_file(work / "model.key", key)
    bundles = {}
    for name, thresholds in thresholds_for.items():
        bundles[name] = work / f"{name}.btee"
        seal_model(model, {**meta, "thresholds": thresholds}, key, bundles[name])
    torch.save(model.state_dict(), work / "plain.pt")
    return bundles


def _predict_subprocess(work: Path, bundle: Path, name: str, batch_size: int) -> dict:
    stats = work / f"{name}.stats.json"
    cmd = [sys.executable, "-m", "branchy_tee.runtime.predict", "--bundle", str(bundle), "--input", str(work / "req.enc"),
           "--output", str(work / f"{name}.res"), "--model-key", str(work / "model.key"), "--data-key", str(work / "data.key"),
           "--stats-json", str(stats), "--quiet", "--batch-size", str(batch_size)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BranchyError(f"predict subprocess failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    return json.loads(stats.read_text())


def bench_sealed(work: Path, quick: bool) -> dict:
    from .fileio import read_key_file, write_key_file
    from .models import create_model
    from .runtime.criteria import never_exit_threshold
    from .runtime.engine import early_exit
    from .runtime.stages import StageStore
    from .seal.bundle import open_bundle
    from .seal.envelope import seal_request
    from .seal.keys import generate_key

    arch, config = ("resnet18", {"width": 16}) if quick else ("resnet152", {})
    never = never_exit_threshold("entropy")
    # "staged": everything leaves by exit 1 (exit 1 takes all: normalised entropy <= 1 always holds).
    bundles = _random_bundle(work, arch, config, {"staged": [never, 1.0, never], "full": [never] * 3})
    data_key = generate_key()
    write_key_file(work / "data.key", data_key)
    torch.manual_seed(1)
    (work / "req.enc").write_bytes(seal_request(torch.randn(32, 3, 32, 32), data_key))

    # An enclave's protected memory is small (93-128 MiB usable on SGX1), so it answers in small
    # batches; the headline figure is batch 4, batch 16 is recorded beside it.
    _log(f"peak RSS of predict ({arch}, one subprocess each): staged vs full load")
    runs = {}
    for bs in (4, 16):
        staged = _predict_subprocess(work, bundles["staged"], f"staged{bs}", bs)
        full = _predict_subprocess(work, bundles["full"], f"full{bs}", bs)
        runs[bs] = {"batch_size": bs, "staged_mib": staged["peak_rss_mib"], "full_mib": full["peak_rss_mib"],
                    "peak_ratio": staged["peak_rss_mib"] / full["peak_rss_mib"],
                    "staged_stages_loaded": staged["stages_loaded"], "full_stages_loaded": full["stages_loaded"]}  # fmt: skip
    memory = {"model": arch, **runs[4], "batch_16": runs[16]}

    # Decrypt + verify throughput of the largest stage file (page cache warm): into a reused buffer
    # (the AEAD work) and into fresh memory (what loading a stage costs: the kernel must also map
    # and zero every page of the new buffer).
    _log("AES-256-GCM decrypt+verify throughput")
    model_key = read_key_file(work / "model.key")
    bundle = open_bundle(bundles["full"], model_key)
    big = max(range(bundle.num_stages), key=lambda k: bundle.header["stages"][k]["plaintext_size"])
    size = bundle.header["stages"][big]["plaintext_size"]
    warm = bytearray(size)
    reps = 3 if quick else 5
    warm_t, fresh_t = [], []
    for _ in range(reps):
        with _timer() as t:
            bundle.decrypt_stage(big, into=warm)
        warm_t.append(t[1])
        with _timer() as t:
            buf = bundle.decrypt_stage(big)
        fresh_t.append(t[1])
        del buf
    aead_result = {"decrypt_gbps": size / min(warm_t) / 1e9, "stage_load_gbps": size / min(fresh_t) / 1e9,
                   "stage_mib": size / 2**20, "chunk_mib": bundle.header["chunk_size"] / 2**20}  # fmt: skip

    # Cold start to the first prediction through the whole model: sealed bundle vs plain torch.load.
    # Both build the model on the meta device and assign the loaded tensors, so the comparison is
    # the cost of decrypting and verifying, not of weight initialisation.
    _log("cold start: sealed bundle vs plain torch.load")
    x1 = torch.randn(1, 3, 32, 32)

    def sealed_start():
        b = open_bundle(bundles["full"], model_key)
        store = StageStore(b)
        early_exit(store.get, b.num_stages, x1, "entropy", [never] * (b.num_stages - 1))

    def plain_start():
        state = torch.load(work / "plain.pt", map_location="cpu", weights_only=True)
        with torch.device("meta"):
            m = create_model(arch, **config)
        m.load_state_dict(state, assign=True)
        with torch.inference_mode():
            m.eval()(x1)

    sealed_t, plain_t = [], []
    for _ in range(2 if quick else 5):
        for fn, acc in ((plain_start, plain_t), (sealed_start, sealed_t)):
            with _timer() as t:
                fn()
            acc.append(t[1])
    cold = {"sealed_s": statistics.median(sealed_t), "plain_s": statistics.median(plain_t)}
    cold["ratio"] = cold["sealed_s"] / cold["plain_s"]
    return {"staged_memory": memory, "aead": aead_result, "cold_start": cold}


# --------------------------------------------------------------------------- quote verification
def bench_quote_verify(quick: bool) -> dict | None:
    from datetime import datetime, timezone

    from .attest.verify import read_collateral_file, verify_quote

    here = Path(__file__).resolve()
    candidates = [Path(os.environ.get("BRANCHY_TEE_SGX_QUOTES", "")), here.parents[3] / "shared" / "testdata" / "sgx-quotes",
                  Path.cwd().parent / "shared" / "testdata" / "sgx-quotes"]  # fmt: skip
    qdir = next((c for c in candidates if (c / "phala-1.quote.bin").is_file()), None)
    if qdir is None:
        _log("real SGX quotes not found (../shared/testdata/sgx-quotes); skipping quote verification timing")
        return None
    quote = (qdir / "phala-1.quote.bin").read_bytes()
    collateral = read_collateral_file(qdir / "phala-1.collateral.json")
    now = datetime(2025, 6, 20, tzinfo=timezone.utc)
    out = {}
    for label, kw in (("chain_ms", {}), ("with_collateral_ms", {"collateral": collateral})):
        ts = []
        for _ in range(10 if quick else 50):
            with _timer() as t:
                verify_quote(quote, now=now, **kw)
            ts.append(t[1])
        out[label] = 1000 * statistics.median(ts)
    return out


# --------------------------------------------------------------------------- the whole suite
def run_bench(quick: bool = False, cache_dir: str | os.PathLike = "runs/bench-cache", skip: tuple = ()) -> dict:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "quick": quick, "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    if "early_exit" not in skip:
        result["early_exit"] = bench_early_exit(ensure_bench_model(cache_dir, quick), quick)
    if "exit_profile" not in skip:
        result["exit_profile"] = bench_exit_profile(quick)
    if "sealed" not in skip:
        with tempfile.TemporaryDirectory(prefix="branchy-bench-") as work:
            sealed = bench_sealed(Path(work), quick)
        result["staged_memory"] = sealed["staged_memory"]
        result["aead"] = sealed["aead"]
        result["cold_start"] = sealed["cold_start"]
        result["cold_start_ratio"] = sealed["cold_start"]["ratio"]
    if "quote" not in skip:
        q = bench_quote_verify(quick)
        result["quote_verify"] = q
        result["quote_verify_ms"] = q["with_collateral_ms"] if q else None
    result["seconds"] = time.perf_counter() - t0
    return result


def format_report(r: dict) -> str:
    lines = [f"branchy-tee bench on {r['machine']['cpu']} ({r['machine']['cores']} cores, torch {r['machine']['torch']})"]
    if "early_exit" in r:
        e = r["early_exit"]
        lines += [
            f"early exit vs full forward: {e['model']}",
            f"  accuracy        {100 * e['accuracy_early_exit']:.2f}% vs {100 * e['accuracy_full']:.2f}%  (drop {e['accuracy_drop_pp']:.2f} points)",
            f"  batch-1 latency {e['latency_ms_early_exit']:.3f} ms vs {e['latency_ms_full']:.3f} ms  -> {e['latency_speedup']:.2f}x",
            f"  batch-128       {e['throughput_early_exit']:.0f} vs {e['throughput_full']:.0f} samples/s  -> {e['throughput_speedup']:.2f}x",
            f"  oracle speedup  {e['oracle_speedup']:.2f}x (early exit reaches {100 * e['fraction_of_oracle_speedup']:.0f}% of it)",
            f"  exits taken     {' / '.join(f'{100 * f:.1f}%' for f in e['exit_fractions'])}",
        ]
    if "exit_profile" in r:
        lines.append("per-exit profile (random weights, 3x32x32, batch 1): first exit's share of FLOPs / latency")
        for p in r["exit_profile"]:
            lines.append(f"  {p['model']:<12} {p['exits']} exits  {p['first_exit_flops_fraction']:.3f} / {p['first_exit_latency_fraction']:.3f}"
                         f"  full {p['exit_flops'][-1] / 1e9:.3f} GFLOPs, {p['exit_latency_ms'][-1]:.2f} ms")
    if "staged_memory" in r:
        m, a, c = r["staged_memory"], r["aead"], r["cold_start"]
        lines += [
            f"peak RSS of predict, {m['model']}, batch {m['batch_size']}: staged (exit <= 1) {m['staged_mib']:.0f} MiB vs full load "
            f"{m['full_mib']:.0f} MiB -> {m['peak_ratio']:.2f}x (batch 16: {m['batch_16']['peak_ratio']:.2f}x)",
            f"AES-256-GCM decrypt+verify of a {a['stage_mib']:.0f} MiB stage file: {a['decrypt_gbps']:.2f} GB/s into a reused buffer, "
            f"{a['stage_load_gbps']:.2f} GB/s into fresh memory",
            f"cold start to first prediction: sealed {c['sealed_s']:.3f} s vs plain torch.load {c['plain_s']:.3f} s -> {c['ratio']:.2f}x",
        ]
    if r.get("quote_verify"):
        q = r["quote_verify"]
        lines.append(f"DCAP quote verification: {q['chain_ms']:.2f} ms (chain + signatures), {q['with_collateral_ms']:.2f} ms with collateral")
    lines.append(f"({r['seconds']:.0f} s)")
    return "\n".join(lines)
