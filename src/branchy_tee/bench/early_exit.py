"""``branchy-tee bench``'s early-exit figures: the benchmark model's exported stage graphs through the
enclave's engine (on ONNX Runtime) against the same model's full forward on the same runtime, and
against the full model on ONNX Runtime with its default session options, what a user would pick
instead. Test accuracy of the final exit and of the calibrated setting, batch-1 latency, batch-128
throughput, and the oracle (each sample at its cheapest correct exit)."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from branchy_tee.bench.common import ENGINE_THREADS
from branchy_tee.tee.engine import early_exit

SPIN_PAUSE = 0.02  # seconds after each call with ONNX Runtime's default options, for its spinning threads to stop
REPS = 3  # batch-1 runs per sample and path; the fastest counts


def _onnxruntime_sessions(model, input_shape):
    """The full model (no early exits) as one ONNX graph, in two sessions: with the enclave's session
    options (the same runtime as early exit) and with ONNX Runtime's defaults (what a user would pick
    instead of branchy-tee)."""
    import onnxruntime as ort

    from branchy_tee.export.onnx import export_full_model
    from branchy_tee.export.payload import pack
    from branchy_tee.tee.graphs import PROVIDERS, load_session

    graph = export_full_model(model, input_shape)
    return load_session(pack(graph), "full model"), ort.InferenceSession(graph, providers=PROVIDERS)


def _onnxruntime_call_us(calls: int = 2000) -> float:
    """Median time of one session call on a one-node graph (Identity of a 1x10 tensor), microseconds."""
    from onnx import TensorProto, helper

    from branchy_tee.export.payload import pack
    from branchy_tee.tee.graphs import load_session

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 10]) for n in ("input", "output")]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = load_session(pack(model.SerializeToString()), "identity")
    x = np.zeros((1, 10), np.float32)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        session.run(["output"], {"input": x})
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


@dataclass
class Subject:
    """What is measured: the run's stage graphs and its full model on two session options, the test
    samples, and the calibrated exit rule."""

    run_dir: Path
    card: Any  # ModelCard
    stages: list
    x: np.ndarray
    y: np.ndarray
    full_ours: Callable[[np.ndarray], np.ndarray]  # the full model, the enclave's session options
    full_default: Callable[[np.ndarray], np.ndarray]  # the full model, ONNX Runtime's defaults

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def early(self, x: np.ndarray, thresholds=None, batch_size: int = 256, workers: int = 1):
        """Early exit through the enclave's engine (the calibrated thresholds unless given)."""
        thresholds = self.card.exit_thresholds() if thresholds is None else thresholds
        return early_exit(
            self.stages.__getitem__, self.num_exits, x, self.card.criterion, thresholds, batch_size, workers=workers
        )


def load_subject(run_dir: Path, quick: bool, samples: int | None, data_dir) -> Subject:
    from branchy_tee.evaluate.exits import load_split, stage_graphs
    from branchy_tee.models.rundir import load_run
    from branchy_tee.tee.graphs import INPUT

    model, card = load_run(run_dir)
    stages = stage_graphs(run_dir, show=False)
    test = load_split(card, "test", data_dir=data_dir)
    n = min(samples or (200 if quick else len(test)), len(test))
    x = torch.stack([test[i][0] for i in range(n)]).numpy()
    y = np.array([test[i][1] for i in range(n)])
    ours, default = _onnxruntime_sessions(model, card.preprocessing.input_shape)
    return Subject(
        run_dir, card, stages, x, y, lambda b: ours.run(None, {INPUT: b})[0], lambda b: default.run(None, {INPUT: b})[0]
    )


def accuracy_on_test(s: Subject) -> dict:
    """The final exit's and the calibrated setting's accuracy on the test samples, by the enclave's
    engine and graphs, and the loss against the calibration's budget."""
    early = s.early(s.x)
    full_pred = np.concatenate([s.full_ours(s.x[i : i + 256]).argmax(1) for i in range(0, len(s.x), 256)])
    acc_early, acc_full = float((early.labels == s.y).mean()), float((full_pred == s.y).mean())
    cal = s.card.calibration
    budget = 100 * cal.max_accuracy_drop if cal else None
    loss = 100 * (acc_full - acc_early)
    return {
        "accuracy_full": acc_full,
        "accuracy_early_exit": acc_early,
        "accuracy_drop_pp": loss,
        "final_exit_test_accuracy": acc_full,
        "calibrated_test_loss_pp": loss,
        "calibration_budget_pp": budget,
        "calibration_margin_se": cal.margin_se if cal else None,
        "within_budget": None if budget is None else loss <= budget + 1e-9,
    }


def _fastest(fn, *args) -> float:
    best = float("inf")
    for _ in range(REPS):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def batch1_latencies(s: Subject, samples: int) -> dict[str, Any]:
    """Seconds per sample at batch 1, all measured sample by sample in one interleaved loop, so that
    drift of this machine's speed hits every figure alike: the calibrated early exit, the full model
    on both session options, leaving at each exit k through the same engine (for the oracle), and
    stages 0..k called directly (the compute without the engine). Each figure for a sample is the
    fastest of REPS runs (on a shared machine a run is now and then preempted for milliseconds; the
    work is the same each time). ONNX Runtime's default threads keep spinning for a while after a
    call returns, taking a core from whatever runs next: the default-options calls come last,
    followed by a pause."""
    from branchy_tee.evaluate.exits import forced_thresholds

    criterion, thresholds = s.card.criterion, s.card.exit_thresholds()
    forced = [forced_thresholds(criterion, s.num_exits, k) for k in range(s.num_exits)]
    engine = partial(early_exit, s.stages.__getitem__, s.num_exits)  # as predict calls it

    def through(h, last):
        for stage in s.stages[: last + 1]:
            h, _ = stage(h)

    t: dict[str, Any] = {
        "early": [],
        "full": [],
        "default": [],
        "exit": [[] for _ in forced],
        "stage": [[] for _ in s.stages],
    }
    for i in range(min(samples, len(s.x))):
        xi = s.x[i : i + 1]
        t["early"].append(_fastest(engine, xi, criterion, thresholds, 1))
        t["full"].append(_fastest(s.full_ours, xi))
        for k, th in enumerate(forced):
            t["exit"][k].append(_fastest(engine, xi, criterion, th, 1))
        for k in range(s.num_exits):
            t["stage"][k].append(_fastest(through, xi, k))
        t["default"].append(_fastest(s.full_default, xi))
        time.sleep(SPIN_PAUSE)
    return t


def batch128_throughputs(s: Subject, quick: bool) -> tuple[float, float, float, float, float]:
    """Samples per second (early exit, full model, full model on ONNX Runtime's defaults, early exit on
    every core, every stage through the engine as ``predict --full-model`` runs) over the same
    samples, given to early exit as one request as predict gets them (so
    the engine can refill the later stages' batches), and to the full model batch by batch; the best
    of interleaved runs. ONNX Runtime's defaults use every core: early exit on every core is
    ``predict --threads`` cores (one batch per core at once on single-threaded sessions)."""

    def throughput(fn) -> float:
        t = time.perf_counter()
        fn()
        return len(s.x) / (time.perf_counter() - t)

    def batches(fn):
        return lambda: [fn(s.x[i : i + 128]) for i in range(0, len(s.x), 128)]

    from branchy_tee.evaluate.exits import forced_thresholds

    cores = os.cpu_count() or 1
    every_stage = forced_thresholds(s.card.criterion, s.num_exits, s.num_exits - 1)
    tp_early, tp_full, tp_default, tp_cores, tp_stages = 0.0, 0.0, 0.0, 0.0, 0.0
    for _ in range(1 if quick else 3):
        tp_early = max(tp_early, throughput(lambda: s.early(s.x, None, 128)))
        tp_cores = max(tp_cores, throughput(lambda: s.early(s.x, None, 128, workers=cores)))
        tp_stages = max(tp_stages, throughput(lambda: s.early(s.x, every_stage, 128)))
        tp_full = max(tp_full, throughput(batches(s.full_ours)))
        tp_default = max(tp_default, throughput(batches(s.full_default)))
        time.sleep(SPIN_PAUSE)
    return tp_early, tp_full, tp_default, tp_cores, tp_stages


def bench_early_exit(
    run_dir: Path, quick: bool, samples: int | None = None, data_dir=None, latency_samples: int | None = None
) -> dict:
    """Early exit (the run's stage graphs through the enclave's engine, on ONNX Runtime) against the
    full model on the same runtime and against the full model on ONNX Runtime's default options:
    accuracy and throughput over ``samples`` test images (all by default), batch-1 latency over the
    first ``latency_samples`` of them (1,000 by default)."""
    s = load_subject(run_dir, quick, samples, data_dir)
    accuracy = accuracy_on_test(s)
    lat = batch1_latencies(s, latency_samples or (60 if quick else 1000))
    throughputs = batch128_throughputs(s, quick)
    # What one ONNX Runtime call costs with nothing to compute (a one-node graph): the floor under
    # every stage call at batch 1, which the engine pays once per stage a sample runs.
    call_us = _onnxruntime_call_us()
    return {
        "model": f"{s.card.arch} {s.card.config} trained on {s.card.dataset} ({run_dir})",
        "runtime": f"onnxruntime {_ort_version()}, {ENGINE_THREADS} intra-op thread per stage session "
        "(the enclave's session options)",
        "test_samples": len(s.x),
        "latency_samples": len(lat["early"]),
        **accuracy,
        **_speed_figures(s, lat, throughputs),
        "onnxruntime_call_us": call_us,
    }


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _speed_figures(s: Subject, lat: dict, throughputs: tuple[float, float, float, float, float]) -> dict:
    """Latency and throughput speedups, the exits taken, the oracle costed with the measured latencies,
    and what the engine adds per stage."""
    from branchy_tee.evaluate.exits import collect_log_probs, decide, oracle

    tp_early, tp_full, tp_default, tp_cores, tp_stages = throughputs
    data = torch.utils.data.TensorDataset(torch.from_numpy(s.x), torch.from_numpy(s.y))
    logits, labels = collect_log_probs(s.stages, data, show=False)
    orc = oracle(logits, labels, list(range(s.num_exits)))
    per_exit = [statistics.mean(ts) for ts in lat["exit"]]
    reach = [statistics.mean(ts) for ts in lat["stage"]]  # stages 0..k called directly
    stage_alone = [reach[0]] + [reach[k] - reach[k - 1] for k in range(1, s.num_exits)]
    oracle_latency = sum(f * t for f, t in zip(orc["exit_fractions"], per_exit, strict=True))
    mean_early, mean_full, mean_default = (statistics.mean(lat[k]) for k in ("early", "full", "default"))
    exit_idx, _ = decide(logits, s.card.criterion, s.card.exit_thresholds())
    # What the engine adds per stage at batch 1 (deciding, queueing, answering) over calling the graphs alone.
    overhead = [(per_exit[k] - reach[k]) / (k + 1) for k in range(s.num_exits)]
    return {
        "exit_fractions": (torch.bincount(exit_idx, minlength=s.num_exits).float() / len(s.x)).tolist(),
        "latency_ms_full": 1000 * mean_full,
        "latency_ms_early_exit": 1000 * mean_early,
        "latency_speedup": mean_full / mean_early,
        "throughput_full": tp_full,
        "throughput_early_exit": tp_early,
        "throughput_speedup": tp_early / tp_full,
        "vs_onnxruntime": {
            "what": "the full model as one ONNX graph on ONNX Runtime with default session options",
            "latency_ms": 1000 * mean_default,
            "throughput": tp_default,
            "latency_speedup": mean_default / mean_early,
            # both on every core: ONNX Runtime's default threads, early exit's parallel batches
            "throughput_speedup": tp_cores / tp_default,
            "throughput_early_exit": tp_cores,
            "workers": os.cpu_count() or 1,
            "throughput_speedup_one_worker": tp_early / tp_default,
        },
        "vs_every_stage": {
            "what": "the full model on the same engine: every stage and exit, as predict --full-model runs it",
            "latency_ms": 1000 * per_exit[-1],
            "throughput": tp_stages,
            "latency_speedup": per_exit[-1] / mean_early,
            "throughput_speedup": tp_early / tp_stages,
        },
        "oracle_accuracy": orc["accuracy"],
        "oracle_latency_ms": 1000 * oracle_latency,
        "oracle_speedup": mean_full / oracle_latency,
        "fraction_of_oracle_speedup": (mean_full / mean_early) / (mean_full / oracle_latency),
        "exit_latency_ms": [1000 * t for t in per_exit],
        "stage_graph_ms": [1000 * t for t in stage_alone],
        "engine_overhead_us_per_stage": [1e6 * t for t in overhead],
    }
