"""Batched early exit with shrinking batches.

Each batch runs stage k only on the samples still undecided; exit k's confident samples are answered
and dropped from the batch. With BatchNorm in eval mode every operation is per-sample, so a sample's
label and exit do not depend on which other samples share its batch.

At batch size 1 the per-stage bookkeeping costs as much as a small stage, so it is kept to a few
tensor operations: one log-softmax serves the score, the label and the confidence, and the common
cases (the whole batch exits, or none of it does) skip the masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .criteria import confident, scores_from_log_probs


@dataclass
class Answers:
    labels: torch.Tensor  # (N,) int64
    exits: torch.Tensor  # (N,) int64, the exit that answered
    confidences: torch.Tensor  # (N,) float32, max softmax probability at that exit

    def exit_counts(self, num_exits: int) -> list[int]:
        return torch.bincount(self.exits, minlength=num_exits).tolist()


@torch.inference_mode()
def early_exit(get_stage, num_exits: int, x: torch.Tensor, criterion: str, thresholds, batch_size: int = 64) -> Answers:
    """Answer every sample of ``x``. ``get_stage(k)`` returns (stage module, exit head) for stage k;
    it is called only when some sample of the batch reaches stage k."""
    n = len(x)
    positions, labels, exits, confs = [], [], [], []
    final = num_exits - 1
    for start in range(0, n, batch_size):
        h = x[start : start + batch_size]
        pos = torch.arange(start, start + len(h))
        for k in range(num_exits):
            stage, head = get_stage(k)
            h = stage(h)
            logp = torch.log_softmax(head(h).float(), dim=1)
            best, label = logp.max(dim=1)
            if k == final:
                take_all = True
            else:
                take = confident(scores_from_log_probs(logp, best, criterion), thresholds[k], criterion)
                taken = int(take.sum())
                take_all = taken == len(h)
                if not take_all:
                    if taken:
                        positions.append(pos[take])
                        labels.append(label[take])
                        exits.append(torch.full((taken,), k, dtype=torch.long))
                        confs.append(best[take])
                        keep = ~take
                        pos, h = pos[keep], h[keep]
                    continue
            positions.append(pos)
            labels.append(label)
            exits.append(torch.full((len(pos),), k, dtype=torch.long))
            confs.append(best)
            break
    if len(positions) == 1:  # one batch, one exit: already in order
        return Answers(labels[0], exits[0], confs[0].exp())
    order = torch.cat(positions).argsort()
    return Answers(torch.cat(labels)[order], torch.cat(exits)[order], torch.cat(confs)[order].exp())
