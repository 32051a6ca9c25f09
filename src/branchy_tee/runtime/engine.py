"""Batched early exit with shrinking batches.

Each batch runs stage k only on the samples still undecided; exit k's confident samples are answered
and dropped from the batch. With BatchNorm in eval mode every operation is per-sample, so a sample's
label and exit do not depend on which other samples share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .criteria import confident, exit_scores


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
    labels = torch.empty(n, dtype=torch.long)
    exits = torch.empty(n, dtype=torch.long)
    conf = torch.empty(n, dtype=torch.float32)
    final = num_exits - 1
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        h = x[idx]
        for k in range(num_exits):
            stage, head = get_stage(k)
            h = stage(h)
            logits = head(h)
            if k == final:
                take = torch.ones(len(idx), dtype=torch.bool)
            else:
                take = confident(exit_scores(logits, criterion), thresholds[k], criterion)
            if take.any():
                probs = torch.softmax(logits[take].float(), dim=1)
                p, y = probs.max(dim=1)
                labels[idx[take]], exits[idx[take]], conf[idx[take]] = y, k, p
                keep = ~take
                idx, h = idx[keep], h[keep]
            if len(idx) == 0:
                break
    return Answers(labels, exits, conf)
