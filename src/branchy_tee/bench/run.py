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

The early-exit figures are in ``bench.early_exit``, the sealed-bundle ones in ``bench.sealed``, what
they share in ``bench.common``; the online service in ``bench.serve``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from branchy_tee.bench.common import ENGINE_THREADS, log, machine, predict_subprocess, timer
from branchy_tee.bench.early_exit import bench_early_exit
from branchy_tee.bench.sealed import bench_sealed
from branchy_tee.train.cache import DEFAULT_CACHE, cached_model, recipe

__all__ = ["run_bench", "format_report", "bench_early_exit", "machine"]


# --------------------------------------------------------------------------- per-exit profile of every model
@torch.inference_mode()
def _torch_exit_latency_ms(model, input_shape, reps: int, warmup: int) -> list[float]:
    """Median batch-1 latency to reach each exit (stages 0..k and head k) in PyTorch, milliseconds."""
    model.eval()
    x = torch.randn(1, *input_shape)
    out = []
    for k in range(model.num_exits):

        def reach(k=k):
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
    from branchy_tee.models import create_model, list_models
    from branchy_tee.models.cost import exit_flops

    rows = []
    for name in list_models():
        torch.manual_seed(0)
        model = create_model(name).eval()
        flops = exit_flops(model)
        lat = _torch_exit_latency_ms(model, (3, 32, 32), reps=2 if quick else 10, warmup=1 if quick else 2)
        rows.append(
            {
                "model": name,
                "exits": model.num_exits,
                "exit_flops": flops,
                "exit_latency_ms": lat,
                "first_exit_flops_fraction": flops[0] / flops[-1],
                "first_exit_latency_fraction": lat[0] / lat[-1],
            }
        )
        log(
            f"profile {name}: first exit at {flops[0] / flops[-1]:.3f} of the FLOPs,"
            f" {lat[0] / lat[-1]:.3f} of the latency"
        )
        del model
    return rows


# --------------------------------------------------------------------------- the enclave process on the benchmark model
_CLOSURE_PROBE = r"""
import json, sys
from branchy_tee.tee.predict import main
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
    ours = Path(__file__).resolve().parents[1]
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
    return {
        "packages": out,
        "third_party_files": sum(v["files"] for v in third_party),
        "third_party_mb": round(sum(v["mb"] for v in third_party), 1),
        "stdlib_modules": n_std,
        "has_torch": "torch" in modules,
    }


def bench_enclave(run_dir: Path, work: Path, quick: bool, data_dir=None) -> dict:
    """The enclave process on the benchmark model: peak RSS of ``predict`` answering one request of
    256 test images at batch 64 (early exit, and the full model), and what it imported."""
    from branchy_tee.client.envelopes import seal_request
    from branchy_tee.core.fileio import write_key_file
    from branchy_tee.core.keys import generate_key
    from branchy_tee.evaluate.exits import load_split
    from branchy_tee.models.rundir import read_model_card
    from branchy_tee.seal.bundle import seal_run
    from branchy_tee.tee.sealed.bundle import read_header_unverified

    card = read_model_card(run_dir)
    key, data_key = generate_key(), generate_key()
    write_key_file(work / "model.key", key)
    write_key_file(work / "data.key", data_key)
    seal_run(run_dir, key, work / "bench.btee")
    test = load_split(card, "test", data_dir=data_dir)
    n = min(256, len(test))
    (work / "req256.enc").write_bytes(seal_request(torch.stack([test[i][0] for i in range(n)]), data_key))
    log(f"peak RSS of predict on the benchmark model ({n} images, batch 64): early exit vs full model")
    early = predict_subprocess(work, work / "bench.btee", "bench-early", 64, "req256.enc")
    full = predict_subprocess(work, work / "bench.btee", "bench-full", 64, "req256.enc", ["--full-model"])
    probe = work / "closure.json"
    cmd = [
        sys.executable,
        "-c",
        _CLOSURE_PROBE,
        str(probe),
        "--bundle",
        str(work / "bench.btee"),
        "--input",
        str(work / "req256.enc"),
        "--output",
        str(work / "closure.res"),
        "--model-key",
        str(work / "model.key"),
        "--data-key",
        str(work / "data.key"),
        "--quiet",
        "--batch-size",
        "64",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    closure = json.loads(probe.read_text())
    weights = sum(s.weight_bytes for s in read_header_unverified(work / "bench.btee").stages)
    return {
        "samples": n,
        "batch_size": 64,
        "early_exit_peak_mib": early["peak_rss_mib"],
        "full_model_peak_mib": full["peak_rss_mib"],
        "early_exit_stages_loaded": early["stages_loaded"],
        "exit_counts": early["exit_counts"],
        "weights_mib": weights / 2**20,
        "import_closure": import_closure(closure["modules"]),
    }


# --------------------------------------------------------------------------- quote verification
def bench_quote_verify(quick: bool) -> dict | None:
    from datetime import datetime, timezone

    from branchy_tee.verifier.dcap import read_collateral_file, verify_quote

    here = Path(__file__).resolve()
    candidates = [
        Path(os.environ.get("BRANCHY_TEE_SGX_QUOTES", "")),
        here.parents[4] / "shared" / "testdata" / "sgx-quotes",
        Path.cwd().parent / "shared" / "testdata" / "sgx-quotes",
    ]
    qdir = next((c for c in candidates if (c / "phala-1.quote.bin").is_file()), None)
    if qdir is None:
        log("real SGX quotes not found (../shared/testdata/sgx-quotes); skipping quote verification timing")
        return None
    quote = (qdir / "phala-1.quote.bin").read_bytes()
    collateral = read_collateral_file(qdir / "phala-1.collateral.json")
    now = datetime(2025, 6, 20, tzinfo=timezone.utc)
    out = {}
    for label, with_collateral in (("chain_ms", None), ("with_collateral_ms", collateral)):
        ts = []
        for _ in range(10 if quick else 50):
            with timer() as t:
                verify_quote(quote, now=now, collateral=with_collateral)
            ts.append(t[1])
        out[label] = 1000 * statistics.median(ts)
    return out


# --------------------------------------------------------------------------- the whole suite
def run_bench(
    quick: bool = False, cache_dir: str | os.PathLike = DEFAULT_CACHE, skip: tuple = (), serve: bool = False
) -> dict:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from branchy_tee.tee.graphs import use_threads

    use_threads(ENGINE_THREADS)
    result: dict = {"machine": machine(), "quick": quick, "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    if "early_exit" not in skip or "enclave" not in skip or serve:
        run = cached_model(cache_dir, recipe(quick), quiet=True, log=log)
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
        from branchy_tee.bench.serve import run_serve_bench

        log("online service: early exit vs --full-model under closed-loop load")
        result["serve"] = run_serve_bench(run, quick, log=log)
    result["seconds"] = time.perf_counter() - t0
    return result


def format_report(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"branchy-tee bench on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, onnxruntime {m['onnxruntime']})"
    ]
    if "early_exit" in r:
        lines += _format_early_exit(r["early_exit"])
    if "enclave" in r:
        lines += _format_enclave(r["enclave"])
    if "exit_profile" in r:
        lines.append("per-exit profile (random weights, 3x32x32, batch 1): first exit's share of FLOPs / latency")
        for p in r["exit_profile"]:
            lines.append(
                f"  {p['model']:<12} {p['exits']} exits  {p['first_exit_flops_fraction']:.3f} / "
                f"{p['first_exit_latency_fraction']:.3f}  full {p['exit_flops'][-1] / 1e9:.3f} GFLOPs, "
                f"{p['exit_latency_ms'][-1]:.2f} ms"
            )
    if "staged_memory" in r:
        lines += _format_sealed(r["staged_memory"], r["aead"], r["cold_start"])
    if r.get("quote_verify"):
        q = r["quote_verify"]
        lines.append(
            f"DCAP quote verification: {q['chain_ms']:.2f} ms (chain + signatures), "
            f"{q['with_collateral_ms']:.2f} ms with collateral"
        )
    if "serve" in r:
        lines += _format_serve(r["serve"])
    lines.append(f"({r['seconds']:.0f} s)")
    return "\n".join(lines)


def _format_early_exit(e: dict) -> list[str]:
    v, w = e["vs_onnxruntime"], e["vs_every_stage"]
    budget = e.get("calibration_budget_pp")
    verdict = ""
    if budget is not None:
        within = "within" if e["within_budget"] else "OVER"
        verdict = f" (budget {budget:.2f}, margin {e['calibration_margin_se']} SE: {within})"
    return [
        f"early exit vs full forward: {e['model']}, on {e['runtime']}",
        f"  test accuracy   final exit {100 * e['final_exit_test_accuracy']:.2f}%; the calibrated setting "
        f"{100 * e['accuracy_early_exit']:.2f}%, a loss of {e['calibrated_test_loss_pp']:.2f} points{verdict}",
        f"  batch-1 latency {e['latency_ms_early_exit']:.3f} ms vs {e['latency_ms_full']:.3f} ms  -> "
        f"{e['latency_speedup']:.2f}x  (ONNX Runtime defaults: {v['latency_ms']:.3f} ms -> "
        f"{v['latency_speedup']:.2f}x)",
        f"  batch-128       {e['throughput_early_exit']:.0f} vs {e['throughput_full']:.0f} samples/s  -> "
        f"{e['throughput_speedup']:.2f}x  (on {v['workers']} cores {v['throughput_early_exit']:.0f}/s vs ONNX "
        f"Runtime defaults {v['throughput']:.0f}/s -> {v['throughput_speedup']:.2f}x; one core "
        f"{v['throughput_speedup_one_worker']:.2f}x)",
        f"  every stage on the same engine (predict --full-model): {w['latency_ms']:.3f} ms -> "
        f"{w['latency_speedup']:.2f}x at batch 1, {w['throughput']:.0f} samples/s -> {w['throughput_speedup']:.2f}x "
        "at batch 128",
        f"  oracle speedup  {e['oracle_speedup']:.2f}x (early exit reaches "
        f"{100 * e['fraction_of_oracle_speedup']:.0f}% of it)",
        f"  exits taken     {' / '.join(f'{100 * f:.1f}%' for f in e['exit_fractions'])}",
        f"  per stage at batch 1: the graph alone {' / '.join(f'{t:.3f}' for t in e['stage_graph_ms'])} ms (of which "
        f"an empty ONNX Runtime call is {e['onnxruntime_call_us']:.0f} us); the engine adds "
        f"{' / '.join(f'{t:.0f}' for t in e['engine_overhead_us_per_stage'])} us",
    ]


def _format_enclave(n: dict) -> list[str]:
    c = n["import_closure"]
    packages = ", ".join(f"{k} ({v['files']} files, {v['mb']:.1f} MB)" for k, v in c["packages"].items())
    return [
        f"enclave process (predict, {n['samples']} images at batch {n['batch_size']}, benchmark model): peak RSS "
        f"{n['early_exit_peak_mib']:.0f} MiB early exit, {n['full_model_peak_mib']:.0f} MiB full model; "
        f"weights {n['weights_mib']:.1f} MiB",
        f"  imports: {packages}; "
        f"{c['stdlib_modules']} standard-library modules; torch {'IMPORTED' if c['has_torch'] else 'not imported'}",
    ]


def _format_sealed(m: dict, a: dict, c: dict) -> list[str]:
    return [
        f"peak RSS of predict, {m['model']}, batch {m['batch_size']}: staged (exit <= 1) {m['staged_mib']:.0f} MiB vs "
        f"full load {m['full_mib']:.0f} MiB -> {m['peak_ratio']:.2f}x (batch 16: {m['batch_16']['peak_ratio']:.2f}x)",
        f"AES-256-GCM decrypt+verify of a {a['stage_mib']:.0f} MiB stage file: {a['decrypt_gbps']:.2f} GB/s into a "
        f"reused buffer, {a['stage_load_gbps']:.2f} GB/s into fresh memory",
        f"cold start to first prediction: sealed {c['sealed_s']:.3f} s vs the plain ONNX file {c['plain_s']:.3f} s -> "
        f"{c['ratio']:.2f}x (sealed, a sample leaving by exit 1: {c['sealed_exit_1_s']:.3f} s)",
    ]


def _format_serve(s: dict) -> list[str]:
    lines = ["online service (closed loop, one image per request): early exit vs the same server with --full-model"]
    for ee, full in zip(s["early_exit"], s["full_model"], strict=True):
        lines.append(
            f"  {ee['clients']:>3} client(s): {ee['throughput_per_s']:.0f} vs {full['throughput_per_s']:.0f} "
            f"requests/s, p50 {ee['p50_ms']:.2f} vs {full['p50_ms']:.2f} ms, p99 {ee['p99_ms']:.2f} vs "
            f"{full['p99_ms']:.2f} ms, compute mean {ee['compute_mean_ms']:.2f} vs {full['compute_mean_ms']:.2f} ms, "
            f"errors {ee['errors']}+{full['errors']}"
        )
    m = s["summary"]
    lines.append(
        f"  throughput {m['throughput_speedup_at_max_clients']:.2f}x at the most clients; compute mean "
        f"{m['compute_mean_speedup_at_1_client']:.2f}x lower at 1 client; protocol overhead "
        f"{m['protocol_overhead_ms_at_1_client']:.2f} ms; attestation {m['attest_ms_per_connection']} ms per connection"
    )
    if "batched" in s:
        b = s["batched"]
        ee, full, bm = b["early_exit"], b["full_model"], b["summary"]
        lines += [
            f"online service, batched requests ({b['clients']} closed-loop clients x {b['images_per_request']} images "
            "a request): early exit vs --full-model",
            f"  {ee['images_per_s']:.0f} vs {full['images_per_s']:.0f} images/s -> {bm['images_per_s_speedup']:.2f}x; "
            f"p50 {ee['p50_ms']:.2f} vs {full['p50_ms']:.2f} ms, p99 {ee['p99_ms']:.2f} vs {full['p99_ms']:.2f} ms, "
            f"compute mean {ee['compute_mean_ms']:.2f} vs {full['compute_mean_ms']:.2f} ms a request "
            f"({bm['compute_mean_speedup']:.2f}x), errors {ee['errors']}+{full['errors']}",
        ]
    return lines
