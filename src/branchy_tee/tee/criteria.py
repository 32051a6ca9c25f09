"""The exit criterion: when is an exit confident enough to answer?

One implementation, used by the enclave runtime, by evaluation and by calibration, so that the
decision measured offline is exactly the decision made in the enclave. It works on the exit's
log-probabilities as the stage graph outputs them (numpy float32), never on re-normalised logits:
evaluation and calibration score the very numbers the enclave scores.

- ``entropy``: normalised entropy H(p)/log(C) in [0, 1]; exit when it is <= the threshold.
- ``maxprob``: the largest softmax probability; exit when it is >= the threshold.

A model card and a bundle header hold the criterion as its name; :func:`criterion` turns the name
into the object. Standard library and numpy only (enclave side); numpy is imported where a score is
computed, so that the command line can offer the names without loading it.
"""

from __future__ import annotations

import math
from typing import Any

from branchy_tee.core.errors import BranchyError


class Criterion:
    """One exit criterion: a per-sample score of an exit's log-probabilities and the rule that
    compares it with a threshold."""

    name: str
    always: float  # a threshold every sample passes
    never: float  # a threshold no sample passes

    def score(self, log_probs: Any) -> Any:
        """Per-sample confidence score of one exit's log-probabilities (N, C) -> (N,) float32."""
        raise NotImplementedError

    def passes(self, scores: Any, threshold: float) -> Any:
        """Boolean mask of the samples whose score passes ``threshold``."""
        raise NotImplementedError

    def to_json(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"criterion({self.name!r})"


class _Entropy(Criterion):
    name = "entropy"
    always = 2.0  # normalised entropy is <= 1, with room for rounding
    never = -1.0  # and >= 0

    def score(self, log_probs: Any) -> Any:
        import numpy as np

        return (np.exp(log_probs) * log_probs).sum(axis=1) / -math.log(log_probs.shape[1])

    def passes(self, scores: Any, threshold: float) -> Any:
        return scores <= threshold


class _MaxProb(Criterion):
    name = "maxprob"
    always = -1.0  # a probability is >= 0
    never = 2.0  # and <= 1

    def score(self, log_probs: Any) -> Any:
        import numpy as np

        return np.exp(log_probs.max(axis=1))

    def passes(self, scores: Any, threshold: float) -> Any:
        return scores >= threshold


ENTROPY, MAXPROB = _Entropy(), _MaxProb()
_BY_NAME: dict[str, Criterion] = {c.name: c for c in (ENTROPY, MAXPROB)}
NAMES = tuple(_BY_NAME)  # what --criterion offers


def criterion(name: object, where: str = "") -> Criterion:
    """The criterion called ``name`` (a Criterion is returned as it is); one-line BranchyError for
    any other name."""
    if isinstance(name, Criterion):
        return name
    found = _BY_NAME.get(name) if isinstance(name, str) else None
    if found is None:
        prefix = f"{where}: " if where else ""
        raise BranchyError(f"{prefix}unknown exit criterion {ascii(str(name)[:40])}; choose one of: {', '.join(NAMES)}")
    return found
