import json

import pytest
import torch
from PIL import Image

from branchy_tee.cli import main
from branchy_tee.evaluate.calibrate import calibrate, calibrate_run
from branchy_tee.evaluate.exits import collect_log_probs, decide, exit_scores, load_split, oracle, stage_graphs
from branchy_tee.models.rundir import read_model_card
from branchy_tee.tee.criteria import ENTROPY
from branchy_tee.train.trainer import TrainConfig, fit


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    synthetic = {"channels": 1, "size": 28, "n": 1000}
    options = dict(epochs=2, lr=3e-3, batch_size=50, num_workers=0, out=str(out), quiet=True)
    fit(TrainConfig(net="lenet5", dataset="synthetic", synthetic=synthetic, **options))
    return out


def test_eval_json_is_consistent(run_dir, tmp_path, capsys):
    png = tmp_path / "acc.png"
    assert main(["eval", str(run_dir), "--json", "--plot", str(png), "--latency-reps", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"exits", "final_accuracy", "calibrated", "oracle", "sweep"} <= set(r)
    assert [e["index"] for e in r["exits"]] == [0, 1, 2]
    for e in r["exits"]:
        assert (
            {"index", "accuracy", "flops", "latency_ms"} <= set(e) and 0 <= e["accuracy"] <= 1 and e["latency_ms"] > 0
        )
    assert r["final_accuracy"] == r["exits"][-1]["accuracy"]
    cal = r["calibrated"]
    assert {"criterion", "thresholds", "accuracy", "mean_flops", "exit_fractions"} <= set(cal)
    assert sum(cal["exit_fractions"]) == pytest.approx(1.0)
    assert r["oracle"]["accuracy"] >= r["final_accuracy"]
    assert r["oracle"]["accuracy"] >= max(e["accuracy"] for e in r["exits"])
    for s in r["sweep"]:
        assert sum(s["exit_fractions"]) == pytest.approx(1.0)
    never = r["sweep"][0]
    assert never["exit_fractions"][-1] == 1.0 and never["accuracy"] == pytest.approx(r["final_accuracy"])
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_decide_matches_a_per_sample_loop():
    torch.manual_seed(1)
    logits = [torch.log_softmax(torch.randn(200, 10) * s, dim=1) for s in (1.0, 2.0, 3.0, 4.0)]
    thresholds = [0.6, 0.7, 0.8]
    exit_idx, preds = decide(logits, ENTROPY, thresholds)
    for i in range(200):
        k = next((k for k in range(3) if exit_scores(logits[k][i : i + 1], ENTROPY)[0] <= thresholds[k]), 3)
        assert exit_idx[i] == k and preds[i] == logits[k][i].argmax()


def test_oracle_takes_the_cheapest_correct_exit():
    labels = torch.tensor([0, 1, 2])
    logits = [torch.eye(3)[[0, 0, 0]], torch.eye(3)[[0, 1, 0]], torch.eye(3)[[1, 1, 1]]]
    o = oracle(logits, labels, [1, 2, 3])
    assert o["accuracy"] == pytest.approx(2 / 3)  # sample 2 is right nowhere
    assert o["mean_flops"] == pytest.approx((1 + 2 + 3) / 3)


@pytest.mark.parametrize("criterion", ["entropy", "maxprob"])
def test_calibration_meets_budget_and_is_the_cheapest_such_setting(run_dir, criterion):
    card = read_model_card(run_dir)
    logits, labels = collect_log_probs(stage_graphs(run_dir, show=False), load_split(card, "val"), show=False)
    costs = [3, 5, 6]
    for drop in (0.0, 0.01, 0.05):
        r = calibrate(logits, labels, costs, criterion, drop, margin_se=0.0)
        assert r["accuracy"] >= r["final_accuracy"] - drop - 1e-9
        eligible = [c for c in r["candidates"] if c["accuracy"] >= r["final_accuracy"] - drop - 1e-9]
        assert r["mean_flops"] == min(c["mean_flops"] for c in eligible)
        # A margin never makes the choice cheaper, and the budget still holds.
        safe = calibrate(logits, labels, costs, criterion, drop, margin_se=1.0)
        assert safe["mean_flops"] >= r["mean_flops"] and safe["accuracy"] >= safe["final_accuracy"] - drop - 1e-9


def test_calibrate_writes_model_json(run_dir, capsys):
    assert main(["calibrate", str(run_dir), "--max-accuracy-drop", "0.02", "--criterion", "maxprob", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["criterion"] == "maxprob" and meta["thresholds"] == out["thresholds"]
    assert meta["calibration"]["max_accuracy_drop"] == 0.02
    calibrate_run(run_dir, criterion="entropy", show=False)  # back to the defaults for the other tests


@pytest.mark.parametrize("criterion", ["entropy", "maxprob"])
def test_calibration_candidates_decide_as_the_runtime_does(criterion):
    from branchy_tee.evaluate.calibrate import candidate_thresholds, shared_threshold_settings
    from branchy_tee.evaluate.exits import run_setting
    from branchy_tee.tee.criteria import criterion as criterion_named

    criterion = criterion_named(criterion)
    torch.manual_seed(3)
    labels = torch.randint(0, 10, (300,))
    one_hot = torch.nn.functional.one_hot(labels, 10)
    logits = [(torch.randn(300, 10) * s + 3 * one_hot).log_softmax(1) for s in (2.0, 1.5, 1.0)]
    thresholds = candidate_thresholds(logits, criterion, points=50)
    for t, fast in zip(
        thresholds, shared_threshold_settings(logits, labels, [1, 2, 4], criterion, thresholds), strict=True
    ):
        ref = run_setting(logits, labels, criterion, [t, t], [1, 2, 4])
        assert fast["accuracy"] == ref["accuracy"] and fast["exit_fractions"] == ref["exit_fractions"]
        assert fast["mean_flops"] == pytest.approx(ref["mean_flops"])


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_plots_are_written_in_the_format_their_name_says(tmp_path, suffix, magic):
    """`--plot p.pdf` wrote PNG bytes."""
    from branchy_tee.evaluate.plots import _figure, _save

    plt = _figure()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    assert _save(fig, tmp_path / f"p{suffix}").read_bytes().startswith(magic)


def test_a_plot_name_of_another_format_is_refused_before_the_evaluation(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-such-run"), "--plot", str(tmp_path / "p.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "name it .png, .pdf or .svg" in err
