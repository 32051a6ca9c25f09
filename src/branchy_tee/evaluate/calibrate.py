"""Choose exit thresholds on the validation split: the cheapest setting within an accuracy budget.

Candidates share one threshold across the early exits, because a free threshold per exit overfits
the validation set. The chosen setting also keeps a margin of ``DEFAULT_MARGIN_SE`` standard errors
of the paired accuracy difference (calibrated vs final exit, on validation), so that the budget
holds on unseen data (BENCHMARKS.md, "Runtime choices", has the figures that set both).
"""

from __future__ import annotations

import math

import torch

from branchy_tee.evaluate.exits import collect_log_probs, costs_of, exit_scores, stage_graphs
from branchy_tee.tee.criteria import Criterion
from branchy_tee.tee.criteria import criterion as criterion_named

# How many standard errors of the paired accuracy difference the choice keeps in hand.
DEFAULT_MARGIN_SE = 2.5


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


def shared_threshold_settings(logits, labels, costs: list[int], criterion: Criterion, thresholds) -> list[dict]:
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
            take = undecided & criterion.passes(scores[k], t)
            exit_idx[take] = k
            undecided &= ~take
        right = correct.gather(0, exit_idx.view(1, -1)).squeeze(0)
        counts = torch.bincount(exit_idx, minlength=k_final + 1).tolist()
        out.append(
            {
                "criterion": criterion.name,
                "thresholds": [float(t)] * k_final,
                "accuracy": float(right.float().mean()),
                "mean_flops": float(sum(c * costs[k] for k, c in enumerate(counts)) / n),
                "exit_fractions": [c / n for c in counts],
                "standard_error": paired_standard_error(right, correct[-1]),
            }
        )
    return out


def within_budget(candidate: dict, final_accuracy: float, max_accuracy_drop: float, margin_se: float) -> bool:
    """Whether the candidate's accuracy, less ``margin_se`` standard errors, is at least the final
    exit's less the budget."""
    kept = candidate["accuracy"] - margin_se * candidate["standard_error"]
    return kept >= final_accuracy - max_accuracy_drop - 1e-12


def choose(candidates: list[dict], final_accuracy: float, max_accuracy_drop: float, margin_se: float) -> dict:
    """The selection rule: the cheapest candidate within the budget (``within_budget``). 'Never exit
    early' always qualifies (difference 0)."""
    eligible = [c for c in candidates if within_budget(c, final_accuracy, max_accuracy_drop, margin_se)]
    return min(eligible, key=lambda c: (c["mean_flops"], -c["accuracy"]))


def calibrate(
    logits,
    labels,
    costs: list[int],
    criterion: Criterion | str = "entropy",
    max_accuracy_drop=0.01,
    margin_se=DEFAULT_MARGIN_SE,
) -> dict:
    """Pick the cheapest shared threshold whose validation accuracy is at least
    final-exit accuracy - ``max_accuracy_drop`` (+ ``margin_se`` standard errors).

    Returns the choice and the whole candidate list (each with ``eligible``), so that callers can check it.
    """
    criterion = criterion_named(criterion)
    final_acc = float((logits[-1].argmax(1) == labels).float().mean())
    candidates = shared_threshold_settings(logits, labels, costs, criterion, candidate_thresholds(logits, criterion))
    best = choose(candidates, final_acc, max_accuracy_drop, margin_se)
    for c in candidates:
        c["eligible"] = within_budget(c, final_acc, max_accuracy_drop, margin_se)
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


def _fall_back_to_the_full_model(result: dict, show: bool) -> None:
    """No setting within the budget costs less than the full model alone (the heads cost more than
    the exits save): keep the cheapest (every other setting, 'never exit early' included, runs the
    heads too and costs more), and say so: early exit does not pay for this model."""
    import sys

    cheapest = result["mean_flops"] / result["full_flops"]
    result["warning"] = (
        f"no exit setting within the budget is cheaper than the full model (the cheapest, stored, costs "
        f"{cheapest:.2f}x its FLOPs): early exit does not pay here; train longer, or use `predict --full-model`"
    )
    if show:
        print(f"warning: {result['warning']}", file=sys.stderr)


def calibrate_run(
    run_dir,
    max_accuracy_drop=0.01,
    criterion=None,
    margin_se=DEFAULT_MARGIN_SE,
    device="cpu",
    dataset=None,
    data_dir=None,
    max_batches=None,
    val_set=None,
    show=True,
) -> dict:
    """Calibrate a run directory on its validation split and write the thresholds into model.json.

    The scores are those of the run's exported stage graphs run by the enclave's engine (exported
    first if missing or stale): the thresholds are chosen on the numbers the enclave computes.
    ``device`` is accepted for callers and unused: the graphs run on ONNX Runtime's CPU provider, as
    in the enclave."""
    from branchy_tee.evaluate.exits import load_split
    from branchy_tee.models.card import Calibration
    from branchy_tee.models.rundir import read_model_card, write_model_card

    card = read_model_card(run_dir)
    criterion = criterion_named(criterion or card.criterion)
    val = val_set if val_set is not None else load_split(card, "val", dataset, data_dir)
    logits, labels = collect_log_probs(stage_graphs(run_dir, show=show), val, max_batches=max_batches, show=show)
    exit_f, cost = costs_of(card)
    # The saving is reported against the plain full model (no early-exit heads at all).
    result = calibrate(logits, labels, cost, criterion, max_accuracy_drop, margin_se)
    result["full_flops"] = exit_f[-1]
    if result["mean_flops"] >= exit_f[-1]:
        _fall_back_to_the_full_model(result, show)
    record = {k: v for k, v in result.items() if k not in ("candidates", "warning")}
    record |= {"criterion": criterion, "samples": len(labels)}
    write_model_card(
        run_dir,
        card.replace(criterion=criterion, thresholds=tuple(result["thresholds"]), calibration=Calibration(**record)),
    )
    return result
