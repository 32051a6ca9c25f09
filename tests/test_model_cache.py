"""The trained model that the demo and the benchmark share: trained once, reused, retrained when a run
was interrupted."""

import json

import pytest

from branchy_tee.cli import build_parser
from branchy_tee.models.rundir import MODEL_CARD
from branchy_tee.train.cache import SHOWCASE_MODEL, cache_entry, cached_model, recipe, stale_because

pytestmark = pytest.mark.slow  # trains the quick model


def test_the_model_is_trained_once_and_then_reused(tmp_path):
    spec, said = recipe(quick=True), []
    run = cached_model(tmp_path, spec, quiet=True, log=said.append)
    weights = next(run.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert cached_model(tmp_path, spec, quiet=True, log=said.append) == run
    assert weights.stat().st_mtime_ns == stamp  # not trained again
    assert said[0].startswith("training") and said[-1].startswith("reusing the cached model")


def test_an_interrupted_run_in_the_cache_is_trained_again(tmp_path):
    spec = recipe(quick=True)
    run = cached_model(tmp_path, spec, quiet=True, log=lambda _: None)
    assert not list(tmp_path.glob("*.partial"))  # trained beside the entry, then moved into place
    (run / MODEL_CARD).unlink()  # as if training had been killed before the card was written
    said: list[str] = []
    assert cached_model(tmp_path, spec, quiet=True, log=said.append) == run
    assert "interrupted" in said[0] and said[1].startswith("training") and (run / MODEL_CARD).is_file()


def test_an_uncalibrated_or_otherwise_trained_run_is_not_reused(tmp_path):
    spec = recipe(quick=True)
    run = cached_model(tmp_path, spec, quiet=True, log=lambda _: None)
    card = json.loads((run / MODEL_CARD).read_text())
    (run / MODEL_CARD).write_text(json.dumps({**card, "thresholds": None}))  # killed before calibration
    assert "never calibrated" in stale_because(run, spec)
    (run / MODEL_CARD).write_text(json.dumps(card))
    assert stale_because(run, spec) is None
    other = {**spec, "lr": spec["lr"] / 10}  # the same folder name, another recipe
    assert cache_entry(tmp_path, other) == run and "lr" in stale_because(run, other)


def test_demo_and_bench_share_one_cache_entry():
    parser = build_parser()
    demo = parser.parse_args(["demo"])
    bench = parser.parse_args(["bench"])
    assert demo.cache_dir == bench.cache_dir
    assert cache_entry(demo.cache_dir, recipe(False)) == cache_entry(bench.cache_dir, recipe(False))
    # --epochs gives another recipe, hence another entry (a cached model is never taken for another)
    assert cache_entry(demo.cache_dir, recipe(False, epochs=3)) != cache_entry(demo.cache_dir, recipe(False))
    assert recipe(False)["net"] == SHOWCASE_MODEL["net"]
