"""The showcase model, trained once and reused: ``branchy-tee demo`` and ``branchy-tee bench`` measure
the same multi-exit model, kept in one cache (a run directory per recipe)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

DEFAULT_CACHE = "runs/cache"

# Deep enough that exit 0 is cheap (7 % of the full model's FLOPs), small enough to train here in
# about 3 minutes, and past 90 % at its final exit (BENCHMARKS.md, "The showcase model").
SHOWCASE_MODEL: dict[str, Any] = {
    "net": "mobilenetv1",
    "model_config": {"width_mult": 0.5},
    "epochs": 5,
    "lr": 3e-3,
    "batch_size": 128,
    "minutes": 3,  # training on this project's 2-core machine (177 s on a fresh clone), for the demo's estimate
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


def describe(spec: dict[str, Any]) -> str:
    """``mobilenetv1 width_mult=0.5``: the recipe's model as the demo and the benchmark name it."""
    return spec["net"] + "".join(f" {k}={v}" for k, v in spec["model_config"].items())


# What may differ between a cached run's recorded options and the recipe's: where and how it ran.
_NOT_THE_RECIPE = ("out", "data_dir", "dataset", "net", "num_workers", "force", "quiet", "resume", "download", "device")


def _train_config(spec: dict[str, Any], out: Path, data_dir, quiet: bool):
    from branchy_tee.train.trainer import TrainConfig

    return TrainConfig(
        net=spec["net"],
        model_config=dict(spec["model_config"]),
        dataset=spec["dataset"],
        data_dir=data_dir,
        epochs=spec["epochs"],
        lr=spec["lr"],
        batch_size=spec["batch_size"],
        num_workers=0,
        out=str(out),
        force=True,
        max_accuracy_drop=0.01,
        quiet=quiet,
        synthetic=spec["synthetic"] if spec["dataset"] == "synthetic" else {},
    )


def stale_because(run: Path, spec: dict[str, Any]) -> str | None:
    """Why ``run`` is not a finished, calibrated run of ``spec`` to reuse (None when it is)."""
    from branchy_tee.models.rundir import MODEL_CARD, read_model_card
    from branchy_tee.train.config import jsonable

    if not run.exists():
        return "it is not there"
    if not (run / MODEL_CARD).is_file():
        return "it holds no model card (interrupted)"
    card = read_model_card(run)
    if not card.thresholds:
        return "it was never calibrated (interrupted)"
    recorded = (card.training or {}).get("config", {})
    wanted = jsonable(_train_config(spec, run, None, False))
    differ = sorted(k for k, v in wanted.items() if k not in _NOT_THE_RECIPE and recorded.get(k) != v)
    if card.arch != spec["net"] or card.dataset != spec["dataset"] or differ:
        return f"it was trained otherwise ({', '.join(differ) or 'model or data set'})"
    return None


def is_cached(run: Path, spec: dict[str, Any]) -> bool:
    return stale_because(run, spec) is None


def cached_model(
    cache_dir: str | os.PathLike, spec: dict[str, Any], data_dir=None, quiet: bool = False, log: Callable = print
) -> Path:
    """The trained and calibrated run of ``spec`` from the cache, trained first if it is not there or
    not a finished run of ``spec``; training goes to a folder beside it that replaces it when done, so
    an interrupted run is never taken for a cached one. A cached model calibrated otherwise than
    calibration now does (on PyTorch's outputs rather than the stage graphs', or with another margin)
    is calibrated again."""
    import shutil

    from branchy_tee.evaluate.calibrate import DEFAULT_MARGIN_SE, calibrate_run
    from branchy_tee.export.onnx import read_export
    from branchy_tee.models.rundir import read_model_card
    from branchy_tee.train.trainer import fit

    run = cache_entry(cache_dir, spec)
    stale = stale_because(run, spec)
    if stale is None:
        calibration = read_model_card(run).calibration
        if read_export(run) is None or calibration is None or calibration.margin_se != DEFAULT_MARGIN_SE:
            log(f"calibrating the cached model {run} again, on its stage graphs with the current margin")
            budget = calibration.max_accuracy_drop if calibration else 0.01
            calibrate_run(run, max_accuracy_drop=budget, data_dir=data_dir, show=False)
        log(f"reusing the cached model {run}")
        return run
    if run.exists():
        log(f"not reusing {run}: {stale}")
    log(
        f"training {describe(spec)} on {spec['dataset']} for {spec['epochs']} epoch(s) -> {run} (cached for later "
        "runs of the demo and the benchmark)"
    )
    partial = run.with_name(run.name + ".partial")
    fit(_train_config(spec, partial, data_dir, quiet))
    if run.exists():
        shutil.rmtree(run)
    os.replace(partial, run)
    return run
