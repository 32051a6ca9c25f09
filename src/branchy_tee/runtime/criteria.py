"""The exit criterion: when is an exit confident enough to answer?

One implementation, used by the enclave runtime, by evaluation and by calibration, so that the
decision measured offline is exactly the decision made in the enclave.

- ``entropy``: normalised entropy H(p)/log(C) in [0, 1]; exit when it is <= the threshold.
- ``maxprob``: the largest softmax probability; exit when it is >= the threshold.
"""

from __future__ import annotations

import math

import torch

from ..choices import CRITERIA


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown exit criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    return criterion


def exit_scores(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-sample confidence score of one exit's logits (N, C) -> (N,)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return scores_from_log_probs(logp, logp.max(dim=1).values, criterion)


def scores_from_log_probs(logp: torch.Tensor, max_logp: torch.Tensor, criterion: str) -> torch.Tensor:
    """The score from log-probabilities (N, C) and their row maxima (N,), computed once by the caller."""
    if criterion == "entropy":
        return -(logp.exp() * logp).sum(dim=1) / math.log(logp.shape[1])
    if criterion == "maxprob":
        return max_logp.exp()
    raise ValueError(f"unknown exit criterion {criterion!r}")


def confident(scores: torch.Tensor, threshold: float, criterion: str) -> torch.Tensor:
    """Boolean mask of samples whose score passes ``threshold``."""
    return scores <= threshold if criterion == "entropy" else scores >= threshold


def always_exit_threshold(criterion: str) -> float:
    """A threshold every sample passes (normalised entropy <= 1 and probability >= 0, with room for rounding)."""
    return 2.0 if criterion == "entropy" else -1.0


def never_exit_threshold(criterion: str) -> float:
    """A threshold no sample passes (entropy >= 0 and probability <= 1 always)."""
    return -1.0 if criterion == "entropy" else 2.0
