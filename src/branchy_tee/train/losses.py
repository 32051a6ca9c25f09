"""The multi-exit training loss: per-exit cross-entropy, with distillation into the early exits.

    L = sum_{k < final} w_k * [(1 - alpha) * CE(exit_k, y) + alpha * T^2 * KL(softmax(teacher/T) || softmax(exit_k/T))]
        + w_final * CE(final exit, y)

The teacher is the final exit (detached: the early exits learn from it, it does not learn from them)
or a separately trained model. T^2 keeps the gradient scale of the soft term independent of T
(Hinton et al. 2015). The convex weighting keeps each early exit's total weight at w_k whatever
alpha is, so switching distillation on does not also shift the balance between the exits (which
the previous additive form, CE + alpha * T^2 * KL, did: with alpha 0.5 and T 4 the soft terms
outweighed every cross-entropy eight to one; see docs/training.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def distillation_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher/T || student/T), averaged over the batch."""
    t = temperature
    log_student = F.log_softmax(student_logits / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * (t * t)


def multi_exit_loss(
    outputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    exit_weights: Sequence[float],
    alpha: float = 0.5,
    temperature: float = 4.0,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Total loss and each exit's cross-entropy (floats, for logging).

    ``teacher_logits`` None (or ``alpha`` 0) means plain cross-entropy at every exit. Pass
    ``outputs[-1]`` for self-distillation from the final exit; it is detached here either way.
    """
    if len(exit_weights) != len(outputs):
        raise ValueError(f"{len(exit_weights)} exit weights for {len(outputs)} exits")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ces = [F.cross_entropy(out, targets) for out in outputs]
    teacher = teacher_logits if alpha > 0 else None
    loss = exit_weights[-1] * ces[-1]
    for w, ce, out in zip(exit_weights[:-1], ces[:-1], outputs[:-1], strict=True):
        term = ce if teacher is None else (1 - alpha) * ce + alpha * distillation_term(out, teacher, temperature)
        loss = loss + w * term
    return loss, [float(ce.detach()) for ce in ces]
