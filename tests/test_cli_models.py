import json
import subprocess
import sys

from branchy_tee.cli import main


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows][:2] == ["lenet5", "alexnet"]
    assert len(rows) == 12
    for r in rows:
        assert {"name", "params", "exits", "exit_flops", "size_mib"} <= set(r)
        assert len(r["exit_flops"]) == r["exits"] >= 3
        assert r["exit_flops"][-1] == max(r["exit_flops"])
        assert r["size_mib"] > 0
    r152 = next(r for r in rows if r["name"] == "resnet152")
    assert abs(r152["size_mib"] - r152["params"] * 4 / 2**20) / r152["size_mib"] < 0.01


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet152" in out and "mobilenetv2" in out


def test_usage_errors_exit_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "branchy_tee.cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "invalid choice" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_everywhere():
    proc = subprocess.run([sys.executable, "-m", "branchy_tee.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "models" in proc.stdout
