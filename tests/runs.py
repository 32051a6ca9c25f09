"""Helpers that make small run directories and bundles for tests (no training needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from branchy_tee.cli import main
from branchy_tee.evaluate.exits import decide
from branchy_tee.models import create_model
from branchy_tee.models.cost import arch_part_flops
from branchy_tee.rundir import write_model_json, write_weights
from branchy_tee.runtime.criteria import exit_scores


def make_random_run(out: Path, arch: str, in_channels: int = 1, size: int = 28, seed: int = 0, criterion="entropy",
                    thresholds=None, **config) -> tuple[torch.nn.Module, dict]:
    """A run directory holding a randomly initialised model (eval mode), as training would write it."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10, in_channels=in_channels, **config).eval()
    # Random BatchNorm statistics, so that random-weight networks give varied, input-dependent logits.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    # Spread each exit's logits (a random deep net's are nearly uniform), so that the scores of
    # different samples differ by far more than float rounding between two correct implementations.
    with torch.no_grad():
        for head in model.exits:
            last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(30.0 / max(float(last.weight.abs().max()), 1e-12))
    stage_flops, head_flops = arch_part_flops(arch, model.config, (in_channels, size, size))
    meta = {
        "arch": arch, "config": model.config, "classes": [f"c{i}" for i in range(10)], "dataset": "synthetic",
        "preprocessing": {"input_shape": [in_channels, size, size], "scale": 1 / 255, "mean": [0.5] * in_channels,
                          "std": [0.25] * in_channels},
        "criterion": criterion, "thresholds": thresholds, "stage_flops": stage_flops, "head_flops": head_flops,
        "data": {"dataset": "synthetic", "synthetic": {"channels": in_channels, "size": size}, "val_fraction": 0.1, "seed": 0},
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out / "model.safetensors", model)
    write_model_json(out, meta)
    return model, meta


@torch.no_grad()
def spreading_thresholds(model, x: torch.Tensor, criterion: str = "entropy") -> list[float]:
    """Thresholds that send roughly equal shares of ``x`` to every exit, each placed in the middle of a
    gap between samples' scores so that float noise cannot flip a decision."""
    logits = model(x)
    k = len(logits)
    remaining = torch.ones(len(x), dtype=torch.bool)
    thresholds = []
    for j in range(k - 1):
        scores = exit_scores(logits[j], criterion)[remaining].sort().values
        if criterion == "maxprob":
            scores = scores.flip(0)
        want = max(1, int(remaining.sum()) // (k - j))
        if want >= len(scores):
            want = len(scores) - 1
        t = float((scores[want - 1] + scores[want]) / 2) if len(scores) > 1 else float(scores[0])
        thresholds.append(t)
        passed = (exit_scores(logits[j], criterion) <= t) if criterion == "entropy" else (exit_scores(logits[j], criterion) >= t)
        remaining &= ~passed
    return thresholds


@torch.no_grad()
def reference_decisions(model, x, criterion, thresholds):
    """(labels, exits) of the plain model, all exits computed on the whole batch in eval mode."""
    exits, labels = decide(model(x), criterion, thresholds)
    return labels, exits


def keygen(path: Path) -> Path:
    assert main(["keygen", "--out", str(path)]) == 0
    return path


def mutate_bytes(raw: bytes, edits) -> bytes:
    """Apply (op, position, payload) edits: xor one byte, delete, insert or overwrite (set) bytes;
    positions wrap around the current length (the shape hypothesis strategies generate)."""
    b = bytearray(raw)
    for op, pos, payload in edits:
        pos %= len(b) + 1
        if op == "xor" and pos < len(b):
            b[pos] ^= payload[0] or 1
        elif op == "delete":
            del b[pos : pos + len(payload)]
        elif op == "insert":
            b[pos:pos] = payload
        else:
            b[pos : pos + len(payload)] = payload
    return bytes(b)

