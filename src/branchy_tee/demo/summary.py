"""The demo's closing figures: latency and throughput of early exit against the full model, the memory
timeline, accuracy on the test split against the calibration's budget; written to ``summary.json``
and printed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from branchy_tee.demo.common import OWNERS, say

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
        demo.run_dir, quick=demo.quick, samples=200 if demo.quick else 2000, data_dir=demo.data_dir
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
            "model": f"{card.arch} {card.config}",
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


def format_summary(s: dict) -> str:
    cal, full_acc = s["calibrated"], s["final_accuracy"]
    t, e, f = s["timing"], s["enclave"]["early_exit"], s["enclave"]["full_model"]
    lines = ["", "=" * 78, f"branchy-tee demo: {s['model']} on {s['dataset']}  ({s['seconds']:.0f} s)", "=" * 78]
    lines.append(
        "accuracy per exit (test):  " + "  ".join(f"exit {x['index']}: {100 * x['accuracy']:.2f}%" for x in s["exits"])
    )
    tst = s["test"]
    lines.append(f"final exit (test split):   {100 * full_acc:.2f}%")
    lines.append(
        f"calibrated setting (test): {100 * cal['accuracy']:.2f}%, a loss of {tst['calibrated_loss_pp']:.2f} points "
        f"against the {tst['budget_pp']:.2f}-point budget: {'within' if tst['within_budget'] else 'OVER'}"
    )
    lines.append(
        "exit distribution (enclave): "
        + " / ".join(f"{c}" for c in e["exit_counts"])
        + f" samples; stages loaded {e['stages_loaded']}"
    )
    lines.append(
        f"batch-1 latency:           {t['latency_ms_early_exit']:.3f} ms early exit vs {t['latency_ms_full']:.3f} ms "
        f"full model ({t['latency_speedup']:.2f}x)"
    )
    lines.append(
        f"batch-128 throughput:      {t['throughput_early_exit']:.0f} vs {t['throughput_full']:.0f} samples/s "
        f"({t['throughput_speedup']:.2f}x)"
    )
    if t["latency_speedup"] < 1:
        lines.append("  (this model's stages cost less than the engine's call per stage: early exit does not pay here;")
        lines.append("   `branchy-tee bench` measures a deeper model)")
    lines.append(
        f"enclave peak RSS:          {e['peak_rss_mib']:.0f} MiB staged vs {f['peak_rss_mib']:.0f} MiB full model; "
        f"resident weights {e['resident_weights_peak_mib']:.2f} vs {f['resident_weights_peak_mib']:.2f} MiB"
    )
    easy, budget = s["enclave"]["easy_images"], s["enclave"]["memory_budget"]
    if easy:
        lines.append(
            f"easy images only:          stages loaded {easy['stages_loaded']}, resident weights "
            f"{easy['resident_weights_peak_mib']:.2f} MiB, peak RSS {easy['peak_rss_mib']:.0f} MiB"
        )
    lines.append(
        f"under --memory-budget:     resident weights at most {budget['resident_weights_peak_mib']:.2f} MiB, "
        f"{budget['evictions']} evictions"
    )
    o = s["online"]
    lines.append(
        f"online (RA-TLS, 2 owners): p50 {o['early_exit']['p50_ms']:.2f} ms early exit vs "
        f"{o['full_model']['p50_ms']:.2f} ms full model per single-image request"
    )
    for who, own in s["data_owners"].items():
        lines.append(
            f"data owner {who[-1].upper()}:              {own['samples']} answers, "
            f"accuracy {100 * own['accuracy']:.2f}%, "
            f"result.txt (decrypted by the data owner): {own['result_txt']}"
        )
    files = s["files"]
    lines.append(f"memory traces (mprof):     {', '.join(files['mprofile'])}")
    lines.append(f"plots:                     {files['accuracy_plot']}, {files['memory_plot']}")
    lines.append("attestation was SIMULATED (no SGX here); see docs/sgx.md.")
    return "\n".join(lines)
