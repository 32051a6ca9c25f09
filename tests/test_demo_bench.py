import json
import re
from pathlib import Path

import pytest

from branchy_tee.cli import main
from branchy_tee.data import load_dataset
from branchy_tee.data.preprocess import tensor_to_inputs
from branchy_tee.models.rundir import read_model_card
from runs import reference_decisions

pytestmark = pytest.mark.slow  # the demo and the benchmark, end to end


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n") :])
    assert "SIMULATED" in printed
    steps = [int(n) for n in re.findall(r"^\[(\d)/8\]", printed, re.M)]
    assert steps == list(range(1, 9))  # every step once, in order ([7/8] came before [6/8])
    # The data owners' decrypted answers are exactly the early-exit decisions eval computes from the
    # run's stage graphs (what was sealed is what was evaluated).
    card = read_model_card(out / "mo" / "run")
    test = load_dataset("synthetic", "test", synthetic=card.data.synthetic)
    x = tensor_to_inputs(test.images[:64], card.preprocessing, "test")
    labels, exits = reference_decisions(out / "mo" / "run", x, card.criterion, card.thresholds)
    records = []
    for who in ("do-a", "do-b"):
        text = (out / who / "result.txt").read_text().splitlines()[1:]
        records += [line.split("\t") for line in text]
        assert summary["data_owners"][who]["cannot_read_other_owner"] is True
    assert [int(r[1]) for r in records] == labels.tolist()
    assert [int(r[4]) for r in records] == exits.tolist()
    # The final exit's test accuracy and the calibrated setting's loss on test, against the budget.
    t = summary["test"]
    assert t["final_exit_accuracy"] == summary["final_accuracy"] and t["budget_pp"] == pytest.approx(1.0)
    assert t["calibrated_loss_pp"] == pytest.approx(100 * (t["final_exit_accuracy"] - t["calibrated_accuracy"]))
    assert "final exit" in printed and "early exit (calibrated)" in printed
    # early exit against three baselines: the engine's full model, the one-graph model, ONNX Runtime's defaults
    timing = summary["timing"]
    for baseline in (timing["vs_every_stage"], timing, timing["vs_onnxruntime"]):
        assert baseline["latency_speedup"] > 0 and baseline["throughput_speedup"] > 0
    assert "on the same engine" in printed and "ONNX Runtime's defaults" in printed
    assert printed.index("about") < printed.index("[1/8]")  # the expected duration comes first
    enclave = summary["enclave"]
    assert sum(enclave["early_exit"]["exit_counts"]) == 64
    assert enclave["full_model"]["exit_counts"][-1] == 64
    # staged loading: easy images need stage 0 only; a budget below the weights evicts and answers the same
    if enclave["easy_images"]:
        assert enclave["easy_images"]["stages_loaded"] == [0]
    budget = enclave["memory_budget"]
    assert budget["resident_weights_peak_mib"] < enclave["full_model"]["resident_weights_peak_mib"]
    assert budget["evictions"] > 0 or len(budget["stages_loaded"]) < 3  # all three stages never fit at once
    for who in ("do-a", "do-b"):
        from branchy_tee.client.envelopes import open_result
        from branchy_tee.core.fileio import read_key_file
        from branchy_tee.tee.sealed.envelope import request_digest

        key, digest = (
            read_key_file(out / who / "data.key"),
            request_digest((out / "io" / f"{who}-request.enc").read_bytes()),
        )
        answers = open_result((out / "io" / f"{who}-result.enc").read_bytes(), key, "r", digest)[1]
        budgeted = open_result((out / "io" / f"{who}-result-budget.enc").read_bytes(), key, "r", digest)[1]
        assert budgeted == answers  # the same answers under the budget
    # online: both data owners were answered through attested TLS, by early exit and the full model
    assert all(summary["online"][m]["requests"] == 40 for m in ("early_exit", "full_model"))
    for f in summary["files"]["mprofile"] + [summary["files"]["accuracy_plot"], summary["files"]["memory_plot"]]:
        assert Path(f).is_file(), f
    # Every broker logged its decisions, and stopped: nothing is listening any more.
    for who in ("mo", "do-a", "do-b"):
        lines = (out / "brokers" / f"{who}-audit.jsonl").read_text().splitlines()
        assert len(lines) >= 2 and all(json.loads(line) for line in lines)


def test_bench_quick_produces_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {"latency_speedup", "throughput_speedup", "accuracy_drop_pp", "oracle_speedup", "model"} <= set(
        r["early_exit"]
    )
    assert {"latency_speedup", "throughput_speedup"} <= set(r["early_exit"]["vs_onnxruntime"])
    # Beside the speed figures, what early exit costs in accuracy on the test split.
    e = r["early_exit"]
    assert 0 < e["final_exit_test_accuracy"] <= 1 and e["final_exit_test_accuracy"] == e["accuracy_full"]
    assert e["calibrated_test_loss_pp"] == pytest.approx(100 * (e["accuracy_full"] - e["accuracy_early_exit"]))
    assert e["calibration_budget_pp"] == pytest.approx(1.0) and e["calibration_margin_se"] == 2.5
    assert e["within_budget"] == (e["calibrated_test_loss_pp"] <= 1.0 + 1e-9)
    assert r["enclave"]["early_exit_peak_mib"] > 0 and r["enclave"]["import_closure"]["has_torch"] is False
    assert {"onnxruntime", "numpy", "cryptography"} <= set(r["enclave"]["import_closure"]["packages"])
    assert {"peak_ratio", "staged_mib", "full_mib"} <= set(r["staged_memory"])
    assert r["aead"]["decrypt_gbps"] > 0
    assert r["cold_start_ratio"] > 0
    assert "quote_verify_ms" in r
    assert len(r["exit_profile"]) == 12 and all(len(p["exit_flops"]) == p["exits"] for p in r["exit_profile"])
    assert r["staged_memory"]["staged_stages_loaded"] == [0, 1] and r["staged_memory"]["full_stages_loaded"] == [
        0,
        1,
        2,
        3,
    ]
    printed = capsys.readouterr().out
    assert "early exit vs full forward" in printed and "test accuracy   final exit" in printed


def test_bench_serve_compares_the_online_service_with_its_full_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    skip = [a for part in ("early_exit", "enclave", "exit_profile", "sealed", "quote") for a in ("--skip", part)]
    assert main(["bench", "--quick", "--serve", *skip, "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    s = json.loads(out.read_text())["serve"]
    assert [r["clients"] for r in s["early_exit"]] == [r["clients"] for r in s["full_model"]] == [1, 4]
    for r in s["early_exit"] + s["full_model"]:
        assert r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert s["summary"]["attest_ms_per_connection"] > 0
    b = s["batched"]  # the second load shape: requests of several images each, never split across batches
    for r in (b["early_exit"], b["full_model"]):
        assert r["requests"] > 0 and r["errors"] == 0 and r["mean_batch_samples"] >= b["images_per_request"]
    assert b["summary"]["images_per_s_speedup"] > 0
    assert "online service" in capsys.readouterr().out
