import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from branchy_tee.cli import main
from branchy_tee.client.envelopes import open_result
from branchy_tee.core.fileio import read_key_file
from branchy_tee.tee.sealed.envelope import request_digest
from runs import keygen, make_random_run, reference_decisions, set_thresholds, spreading_thresholds

ARCHS = [
    ("lenet5", 1, 28, {}),
    ("resnet18", 3, 32, {"width": 8}),
    ("mobilenetv2", 3, 32, {}),
    ("densenet121", 1, 28, {"growth": 8}),
]


def setup_bundle(
    tmp, arch, channels, size, config, n=40, criterion="entropy", thresholds="spread", version=1, chunk=None
):
    model, meta = make_random_run(tmp / "run", arch, channels, size, criterion=criterion, **config)
    torch.manual_seed(1)
    x = (torch.rand(n, channels, size, size) * 255).to(torch.uint8)
    xn = (x.float() / 255 - 0.5) / 0.25
    if thresholds == "spread":
        thresholds = spreading_thresholds(tmp / "run", xn, criterion)
    if thresholds is not None:
        set_thresholds(tmp / "run", thresholds)
    mo, do = keygen(tmp / "mo.key"), keygen(tmp / "do.key")
    args = ["seal", str(tmp / "run"), "--key", str(mo), "--out", str(tmp / "m.btee"), "--version", str(version)]
    assert main(args + (["--chunk-size", str(chunk)] if chunk else [])) == 0
    save_file({"x": x}, tmp / "x.safetensors")
    assert (
        main(
            [
                "encrypt-input",
                str(tmp / "x.safetensors"),
                "--bundle",
                str(tmp / "m.btee"),
                "--key",
                str(do),
                "--out",
                str(tmp / "req.enc"),
                "--request-id",
                "r1",
            ]
        )
        == 0
    )
    return model, xn, thresholds


def predict(tmp, *extra, out="res.enc", bundle="m.btee", req="req.enc", data_key="do.key"):
    return main(
        [
            "predict",
            "--bundle",
            str(tmp / bundle),
            "--input",
            str(tmp / req),
            "--output",
            str(tmp / out),
            "--model-key",
            str(tmp / "mo.key"),
            "--data-key",
            str(tmp / data_key),
            "--quiet",
            *extra,
        ]
    )


def results(tmp, out="res.enc", req="req.enc"):
    return open_result(
        (tmp / out).read_bytes(), read_key_file(tmp / "do.key"), out, request_digest((tmp / req).read_bytes())
    )[1]


@pytest.mark.parametrize("arch,channels,size,config", ARCHS, ids=[a[0] for a in ARCHS])
def test_predict_gives_evals_labels_and_exits(tmp_path, arch, channels, size, config):
    """What is sealed is what is evaluated: predict's answers are exactly those eval computes from the
    run's stage graphs (on refilled batches of 7 here, all exits at once in eval)."""
    model, xn, thresholds = setup_bundle(tmp_path, arch, channels, size, config)
    assert predict(tmp_path, "--batch-size", "7", "--stats-json", str(tmp_path / "stats.json")) == 0
    recs = results(tmp_path)
    labels, exits = reference_decisions(tmp_path / "run", xn, "entropy", thresholds)
    assert [r["label"] for r in recs] == labels.tolist()
    assert [r["exit"] for r in recs] == exits.tolist()
    assert len(set(exits.tolist())) >= 3  # the thresholds really spread samples over the exits
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["samples"] == len(xn) and sum(stats["exit_counts"]) == len(xn)
    assert stats["exit_counts"] == torch.bincount(exits, minlength=model.num_exits).tolist()
    assert {"samples", "exit_counts", "stages_loaded", "peak_rss_mib", "seconds"} <= set(stats)


def test_all_samples_at_exit_0_never_touch_later_stages(tmp_path):
    setup_bundle(tmp_path, "resnet18", 3, 32, {"width": 8}, thresholds=[1.0, 1.0, 1.0])  # entropy <= 1 always
    for f in (tmp_path / "m.btee").glob("stage-0[1-9].bin"):
        f.unlink()  # if the runtime opened any later stage file, it would fail
    assert predict(tmp_path, "--stats-json", str(tmp_path / "stats.json")) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["stages_loaded"] == [0] and stats["exit_counts"][0] == 40
    assert all(r["exit"] == 0 for r in results(tmp_path))


def test_memory_budget_bounds_resident_weights_and_keeps_answers(tmp_path):
    model, xn, thresholds = setup_bundle(tmp_path, "resnet18", 3, 32, {"width": 8}, n=60)
    stats_file = tmp_path / "stats.json"
    assert predict(tmp_path, "--batch-size", "8", "--stats-json", str(stats_file), out="free.enc") == 0
    free = json.loads(stats_file.read_text())
    assert free["evictions"] == 0 and free["stages_loaded"] == [0, 1, 2, 3]
    header = json.loads((tmp_path / "m.btee" / "header.json").read_text())["header"]
    sizes = [s["weight_bytes"] / 2**20 for s in header["stages"]]
    # Room for stage 0, the largest later stage and one batch's activations, but not for everything at once.
    budget_mib = sizes[0] + max(sizes[1:]) + free["activation_allowance_mib"] + 0.01
    assert budget_mib < sum(sizes) + free["activation_allowance_mib"]
    assert (
        predict(tmp_path, "--batch-size", "8", "--memory-budget", f"{budget_mib:.4f}", "--stats-json", str(stats_file))
        == 0
    )
    stats = json.loads(stats_file.read_text())
    assert stats["evictions"] > 0
    assert stats["resident_weights_peak_mib"] <= budget_mib - stats["activation_allowance_mib"]
    assert results(tmp_path) == results(tmp_path, "free.enc")


def test_budget_too_small_fails_without_output(tmp_path, capsys):
    setup_bundle(tmp_path, "resnet18", 3, 32, {"width": 8})
    assert predict(tmp_path, "--memory-budget", "0.01") == 1
    err = capsys.readouterr().err
    assert "memory budget 0.01 MiB is too small" in err and "--batch-size" in err
    assert not (tmp_path / "res.enc").exists()


def test_images_round_trip_with_mprofile(tmp_path, capsys):
    import mprof

    model, meta = make_random_run(tmp_path / "run", "lenet5", 1, 28)
    mo, do = keygen(tmp_path / "mo.key"), keygen(tmp_path / "do.key")
    assert main(["seal", str(tmp_path / "run"), "--key", str(mo), "--out", str(tmp_path / "m.btee")]) == 0
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(p)
        paths.append(str(p))
    rgb = tmp_path / "big.jpg"  # colour and another size: converted to grey and resized
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(rgb)
    paths.append(str(rgb))
    assert (
        main(
            [
                "encrypt-input",
                *paths,
                "--bundle",
                str(tmp_path / "m.btee"),
                "--key",
                str(do),
                "--out",
                str(tmp_path / "req.enc"),
                "--request-id",
                "r1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        predict(tmp_path, "--mprofile", str(tmp_path / "prof"), "--plaintext-result", str(tmp_path / "result.txt")) == 0
    )
    assert "the host can read them" in capsys.readouterr().err
    assert (
        main(
            [
                "decrypt-result",
                str(tmp_path / "res.enc"),
                "--key",
                str(do),
                "--json",
                "--request",
                str(tmp_path / "req.enc"),
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    header = json.loads((tmp_path / "m.btee" / "header.json").read_text())["header"]
    assert (doc["bundle_id"], doc["model_version"], doc["model_key_id"]) == (header["bundle_id"], 1, header["key_id"])
    recs = doc["records"]
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    assert all({"index", "label", "class_name", "confidence", "exit"} == set(r) for r in recs)
    # The reference: the same preprocessing by hand, through the plain model.
    imgs = [np.asarray(Image.open(p).convert("L").resize((28, 28), Image.BILINEAR)) for p in paths]
    x = (torch.tensor(np.stack(imgs)).float().unsqueeze(1) / 255 - 0.5) / 0.25
    labels, exits = reference_decisions(tmp_path / "run", x, "entropy", [-1.0, -1.0])
    assert [r["label"] for r in recs] == labels.tolist() and all(r["exit"] == 2 for r in recs)
    text = (tmp_path / "result.txt").read_text().splitlines()
    assert text[0] == "# request r1" and len(text) == 2 + 4
    dat = list((tmp_path / "prof").glob("mprofile_*.dat"))
    assert len(dat) == 1
    prof = mprof.read_mprofile_file(str(dat[0]))
    assert len(prof["mem_usage"]) >= 2 and max(prof["mem_usage"]) > 10
    assert prof["timestamp"] == sorted(prof["timestamp"])


def test_two_data_owners_in_one_run(tmp_path, capsys):
    setup_bundle(tmp_path, "lenet5", 1, 28, {})
    do2 = keygen(tmp_path / "do2.key")
    x2 = torch.rand(5, 1, 28, 28)
    save_file({"x": x2}, tmp_path / "x2.safetensors")
    assert (
        main(
            [
                "encrypt-input",
                str(tmp_path / "x2.safetensors"),
                "--bundle",
                str(tmp_path / "m.btee"),
                "--key",
                str(do2),
                "--out",
                str(tmp_path / "req2.enc"),
                "--request-id",
                "r2",
            ]
        )
        == 0
    )
    rc = main(
        [
            "predict",
            "--bundle",
            str(tmp_path / "m.btee"),
            "--input",
            str(tmp_path / "req.enc"),
            "--input",
            str(tmp_path / "req2.enc"),
            "--output",
            str(tmp_path / "a.enc"),
            "--output",
            str(tmp_path / "b.enc"),
            "--model-key",
            str(tmp_path / "mo.key"),
            "--data-key",
            str(tmp_path / "do.key"),
            "--data-key",
            str(do2),
            "--quiet",
        ]
    )
    assert rc == 0
    assert len(results(tmp_path, "a.enc")) == 40
    assert (
        len(
            open_result(
                (tmp_path / "b.enc").read_bytes(),
                read_key_file(do2),
                "b",
                request_digest((tmp_path / "req2.enc").read_bytes()),
            )[1]
        )
        == 5
    )
    capsys.readouterr()
    assert (
        main(
            [
                "decrypt-result",
                str(tmp_path / "b.enc"),
                "--key",
                str(tmp_path / "do.key"),
                "--request",
                str(tmp_path / "req2.enc"),
            ]
        )
        == 1
    )
    assert "no key for" in capsys.readouterr().err


# Run predict in a fresh interpreter in which the owner-side libraries cannot be imported at all, then
# list what it did import: the enclave's import closure.
WITHOUT_OWNER_SIDE = r"""
import json, sys
OWNER_SIDE = {"torch", "onnx", "onnxscript", "PIL", "matplotlib", "jinja2", "tqdm", "aiohttp"}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OWNER_SIDE:
            raise ImportError(f"{name} is owner-side; the enclave must not import it")
sys.meta_path.insert(0, Refuse())
from branchy_tee.tee.predict import main
rc = main(sys.argv[2:])
json.dump(sorted({m.split(".")[0] for m in sys.modules}), open(sys.argv[1], "w"))
sys.exit(rc)
"""


def test_the_enclave_imports_no_torch(tmp_path):
    import subprocess
    import sys

    model, xn, thresholds = setup_bundle(tmp_path, "lenet5", 1, 28, {})
    args = [
        "--bundle",
        str(tmp_path / "m.btee"),
        "--input",
        str(tmp_path / "req.enc"),
        "--output",
        str(tmp_path / "res.enc"),
        "--model-key",
        str(tmp_path / "mo.key"),
        "--data-key",
        str(tmp_path / "do.key"),
        "--quiet",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_OWNER_SIDE, str(tmp_path / "modules.json"), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    imported = set(json.loads((tmp_path / "modules.json").read_text()))
    assert {"onnxruntime", "numpy", "cryptography", "safetensors"} <= imported
    assert not imported & {"torch", "onnx", "onnxscript", "PIL", "matplotlib"}
    labels, exits = reference_decisions(tmp_path / "run", xn, "entropy", thresholds)
    assert [r["label"] for r in results(tmp_path)] == labels.tolist()


# ------------------------------------------------------------------------- integrity: exit 1, one line, nothing written
def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _refused(tmp_path, capsys, match, *extra, **kw):
    capsys.readouterr()
    assert predict(tmp_path, *extra, **kw) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert "Traceback" not in err
    assert not (tmp_path / kw.get("out", "res.enc")).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".res")]  # no temporary file left


@pytest.fixture
def sealed(tmp_path):
    # Never exit early, so every stage is read; small chunks so stages have several.
    setup_bundle(tmp_path, "lenet5", 1, 28, {}, thresholds=None, chunk=4096)
    return tmp_path


def test_flipped_header_byte(sealed, capsys):
    hdr = sealed / "m.btee" / "header.json"
    text = hdr.read_text()
    hdr.write_text(text.replace('"model_version": 1', '"model_version": 2'))
    _refused(sealed, capsys, "header failed authentication")


# The parallel case: batches of 8 on 3 threads, so a later stage is first needed on a worker thread.
PARALLEL = ("--batch-size", "8", "--threads", "3")


@pytest.mark.parametrize("extra", [(), PARALLEL], ids=["one-batch", "parallel-batches"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_flipped_stage_byte(sealed, capsys, stage, extra):
    _flip(sealed / "m.btee" / f"stage-{stage:02d}.bin", 5000)
    _refused(sealed, capsys, f"stage-{stage:02d}.bin: chunk 1 failed authentication", *extra)


def test_parallel_batches_give_the_one_batch_answers(sealed):
    assert predict(sealed) == 0
    alone = results(sealed)
    assert predict(sealed, *PARALLEL, "--stats-json", str(sealed / "stats.json")) == 0
    assert results(sealed) == alone
    assert sum(json.loads((sealed / "stats.json").read_text())["exit_counts"]) == len(alone)


def test_truncated_stage(sealed, capsys):
    f = sealed / "m.btee" / "stage-02.bin"
    f.write_bytes(f.read_bytes()[:-100])
    _refused(sealed, capsys, "stage-02.bin: truncated")


def test_two_chunks_swapped(sealed, capsys):
    f = sealed / "m.btee" / "stage-02.bin"
    data = f.read_bytes()
    c = 4096 + 16
    f.write_bytes(data[c : 2 * c] + data[:c] + data[2 * c :])
    _refused(sealed, capsys, "stage-02.bin: chunk 0 failed authentication")


def test_stage_swapped_between_bundles_and_versions(sealed, capsys):
    mo = str(sealed / "mo.key")
    for version, name in [(1, "other.btee"), (2, "v2.btee")]:
        assert (
            main(
                [
                    "seal",
                    str(sealed / "run"),
                    "--key",
                    mo,
                    "--out",
                    str(sealed / name),
                    "--version",
                    str(version),
                    "--chunk-size",
                    "4096",
                ]
            )
            == 0
        )
    original = (sealed / "m.btee" / "stage-01.bin").read_bytes()
    for name in ["other.btee", "v2.btee"]:
        (sealed / "m.btee" / "stage-01.bin").write_bytes((sealed / name / "stage-01.bin").read_bytes())
        _refused(sealed, capsys, "stage-01.bin: chunk 0 failed authentication")
    (sealed / "m.btee" / "stage-01.bin").write_bytes(original)
    assert predict(sealed) == 0


def test_rollback_below_min_version(sealed, capsys):
    capsys.readouterr()
    assert predict(sealed, "--min-version", "2") == 1
    assert "model version 1 is older than the minimum 2" in capsys.readouterr().err
    assert not (sealed / "res.enc").exists()


def test_wrong_keys_and_foreign_key_ids(sealed, capsys):
    keygen(sealed / "other.key")
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--bundle",
                str(sealed / "m.btee"),
                "--input",
                str(sealed / "req.enc"),
                "--output",
                str(sealed / "res.enc"),
                "--model-key",
                str(sealed / "other.key"),
                "--data-key",
                str(sealed / "do.key"),
            ]
        )
        == 1
    )
    assert "model key id" in capsys.readouterr().err
    _refused(sealed, capsys, "which this run has no key for", data_key="other.key")


def test_flipped_request_and_result(sealed, capsys):
    good = (sealed / "req.enc").read_bytes()
    for offset in [3, 30, len(good) // 2, len(good) - 1]:
        _flip(sealed / "req.enc", offset)
        _refused(sealed, capsys, "req.enc")
        (sealed / "req.enc").write_bytes(good)
    assert predict(sealed) == 0
    _flip(sealed / "res.enc", 200)
    capsys.readouterr()
    assert (
        main(
            [
                "decrypt-result",
                str(sealed / "res.enc"),
                "--key",
                str(sealed / "do.key"),
                "--request",
                str(sealed / "req.enc"),
                "--out",
                str(sealed / "r.json"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "failed authentication" in err and len(err.strip().splitlines()) == 1
    assert not (sealed / "r.json").exists()


# --------------------------------------------------------------------------- bad input
def _raw_request(tmp, x, key_file, rid="r1"):
    """A request sealed without the client-side checks, as a malicious or buggy data owner could."""
    from safetensors.torch import save

    from branchy_tee.tee.sealed.envelope import REQUEST_MAGIC, seal_envelope

    header = {
        "format": "branchy-tee/request/v1",
        "request_id": rid,
        "samples": len(x),
        "shape": list(x.shape[1:]),
        "dtype": "x",
    }
    (tmp / "req.enc").write_bytes(seal_envelope(REQUEST_MAGIC, header, save({"inputs": x}), read_key_file(key_file)))


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.zeros(2, 3, 28, 28), "does not match the model's input"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.float64), "dtype is float64"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN or infinite"),
        (torch.full((2, 1, 28, 28), float("inf")), "NaN or infinite"),
        (torch.zeros(0, 1, 28, 28), "no samples"),
    ],
    ids=["shape", "dtype", "nan", "inf", "empty"],
)
def test_bad_requests_are_refused(sealed, capsys, x, match):
    _raw_request(sealed, x, sealed / "do.key")
    _refused(sealed, capsys, match)


def test_bad_inputs_for_encrypt_input(sealed, capsys):
    bad_png = sealed / "bad.png"
    bad_png.write_bytes(b"\x89PNG not really")
    np.save(sealed / "wrong.npy", np.zeros((2, 3, 5, 5), dtype=np.float32))
    np.save(sealed / "empty.npy", np.zeros((0, 1, 28, 28), dtype=np.uint8))
    np.save(sealed / "nan.npy", np.full((1, 1, 28, 28), np.nan, dtype=np.float32))
    for inp, match in [
        (bad_png, "unreadable image"),
        (sealed / "wrong.npy", "does not match"),
        (sealed / "empty.npy", "no samples"),
        (sealed / "nan.npy", "NaN"),
        (sealed / "missing.png", "file not found"),
    ]:
        capsys.readouterr()
        rc = main(
            [
                "encrypt-input",
                str(inp),
                "--bundle",
                str(sealed / "m.btee"),
                "--key",
                str(sealed / "do.key"),
                "--out",
                str(sealed / "new.enc"),
            ]
        )
        err = capsys.readouterr().err
        assert rc == 1 and match in err and len(err.strip().splitlines()) == 1, err
        assert not (sealed / "new.enc").exists()


def test_usage_errors(sealed, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--bundle", "x"])
    assert e.value.code == 2
    rc = main(
        [
            "predict",
            "--bundle",
            str(sealed / "m.btee"),
            "--input",
            str(sealed / "req.enc"),
            "--output",
            "a",
            "--output",
            "b",
            "--model-key",
            str(sealed / "mo.key"),
            "--data-key",
            str(sealed / "do.key"),
        ]
    )
    assert rc == 2 and "one result file per request" in capsys.readouterr().err
