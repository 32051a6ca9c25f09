"""Choose exit thresholds on the validation split: the cheapest setting within an accuracy budget.

Candidates share one threshold across the early exits: a free threshold per exit overfits the
validation set (measured on Fashion-MNIST: per-exit thresholds lost 1.1-1.8 points on test where one
shared threshold lost ~1.0). The chosen setting must also keep a margin of ``DEFAULT_MARGIN_SE``
standard errors of the paired accuracy difference (calibrated vs final exit, on validation): over
the 47 runs of the distillation study (docs/training.md), a margin of 1 met the 1-point budget on the
test split in 39 runs (worst loss 1.20 points), a margin of 2.5 in all 47 (worst 0.89 points) for
1.8 % more FLOPs on average.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..runtime.criteria import check_criterion, confident, exit_scores, never_exit_threshold
from .exits import collect_logits, costs_of

# How many standard errors of the paired accuracy difference the choice keeps in hand (measured: see
# the module docstring).
DEFAULT_MARGIN_SE = 2.5


def candidate_thresholds(logits, criterion: str, points: int = 400) -> list[float]:
    """Quantiles of the early exits' scores (so the grid is dense where the samples are), plus
    'never exit early'."""
    scores = torch.cat([exit_scores(lg, criterion) for lg in logits[:-1]]).double()
    qs = torch.quantile(scores, torch.linspace(0, 1, points, dtype=torch.float64)).tolist()
    return [never_exit_threshold(criterion)] + sorted(set(qs))


def paired_standard_error(correct_a: torch.Tensor, correct_b: torch.Tensor) -> float:
    """Standard error of mean(correct_a - correct_b) over the same samples."""
    d = correct_a.double() - correct_b.double()
    n = len(d)
    return float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0


def shared_threshold_settings(logits, labels, costs: list[int], criterion: str, thresholds) -> list[dict]:
    """Every candidate: one threshold shared by the early exits, its accuracy, mean cost, exit fractions
    and the standard error of its accuracy difference to the final exit.

    The decision is the runtime's (``evaluate.exits.decide``: the first exit whose score passes
    answers), computed here from scores and predictions taken once, since hundreds of candidates are
    tried; a test checks that the two agree.
    """
    k_final = len(logits) - 1
    scores = [exit_scores(lg, criterion) for lg in logits[:-1]]
    correct = torch.stack([lg.argmax(1) == labels for lg in logits])  # (K, N)
    n = len(labels)
    out = []
    for t in thresholds:
        exit_idx = torch.full((n,), k_final, dtype=torch.long)
        undecided = torch.ones(n, dtype=torch.bool)
        for k in range(k_final):
            take = undecided & confident(scores[k], t, criterion)
            exit_idx[take] = k
            undecided &= ~take
        right = correct.gather(0, exit_idx.view(1, -1)).squeeze(0)
        counts = torch.bincount(exit_idx, minlength=k_final + 1).tolist()
        out.append({
            "criterion": criterion, "thresholds": [float(t)] * k_final,
            "accuracy": float(right.float().mean()),
            "mean_flops": float(sum(c * costs[k] for k, c in enumerate(counts)) / n),
            "exit_fractions": [c / n for c in counts],
            "standard_error": paired_standard_error(right, correct[-1]),
        })  # fmt: skip
    return out


def choose(candidates: list[dict], final_accuracy: float, max_accuracy_drop: float, margin_se: float) -> dict:
    """The selection rule: the cheapest candidate whose accuracy, less ``margin_se`` standard errors,
    is at least the final exit's less the budget. 'Never exit early' always qualifies (difference 0)."""
    eligible = [c for c in candidates
                if c["accuracy"] - margin_se * c["standard_error"] >= final_accuracy - max_accuracy_drop - 1e-12]
    return min(eligible, key=lambda c: (c["mean_flops"], -c["accuracy"]))


def calibrate(logits, labels, costs: list[int], criterion="entropy", max_accuracy_drop=0.01, margin_se=DEFAULT_MARGIN_SE) -> dict:
    """Pick the cheapest shared threshold whose validation accuracy is at least
    final-exit accuracy - ``max_accuracy_drop`` (+ ``margin_se`` standard errors).

    Returns the choice and the whole candidate list (each with ``eligible``), so that callers can check it.
    """
    check_criterion(criterion)
    final_acc = float((logits[-1].argmax(1) == labels).float().mean())
    candidates = shared_threshold_settings(logits, labels, costs, criterion, candidate_thresholds(logits, criterion))
    best = choose(candidates, final_acc, max_accuracy_drop, margin_se)
    for c in candidates:
        c["eligible"] = c["accuracy"] - margin_se * c["standard_error"] >= final_acc - max_accuracy_drop - 1e-12
    return {
        "criterion": criterion,
        "thresholds": best["thresholds"],
        "accuracy": best["accuracy"],
        "mean_flops": best["mean_flops"],
        "exit_fractions": best["exit_fractions"],
        "final_accuracy": final_acc,
        "full_flops": costs[-1],
        "max_accuracy_drop": max_accuracy_drop,
        "margin_se": margin_se,
        "candidates": candidates,
    }


def calibrate_run(run_dir, max_accuracy_drop=0.01, criterion=None, margin_se=DEFAULT_MARGIN_SE, device="cpu",
                  dataset=None, data_dir=None, max_batches=None, val_set=None, show=True) -> dict:
    """Calibrate a run directory on its validation split and write the thresholds into model.json."""
    from ..rundir import load_run, update_model_json
    from .exits import load_split

    model, meta = load_run(run_dir)
    criterion = criterion or meta.get("criterion") or "entropy"
    val = val_set if val_set is not None else load_split(meta, "val", dataset, data_dir)
    logits, labels = collect_logits(model, val, device=device, max_batches=max_batches, show=show)
    exit_f, cost = costs_of(meta)
    # The saving is reported against the plain full model (no early-exit heads at all).
    result = calibrate(logits, labels, cost, criterion, max_accuracy_drop, margin_se)
    result["full_flops"] = exit_f[-1]
    update_model_json(Path(run_dir), criterion=criterion, thresholds=result["thresholds"],
                      calibration={k: v for k, v in result.items() if k != "candidates"} | {"samples": len(labels)})
    return result
