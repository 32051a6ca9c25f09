"""The demo's closing figures: latency and throughput of early exit against the full model, the memory
timeline, accuracy on the test split against the calibration's budget; written to ``summary.json``
and printed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from branchy_tee.bench.common import ENGINE_THREADS
from branchy_tee.demo.common import OWNERS, say
from branchy_tee.train.cache import describe

if TYPE_CHECKING:
    from branchy_tee.demo.batch import Demo


def _read_mprofile(path: str) -> tuple[list[float], list[float]]:
    t, mib = [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("MEM "):
            _, m, ts = line.split()
            mib.append(float(m))
            t.append(float(ts))
    return [x - t[0] for x in t], mib


def accuracy_on_test(report: dict, max_accuracy_drop: float) -> dict:
    """The final exit's test accuracy and what the calibrated setting loses against it, with the budget."""
    loss_pp = 100 * (report["final_accuracy"] - report["calibrated"]["accuracy"])
    return {
        "final_exit_accuracy": report["final_accuracy"],
        "calibrated_accuracy": report["calibrated"]["accuracy"],
        "calibrated_loss_pp": loss_pp,
        "budget_pp": 100 * max_accuracy_drop,
        "within_budget": loss_pp <= 100 * max_accuracy_drop + 1e-9,
    }


def summarize(demo: Demo) -> dict:
    from branchy_tee.bench.early_exit import bench_early_exit
    from branchy_tee.core.fileio import atomic_write_text
    from branchy_tee.evaluate.plots import plot_memory_timeline

    say("\n    measuring batch-1 latency and batch-128 throughput, early exit vs the full model ...")
    timing = bench_early_exit(
        demo.run_dir,
        quick=demo.quick,
        samples=200 if demo.quick else 2000,
        data_dir=demo.data_dir,
        latency_samples=60 if demo.quick else 300,
    )
    traces = {"early exit (staged loading)": demo.stats, "full model": demo.full}
    if demo.easy:
        traces["easy images (stage 0 only)"] = demo.easy
    mem_plot = plot_memory_timeline(
        {k: _read_mprofile(v["mprofile"]) for k, v in traces.items()},
        demo.d / "memory_timeline.png",
        title="enclave runtime: resident memory",
    )
    r, card = demo.report, demo.card
    s = demo.summary
    s["test"] = accuracy_on_test(r, card.calibration.max_accuracy_drop if card.calibration else 0.01)
    s.update(
        {
            "model": describe(demo.spec),
            "exits": r["exits"],
            "final_accuracy": r["final_accuracy"],
            "calibrated": r["calibrated"],
            "oracle": r["oracle"],
            "timing": timing,
            "data_owners": demo.per_owner,
            "enclave": {
                "early_exit": demo.stats,
                "full_model": demo.full,
                "easy_images": demo.easy,
                "memory_budget": demo.budgeted,
            },
            "seconds": round(time.time() - demo.t_start, 1),
        }
    )
    s["files"].update(
        {
            "result_txt": [demo.per_owner[w]["result_txt"] for w in OWNERS],
            "memory_plot": str(mem_plot),
            "mprofile": [demo.stats["mprofile"], demo.full["mprofile"]],
            "bundle": str(demo.d / "model.btee"),
            "release": str(demo.d / "mo" / "release-enclave.json"),
        }
    )
    atomic_write_text(demo.d / "summary.json", json.dumps(s, indent=1) + "\n")
    say(format_summary(s))
    return s


def _row(label: str, *cells: str) -> str:
    return f"  {label:<26}" + "".join(f"{c:>16}" for c in cells)


def format_summary(s: dict) -> str:
    """The closing figures in four blocks (accuracy, speed, memory, the parties), one line per figure."""
    cal, tst = s["calibrated"], s["test"]
    t, enc = s["timing"], s["enclave"]
    e, ort = enc["early_exit"], t["vs_onnxruntime"]
    one_graph = {k: t[f"{k}_full" if k in ("latency_ms", "throughput") else k] for k in _BASELINE}
    n = sum(e["exit_counts"])
    rule = "=" * 90
    title = f"branchy-tee demo: {s['model']} on {s['dataset']}, {n} test images ({s['seconds']:.0f} s)"
    lines = ["", rule, title, rule]
    lines += [
        "ACCURACY (test split)",
        _row("final exit", f"{100 * s['final_accuracy']:.2f} %"),
        _row("early exit (calibrated)", f"{100 * cal['accuracy']:.2f} %")
        + f"   {tst['calibrated_loss_pp']:.2f} points lost, budget {tst['budget_pp']:.2f}: "
        + ("within" if tst["within_budget"] else "OVER BUDGET"),
        _row("per exit", *(f"{k}: {100 * x['accuracy']:.1f} %" for k, x in enumerate(s["exits"]))),
        _row("answered at exit", *(f"{k}: {100 * c / n:.1f} %" for k, c in enumerate(e["exit_counts"]))),
        "",
        f"SPEED: the enclave's engine on ONNX Runtime, {ENGINE_THREADS} intra-op thread ({t['test_samples']} test "
        "images; batch 1 over the "
        f"first {t['latency_samples']})",
        _row("", "early exit", "full model", "early exit is"),
        *_speed(t, t["vs_every_stage"], "the full model on the same engine (every stage, as predict --full-model):"),
        *_speed(t, one_graph, "the full model as one ONNX graph (no exit heads), the same session options:"),
        *_speed(
            t,
            ort,
            f"the full model as one ONNX graph on ONNX Runtime's defaults ({ort['workers']} cores; "
            f"early exit on {ort['workers']} workers at batch 128):",
            ort["throughput_early_exit"],
        ),
    ]
    if t["latency_speedup"] < 1:
        lines.append("  (this model's stages cost less than the engine's call per stage: early exit does not pay here)")
    lines += _memory_block(enc, all(o["same_answers_under_budget"] for o in s["data_owners"].values()))
    o = s["online"]
    lines += [
        "",
        "PARTIES",
        f"  online (RA-TLS, both owners at once): p50 {o['early_exit']['p50_ms']:.2f} ms early exit vs "
        f"{o['full_model']['p50_ms']:.2f} ms full model per one-image request",
    ]
    for who, own in s["data_owners"].items():
        lines.append(
            f"  data owner {who[-1].upper()}: {own['samples']} answers, accuracy {100 * own['accuracy']:.2f} %, "
            f"decrypted by itself to {own['result_txt']}"
        )
    files = s["files"]
    lines += [
        "",
        f"PLOTS: {files['accuracy_plot']} (accuracy against cost), {files['memory_plot']} (memory over time)",
        f"memory traces (mprof): {', '.join(files['mprofile'])}",
        f"every figure: {Path(files['bundle']).parent / 'summary.json'}",
        "attestation was SIMULATED (no SGX here); see docs/sgx.md.",
    ]
    return "\n".join(lines)


_BASELINE = ("latency_ms", "throughput", "latency_speedup", "throughput_speedup")  # a bench ``vs_*`` block's figures


def _speed(t: dict, full: dict, title: str, early_throughput: float | None = None) -> list[str]:
    """Batch-1 latency and batch-128 throughput of early exit against one baseline (``full``: the
    ``_BASELINE`` figures of one of the bench's ``vs_*`` blocks)."""
    latency, tp = full["latency_ms"], full["throughput"]
    early_tp = t["throughput_early_exit"] if early_throughput is None else early_throughput
    return [
        f"  {title}",
        _row(
            "  batch-1 latency",
            f"{t['latency_ms_early_exit']:.3f} ms",
            f"{latency:.3f} ms",
            f"{full['latency_speedup']:.2f}x faster",
        ),
        _row(
            "  batch-128 throughput", f"{early_tp:.0f} /s", f"{tp:.0f} /s", f"{full['throughput_speedup']:.2f}x higher"
        ),
    ]


def _memory_block(enc: dict, same_answers: bool) -> list[str]:
    easy, budget = enc["easy_images"], enc["memory_budget"]
    lines = [
        "",
        "MEMORY (the enclave runtime: the stage store's resident weights and the process's peak RSS)",
        _row("", "weights", "peak RSS", "stages loaded"),
        _row("full model", *_memory(enc["full_model"])),
        _row("early exit, on demand", *_memory(enc["early_exit"])),
    ]
    if easy:
        lines.append(_row("easy images only", *_memory(easy)))
    lines.append(
        _row("under --memory-budget", *_memory(budget))
        + f"   ({budget['evictions']} evictions, {'the same answers' if same_answers else 'DIFFERENT ANSWERS'})"
    )
    return lines


def _memory(stats: dict) -> tuple[str, str, str]:
    stages = ",".join(str(k) for k in stats["stages_loaded"])
    return f"{stats['resident_weights_peak_mib']:.2f} MiB", f"{stats['peak_rss_mib']:.0f} MiB", stages
