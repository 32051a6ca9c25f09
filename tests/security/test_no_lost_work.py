"""Work is never destroyed silently, and a newcomer's mistakes get one line, never a traceback:
results that would replace their own request, a directory or another request, a request written
over an existing one (orphaning its result), training over an existing run (which overwrote the
weights and appended to the old metrics), model options that are not positive numbers, and serve on
a port in use (which used to fetch the model key first, then fail with a traceback)."""

from __future__ import annotations

import json
import socket

import pytest

from branchy_tee.cli import main
from test_bad_input import assert_nothing_written, predict_argv, run_cli, w  # noqa: F401 (a fixture)
from world import quiet_call

SYN = ["--dataset", "synthetic", "--synthetic-channels", "1", "--synthetic-size", "28", "--num-workers", "0"]
TINY = ["--net", "lenet5", *SYN, "--synthetic-samples", "100", "--epochs", "1", "--max-batches", "1"]


def _replace_output(argv: list[str], path: str) -> list[str]:
    i = argv.index("--output")
    return argv[: i + 1] + [path] + argv[i + 2 :]


@pytest.mark.parametrize(
    "target, match",
    [
        (lambda d: d / "do1.req", "is also an input: writing it would replace that input"),
        (lambda d: d / "out", "is a directory: give a file name"),
        (lambda d: d / "other.req", "is an existing request: give another file name for the result"),
    ],
    ids=["its-own-request", "a-directory", "another-request"],
)
def test_predict_never_writes_a_result_over_a_request_or_a_directory(w, target, match):  # noqa: F811
    (w / "other.req").write_bytes((w / "do1.req").read_bytes())
    before = {p.name: p.read_bytes() for p in w.glob("*.req")}
    run_cli(_replace_output(predict_argv(w), str(target(w))), 2, match)
    assert {p.name: p.read_bytes() for p in w.glob("*.req")} == before
    assert_nothing_written(w)


def test_encrypt_input_does_not_replace_an_existing_request_without_force(w, tmp_path):  # noqa: F811
    import numpy as np

    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 1, 28, 28), np.float32))
    argv = ["encrypt-input", str(x), "--bundle", str(w / "m.btee"), "--key", str(w / "do1.key")]
    before = (w / "do1.req").read_bytes()
    run_cli([*argv, "--out", str(w / "do1.req")], 2, "exists: give another name, or --force to replace it")
    assert (w / "do1.req").read_bytes() == before
    run_cli([*argv, "--out", str(x), "--force"], 2, "is also an input")
    assert quiet_call(main, [*argv, "--out", str(w / "do1.req"), "--force"])[0] == 0
    assert (w / "do1.req").read_bytes() != before


def test_training_into_an_existing_run_needs_resume_or_force(tmp_path):
    out = tmp_path / "run"
    assert quiet_call(main, ["train", *TINY, "--out", str(out)])[0] == 0
    weights = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    run_cli(["train", *TINY, "--out", str(out)], 2, "already holds a run (checkpoint.pt): give a new --out, --resume")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == weights
    assert quiet_call(main, ["train", *TINY, "--out", str(out), "--force"])[0] == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # replaced, not appended to


@pytest.mark.parametrize(
    "net, option, match",
    [
        ("mobilenetv1", "width_mult=abc", "--model-config width_mult=abc: mobilenetv1's width_mult takes a positive"),
        ("resnet18", "width=0", "--model-config width=0: resnet18's width takes a positive number"),
    ],
)
def test_model_options_that_are_not_positive_numbers(tmp_path, net, option, match):
    argv = ["train", "--net", net, *SYN, "--epochs", "1", "--model-config", option, "--out", str(tmp_path / "r")]
    run_cli(argv, 2, match)
    assert not (tmp_path / "r").exists()


def test_serve_on_a_port_in_use_says_so_before_it_attests(w):  # noqa: F811
    """The model broker's address answers nothing: the port error must come first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--bundle", str(w / "m.btee"), "--listen", f"127.0.0.1:{port}", "--attest", "simulated"]
        argv += ["--model-broker", "http://127.0.0.1:9", "--model-broker-identity", "ab" * 32]
        run_cli(argv, 1, f"--listen 127.0.0.1:{port}: cannot listen there (Address already in use)")


def test_images_far_from_the_models_size_need_resize_and_resizes_are_said(w, tmp_path):  # noqa: F811
    """A 3000x2000 RGBA picture was silently squeezed into 28x28 grey."""
    from PIL import Image

    Image.new("RGBA", (300, 200)).save(tmp_path / "big.png")
    Image.new("L", (32, 32)).save(tmp_path / "near.png")
    argv = ["encrypt-input", "--bundle", str(w / "m.btee"), "--key", str(w / "do1.key")]
    run_cli([*argv, str(tmp_path / "big.png"), "--out", str(w / "r1.req")], 1, "more than 2x apart); give --resize")
    assert not (w / "r1.req").exists()
    rc, _, err = quiet_call(
        main, [*argv, str(tmp_path / "big.png"), str(tmp_path / "near.png"), "--resize", "--out", str(w / "r1.req")]
    )
    assert rc == 0 and "big.png: resized 300x200 to 28x28" in err and "near.png: resized 32x32 to 28x28" in err


def test_the_plaintext_file_never_replaces_a_sealed_result(w):  # noqa: F811
    argv = predict_argv(w) + ["--plaintext-result", str(w / "out" / "res.enc")]
    run_cli(argv, 2, "two --output (or --plaintext-result) paths are the same")
    assert_nothing_written(w)


def test_a_release_never_makes_the_development_key_it_names(tmp_path):
    from branchy_tee.core.errors import BranchyError
    from branchy_tee.tee.attest.providers import dev_public_key

    with pytest.raises(BranchyError, match="the development key .* is not here: copy the shared key"):
        dev_public_key(tmp_path / "absent.key")
    assert not (tmp_path / "absent.key").exists()
