"""Helpers that make small run directories and bundles for tests (no training needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from branchy_tee.cli import main
from branchy_tee.evaluate.exits import collect_log_probs, decide, exit_scores, stage_graphs
from branchy_tee.export.onnx import EXPORT_DIR, export_run
from branchy_tee.models import create_model
from branchy_tee.models.card import DataSpec, ModelCard
from branchy_tee.models.cost import arch_part_flops
from branchy_tee.models.rundir import read_model_card, write_model_card, write_weights
from branchy_tee.tee.criteria import criterion as criterion_named
from branchy_tee.tee.sealed.preprocessing import Preprocessing

# Exports by weights digest: tests make the same seeded random runs again and again, and exporting
# (a few seconds per stage) would dominate the suite. Held in memory: nothing is written outside
# the tests' own directories.
_EXPORTS: dict[str, dict[str, bytes]] = {}


def export_cached(run_dir: Path) -> None:
    """RUN_DIR/onnx as ``branchy-tee export`` writes it, reusing an earlier export of the same weights."""
    digest = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    if digest not in _EXPORTS:
        export_run(run_dir, show=False)
        _EXPORTS[digest] = {p.name: p.read_bytes() for p in (run_dir / EXPORT_DIR).iterdir()}
        return
    (run_dir / EXPORT_DIR).mkdir(exist_ok=True)
    for name, data in _EXPORTS[digest].items():
        (run_dir / EXPORT_DIR / name).write_bytes(data)


def make_random_run(
    out: Path,
    arch: str,
    in_channels: int = 1,
    size: int = 28,
    seed: int = 0,
    criterion="entropy",
    thresholds=None,
    export=True,
    **config,
) -> tuple[torch.nn.Module, ModelCard]:
    """A run directory holding a randomly initialised model (eval mode) and, with ``export``, its
    stage graphs, as training would write them."""
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
    card = ModelCard(
        arch=arch,
        config=model.config,
        classes=tuple(f"c{i}" for i in range(10)),
        dataset="synthetic",
        preprocessing=Preprocessing.for_images((in_channels, size, size), [0.5] * in_channels, [0.25] * in_channels),
        criterion=criterion_named(criterion),
        thresholds=None if thresholds is None else tuple(thresholds),
        stage_flops=tuple(stage_flops),
        head_flops=tuple(head_flops),
        data=DataSpec("synthetic", {"channels": in_channels, "size": size}, 0.1, 0),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out / "model.safetensors", model)
    write_model_card(out, card)
    if export:
        export_cached(out)
    return model, card


def set_thresholds(run_dir: Path, thresholds) -> None:
    """Calibrated thresholds for the run (what calibration would write into its model card)."""
    write_model_card(run_dir, read_model_card(run_dir).replace(thresholds=tuple(thresholds)))


def graph_log_probs(run_dir: Path, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's log-probabilities of ``x`` as eval computes them: the run's exported stage graphs
    through the enclave's engine."""
    data = torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    return collect_log_probs(stage_graphs(run_dir, show=False), data, show=False)[0]


def spreading_thresholds(run_dir: Path, x: torch.Tensor, name: str = "entropy") -> list[float]:
    """Thresholds that send roughly equal shares of ``x`` to every exit, each placed in the middle of a
    gap between samples' scores so that float noise cannot flip a decision."""
    criterion = criterion_named(name)
    logits = graph_log_probs(run_dir, x)
    k = len(logits)
    remaining = torch.ones(len(x), dtype=torch.bool)
    thresholds = []
    for j in range(k - 1):
        scores = exit_scores(logits[j], criterion)[remaining].sort().values
        if criterion.name == "maxprob":
            scores = scores.flip(0)
        want = max(1, int(remaining.sum()) // (k - j))
        if want >= len(scores):
            want = len(scores) - 1
        t = float((scores[want - 1] + scores[want]) / 2) if len(scores) > 1 else float(scores[0])
        thresholds.append(t)
        passed = criterion.passes(exit_scores(logits[j], criterion), t)
        remaining &= ~passed
    return thresholds


def reference_decisions(run_dir: Path, x: torch.Tensor, criterion, thresholds):
    """(labels, exits) as eval decides them: all exits computed by the run's stage graphs, then the
    runtime's criterion (a Criterion or its name)."""
    exits, labels = decide(graph_log_probs(run_dir, x), criterion_named(criterion), thresholds)
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
