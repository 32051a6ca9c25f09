"""The showcase model, trained once and reused: ``branchy-tee demo`` and ``branchy-tee bench`` measure
the same multi-exit model, kept in one cache (a run directory per recipe)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

DEFAULT_CACHE = "runs/cache"

# Deep enough that exit 0 is cheap (7 % of the full model's FLOPs), small enough to train here in
# about 4 minutes, and past 90 % at its final exit (BENCHMARKS.md, "The showcase model").
SHOWCASE_MODEL: dict[str, Any] = {
    "net": "mobilenetv1",
    "model_config": {"width_mult": 0.5},
    "epochs": 5,
    "lr": 3e-3,
    "batch_size": 128,
    "minutes": 4,  # training on this project's 2-core machine, for the demo's estimate
}
QUICK_MODEL: dict[str, Any] = {
    "net": "lenet5",
    "model_config": {},
    "epochs": 1,
    "lr": 3e-3,
    "batch_size": 50,
    "minutes": 0.1,
}


def recipe(quick: bool, data_dir=None, epochs: int | None = None) -> dict[str, Any]:
    """The model to train: the showcase model (the quick one for tests), on Fashion-MNIST when it is
    installed, else on synthetic data; ``epochs`` overrides the recipe's."""
    from branchy_tee.data import fashion_mnist_available

    spec = dict(QUICK_MODEL if quick else SHOWCASE_MODEL)
    if epochs:
        spec["minutes"] *= epochs / spec["epochs"]
        spec["epochs"] = epochs
    spec["dataset"] = "fashion-mnist" if fashion_mnist_available(data_dir) and not quick else "synthetic"
    spec["synthetic"] = {"channels": 1, "size": 28, **({"n": 600} if quick else {})}
    return spec


def cache_entry(cache_dir: str | os.PathLike, spec: dict[str, Any]) -> Path:
    tag = [spec["net"], *(f"{k}{v}" for k, v in spec["model_config"].items()), spec["dataset"], f"e{spec['epochs']}"]
    return Path(cache_dir) / "-".join(tag)


def is_cached(run: Path) -> bool:
    from branchy_tee.models.rundir import MODEL_CARD, read_model_card

    return (run / MODEL_CARD).is_file() and bool(read_model_card(run).thresholds)


def cached_model(
    cache_dir: str | os.PathLike, spec: dict[str, Any], data_dir=None, quiet: bool = False, log: Callable = print
) -> Path:
    """The trained and calibrated run of ``spec`` from the cache, trained first if it is not there (an
    interrupted run is replaced). A cached model calibrated otherwise than calibration now does (on
    PyTorch's outputs rather than the stage graphs', or with another margin) is calibrated again."""
    from branchy_tee.evaluate.calibrate import DEFAULT_MARGIN_SE, calibrate_run
    from branchy_tee.export.onnx import read_export
    from branchy_tee.models.rundir import read_model_card
    from branchy_tee.train.trainer import TrainConfig, fit

    run = cache_entry(cache_dir, spec)
    if is_cached(run):
        calibration = read_model_card(run).calibration
        if read_export(run) is None or calibration is None or calibration.margin_se != DEFAULT_MARGIN_SE:
            log(f"calibrating the cached model {run} again, on its stage graphs with the current margin")
            calibrate_run(run, max_accuracy_drop=calibration.max_accuracy_drop if calibration else 0.01, show=False)
        log(f"reusing the cached model {run}")
        return run
    log(
        f"training {spec['net']} {spec['model_config'] or ''} on {spec['dataset']} for {spec['epochs']} epoch(s) "
        f"-> {run} (cached for later runs of the demo and the benchmark)"
    )
    fit(
        TrainConfig(
            net=spec["net"],
            model_config=dict(spec["model_config"]),
            dataset=spec["dataset"],
            data_dir=data_dir,
            epochs=spec["epochs"],
            lr=spec["lr"],
            batch_size=spec["batch_size"],
            num_workers=0,
            out=str(run),
            force=True,
            max_accuracy_drop=0.01,
            quiet=quiet,
            synthetic=spec["synthetic"] if spec["dataset"] == "synthetic" else {},
        )
    )
    return run
