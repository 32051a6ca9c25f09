"""The early-exit engine on ONNX Runtime stage graphs: answers never depend on the batch size, and
samples that go on to a later stage are gathered into full batches there (the point of refilling),
with few samples left waiting."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from branchy_tee.evaluate.exits import stage_graphs
from branchy_tee.tee.criteria import ENTROPY
from branchy_tee.tee.engine import early_exit
from runs import graph_log_probs, make_random_run, reference_decisions, spreading_thresholds


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_random_run(run, "resnet18", 3, 32, width=8)
    stages = stage_graphs(run, show=False)
    torch.manual_seed(3)
    x = torch.randn(90, 3, 32, 32)
    thresholds = spreading_thresholds(run, x, "entropy")
    labels, exits = reference_decisions(run, x, "entropy", thresholds)
    probs = torch.stack(graph_log_probs(run, x)).exp()  # (exits, N, C)
    assert len(set(exits.tolist())) == len(stages)
    model = SimpleNamespace(num_exits=len(stages))
    return model, stages, x.numpy(), thresholds, labels, exits, probs[exits, torch.arange(len(x)), labels]


def recording(stages, log):
    """get_stage for the engine that notes the size of every batch each stage runs on."""

    def get_stage(k):
        def stage(h):
            log.append((k, len(h)))
            return stages[k](h)

        return stage

    return get_stage


@pytest.mark.parametrize("batch_size", [1, 4, 16, 90, 256])
def test_answers_do_not_depend_on_the_batch_size(setting, batch_size):
    model, stages, x, thresholds, labels, exits, confidences = setting
    ans = early_exit(recording(stages, []), model.num_exits, x, ENTROPY, thresholds, batch_size)
    assert ans.labels.tolist() == labels.tolist()
    assert ans.exits.tolist() == exits.tolist()
    assert ans.exit_counts(model.num_exits) == torch.bincount(exits, minlength=model.num_exits).tolist()
    assert np.allclose(ans.confidences, confidences.numpy(), atol=1e-5)


def test_a_sample_alone_gets_the_answer_it_gets_in_a_batch(setting):
    """A request of one sample takes the engine's short path; its decision is the batch's."""
    model, stages, x, thresholds, labels, exits, confidences = setting
    for i in range(len(x)):
        seen = []
        ans = early_exit(
            stages.__getitem__,
            model.num_exits,
            x[i : i + 1],
            ENTROPY,
            thresholds,
            64,
            lambda k, pos, logp, seen=seen: seen.append((k, pos.tolist())),
        )
        assert (ans.labels.tolist(), ans.exits.tolist()) == ([int(labels[i])], [int(exits[i])])
        assert ans.labels.dtype == ans.exits.dtype == np.int64 and ans.confidences.dtype == np.float32
        assert np.allclose(ans.confidences, confidences[i : i + 1].numpy(), atol=1e-5)
        assert seen == [(k, [0]) for k in range(int(exits[i]) + 1)]


def test_later_stages_run_on_full_batches(setting):
    model, stages, x, thresholds, _, exits, _ = setting
    log = []
    early_exit(recording(stages, log), model.num_exits, x, ENTROPY, thresholds, batch_size=8)
    for k in range(1, model.num_exits):
        sizes = [n for j, n in log if j == k]
        reaching = int((exits >= k).sum())
        assert sum(sizes) == reaching  # every sample runs each stage on its way exactly once
        # all batches full except the last one, which takes what is left when the input runs out
        assert all(n == 8 for n in sizes[:-1]) and 0 < sizes[-1] <= 8
        assert len(sizes) == -(-reaching // 8)


def test_a_stage_is_not_fetched_when_nobody_reaches_it(setting):
    model, stages, x, *_ = setting
    fetched = []

    def get_stage(k):
        fetched.append(k)
        return stages[k]

    ans = early_exit(get_stage, model.num_exits, x, ENTROPY, [2.0] * (model.num_exits - 1), batch_size=16)
    assert set(fetched) == {0} and ans.exits.tolist() == [0] * len(x)


def test_no_samples_no_work(setting):
    model, stages, x, thresholds, *_ = setting
    ans = early_exit(recording(stages, log := []), model.num_exits, x[:0], ENTROPY, thresholds, batch_size=8)
    assert len(ans.labels) == len(ans.exits) == len(ans.confidences) == 0 and log == []


@pytest.mark.parametrize("workers,batch_size", [(2, 8), (3, 16), (4, 64), (2, 90)])
def test_batches_in_parallel_give_the_same_answers_in_input_order(setting, workers, batch_size):
    """predict --threads N runs N whole-batch parts of a request at once: each sample's answer, and
    what evaluation observes about it, is that of the one-worker run, in input order."""
    model, stages, x, thresholds, labels, exits, confidences = setting

    def recorder(seen: list, threads: set):
        """An observer noting (exit, position, best log-probability) and the thread it was called on."""

        def observe(k, pos, logp):
            threads.add(threading.get_ident())
            seen.extend((k, int(p), float(row.max())) for p, row in zip(pos, logp, strict=True))

        return observe

    seen, threads = [], set()
    observe = recorder(seen, threads)
    ans = early_exit(stages.__getitem__, model.num_exits, x, ENTROPY, thresholds, batch_size, observe, workers=workers)
    assert ans.labels.tolist() == labels.tolist() and ans.exits.tolist() == exits.tolist()
    assert np.allclose(ans.confidences, confidences.numpy(), atol=1e-5)
    alone: list = []
    early_exit(stages.__getitem__, model.num_exits, x, ENTROPY, thresholds, batch_size, recorder(alone, set()))
    assert sorted(seen) == sorted(alone)  # every sample observed at every exit it reached, under its own position
    # parts of more than one batch run on the pool's threads, a request of one batch on the caller's
    assert (threading.get_ident() in threads) == (batch_size >= len(x))


@pytest.mark.parametrize("batch_size", [16, 90, 256])
def test_a_stage_runs_a_batch_in_runs_of_at_most_its_run_size_with_the_same_answers(setting, batch_size):
    """A stage whose activations would spill out of the caches runs a batch in several runs
    (``run_size``, from the bundle's activation figures): no run is larger, every sample reaching
    the stage runs it exactly once, and every answer is the whole-batch one."""
    model, stages, x, thresholds, labels, exits, confidences = setting
    log = []

    class Sized:
        def __init__(self, k, run_size):
            self.k, self.run_size = k, run_size

        def __call__(self, h):
            log.append((self.k, len(h)))
            return stages[self.k](h)

    sizes = [7, 5, None, 3][: model.num_exits] + [None] * (model.num_exits - 4)
    sized = [Sized(k, n) for k, n in enumerate(sizes)]
    ans = early_exit(sized.__getitem__, model.num_exits, x, ENTROPY, thresholds, batch_size)
    assert ans.labels.tolist() == labels.tolist() and ans.exits.tolist() == exits.tolist()
    assert np.allclose(ans.confidences, confidences.numpy(), atol=1e-5)
    for k, limit in enumerate(sizes):
        runs = [n for j, n in log if j == k]
        assert sum(runs) == int((exits >= k).sum())
        assert max(runs) <= (limit or batch_size)
    if batch_size >= len(x):  # stage 0 runs the whole input in equal parts: 90 in 13 of 6-7, not 12 x 7 + 6
        assert sorted(set(n for j, n in log if j == 0)) == [6, 7]


def test_run_sizes_follow_the_activation_figures():
    from branchy_tee.tee.budget import FLOAT_BYTES, MIN_RUN, RUN_BYTES, run_size

    assert run_size(0) is None
    assert run_size(RUN_BYTES // FLOAT_BYTES // 32) == 32
    assert run_size(10**9) == MIN_RUN and run_size(1) == RUN_BYTES // FLOAT_BYTES
