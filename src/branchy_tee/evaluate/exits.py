"""Per-exit evaluation: accuracy, cost, the early-exit decision at given thresholds, sweeps, oracle.

What is evaluated is what is sealed: the run's exported stage graphs (``export.onnx``), run on ONNX
Runtime by the enclave's own engine (``tee.engine``). The log-probabilities of *all* exits are
collected once through it; the early-exit decision is then simulated with the runtime's own
criterion (``tee.criteria``) on those very numbers, so what is reported is what the enclave
will do (every operation of a stage graph is per-sample, so a sample's numbers do not depend on the
batch it shares).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from branchy_tee.core.errors import BranchyError
from branchy_tee.data import ImageDataset, load_dataset, train_val_split
from branchy_tee.data.transforms import eval_transform
from branchy_tee.models.card import ModelCard
from branchy_tee.models.cost import early_exit_cost, exit_flops_from_parts
from branchy_tee.tee.criteria import ENTROPY, Criterion
from branchy_tee.tee.engine import early_exit


# --------------------------------------------------------------------------- data for a trained run
def load_split(
    card: ModelCard, split: str, dataset: str | None = None, data_dir=None, download: bool = False
) -> ImageDataset:
    """The run's validation split ('val', carved from the training set exactly as in training)
    or the test split ('test'), preprocessed as the model expects; checks that it fits the model."""
    data = card.data
    if data is None:
        raise BranchyError("the model card does not say which data set the model was trained on (no 'data')")
    name = dataset or data.dataset
    synthetic = data.synthetic if name == "synthetic" else None
    full = load_dataset(name, "train" if split == "val" else "test", data_dir, download, synthetic)
    shape = tuple(full.input_shape)
    if shape[0] != card.in_channels:
        raise BranchyError(f"dataset {name} has {shape[0]}-channel images; the model expects {card.in_channels}")
    if full.num_classes != card.num_classes:
        raise BranchyError(f"dataset {name} has {full.num_classes} classes; the model has {card.num_classes}")
    if shape != card.preprocessing.input_shape:
        trained = list(card.preprocessing.input_shape)
        raise BranchyError(f"dataset {name} has {list(shape)} images; the model was trained on {trained}")
    transform = eval_transform(card.preprocessing)
    if split == "val":
        _, val_idx = train_val_split(len(full), data.val_fraction, seed=data.seed)
        return full.subset(val_idx, transform)
    full.transform = transform
    return full


def stage_graphs(run_dir, show: bool = True) -> list:
    """The run's stage graphs (exported first if missing or stale) as the enclave runs them."""
    from branchy_tee.export.onnx import exported_graphs
    from branchy_tee.export.payload import pack
    from branchy_tee.tee.budget import run_size
    from branchy_tee.tee.graphs import StageGraph, load_session

    graphs, doc = exported_graphs(run_dir, show=show)
    return [  # the payloads seal encrypts, loaded as the enclave loads them
        StageGraph(load_session(pack(g), f"{run_dir}/onnx/{e['file']}"), e["file"], run_size(e["activation_elems"]))
        for g, e in zip(graphs, doc["stages"], strict=True)
    ]


def collect_log_probs(stages: list, dataset, batch_size: int = 256, max_batches=None, show=True):
    """(list of per-exit log-probabilities (N, C), labels (N,)) of the whole dataset: every sample
    through every stage graph, by the enclave's engine (no sample exits early)."""
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    num_exits = len(stages)
    per_exit: list[list[np.ndarray]] = [[] for _ in range(num_exits)]
    labels = []
    for i, (x, y) in enumerate(
        tqdm(loader, total=total, desc="collect log-probabilities", leave=False, disable=None if show else True)
    ):
        if i >= total:
            break
        got: list = [None] * num_exits
        n = len(x)

        def observe(k, pos, log_probs, got=got, n=n):  # bound now: called only within this iteration
            if got[k] is None:
                got[k] = np.empty((n, log_probs.shape[1]), np.float32)
            got[k][pos] = log_probs

        never = [ENTROPY.never] * (num_exits - 1)
        early_exit(stages.__getitem__, num_exits, x.numpy(), ENTROPY, never, batch_size=len(x), observe=observe)
        for k in range(num_exits):
            per_exit[k].append(got[k])
        labels.append(y)
    if not labels:
        raise BranchyError("the dataset is empty")
    return [torch.from_numpy(np.concatenate(chunks)) for chunks in per_exit], torch.cat(labels)


# --------------------------------------------------------------------------- decisions
def exit_scores(log_probs: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """Per-sample confidence score (N,) of one exit's log-probabilities (N, C): the runtime's own
    computation (``tee.criteria``), on the numbers the stage graph returned."""
    return torch.from_numpy(criterion.score(log_probs.numpy()))


def decide(logits: list[torch.Tensor], criterion: Criterion, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """(exit index, predicted label) per sample under the early-exit rule: the first exit whose
    confidence passes its threshold answers; the final exit answers everything left. ``logits``:
    each exit's log-probabilities as the stage graphs give them (``collect_log_probs``)."""
    n, k_final = len(logits[0]), len(logits) - 1
    exit_idx = torch.full((n,), k_final, dtype=torch.long)
    undecided = torch.ones(n, dtype=torch.bool)
    for k in range(k_final):
        take = undecided & criterion.passes(exit_scores(logits[k], criterion), thresholds[k])
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


def run_setting(logits, labels, criterion: Criterion, thresholds, costs) -> dict:
    exit_idx, preds = decide(logits, criterion, thresholds)
    return {
        "criterion": criterion.name,
        "thresholds": list(map(float, thresholds)),
        **summarize(exit_idx, preds, labels, costs),
    }


def oracle(logits, labels, costs) -> dict:
    """Every sample at its cheapest correct exit (the final exit when none is correct): the bound."""
    correct = torch.stack([lg.argmax(1) == labels for lg in logits])  # (K, N)
    any_correct = correct.any(0)
    first = torch.where(any_correct, correct.float().argmax(0), torch.full_like(labels, len(logits) - 1))
    cost = torch.tensor(costs, dtype=torch.float64)[first]
    return {
        "accuracy": float(any_correct.float().mean()),
        "mean_flops": float(cost.mean()),
        "exit_fractions": (torch.bincount(first, minlength=len(logits)).float() / len(labels)).tolist(),
    }


def threshold_grid(criterion: Criterion, points: int = 41) -> list[float]:
    grid = torch.linspace(0.0, 1.0, points).tolist()
    return [criterion.never] + grid


def sweep(logits, labels, criterion: Criterion, costs, thresholds=None) -> list[dict]:
    """One shared threshold for every early exit, over a grid (plus 'never exit early')."""
    k = len(logits) - 1
    out = []
    for t in thresholds or threshold_grid(criterion):
        s = run_setting(logits, labels, criterion, [t] * k, costs)
        out.append({"threshold": t, **{key: s[key] for key in ("accuracy", "mean_flops", "exit_fractions")}})
    return out


# --------------------------------------------------------------------------- latency
def forced_thresholds(criterion: Criterion, num_exits: int, k: int) -> list[float]:
    """Thresholds that send every sample out at exit k (no earlier exit passes, exit k always does)."""
    final = num_exits - 1
    return [criterion.never] * k + [criterion.always] * (final - k)


def exit_latency_ms(
    stages: list, input_shape, criterion: Criterion = ENTROPY, reps: int = 20, warmup: int = 3
) -> list[float]:
    """Median batch-1 latency of a sample that leaves at each exit, through the engine and stage
    graphs as in the enclave (stages 0..k with their heads), in milliseconds."""
    x = np.random.default_rng(0).standard_normal((1, *input_shape), dtype=np.float32)
    out = []
    for k in range(len(stages)):
        th = forced_thresholds(criterion, len(stages), k)
        for _ in range(warmup):
            early_exit(stages.__getitem__, len(stages), x, criterion, th, batch_size=1)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            early_exit(stages.__getitem__, len(stages), x, criterion, th, batch_size=1)
            times.append(time.perf_counter() - t)
        out.append(1000 * sorted(times)[len(times) // 2])
    return out


# --------------------------------------------------------------------------- the report
def costs_of(card: ModelCard) -> tuple[list[int], list[int]]:
    """(exit_flops, early-exit cost per exit) from the model card."""
    return exit_flops_from_parts(card.stage_flops, card.head_flops), early_exit_cost(card.stage_flops, card.head_flops)


def evaluate_run(
    run_dir: str | Path, dataset=None, data_dir=None, max_batches=None, latency_reps: int = 20, show=True
) -> dict:
    from branchy_tee.models.rundir import read_model_card

    card = read_model_card(run_dir)
    test = load_split(card, "test", dataset, data_dir)
    stages = stage_graphs(run_dir, show=show)
    logits, labels = collect_log_probs(stages, test, max_batches=max_batches, show=show)
    exit_f, cost = costs_of(card)
    latency = exit_latency_ms(stages, card.preprocessing.input_shape, card.criterion, reps=latency_reps)
    exits = [
        {
            "index": k,
            "accuracy": float((lg.argmax(1) == labels).float().mean()),
            "flops": exit_f[k],
            "latency_ms": latency[k],
        }
        for k, lg in enumerate(logits)
    ]
    criterion, thresholds = card.criterion, card.exit_thresholds()
    return {
        "run": str(run_dir),
        "arch": card.arch,
        "samples": len(labels),
        "exits": exits,
        "final_accuracy": exits[-1]["accuracy"],
        "full_flops": exit_f[-1],
        "calibrated": {
            **run_setting(logits, labels, criterion, thresholds, cost),
            "calibrated": card.thresholds is not None,
        },
        "oracle": oracle(logits, labels, cost),
        "sweep": sweep(logits, labels, criterion, cost),
    }
