"""Plots (PNG, PDF or SVG, as the file name says): accuracy against cost, and the enclave's memory timeline."""

from __future__ import annotations

import io
from pathlib import Path

from branchy_tee.core.fileio import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def plot_format(path) -> str:
    """The format a plot's file name asks for; UsageError for one we do not write."""
    from branchy_tee.core.errors import UsageError

    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"plot {path}: name it .png, .pdf or .svg (the suffix chooses the format)")
    return FORMATS[suffix]


def _save(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=plot_format(path), dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_accuracy_vs_cost(report: dict, path) -> Path:
    """One point per exit, the threshold sweep as a curve, the calibrated setting and the oracle marked."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    full = report["full_flops"]
    sweep = sorted(report["sweep"], key=lambda s: s["mean_flops"])
    ax.plot(
        [s["mean_flops"] / full for s in sweep],
        [100 * s["accuracy"] for s in sweep],
        "-",
        color="tab:blue",
        label="shared-threshold sweep",
    )
    ax.scatter(
        [e["flops"] / full for e in report["exits"]],
        [100 * e["accuracy"] for e in report["exits"]],
        color="tab:gray",
        zorder=3,
        label="single exit",
    )
    for e in report["exits"]:
        ax.annotate(
            f"exit {e['index']}",
            (e["flops"] / full, 100 * e["accuracy"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=8,
        )
    cal = report["calibrated"]
    ax.scatter(
        [cal["mean_flops"] / full],
        [100 * cal["accuracy"]],
        marker="*",
        s=180,
        color="tab:red",
        zorder=4,
        label="calibrated thresholds",
    )
    orc = report["oracle"]
    ax.scatter(
        [orc["mean_flops"] / full], [100 * orc["accuracy"]], marker="D", color="tab:green", zorder=4, label="oracle"
    )
    ax.set_xlabel("mean cost (fraction of the full model's FLOPs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['arch']}: accuracy vs cost ({report['samples']} test samples)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_memory_timeline(series: dict[str, tuple[list[float], list[float]]], path, title="resident memory") -> Path:
    """``series``: label -> (seconds since start, RSS in MiB)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (t, mib) in series.items():
        ax.plot(t, mib, label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
