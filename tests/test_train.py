import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from branchy_tee.cli import main
from branchy_tee.core.errors import BranchyError
from branchy_tee.train import losses
from branchy_tee.train.trainer import TrainConfig, fit

SYN = {"channels": 1, "size": 28, "n": 600}
SYN_CLI = ["--dataset", "synthetic", "--synthetic-channels", "1", "--synthetic-size", "28", "--num-workers", "0"]


def tiny(out, **kw) -> TrainConfig:
    base = dict(net="lenet5", dataset="synthetic", synthetic=dict(SYN), epochs=2, lr=3e-3, batch_size=50)
    base.update(num_workers=0, out=str(out), quiet=True, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_distillation_term_matches_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    t = 4.0
    expected = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p = [math.exp(v / t) for v in t_row.tolist()]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / t) for v in s_row.tolist()]
        q = [v / sum(q) for v in q]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = expected / 2 * t * t
    assert abs(float(losses.distillation_term(student, teacher, t)) - expected) < 1e-6


def test_multi_exit_loss_combines_terms_and_detaches_teacher():
    torch.manual_seed(0)
    outs = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    loss, ces = losses.multi_exit_loss(outs, y, [1.0, 0.5, 2.0], alpha=0.3, temperature=2.0, teacher_logits=outs[-1])
    # Each early exit: (1 - alpha) * CE + alpha * T^2 * KL, times its weight; the final exit: CE only.
    manual = 2.0 * F.cross_entropy(outs[-1], y)
    for w, o in zip([1.0, 0.5], outs[:-1], strict=True):
        manual = manual + w * (0.7 * F.cross_entropy(o, y) + 0.3 * losses.distillation_term(o, outs[-1], 2.0))
    assert torch.allclose(loss, manual)
    assert ces == pytest.approx([float(F.cross_entropy(o, y).detach()) for o in outs])
    loss.backward()
    # The final exit gets gradient only from its own cross-entropy (weight 2.0), not from distillation.
    final_only = torch.autograd.grad(2.0 * F.cross_entropy(outs[-1], y), outs[-1])[0]
    assert torch.allclose(outs[-1].grad, final_only)


def test_training_lowers_the_loss_and_writes_the_run_directory(tmp_path):
    summary = fit(tiny(tmp_path / "run", epochs=3))
    hist = summary["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"model.safetensors", "model.json", "checkpoint.pt", "metrics.jsonl"}
    meta = json.loads((run / "model.json").read_text())
    assert meta["arch"] == "lenet5" and meta["config"]["in_channels"] == 1
    assert meta["preprocessing"]["input_shape"] == [1, 28, 28]
    assert len(meta["thresholds"]) == 2 and meta["classes"][0] == "class-0"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    # The file holds plain tensors (safetensors, no pickle).
    assert "stages.0.0.weight" in load_file(run / "model.safetensors")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    fit(tiny(tmp_path / "straight", epochs=3))
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    # Interrupt a 3-epoch run during its third epoch, then resume it.
    interrupted = tiny(tmp_path / "interrupted", epochs=3)
    import branchy_tee.train.trainer as tr

    calls = {"n": 0}
    real = tr.train_one_epoch

    def crash_on_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    tr.train_one_epoch = crash_on_third
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(interrupted)
    finally:
        tr.train_one_epoch = real
    fit(tiny(tmp_path / "interrupted", epochs=3, resume=True))
    resumed = load_file(tmp_path / "interrupted" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_early_stopping_stops(tmp_path):
    # With a vanishing learning rate the validation loss cannot improve after the first epoch.
    summary = fit(tiny(tmp_path / "run", epochs=20, patience=2, lr=1e-30))
    assert summary["stopped_early"]
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import branchy_tee.train.trainer as tr

    fit(tiny(tmp_path / "run", epochs=1))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real = tr.multi_exit_loss
    monkeypatch.setattr(tr, "multi_exit_loss", lambda *a, **kw: (real(*a, **kw)[0] * float("nan"), []))
    with pytest.raises(BranchyError, match=r"loss became nan at epoch 2, batch 1.*last good checkpoint.*epoch 1"):
        fit(tiny(tmp_path / "run", epochs=2, resume=True))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_every_seed_flag_parses(tmp_path, capsys):
    out = tmp_path / "run"
    seed_flags = ["--lr", "0.003", "--batch-size", "50", "--net", "LeNet5", "--epochs", "1", "-p", "3", "-o", "sgd"]
    ours = ["--device", "cpu", "--distill", "none", "--temperature", "3", "--alpha", "0.2", "--exit-weights", "1,1,2"]
    run = ["--synthetic-samples", "300", "--seed", "4", "--out", str(out), "--max-batches", "3", "--json"]
    rc = main(["train", *seed_flags, *SYN_CLI, *ours, *run])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs_run"] == 1
    saved = json.loads((out / "model.json").read_text())["training"]["config"]
    assert saved["optim"] == "sgd" and saved["exit_weights"] == [1.0, 1.0, 2.0] and saved["distill"] == "none"
    resume = ["train", "-r", "--net", "lenet5", "--epochs", "2", "--synthetic-samples", "300", "--out", str(out)]
    assert main([*resume, *SYN_CLI, "--max-batches", "3", "-o", "sgd", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 1  # resumed at epoch 2


def test_cuda_flag_means_require_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["train", "--cuda", "--dataset", "synthetic", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1 and "CUDA was required" in err and len(err.strip().splitlines()) == 1


def test_bad_inputs(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 1
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.json").write_text('{"hello": 1}')
    assert main(["calibrate", str(tmp_path / "foreign")]) == 1
    assert "not a branchy-tee model description" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--net", "resnet19"])
    assert e.value.code == 2
    # A resume checkpoint of another architecture.
    fit(tiny(tmp_path / "run", epochs=1))
    with pytest.raises(BranchyError, match="is a lenet5 checkpoint, not alexnet"):
        fit(tiny(tmp_path / "run", net="alexnet", resume=True))
    # A dataset whose channels don't fit the model.
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    meta["data"]["synthetic"]["channels"] = 3
    (tmp_path / "run" / "model.json").write_text(json.dumps(meta))
    assert main(["eval", str(tmp_path / "run"), "--max-batches", "1", "--latency-reps", "1"]) == 1
    assert "3-channel images; the model expects 1" in capsys.readouterr().err


def test_teacher_distillation(tmp_path):
    fit(tiny(tmp_path / "teacher", epochs=1))
    s = fit(tiny(tmp_path / "student", epochs=1, distill="teacher", teacher=str(tmp_path / "teacher")))
    assert s["epochs_run"] == 1
    s = fit(
        tiny(tmp_path / "student2", epochs=1, distill="teacher", teacher=str(tmp_path / "teacher" / "checkpoint.pt"))
    )
    assert s["epochs_run"] == 1


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    train = ["-m", "branchy_tee.cli", "train", "--net", "lenet5", "--synthetic-samples", "400", "--epochs", "2"]
    run = ["--lr", "0.003", "--batch-size", "25", "--out", str(out), "--json"]
    proc = subprocess.run([*torchrun, *train, *SYN_CLI, *run], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["world_size"] == 2
    assert meta["training"]["ddp_identical_weights"] is True
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # only rank 0 wrote


def test_exit_grad_scale_scales_what_early_exits_send_into_the_backbone():
    from branchy_tee.models import create_model

    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def grads(scale):
        model = create_model("lenet5", num_classes=10, in_channels=1)
        torch.manual_seed(0)
        model.load_state_dict(create_model("lenet5", num_classes=10, in_channels=1).state_dict())
        model.exit_grad_scale = scale
        outs = model(x)
        F.cross_entropy(outs[0], y).backward()  # an early exit's loss only
        return model.stages[0][0].weight.grad.clone(), model.exits[0][-1].weight.grad.clone()

    (stem1, head1), (stem_half, head_half), (stem0, head0) = grads(1.0), grads(0.5), grads(0.0)
    assert torch.allclose(stem_half, 0.5 * stem1) and not torch.equal(stem1, torch.zeros_like(stem1))
    assert torch.equal(stem0, torch.zeros_like(stem0))
    assert torch.equal(head1, head_half) and torch.equal(head1, head0)  # the head itself learns as before


def test_distillation_warmup_ramps_alpha():
    from branchy_tee.train.trainer import distill_alpha

    cfg = TrainConfig(alpha=0.4, distill_warmup=2.0)
    assert [distill_alpha(cfg, p) for p in (0.0, 1.0, 2.0, 3.5)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert distill_alpha(TrainConfig(alpha=0.4), 0.0) == 0.4


def test_a_resume_says_where_and_a_larger_epochs_recomputes_the_schedule(tmp_path, capsys):
    """`--resume` said nothing, and a larger --epochs restarted nothing: the cosine schedule stayed
    the old run's (it ended at lr 0)."""
    out = tmp_path / "run"
    fit(tiny(out, epochs=1, max_batches=2))
    capsys.readouterr()
    fit(tiny(out, epochs=3, max_batches=2, resume=True, quiet=False))
    printed = capsys.readouterr().out
    assert f"resumed {out} at epoch 2/3 (best epoch 1" in printed
    assert "the cosine schedule is recomputed for 3 epochs instead of 1" in printed
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    base = 3e-3
    assert lrs[1:] == pytest.approx([base * (1 + math.cos(2 * math.pi / 3)) / 2, 0.0], abs=1e-9)


def test_training_in_a_log_prints_progress_with_an_eta_and_warns_at_chance(tmp_path, capsys, monkeypatch):
    from branchy_tee.train import trainer

    monkeypatch.setattr(trainer, "LOG_EVERY", 0.0)  # (every batch: stderr is not a terminal here)
    fit(tiny(tmp_path / "run", epochs=1, max_batches=4, lr=1e-7, quiet=False))
    cap = capsys.readouterr()
    assert "batch 1/4" in cap.err and "batches/s, ETA" in cap.err
    assert "epoch 1/1:" in cap.out and "s left)" in cap.out
    assert "warning: the final exit is at chance" in cap.err


def test_calibration_that_finds_nothing_cheaper_than_the_full_model_says_so(capsys):
    from branchy_tee.evaluate.calibrate import _fall_back_to_the_full_model, calibrate

    torch.manual_seed(0)
    logits = [torch.randn(200, 10).log_softmax(1) for _ in range(2)]
    labels = torch.randint(0, 10, (200,))
    result = calibrate(logits, labels, [180, 200], max_accuracy_drop=0.5)
    result["full_flops"] = 150  # the heads cost more than early exit saves
    assert result["mean_flops"] >= 150
    chosen = dict(result)
    _fall_back_to_the_full_model(result, show=True)
    assert result["mean_flops"] == chosen["mean_flops"] and result["thresholds"] == chosen["thresholds"]
    assert "no exit setting within the budget is cheaper than the full model" in capsys.readouterr().err
