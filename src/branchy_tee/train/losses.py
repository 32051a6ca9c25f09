"""The multi-exit training loss: per-exit cross-entropy plus distillation into the early exits.

    L = sum_k w_k * CE(exit_k, y)  +  alpha * sum_{k < final} T^2 * KL(softmax(teacher/T) || softmax(exit_k/T))

The teacher is the final exit (detached: the early exits learn from it, it does not learn from them)
or a separately trained model. T^2 keeps the gradient scale of the soft term independent of T
(Hinton et al. 2015).
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

    ``teacher_logits`` None means no distillation. Pass ``outputs[-1]`` for self-distillation from
    the final exit; it is detached here either way.
    """
    if len(exit_weights) != len(outputs):
        raise ValueError(f"{len(exit_weights)} exit weights for {len(outputs)} exits")
    ces = [F.cross_entropy(out, targets) for out in outputs]
    loss = sum(w * ce for w, ce in zip(exit_weights, ces))
    if teacher_logits is not None and alpha > 0:
        loss = loss + alpha * sum(distillation_term(out, teacher_logits, temperature) for out in outputs[:-1])
    return loss, [float(ce.detach()) for ce in ces]
