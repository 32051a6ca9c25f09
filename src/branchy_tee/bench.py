"""``branchy-tee bench``: the figures that say whether branchy-tee is secure *and* fast.

Every comparison is measured side by side in one run, on this machine:
- early exit (the exported stage graphs through the enclave's engine, on ONNX Runtime) vs the same
  model's full forward on the same runtime, and vs the full model on ONNX Runtime with its default
  session options, what a user would pick instead (a model trained on Fashion-MNIST, cached);
- the enclave process on that model: peak RSS of ``predict`` and what it imports;
- the per-exit cost profile of all registered models (FLOPs and PyTorch latency, random weights);
- peak RSS of ``predict`` when samples leave by exit 1 vs when the whole model is loaded
  (ResNet-152, random weights, one subprocess per measurement);
- AES-GCM decrypt+verify throughput of sealed stages; cold start sealed vs the plain ONNX file;
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

import numpy as np
import torch

from .errors import BranchyError

# The early-exit benchmark model: deep enough that exit 0 is cheap, small enough to train here in
# about 15 minutes (MobileNetV1 at width 0.5, four epochs of Fashion-MNIST on two cores).
BENCH_MODEL = {"net": "mobilenetv1", "model_config": {"width_mult": 0.5}, "epochs": 4, "lr": 3e-3, "batch_size": 128}
QUICK_MODEL = {"net": "lenet5", "model_config": {}, "epochs": 1, "lr": 3e-3, "batch_size": 50}
# Intra-op threads of the enclave's sessions here (predict's default): on this 2-core machine, shared
# with other jobs, a second thread without spinning made early exit slower at batch 1 and at batch
# 128 (threads that sleep between operators must be woken for each; see BENCHMARKS.md).
ENGINE_THREADS = 1
SPIN_PAUSE = 0.02  # seconds after each call with ONNX Runtime's default options, for its spinning threads to stop
REPS = 3  # batch-1 runs per sample and path; the fastest counts


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
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "platform": platform.platform()}  # fmt: skip


# --------------------------------------------------------------------------- early exit vs full forward
def ensure_bench_model(cache_dir: Path, quick: bool) -> Path:
    """Train the benchmark model once and reuse it (the run directory is the cache)."""
    from .data import fashion_mnist_available
    from .train.trainer import TrainConfig, fit

    spec = QUICK_MODEL if quick else BENCH_MODEL
    dataset = "fashion-mnist" if fashion_mnist_available() and not quick else "synthetic"
    tag = "-".join([spec["net"], *(f"{k}{v}" for k, v in spec["model_config"].items()), dataset, f"e{spec['epochs']}"])
    run = cache_dir / tag
    from .rundir import MODEL_CARD, read_model_card

    if (run / MODEL_CARD).is_file() and read_model_card(run).thresholds:
        from .evaluate.calibrate import calibrate_run
        from .export.onnx import read_export

        if read_export(run) is None:  # cached by a version that calibrated PyTorch's outputs, not the graphs'
            _log(f"exporting the cached benchmark model {run} and calibrating it on its stage graphs")
            calibration = read_model_card(run).calibration
            calibrate_run(run, max_accuracy_drop=calibration.max_accuracy_drop if calibration else 0.01, show=False)
        _log(f"reusing the cached benchmark model {run}")
        return run
    if dataset == "synthetic" and not quick:
        _log("Fashion-MNIST not found: training the benchmark model on synthetic data instead")
    _log(f"training the benchmark model {spec['net']} {spec['model_config']} on {dataset} for {spec['epochs']} epoch(s) -> {run}")
    fit(TrainConfig(net=spec["net"], model_config=dict(spec["model_config"]), dataset=dataset, epochs=spec["epochs"],
                    lr=spec["lr"], batch_size=spec["batch_size"], num_workers=0, out=str(run), quiet=True,
                    synthetic={"channels": 1, "size": 28, "n": 600} if quick else {}))  # fmt: skip
    return run


def _onnxruntime_sessions(model, input_shape):
    """The full model (no early exits) as one ONNX graph, in two sessions: with the enclave's session
    options (the same runtime as early exit) and with ONNX Runtime's defaults (what a user would pick
    instead of branchy-tee)."""
    import onnxruntime as ort

    from .export.onnx import export_full_model
    from .runtime.graphs import PROVIDERS, load_session

    graph = export_full_model(model, input_shape)
    return load_session(graph, "full model"), ort.InferenceSession(graph, providers=PROVIDERS)


def _onnxruntime_call_us(calls: int = 2000) -> float:
    """Median time of one session call on a one-node graph (Identity of a 1x10 tensor), microseconds."""
    from onnx import TensorProto, helper

    from .runtime.graphs import load_session

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 10]) for n in ("input", "output")]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity", io[:1], io[1:])
    session = load_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), "identity")
    x = np.zeros((1, 10), np.float32)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        session.run(["output"], {"input": x})
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def bench_early_exit(run_dir: Path, quick: bool, samples: int | None = None, data_dir=None) -> dict:
    """Early exit (the run's stage graphs through the enclave's engine, on ONNX Runtime) against the
    full model on the same runtime and against the full model on ONNX Runtime's default options."""
    import onnxruntime as ort

    from .evaluate.exits import collect_log_probs, decide, forced_thresholds, load_split, oracle, stage_graphs
    from .rundir import load_run
    from .runtime.engine import early_exit
    from .runtime.graphs import INPUT

    model, card = load_run(run_dir)
    stages = stage_graphs(run_dir, show=False)
    num_exits, get = len(stages), stages.__getitem__
    test = load_split(card, "test", data_dir=data_dir)
    n_acc = min(samples or (200 if quick else len(test)), len(test))
    x = torch.stack([test[i][0] for i in range(n_acc)]).numpy()
    y = np.array([test[i][1] for i in range(n_acc)])
    criterion, thresholds = card.criterion, card.exit_thresholds()
    ours, default = _onnxruntime_sessions(model, card.preprocessing.input_shape)
    del model

    def full_model(session):
        return lambda batch: session.run(None, {INPUT: batch})[0]

    full_ours, full_default = full_model(ours), full_model(default)

    # Accuracy of both on the test split (the engine and graphs are the enclave's own).
    early = early_exit(get, num_exits, x, criterion, thresholds, batch_size=256)
    full_pred = np.concatenate([full_ours(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    acc_early = float((early.labels == y).mean())
    acc_full = float((full_pred == y).mean())

    # Batch-1 latency, all measured sample by sample in one interleaved loop, so that drift of this
    # machine's speed hits every figure alike: the calibrated early exit, the full model on both
    # session options, and (for the oracle) leaving at each exit k through the same engine. Each
    # figure for a sample is the fastest of REPS runs (on a shared machine a run is now and then
    # preempted for milliseconds; the work is the same each time), then averaged over the samples.
    # ONNX Runtime's default threads keep spinning for a while after a call returns, taking a core
    # from whatever runs next: the default-options calls come last, followed by a pause.
    forced = [forced_thresholds(criterion, num_exits, k) for k in range(num_exits)]
    n_lat = 60 if quick else 1000

    def fastest(fn, *args) -> float:
        best = float("inf")
        for _ in range(REPS):
            t = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - t)
        return best

    def through(h, last):
        for stage in stages[: last + 1]:
            h, _ = stage(h)

    t_early, t_full, t_default, t_exit = [], [], [], [[] for _ in forced]
    t_stage = [[] for _ in stages]  # stages 0..k called directly: the compute without the engine
    for i in range(min(n_lat, len(x))):
        xi = x[i : i + 1]
        t_early.append(fastest(early_exit, get, num_exits, xi, criterion, thresholds, 1))
        t_full.append(fastest(full_ours, xi))
        for k, th in enumerate(forced):
            t_exit[k].append(fastest(early_exit, get, num_exits, xi, criterion, th, 1))
        for k in range(num_exits):
            t_stage[k].append(fastest(through, xi, k))
        t_default.append(fastest(full_default, xi))
        time.sleep(SPIN_PAUSE)

    # Batch-128 throughput over the same samples, given as one request as predict gets them (so the
    # engine can refill the later stages' batches), against the full model batch by batch.
    def throughput(fn) -> float:
        t = time.perf_counter()
        fn()
        return len(x) / (time.perf_counter() - t)

    def batches(fn):
        return lambda: [fn(x[i : i + 128]) for i in range(0, len(x), 128)]

    reps = 1 if quick else 3
    tp_early, tp_full, tp_default = 0.0, 0.0, 0.0
    for _ in range(reps):  # interleaved, like the latencies
        tp_early = max(tp_early, throughput(lambda: early_exit(get, num_exits, x, criterion, thresholds, 128)))
        tp_full = max(tp_full, throughput(batches(full_ours)))
        tp_default = max(tp_default, throughput(batches(full_default)))
        time.sleep(SPIN_PAUSE)

    # What one ONNX Runtime call costs with nothing to compute (a one-node graph): the floor under
    # every stage call at batch 1, which the engine pays once per stage a sample runs.
    call_us = _onnxruntime_call_us()

    # The oracle: each sample at its cheapest correct exit, costed with the latencies above.
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    logits, labels = collect_log_probs(stages, data, show=False)
    orc = oracle(logits, labels, list(range(num_exits)))
    per_exit = [statistics.mean(ts) for ts in t_exit]
    reach = [statistics.mean(ts) for ts in t_stage]  # stages 0..k called directly
    stage_alone = [reach[0]] + [reach[k] - reach[k - 1] for k in range(1, num_exits)]
    oracle_latency = sum(f * t for f, t in zip(orc["exit_fractions"], per_exit))
    mean_early, mean_full, mean_default = statistics.mean(t_early), statistics.mean(t_full), statistics.mean(t_default)
    exit_idx, _ = decide(logits, criterion, thresholds)
    # What the engine adds per stage at batch 1 (deciding, queueing, answering) over calling the graphs alone.
    overhead = [(per_exit[k] - reach[k]) / (k + 1) for k in range(num_exits)]
    return {
        "model": f"{card.arch} {card.config} trained on {card.dataset} ({run_dir})",
        "runtime": f"onnxruntime {ort.__version__}, {ENGINE_THREADS} intra-op thread per stage session (the enclave's session options)",
        "test_samples": len(x),
        "accuracy_full": acc_full,
        "accuracy_early_exit": acc_early,
        "accuracy_drop_pp": 100 * (acc_full - acc_early),
        "exit_fractions": (torch.bincount(exit_idx, minlength=num_exits).float() / len(x)).tolist(),
        "latency_ms_full": 1000 * mean_full,
        "latency_ms_early_exit": 1000 * mean_early,
        "latency_speedup": mean_full / mean_early,
        "throughput_full": tp_full,
        "throughput_early_exit": tp_early,
        "throughput_speedup": tp_early / tp_full,
        "vs_onnxruntime": {
            "what": "the full model as one ONNX graph on ONNX Runtime with default session options",
            "latency_ms": 1000 * mean_default,
            "throughput": tp_default,
            "latency_speedup": mean_default / mean_early,
            "throughput_speedup": tp_early / tp_default,
        },
        "oracle_accuracy": orc["accuracy"],
        "oracle_latency_ms": 1000 * oracle_latency,
        "oracle_speedup": mean_full / oracle_latency,
        "fraction_of_oracle_speedup": (mean_full / mean_early) / (mean_full / oracle_latency),
        "exit_latency_ms": [1000 * t for t in per_exit],
        "stage_graph_ms": [1000 * t for t in stage_alone],
        "engine_overhead_us_per_stage": [1e6 * t for t in overhead],
        "onnxruntime_call_us": call_us,
    }


# --------------------------------------------------------------------------- per-exit profile of every model
@torch.inference_mode()
def _torch_exit_latency_ms(model, input_shape, reps: int, warmup: int) -> list[float]:
    """Median batch-1 latency to reach each exit (stages 0..k and head k) in PyTorch, milliseconds."""
    model.eval()
    x = torch.randn(1, *input_shape)
    out = []
    for k in range(model.num_exits):
        def reach():
            h = x
            for j in range(k + 1):
                h = model.stages[j](h)
            return model.exits[k](h)

        for _ in range(warmup):
            reach()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            reach()
            times.append(time.perf_counter() - t)
        out.append(1000 * sorted(times)[len(times) // 2])
    return out


def bench_exit_profile(quick: bool) -> list[dict]:
    """FLOPs and PyTorch latency to each exit of every registered architecture: where the first exit
    sits. (The enclave runs exported graphs on ONNX Runtime; exporting all twelve models would take
    minutes, and where an exit sits is a property of the architecture. The benchmark model's own
    per-exit latencies on the enclave's runtime are in ``early_exit.exit_latency_ms``.)"""
    from .models import create_model, list_models
    from .models.cost import exit_flops

    rows = []
    for name in list_models():
        torch.manual_seed(0)
        model = create_model(name).eval()
        flops = exit_flops(model)
        lat = _torch_exit_latency_ms(model, (3, 32, 32), reps=2 if quick else 10, warmup=1 if quick else 2)
        rows.append({"model": name, "exits": model.num_exits, "exit_flops": flops, "exit_latency_ms": lat,
                     "first_exit_flops_fraction": flops[0] / flops[-1], "first_exit_latency_fraction": lat[0] / lat[-1]})
        _log(f"profile {name}: first exit at {flops[0] / flops[-1]:.3f} of the FLOPs, {lat[0] / lat[-1]:.3f} of the latency")
        del model
    return rows


# --------------------------------------------------------------------------- sealed bundles: memory, AEAD, cold start
def _random_bundle(work: Path, arch: str, config: dict, thresholds_for: dict[str, list[float]]) -> dict[str, Path]:
    """Export one random-weight model once and seal its stage graphs several times, once per threshold
    setting; also write the full model as a plain ONNX file (``plain.onnx``, for the cold start)."""
    import dataclasses

    from .export.onnx import export_full_model, export_stages
    from .fileio import write_key_file
    from .modelcard import ModelFacts
    from .models import create_model
    from .models.cost import arch_part_flops
    from .preprocessing import Preprocessing
    from .runtime.criteria import ENTROPY
    from .seal.bundle import seal_graphs
    from .seal.keys import generate_key

    torch.manual_seed(0)
    model = create_model(arch, **config).eval()
    stage_flops, head_flops = arch_part_flops(arch, model.config, (3, 32, 32))
    card = ModelFacts(arch=arch, config=model.config, classes=tuple(str(i) for i in range(10)),
                      preprocessing=Preprocessing.for_images((3, 32, 32), [0.5] * 3, [0.25] * 3), criterion=ENTROPY,
                      thresholds=None, stage_flops=tuple(stage_flops), head_flops=tuple(head_flops))  # fmt: skip
    key = generate_key()
    write_key_file(work / "model.key", key)
    _log(f"exporting {arch} to ONNX stage graphs")
    graphs, facts = export_stages(model, (3, 32, 32))
    bundles = {}
    for name, thresholds in thresholds_for.items():
        bundles[name] = work / f"{name}.btee"
        seal_graphs(graphs, facts, dataclasses.replace(card, thresholds=tuple(thresholds)), key, bundles[name])
    (work / "plain.onnx").write_bytes(export_full_model(model, (3, 32, 32)))
    return bundles


def _predict_subprocess(work: Path, bundle: Path, name: str, batch_size: int, request: str = "req.enc", extra=()) -> dict:
    stats = work / f"{name}.stats.json"
    cmd = [sys.executable, "-m", "branchy_tee.runtime.predict", "--bundle", str(bundle), "--input", str(work / request),
           "--output", str(work / f"{name}.res"), "--model-key", str(work / "model.key"), "--data-key", str(work / "data.key"),
           "--stats-json", str(stats), "--quiet", "--batch-size", str(batch_size), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BranchyError(f"predict subprocess failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    return json.loads(stats.read_text())


def bench_sealed(work: Path, quick: bool) -> dict:
    from .fileio import read_key_file, write_key_file
    from .runtime.criteria import ENTROPY
    from .runtime.engine import early_exit
    from .runtime.graphs import INPUT, PROVIDERS, session_options
    from .runtime.stages import StageStore
    from .seal.bundle import open_bundle
    from .seal.envelope import seal_request
    from .seal.keys import generate_key

    import onnxruntime as ort

    arch, config = ("resnet18", {"width": 16}) if quick else ("resnet152", {})
    never = ENTROPY.never
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
    big = max(range(bundle.num_stages), key=lambda k: bundle.header.stages[k].plaintext_size)
    size = bundle.header.stages[big].plaintext_size
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
                   "stage_mib": size / 2**20, "chunk_mib": bundle.header.chunk_size / 2**20}  # fmt: skip

    # Cold start to the first prediction through the whole model: the sealed bundle (verify the
    # header, decrypt every stage, build its session, run one sample through every stage) against
    # one session on the plain ONNX file of the whole model, with the same session options.
    _log("cold start: sealed bundle vs the plain ONNX file")
    x1 = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)

    def sealed_start():
        b = open_bundle(bundles["full"], model_key)
        store = StageStore(b)
        early_exit(store.get, b.num_stages, x1, ENTROPY, [never] * (b.num_stages - 1))

    def plain_start():
        session = ort.InferenceSession(str(work / "plain.onnx"), session_options(), providers=PROVIDERS)
        session.run(None, {INPUT: x1})

    def staged_start():  # the sample leaves by exit 1: stages 0 and 1 are all that is decrypted and built
        b = open_bundle(bundles["staged"], model_key)
        store = StageStore(b)
        early_exit(store.get, b.num_stages, x1, b.header.criterion, b.header.exit_thresholds())

    sealed_t, plain_t, staged_t = [], [], []
    for _ in range(2 if quick else 5):
        for fn, acc in ((plain_start, plain_t), (sealed_start, sealed_t), (staged_start, staged_t)):
            with _timer() as t:
                fn()
            acc.append(t[1])
    cold = {"sealed_s": statistics.median(sealed_t), "plain_s": statistics.median(plain_t),
            "sealed_exit_1_s": statistics.median(staged_t)}
    cold["ratio"] = cold["sealed_s"] / cold["plain_s"]
    return {"staged_memory": memory, "aead": aead_result, "cold_start": cold}


# --------------------------------------------------------------------------- the enclave process on the benchmark model
_CLOSURE_PROBE = r"""
import json, sys
from branchy_tee.runtime.predict import main
rc = main(sys.argv[2:])
files = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
json.dump({"rc": rc, "modules": files}, open(sys.argv[1], "w"))
"""


def import_closure(modules: dict[str, str | None]) -> dict:
    """What the enclave must hold for these modules (name -> file): per installed top-level package,
    its files (the whole directory, with bundled libraries such as numpy.libs), and the count of
    standard-library modules (the standard library is trusted as a whole)."""
    import sysconfig

    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    ours = Path(__file__).resolve().parent
    packages: dict[str, Path] = {}
    n_std = 0
    for file in filter(None, modules.values()):
        path = Path(file).resolve()
        if "site-packages" in path.parts:
            i = path.parts.index("site-packages")
            base = Path(*path.parts[: i + 2])
            packages.setdefault(base.name.split(".")[0], base)
        elif ours == path or ours in path.parents:
            packages.setdefault("branchy_tee", ours)
        elif any(root in path.parents for root in stdlib):
            n_std += 1
    out = {}
    for top, base in sorted(packages.items()):
        dirs = [base, base.parent / f"{base.name}.libs"]
        files = [f for d in dirs if d.exists() for f in (d.rglob("*") if d.is_dir() else [d]) if f.is_file()]
        out[top] = {"files": len(files), "mb": round(sum(f.stat().st_size for f in files) / 1e6, 2)}
    third_party = [v for k, v in out.items() if k != "branchy_tee"]
    return {"packages": out, "third_party_files": sum(v["files"] for v in third_party),
            "third_party_mb": round(sum(v["mb"] for v in third_party), 1), "stdlib_modules": n_std,
            "has_torch": "torch" in modules}  # fmt: skip


def bench_enclave(run_dir: Path, work: Path, quick: bool, data_dir=None) -> dict:
    """The enclave process on the benchmark model: peak RSS of ``predict`` answering one request of
    256 test images at batch 64 (early exit, and the full model), and what it imported."""
    from .evaluate.exits import load_split
    from .fileio import write_key_file
    from .rundir import read_model_card
    from .seal.bundle import read_header_unverified, seal_run
    from .seal.envelope import seal_request
    from .seal.keys import generate_key

    card = read_model_card(run_dir)
    key, data_key = generate_key(), generate_key()
    write_key_file(work / "model.key", key)
    write_key_file(work / "data.key", data_key)
    seal_run(run_dir, key, work / "bench.btee")
    test = load_split(card, "test", data_dir=data_dir)
    n = min(256, len(test))
    (work / "req256.enc").write_bytes(seal_request(torch.stack([test[i][0] for i in range(n)]), data_key))
    _log(f"peak RSS of predict on the benchmark model ({n} images, batch 64): early exit vs full model")
    early = _predict_subprocess(work, work / "bench.btee", "bench-early", 64, "req256.enc")
    full = _predict_subprocess(work, work / "bench.btee", "bench-full", 64, "req256.enc", ["--full-model"])
    probe = work / "closure.json"
    cmd = [sys.executable, "-c", _CLOSURE_PROBE, str(probe), "--bundle", str(work / "bench.btee"), "--input",
           str(work / "req256.enc"), "--output", str(work / "closure.res"), "--model-key", str(work / "model.key"),
           "--data-key", str(work / "data.key"), "--quiet", "--batch-size", "64"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    closure = json.loads(probe.read_text())
    return {"samples": n, "batch_size": 64, "early_exit_peak_mib": early["peak_rss_mib"], "full_model_peak_mib": full["peak_rss_mib"],
            "early_exit_stages_loaded": early["stages_loaded"], "exit_counts": early["exit_counts"],
            "weights_mib": sum(s.weight_bytes for s in read_header_unverified(work / "bench.btee").stages) / 2**20,
            "import_closure": import_closure(closure["modules"])}  # fmt: skip


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
def run_bench(quick: bool = False, cache_dir: str | os.PathLike = "runs/bench-cache", skip: tuple = (),
              serve: bool = False) -> dict:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from .runtime.graphs import use_threads

    use_threads(ENGINE_THREADS)
    result: dict = {"machine": machine(), "quick": quick, "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    if "early_exit" not in skip or "enclave" not in skip or serve:
        run = ensure_bench_model(cache_dir, quick)
    if "early_exit" not in skip:
        result["early_exit"] = bench_early_exit(run, quick)
    if "enclave" not in skip:
        with tempfile.TemporaryDirectory(prefix="branchy-bench-") as work:
            result["enclave"] = bench_enclave(run, Path(work), quick)
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
    if serve:
        from .bench_serve import run_serve_bench

        _log("online service: early exit vs --full-model under closed-loop load")
        result["serve"] = run_serve_bench(run, quick, log=_log)
    result["seconds"] = time.perf_counter() - t0
    return result


def format_report(r: dict) -> str:
    m = r["machine"]
    lines = [f"branchy-tee bench on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, onnxruntime {m['onnxruntime']})"]
    if "early_exit" in r:
        e = r["early_exit"]
        v = e["vs_onnxruntime"]
        lines += [
            f"early exit vs full forward: {e['model']}, on {e['runtime']}",
            f"  accuracy        {100 * e['accuracy_early_exit']:.2f}% vs {100 * e['accuracy_full']:.2f}%  (drop {e['accuracy_drop_pp']:.2f} points)",
            f"  batch-1 latency {e['latency_ms_early_exit']:.3f} ms vs {e['latency_ms_full']:.3f} ms  -> {e['latency_speedup']:.2f}x"
            f"  (ONNX Runtime defaults: {v['latency_ms']:.3f} ms -> {v['latency_speedup']:.2f}x)",
            f"  batch-128       {e['throughput_early_exit']:.0f} vs {e['throughput_full']:.0f} samples/s  -> {e['throughput_speedup']:.2f}x"
            f"  (ONNX Runtime defaults: {v['throughput']:.0f}/s -> {v['throughput_speedup']:.2f}x)",
            f"  oracle speedup  {e['oracle_speedup']:.2f}x (early exit reaches {100 * e['fraction_of_oracle_speedup']:.0f}% of it)",
            f"  exits taken     {' / '.join(f'{100 * f:.1f}%' for f in e['exit_fractions'])}",
            f"  per stage at batch 1: the graph alone {' / '.join(f'{t:.3f}' for t in e['stage_graph_ms'])} ms (of which an empty "
            f"ONNX Runtime call is {e['onnxruntime_call_us']:.0f} us); the engine adds "
            f"{' / '.join(f'{t:.0f}' for t in e['engine_overhead_us_per_stage'])} us",
        ]
    if "enclave" in r:
        n = r["enclave"]
        c = n["import_closure"]
        packages = ", ".join(f"{k} ({v['files']} files, {v['mb']:.1f} MB)" for k, v in c["packages"].items())
        lines += [
            f"enclave process (predict, {n['samples']} images at batch {n['batch_size']}, benchmark model): peak RSS "
            f"{n['early_exit_peak_mib']:.0f} MiB early exit, {n['full_model_peak_mib']:.0f} MiB full model; weights {n['weights_mib']:.1f} MiB",
            f"  imports: {packages}; "
            f"{c['stdlib_modules']} standard-library modules; torch {'IMPORTED' if c['has_torch'] else 'not imported'}",
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
            f"cold start to first prediction: sealed {c['sealed_s']:.3f} s vs the plain ONNX file {c['plain_s']:.3f} s -> {c['ratio']:.2f}x"
            f" (sealed, a sample leaving by exit 1: {c['sealed_exit_1_s']:.3f} s)",
        ]
    if r.get("quote_verify"):
        q = r["quote_verify"]
        lines.append(f"DCAP quote verification: {q['chain_ms']:.2f} ms (chain + signatures), {q['with_collateral_ms']:.2f} ms with collateral")
    if "serve" in r:
        lines += _format_serve(r["serve"])
    lines.append(f"({r['seconds']:.0f} s)")
    return "\n".join(lines)


def _format_serve(s: dict) -> list[str]:
    lines = ["online service (closed loop, one image per request): early exit vs the same server with --full-model"]
    for ee, full in zip(s["early_exit"], s["full_model"]):
        lines.append(f"  {ee['clients']:>3} client(s): {ee['throughput_per_s']:.0f} vs {full['throughput_per_s']:.0f} requests/s, "
                     f"p50 {ee['p50_ms']:.2f} vs {full['p50_ms']:.2f} ms, p99 {ee['p99_ms']:.2f} vs {full['p99_ms']:.2f} ms, "
                     f"compute p50 {ee['compute_p50_ms']:.2f} vs {full['compute_p50_ms']:.2f} ms, errors {ee['errors']}+{full['errors']}")
    m = s["summary"]
    lines.append(f"  throughput {m['throughput_speedup_at_max_clients']:.2f}x at the most clients; compute p50 "
                 f"{m['compute_p50_speedup_at_1_client']:.2f}x lower at 1 client; protocol overhead "
                 f"{m['protocol_overhead_ms_at_1_client']:.2f} ms; attestation {m['attest_ms_per_connection']} ms per connection")
    return lines
