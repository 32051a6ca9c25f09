"""Choose exit thresholds on the validation split: the cheapest setting within an accuracy budget.

Candidates share one threshold across the early exits. Fitting a free threshold per exit overfits
the validation set (measured on Fashion-MNIST: per-exit thresholds lost 1.1-1.8 points on test where
one shared threshold lost ~1.0), so we keep a single free parameter, and by default also demand a
margin of one standard error of the paired accuracy difference, so that the budget is met on
unseen data with good probability, not just on the validation set.
"""

from __future__ import annotations

import math

import torch

from ..runtime.criteria import Criterion
from ..runtime.criteria import criterion as criterion_named
from .exits import collect_log_probs, costs_of, decide, exit_scores, run_setting, stage_graphs


def candidate_thresholds(logits, criterion: Criterion, points: int = 400) -> list[float]:
    """Quantiles of the early exits' scores (so the grid is dense where the samples are), plus
    'never exit early'."""
    scores = torch.cat([exit_scores(lg, criterion) for lg in logits[:-1]]).double()
    qs = torch.quantile(scores, torch.linspace(0, 1, points, dtype=torch.float64)).tolist()
    return [criterion.never] + sorted(set(qs))


def paired_standard_error(correct_a: torch.Tensor, correct_b: torch.Tensor) -> float:
    """Standard error of mean(correct_a - correct_b) over the same samples."""
    d = correct_a.double() - correct_b.double()
    n = len(d)
    return float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0


def calibrate(logits, labels, costs: list[int], criterion: Criterion | str = "entropy", max_accuracy_drop=0.01,
              margin_se=1.0) -> dict:
    """Pick the cheapest shared threshold whose validation accuracy is at least
    final-exit accuracy - ``max_accuracy_drop`` (+ ``margin_se`` standard errors).

    Returns the choice and the whole candidate list (each with ``eligible``), so that callers can check it.
    """
    criterion = criterion_named(criterion)
    k = len(logits) - 1
    final_correct = logits[-1].argmax(1) == labels
    final_acc = float(final_correct.float().mean())
    candidates = []
    for t in candidate_thresholds(logits, criterion):
        exit_idx, preds = decide(logits, criterion, [t] * k)
        correct = preds == labels
        acc = float(correct.float().mean())
        se = paired_standard_error(correct, final_correct)
        setting = run_setting(logits, labels, criterion, [t] * k, costs)
        setting["eligible"] = acc - margin_se * se >= final_acc - max_accuracy_drop - 1e-12
        setting["standard_error"] = se
        candidates.append(setting)
    eligible = [c for c in candidates if c["eligible"]]  # never-exit is always eligible (difference 0)
    best = min(eligible, key=lambda c: (c["mean_flops"], -c["accuracy"]))
    return {
        "criterion": criterion.name,
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


def calibrate_run(run_dir, max_accuracy_drop=0.01, criterion=None, margin_se=1.0, device="cpu",
                  dataset=None, data_dir=None, max_batches=None, val_set=None, show=True) -> dict:
    """Calibrate a run directory on its validation split and write the thresholds into model.json.

    The scores are those of the run's exported stage graphs run by the enclave's engine (exported
    first if missing or stale): the thresholds are chosen on the numbers the enclave computes.
    ``device`` is accepted for callers and unused: the graphs run on ONNX Runtime's CPU provider, as
    in the enclave."""
    from ..modelcard import Calibration
    from ..rundir import read_model_card, write_model_card
    from .exits import load_split

    card = read_model_card(run_dir)
    criterion = criterion_named(criterion or card.criterion)
    val = val_set if val_set is not None else load_split(card, "val", dataset, data_dir)
    logits, labels = collect_log_probs(stage_graphs(run_dir, show=show), val, max_batches=max_batches, show=show)
    exit_f, cost = costs_of(card)
    # The saving is reported against the plain full model (no early-exit heads at all).
    result = calibrate(logits, labels, cost, criterion, max_accuracy_drop, margin_se)
    result["full_flops"] = exit_f[-1]
    record = {k: v for k, v in result.items() if k != "candidates"} | {"criterion": criterion, "samples": len(labels)}
    write_model_card(run_dir, card.replace(criterion=criterion, thresholds=tuple(result["thresholds"]),
                                           calibration=Calibration(**record)))
    return result
