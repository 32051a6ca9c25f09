#!/usr/bin/env python3
"""The distillation study of docs/training.md, runnable by one command.

    .venv/bin/python scripts/distill_study.py                       # the whole study (hours on 1 CPU thread)
    .venv/bin/python scripts/distill_study.py --stage screen        # LeNet-5, every recipe
    .venv/bin/python scripts/distill_study.py --stage confirm       # the deeper model, the finalists
    .venv/bin/python scripts/distill_study.py --report              # tables from what has been run

Each run trains on Fashion-MNIST with the project's trainer (``fit``), then records every exit's
logits on the validation and the test split. Finished runs are skipped, so an interrupted study
continues where it stopped. The report gives per-exit test accuracy (mean +- standard deviation over
the seeds) for every recipe, and how often calibration met its budget on the test split for several
margins: the calibration rule of ``evaluate/calibrate.py`` applied to the stored validation logits.
Run it with ``nice`` and one torch thread on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Common to every run of a model: the same epochs, learning rate and batch size for every recipe,
# so that the recipes are compared at equal training time.
MODELS: dict[str, dict[str, Any]] = {
    "lenet5": {"net": "lenet5", "model_config": {}, "epochs": 5, "lr": 3e-3, "batch_size": 128},
    "mobilenetv1-0.25": {
        "net": "mobilenetv1",
        "model_config": {"width_mult": 0.25},
        "epochs": 4,
        "lr": 3e-3,
        "batch_size": 128,
    },
    "resnet18-w8": {"net": "resnet18", "model_config": {"width": 8}, "epochs": 4, "lr": 3e-3, "batch_size": 128},
    "resnet18-w8-3ep-noaug": {
        "net": "resnet18",
        "model_config": {"width": 8},
        "epochs": 3,
        "lr": 3e-3,
        "batch_size": 128,
        "augment": False,
    },
    "resnet18-w8-2ep-noaug": {
        "net": "resnet18",
        "model_config": {"width": 8},
        "epochs": 2,
        "lr": 3e-3,
        "batch_size": 128,
        "augment": False,
    },
    "lenet5-8ep-noaug": {
        "net": "lenet5",
        "model_config": {},
        "epochs": 8,
        "lr": 3e-3,
        "batch_size": 128,
        "augment": False,
    },
    "lenet5-10ep-noaug": {
        "net": "lenet5",
        "model_config": {},
        "epochs": 10,
        "lr": 3e-3,
        "batch_size": 128,
        "augment": False,
    },
}

# A recipe is a list of phases; each phase is a set of TrainConfig fields. A phase with
# "frozen": True trains only the early exits on the previous phase's run (--attach-exits), and its
# "epochs" are taken out of the model's epoch budget (so a two-phase recipe trains no longer).
# The previous additive loss CE + 0.5 * T^2 * KL equals, in the convex form, alpha = 1/3 with the
# early exits' weights at 1.5.
RECIPES: dict[str, list[dict[str, Any]]] = {
    "none": [{"distill": "none"}],
    "previous-default": [{"distill": "final", "alpha": 1 / 3, "temperature": 4.0, "early_weight": 1.5}],
    "convex": [{"distill": "final", "alpha": 0.5, "temperature": 4.0}],
    "convex-a0.2": [{"distill": "final", "alpha": 0.2, "temperature": 4.0}],
    "convex-t2": [{"distill": "final", "alpha": 0.5, "temperature": 2.0}],
    "convex-warmup": [{"distill": "final", "alpha": 0.5, "temperature": 4.0, "distill_warmup": 2.0}],
    "convex-final-weighted": [{"distill": "final", "alpha": 0.5, "temperature": 4.0, "final_weight": "sum"}],
    "convex-gradscale": [{"distill": "final", "alpha": 0.5, "temperature": 4.0, "exit_grad_scale": 0.3}],
    "two-phase": [
        {"distill": "none", "epochs": -1},
        {"frozen": True, "epochs": 1, "distill": "final", "alpha": 0.5, "temperature": 4.0},
    ],
    "two-phase-ce": [{"distill": "none", "epochs": -1}, {"frozen": True, "epochs": 1, "distill": "none"}],
}
STAGES: dict[str, dict[str, Any]] = {
    "screen": {"models": ["lenet5"], "recipes": list(RECIPES)},
    "confirm": {
        "models": ["resnet18-w8-3ep-noaug"],
        "recipes": ["none", "previous-default", "convex-a0.2", "two-phase", "two-phase-ce"],
    },
    "demo": {"models": ["lenet5-8ep-noaug", "lenet5-10ep-noaug"], "recipes": ["none"]},
}
MARGINS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
BUDGET = 0.01


def phase_configs(model: str, recipe: str, seed: int, run_dir: Path) -> list:
    """The TrainConfig of each phase of one run."""
    from branchy_tee.train.trainer import TrainConfig

    spec = MODELS[model]
    phases = RECIPES[recipe]
    frozen_epochs = sum(p["epochs"] for p in phases if p.get("frozen"))
    configs: list = []
    for i, phase in enumerate(phases):
        p = dict(phase)
        frozen = p.pop("frozen", False)
        epochs = p.pop("epochs", spec["epochs"])
        if epochs < 0:
            epochs = spec["epochs"] - frozen_epochs
        early, final = p.pop("early_weight", 1.0), p.pop("final_weight", 1.0)
        out = run_dir if i == len(phases) - 1 else run_dir / f"phase{i + 1}"
        extra = {k: v for k, v in spec.items() if k not in ("net", "model_config", "epochs")}  # lr, batch size, ...
        common = dict(
            dataset="fashion-mnist",
            epochs=epochs,
            num_workers=0,
            out=str(out),
            seed=seed,
            quiet=True,
            patience=epochs,
            **extra,
        )
        if frozen:
            cfg = TrainConfig(attach_exits=str(configs[-1].out), **common, **p)
        else:
            cfg = TrainConfig(net=spec["net"], model_config=dict(spec["model_config"]), **common, **p)
        if early != 1.0 or final != 1.0:
            from branchy_tee.models import create_model

            k = create_model(spec["net"], num_classes=10, in_channels=1, **spec["model_config"]).num_exits
            final_w = (k - 1) * early if final == "sum" else final
            cfg.exit_weights = [early] * (k - 1) + [final_w]
        configs.append(cfg)
    return configs


def run_one(model: str, recipe: str, seed: int, root: Path) -> dict:
    from branchy_tee.evaluate.exits import collect_log_probs, costs_of, load_split, stage_graphs
    from branchy_tee.models.rundir import read_model_card
    from branchy_tee.train.trainer import fit

    run_dir = root / model / recipe / f"seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    t0 = time.time()
    for cfg in phase_configs(model, recipe, seed, run_dir):
        fit(cfg)
    train_seconds = time.time() - t0
    card = read_model_card(run_dir)
    stages = stage_graphs(run_dir, show=False)  # what the enclave runs, as calibration and eval use it
    logits = {}
    for split in ("val", "test"):
        lg, labels = collect_log_probs(stages, load_split(card, split), show=False)
        logits[split] = {"logits": lg, "labels": labels}
    torch.save(logits, run_dir / "logits.pt")
    test = logits["test"]
    result = {
        "model": model,
        "recipe": recipe,
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "test_exit_accuracy": [float((lg.argmax(1) == test["labels"]).float().mean()) for lg in test["logits"]],
        "costs": costs_of(card)[1],
    }
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


# --------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/seed*/result.json"))]


def accuracy_table(rows: list[dict]) -> str:
    lines = [
        "| model | recipe | seeds | test accuracy per exit, mean ± std (%) | mean early exit | final exit | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["recipe"]), []).append(r)
    for (model, recipe), rs in groups.items():
        k = len(rs[0]["test_exit_accuracy"])
        per_exit = " / ".join(_mean_std([r["test_exit_accuracy"][j] for r in rs]) for j in range(k))
        early = _mean_std([statistics.mean(r["test_exit_accuracy"][:-1]) for r in rs])
        final = _mean_std([r["test_exit_accuracy"][-1] for r in rs])
        minutes = statistics.mean(r["train_seconds"] for r in rs) / 60
        lines.append(f"| {model} | {recipe} | {len(rs)} | {per_exit} | {early} | {final} | {minutes:.1f} |")
    return "\n".join(lines)


def load_logits(path: Path) -> dict:
    """A run's stored validation and test outputs as log-probabilities: runs made before the stage
    graphs stored raw logits, and log_softmax leaves log-probabilities as they are."""
    stored = torch.load(path, weights_only=True)
    return {
        split: {"logits": [lg.float().log_softmax(1) for lg in v["logits"]], "labels": v["labels"]}
        for split, v in stored.items()
    }


def calibration_table(root: Path, rows: list[dict], criterion_name: str = "entropy", val_sizes=(None, 3000)) -> str:
    """How often the calibrated setting met the budget on test, per margin and validation size
    (smaller validation sets are the first samples of the run's own)."""
    from branchy_tee.evaluate.calibrate import candidate_thresholds, choose, shared_threshold_settings
    from branchy_tee.evaluate.exits import run_setting
    from branchy_tee.tee.criteria import criterion as criterion_named

    criterion = criterion_named(criterion_name)

    lines = [
        "| validation samples | margin (SE) | budget met on test | worst test loss (points) | mean test loss "
        "| mean cost |",
        "|---|---|---|---|---|---|",
    ]
    loaded = [(r, load_logits(root / r["model"] / r["recipe"] / f"seed{r['seed']}" / "logits.pt")) for r in rows]
    for size in val_sizes:
        outcomes: dict[float, list[tuple[float, float]]] = {m: [] for m in MARGINS}
        for r, lg in loaded:
            val_logits, val_labels = lg["val"]["logits"], lg["val"]["labels"]
            if size is not None:
                val_logits, val_labels = [v[:size] for v in val_logits], val_labels[:size]
            final = float((val_logits[-1].argmax(1) == val_labels).float().mean())
            candidates = shared_threshold_settings(
                val_logits, val_labels, r["costs"], criterion, candidate_thresholds(val_logits, criterion)
            )
            for margin in MARGINS:
                chosen = choose(candidates, final, BUDGET, margin)
                test = run_setting(
                    lg["test"]["logits"], lg["test"]["labels"], criterion, chosen["thresholds"], r["costs"]
                )
                outcomes[margin].append(
                    (r["test_exit_accuracy"][-1] - test["accuracy"], test["mean_flops"] / r["costs"][-1])
                )
        shown = size or len(loaded[0][1]["val"]["labels"])
        for margin, res in outcomes.items():
            losses = [loss for loss, _ in res]
            held = sum(loss <= BUDGET + 1e-12 for loss in losses)
            lines.append(
                f"| {shown} | {margin} | {held}/{len(res)} | {100 * max(losses):.2f} | "
                f"{100 * statistics.mean(losses):.2f} | {statistics.mean(c for _, c in res):.3f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    ap.add_argument("--recipes", help="comma-separated recipes instead of the stage's")
    ap.add_argument("--models", help="comma-separated models instead of the stage's")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--out", default="runs/distill-study", help="where runs and the report go (default runs/distill-study)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--report", action="store_true", help="only write the report from finished runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    if not args.report:
        stages = list(STAGES) if args.stage == "all" else [args.stage]
        for stage in stages:
            models = args.models.split(",") if args.models else STAGES[stage]["models"]
            recipes = args.recipes.split(",") if args.recipes else STAGES[stage]["recipes"]
            for seed in (int(s) for s in args.seeds.split(",")):  # seeds outermost: every recipe gets seed 0 first
                for model in models:
                    for recipe in recipes:
                        r = run_one(model, recipe, seed, root)
                        accs = " / ".join(f"{100 * a:.2f}" for a in r["test_exit_accuracy"])
                        print(f"{model} {recipe} seed {seed}: {accs} ({r['train_seconds']:.0f} s)", flush=True)
    rows = results(root)
    if not rows:
        print("no finished runs", file=sys.stderr)
        return 1
    report = (
        f"## Test accuracy\n\n{accuracy_table(rows)}\n\n## Calibration on test\n\n{calibration_table(root, rows)}\n"
    )
    (root / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
