"""Batched early exit with refilled batches, on numpy arrays.

Stage k runs on a batch of samples that are still undecided; exit k's confident samples are answered
and the rest wait in front of stage k+1 until a full batch of them is waiting (or the input runs out).
So the later stages, which most samples never reach, still run on full batches rather than on the
few survivors of each batch, and with a memory budget a later stage is loaded once per batch of its
own. Fewer than twice batch_size samples wait in front of a stage, which bounds the activation
memory (``tee.budget``).

A stage is any callable ``features, log_probs = stage(h)`` (``tee.graphs.StageGraph`` in the
enclave; features is None for the last stage), optionally with a ``run_size``: the most samples it
runs at once (``tee.budget``), the batch staying the unit that later stages wait for. With BatchNorm
folded for inference every operation is per-sample, so a sample's label and exit do not depend on
which other samples share its batch, nor on the order in which batches run.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Callable, Sequence

import numpy as np

from branchy_tee.tee.criteria import Criterion

# A stage: its input batch -> (features for the next stage, None after the last stage; exit log-probabilities).
Stage = Callable[[np.ndarray], tuple[np.ndarray | None, np.ndarray]]
# Sees every exit's log-probabilities as they are computed: (exit, input positions, log-probabilities).
Observer = Callable[[int, np.ndarray, np.ndarray], None]
Batch = tuple[np.ndarray, np.ndarray]  # (input positions, stage inputs)


@dataclass
class Answers:
    labels: np.ndarray  # (N,) int64
    exits: np.ndarray  # (N,) int64, the exit that answered
    confidences: np.ndarray  # (N,) float32, max softmax probability at that exit

    def exit_counts(self, num_exits: int) -> list[int]:
        counts: list[int] = np.bincount(self.exits, minlength=num_exits).tolist()
        return counts


class _Waiting:
    """Samples (positions, stage inputs) parked in front of one stage."""

    __slots__ = ("chunks", "count")

    def __init__(self) -> None:
        self.chunks: list[Batch] = []
        self.count = 0

    def add(self, pos: np.ndarray, h: np.ndarray) -> None:
        self.chunks.append((pos, h))
        self.count += len(pos)

    def pop(self, size: int) -> Batch:
        """Up to ``size`` samples, oldest first. Samples left behind are copied out of the chunk they
        came in, so that what waits holds no more memory than its own samples need."""
        if len(self.chunks) == 1 and self.count <= size:  # all of it, as it came (batch 1): no copy
            self.count = 0
            return self.chunks.pop()
        taken, need = [], size
        while self.chunks and need:
            pos, h = self.chunks[0]
            if len(pos) <= need:
                taken.append(self.chunks.pop(0))
                need -= len(pos)
            else:
                taken.append((pos[:need], h[:need]))
                self.chunks[0] = (pos[need:].copy(), h[need:].copy())
                need = 0
        self.count -= size - need
        return _joined(taken)


def _joined(parts: list[Batch]) -> Batch:
    if len(parts) == 1:  # batch 1, whole chunks, a stage run in one part: no copy
        return parts[0]
    return np.concatenate([p for p, _ in parts]), np.concatenate([h for _, h in parts])


class _Decided:
    """The answers in the order they were decided; :meth:`answers` puts them in input order."""

    def __init__(self) -> None:
        self.positions: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.exits: list[tuple[int, int]] = []  # (exit, samples it answered), per decision
        self.best: list[np.ndarray] = []  # the winning log-probability

    def add(self, k: int, pos: np.ndarray, logp: np.ndarray) -> None:
        self.positions.append(pos)
        self.labels.append(logp.argmax(axis=1))
        self.exits.append((k, len(pos)))
        self.best.append(logp.max(axis=1))

    def answers(self, n: int) -> Answers:
        if not self.positions:
            empty = np.empty(0, dtype=np.int64)
            return Answers(empty, empty.copy(), np.empty(0, dtype=np.float32))
        if len(self.positions) == 1:  # one batch, one exit: already in order
            k = self.exits[0][0]
            return Answers(self.labels[0].astype(np.int64, copy=False), np.full(n, k, np.int64), np.exp(self.best[0]))
        exit_of = np.repeat(np.array([k for k, _ in self.exits], dtype=np.int64), [c for _, c in self.exits])
        order = np.concatenate(self.positions).argsort(kind="stable")
        labels = np.concatenate(self.labels)[order].astype(np.int64, copy=False)
        return Answers(labels, exit_of[order], np.exp(np.concatenate(self.best)[order]))


class _Pass:
    """One early-exit pass over an input: runs stage k on a batch, answers the samples exit k is
    confident about (``decided``) and parks the others in front of stage k+1 (``waiting``)."""

    def __init__(
        self,
        get_stage: Callable[[int], Stage],
        num_exits: int,
        criterion: Criterion,
        thresholds: Sequence[float],
        observe: Observer | None,
    ) -> None:
        self.get_stage, self.final = get_stage, num_exits - 1
        self.criterion, self.thresholds, self.observe = criterion, thresholds, observe
        self.decided = _Decided()
        self.waiting: dict[int, _Waiting] = {}  # made when a first sample goes on (batch 1: rarely)

    def ready(self, k: int, enough: int) -> bool:
        w = self.waiting.get(k)
        return w is not None and w.count >= enough

    def run(self, k: int, pos: np.ndarray, h: np.ndarray) -> None:
        """Stage k on samples ``pos`` (inputs ``h``), in runs of at most its ``run_size``."""
        stage = self.get_stage(k)
        n = len(pos)
        runs = -(-n // (getattr(stage, "run_size", None) or n))  # sizes differ by one at most: 4 x 32, not 3 x 39 + 11
        if runs == 1:
            self._decide(k, stage, pos, h)
            return
        cuts = [i * n // runs for i in range(runs + 1)]
        for a, b in pairwise(cuts):
            self._decide(k, stage, pos[a:b], h[a:b])

    def _decide(self, k: int, stage: Stage, pos: np.ndarray, h_in: np.ndarray) -> None:
        h, logp = stage(h_in)
        if self.observe is not None:
            self.observe(k, pos, logp)
        if k < self.final:
            assert h is not None  # every stage but the last has features
            take = self.criterion.passes(self.criterion.score(logp), self.thresholds[k])
            taken = int(np.count_nonzero(take))
            if taken < len(pos):  # the whole-batch cases skip the masking: at batch 1 it costs a stage
                if not taken:
                    self._park(k + 1, pos, h)
                    return
                self._park(k + 1, pos[~take], h[~take])
                pos, logp = pos[take], logp[take]
        self.decided.add(k, pos, logp)

    def _park(self, k: int, pos: np.ndarray, h: np.ndarray) -> None:
        w = self.waiting.get(k)
        if w is None:
            w = self.waiting[k] = _Waiting()
        w.add(pos, h)


def early_exit(
    get_stage: Callable[[int], Stage],
    num_exits: int,
    x: np.ndarray,
    criterion: Criterion,
    thresholds: Sequence[float],
    batch_size: int = 64,
    observe: Observer | None = None,
    workers: int = 1,
) -> Answers:
    """Answer every sample of ``x`` (float32, N x stage-0 input). ``get_stage(k)`` returns stage k's
    callable; it is called only when some samples are about to run stage k. ``observe(k, positions,
    log_probs)``, if given, sees every exit's log-probabilities as they are computed (evaluation and
    calibration collect them with it). With ``workers`` > 1 an input of more than one batch is cut
    into that many runs of whole batches, each on its own thread (``get_stage`` and ``observe`` must
    then be safe to call from several threads)."""
    if workers > 1 and len(x) > batch_size:
        return _in_parallel(get_stage, num_exits, x, criterion, thresholds, batch_size, observe, workers)
    p = _Pass(get_stage, num_exits, criterion, thresholds, observe)
    n = len(x)
    positions = np.arange(n)
    for start in range(0, n, batch_size):
        p.run(0, positions[start : start + batch_size], x[start : start + batch_size])
        # Full batches only while input is left; once it is used up, what waits runs in part-batches.
        enough = batch_size if start + batch_size < n else 1
        for k in range(1, num_exits):
            while p.ready(k, enough):
                p.run(k, *p.waiting[k].pop(batch_size))
    return p.decided.answers(n)


def _in_parallel(
    get_stage: Callable[[int], Stage],
    num_exits: int,
    x: np.ndarray,
    criterion: Criterion,
    thresholds: Sequence[float],
    batch_size: int,
    observe: Observer | None,
    workers: int,
) -> Answers:
    """Early exit on ``workers`` consecutive runs of whole batches of ``x`` at once. ONNX Runtime
    releases the GIL while a stage runs, so on single-threaded stage sessions this is data
    parallelism (BENCHMARKS.md: it scales better than intra-op threads). Every sample is answered
    exactly as alone: its label and exit depend on no other sample."""
    from concurrent.futures import ThreadPoolExecutor

    batches = -(-len(x) // batch_size)
    per = -(-batches // workers) * batch_size  # whole batches per worker
    starts = range(0, len(x), per)

    def part(start: int) -> Answers:
        seen = None if observe is None else (lambda k, pos, logp: observe(k, pos + start, logp))
        return early_exit(get_stage, num_exits, x[start : start + per], criterion, thresholds, batch_size, seen)

    with ThreadPoolExecutor(len(starts)) as pool:
        parts = list(pool.map(part, starts))
    return Answers(*(np.concatenate([getattr(a, f) for a in parts]) for f in ("labels", "exits", "confidences")))
