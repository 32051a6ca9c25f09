"""Per-exit evaluation: accuracy, cost, the early-exit decision at given thresholds, sweeps, oracle.

Everything here works on the logits of *all* exits collected once; the early-exit decision is then
simulated with the runtime's own criterion (``runtime.criteria``), so what is reported is what the
enclave will do.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import ImageDataset, load_dataset, train_val_split
from ..data.transforms import eval_transform
from ..errors import BranchyError
from ..models.cost import early_exit_cost, exit_flops_from_parts
from ..runtime.criteria import confident, exit_scores, never_exit_threshold


# --------------------------------------------------------------------------- data for a trained run
def load_split(meta: dict, split: str, dataset: str | None = None, data_dir=None, download: bool = False) -> ImageDataset:
    """The run's validation split ('val', carved from the training set exactly as in training)
    or the test split ('test'), preprocessed as the model expects; checks that it fits the model."""
    data = meta["data"]
    name = dataset or data["dataset"]
    synthetic = data.get("synthetic") if name == "synthetic" else None
    full = load_dataset(name, "train" if split == "val" else "test", data_dir, download, synthetic)
    shape = list(full.input_shape)
    if shape[0] != meta["config"]["in_channels"]:
        raise BranchyError(f"dataset {name} has {shape[0]}-channel images; the model expects {meta['config']['in_channels']}")
    if full.num_classes != meta["config"]["num_classes"]:
        raise BranchyError(f"dataset {name} has {full.num_classes} classes; the model has {meta['config']['num_classes']}")
    if shape != meta["preprocessing"]["input_shape"]:
        raise BranchyError(f"dataset {name} has {shape} images; the model was trained on {meta['preprocessing']['input_shape']}")
    pre = meta["preprocessing"]
    transform = eval_transform(pre["mean"], pre["std"])
    if split == "val":
        _, val_idx = train_val_split(len(full), data["val_fraction"], seed=data["seed"])
        return full.subset(val_idx, transform)
    full.transform = transform
    return full


@torch.no_grad()
def collect_logits(model, dataset, batch_size: int = 256, device="cpu", max_batches=None, show=True):
    """(list of per-exit logits (N, C), labels (N,)) for the whole dataset in eval mode."""
    from tqdm import tqdm

    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    per_exit, labels = None, []
    for i, (x, y) in enumerate(tqdm(loader, total=total, desc="collect logits", leave=False, disable=None if show else True)):
        if i >= total:
            break
        outs = [o.float().cpu() for o in model(x.to(device))]
        per_exit = [[o] for o in outs] if per_exit is None else [acc + [o] for acc, o in zip(per_exit, outs)]
        labels.append(y)
    if per_exit is None:
        raise BranchyError("the dataset is empty")
    return [torch.cat(chunks) for chunks in per_exit], torch.cat(labels)


# --------------------------------------------------------------------------- decisions
def decide(logits: list[torch.Tensor], criterion: str, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """(exit index, predicted label) per sample under the early-exit rule: the first exit whose
    confidence passes its threshold answers; the final exit answers everything left."""
    n, k_final = len(logits[0]), len(logits) - 1
    exit_idx = torch.full((n,), k_final, dtype=torch.long)
    undecided = torch.ones(n, dtype=torch.bool)
    for k in range(k_final):
        take = undecided & confident(exit_scores(logits[k], criterion), thresholds[k], criterion)
        exit_idx[take] = k
        undecided &= ~take
    preds = torch.stack([lg.argmax(1) for lg in logits])  # (K, N)
    return exit_idx, preds.gather(0, exit_idx.view(1, -1)).squeeze(0)


def summarize(exit_idx, preds, labels, costs: list[int]) -> dict:
    counts = torch.bincount(exit_idx, minlength=len(costs)).tolist()
    n = len(labels)
    return {
        "accuracy": float((preds == labels).float().mean()),
        "mean_flops": float(sum(c * costs[k] for k, c in enumerate(counts)) / n),
        "exit_fractions": [c / n for c in counts],
    }


def run_setting(logits, labels, criterion, thresholds, costs) -> dict:
    exit_idx, preds = decide(logits, criterion, thresholds)
    return {"criterion": criterion, "thresholds": list(map(float, thresholds)), **summarize(exit_idx, preds, labels, costs)}


def oracle(logits, labels, costs) -> dict:
    """Every sample at its cheapest correct exit (the final exit when none is correct): the bound."""
    correct = torch.stack([lg.argmax(1) == labels for lg in logits])  # (K, N)
    any_correct = correct.any(0)
    first = torch.where(any_correct, correct.float().argmax(0), torch.full_like(labels, len(logits) - 1))
    cost = torch.tensor(costs, dtype=torch.float64)[first]
    return {"accuracy": float(any_correct.float().mean()), "mean_flops": float(cost.mean()),
            "exit_fractions": (torch.bincount(first, minlength=len(logits)).float() / len(labels)).tolist()}


def threshold_grid(criterion: str, points: int = 41) -> list[float]:
    grid = torch.linspace(0.0, 1.0, points).tolist()
    return [never_exit_threshold(criterion)] + grid


def sweep(logits, labels, criterion, costs, thresholds=None) -> list[dict]:
    """One shared threshold for every early exit, over a grid (plus 'never exit early')."""
    k = len(logits) - 1
    out = []
    for t in thresholds or threshold_grid(criterion):
        s = run_setting(logits, labels, criterion, [t] * k, costs)
        out.append({"threshold": t, **{key: s[key] for key in ("accuracy", "mean_flops", "exit_fractions")}})
    return out


# --------------------------------------------------------------------------- latency
@torch.inference_mode()
def exit_latency_ms(model, input_shape, reps: int = 20, warmup: int = 3) -> list[float]:
    """Median batch-1 latency to reach each exit (stages 0..k and head k), in milliseconds."""
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


# --------------------------------------------------------------------------- the report
def costs_of(meta: dict) -> tuple[list[int], list[int]]:
    """(exit_flops, early-exit cost per exit) from model.json."""
    return exit_flops_from_parts(meta["stage_flops"], meta["head_flops"]), early_exit_cost(meta["stage_flops"], meta["head_flops"])


def evaluate_run(run_dir: str | Path, dataset=None, data_dir=None, device="cpu", max_batches=None,
                 latency_reps: int = 20, show=True) -> dict:
    from ..rundir import load_run

    model, meta = load_run(run_dir)
    test = load_split(meta, "test", dataset, data_dir)
    logits, labels = collect_logits(model, test, device=device, max_batches=max_batches, show=show)
    model.to("cpu")
    exit_f, cost = costs_of(meta)
    latency = exit_latency_ms(model, meta["preprocessing"]["input_shape"], reps=latency_reps)
    exits = [{"index": k, "accuracy": float((lg.argmax(1) == labels).float().mean()), "flops": exit_f[k], "latency_ms": latency[k]}
             for k, lg in enumerate(logits)]  # fmt: skip
    criterion = meta["criterion"]
    thresholds = meta["thresholds"] or [never_exit_threshold(criterion)] * (len(logits) - 1)
    return {
        "run": str(run_dir),
        "arch": meta["arch"],
        "samples": len(labels),
        "exits": exits,
        "final_accuracy": exits[-1]["accuracy"],
        "full_flops": exit_f[-1],
        "calibrated": {**run_setting(logits, labels, criterion, thresholds, cost), "calibrated": meta["thresholds"] is not None},
        "oracle": oracle(logits, labels, cost),
        "sweep": sweep(logits, labels, criterion, cost),
    }
