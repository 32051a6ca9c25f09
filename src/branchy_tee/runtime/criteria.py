"""The exit criterion: when is an exit confident enough to answer?

One implementation, used by the enclave runtime, by evaluation and by calibration, so that the
decision measured offline is exactly the decision made in the enclave. It works on the exit's
log-probabilities as the stage graph outputs them (numpy float32), never on re-normalised logits:
evaluation and calibration score the very numbers the enclave scores.

- ``entropy``: normalised entropy H(p)/log(C) in [0, 1]; exit when it is <= the threshold.
- ``maxprob``: the largest softmax probability; exit when it is >= the threshold.

Standard library and numpy only (enclave side).
"""

from __future__ import annotations

import math

import numpy as np

from ..choices import CRITERIA


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown exit criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    return criterion


def scores_from_log_probs(log_probs: np.ndarray, criterion: str) -> np.ndarray:
    """Per-sample confidence score of one exit's log-probabilities (N, C) -> (N,) float32."""
    if criterion == "entropy":
        return (np.exp(log_probs) * log_probs).sum(axis=1) / -math.log(log_probs.shape[1])
    if criterion == "maxprob":
        return np.exp(log_probs.max(axis=1))
    raise ValueError(f"unknown exit criterion {criterion!r}")


def confident(scores: np.ndarray, threshold: float, criterion: str) -> np.ndarray:
    """Boolean mask of samples whose score passes ``threshold``."""
    return scores <= threshold if criterion == "entropy" else scores >= threshold


def always_exit_threshold(criterion: str) -> float:
    """A threshold every sample passes (normalised entropy <= 1 and probability >= 0, with room for rounding)."""
    return 2.0 if criterion == "entropy" else -1.0


def never_exit_threshold(criterion: str) -> float:
    """A threshold no sample passes (entropy >= 0 and probability <= 1 always)."""
    return -1.0 if criterion == "entropy" else 2.0
