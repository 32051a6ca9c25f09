"""``branchy-tee bench``'s sealed-bundle figures, on a model with random weights (ResNet-152; the
quick run a narrow ResNet-18): peak RSS of ``predict`` when samples leave by exit 1 against loading
the whole model, AES-GCM decrypt+verify throughput of a stage file, and the cold start to the first
prediction from the sealed bundle against the plain ONNX file."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from branchy_tee.bench.common import log, predict_subprocess, timer


def _random_bundle(work: Path, arch: str, config: dict, thresholds_for: dict[str, list[float]]) -> dict[str, Path]:
    """Export one random-weight model once and seal its stage graphs several times, once per threshold
    setting; also write the full model as a plain ONNX file (``plain.onnx``, for the cold start)."""
    import dataclasses

    from branchy_tee.core.fileio import write_key_file
    from branchy_tee.core.keys import generate_key
    from branchy_tee.export.onnx import export_full_model, export_stages
    from branchy_tee.models import create_model
    from branchy_tee.models.cost import arch_part_flops
    from branchy_tee.seal.bundle import seal_graphs
    from branchy_tee.tee.criteria import ENTROPY
    from branchy_tee.tee.sealed.facts import ModelFacts
    from branchy_tee.tee.sealed.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = create_model(arch, **config).eval()
    stage_flops, head_flops = arch_part_flops(arch, model.config, (3, 32, 32))
    card = ModelFacts(
        arch=arch,
        config=model.config,
        classes=tuple(str(i) for i in range(10)),
        preprocessing=Preprocessing.for_images((3, 32, 32), [0.5] * 3, [0.25] * 3),
        criterion=ENTROPY,
        thresholds=None,
        stage_flops=tuple(stage_flops),
        head_flops=tuple(head_flops),
    )
    key = generate_key()
    write_key_file(work / "model.key", key)
    log(f"exporting {arch} to ONNX stage graphs")
    graphs, facts = export_stages(model, (3, 32, 32))
    bundles = {}
    for name, thresholds in thresholds_for.items():
        bundles[name] = work / f"{name}.btee"
        seal_graphs(graphs, facts, dataclasses.replace(card, thresholds=tuple(thresholds)), key, bundles[name])
    (work / "plain.onnx").write_bytes(export_full_model(model, (3, 32, 32)))
    return bundles


def bench_sealed(work: Path, quick: bool) -> dict:
    from branchy_tee.tee.criteria import ENTROPY

    arch, config = ("resnet18", {"width": 16}) if quick else ("resnet152", {})
    never = ENTROPY.never
    # "staged": everything leaves by exit 1 (exit 1 takes all: normalised entropy <= 1 always holds).
    bundles = _random_bundle(work, arch, config, {"staged": [never, 1.0, never], "full": [never] * 3})
    return {
        "staged_memory": staged_memory(work, bundles, arch),
        "aead": aead_throughput(work, bundles, quick),
        "cold_start": cold_start(work, bundles, quick),
    }


def staged_memory(work: Path, bundles: dict[str, Path], arch: str) -> dict:
    """Peak RSS of predict, one subprocess each: staged (exit <= 1) against the full load."""
    from branchy_tee.client.envelopes import seal_request
    from branchy_tee.core.fileio import write_key_file
    from branchy_tee.core.keys import generate_key

    data_key = generate_key()
    write_key_file(work / "data.key", data_key)
    torch.manual_seed(1)
    (work / "req.enc").write_bytes(seal_request(torch.randn(32, 3, 32, 32), data_key))
    # An enclave's protected memory is small (93-128 MiB usable on SGX1), so it answers in small
    # batches; the headline figure is batch 4, batch 16 is recorded beside it.
    log(f"peak RSS of predict ({arch}, one subprocess each): staged vs full load")
    runs = {}
    for bs in (4, 16):
        staged = predict_subprocess(work, bundles["staged"], f"staged{bs}", bs)
        full = predict_subprocess(work, bundles["full"], f"full{bs}", bs)
        runs[bs] = {
            "batch_size": bs,
            "staged_mib": staged["peak_rss_mib"],
            "full_mib": full["peak_rss_mib"],
            "peak_ratio": staged["peak_rss_mib"] / full["peak_rss_mib"],
            "staged_stages_loaded": staged["stages_loaded"],
            "full_stages_loaded": full["stages_loaded"],
        }
    return {"model": arch, **runs[4], "batch_16": runs[16]}


def aead_throughput(work: Path, bundles: dict[str, Path], quick: bool) -> dict:
    """Decrypt + verify throughput of the largest stage file (page cache warm): into a reused buffer
    (the AEAD work) and into fresh memory (what loading a stage costs: the kernel must also map and
    zero every page of the new buffer)."""
    from branchy_tee.core.fileio import read_key_file
    from branchy_tee.tee.sealed.bundle import open_bundle

    log("AES-256-GCM decrypt+verify throughput")
    bundle = open_bundle(bundles["full"], read_key_file(work / "model.key"))
    big = max(range(bundle.num_stages), key=lambda k: bundle.header.stages[k].plaintext_size)
    size = bundle.header.stages[big].plaintext_size
    warm = bytearray(size)
    warm_t, fresh_t = [], []
    for _ in range(3 if quick else 5):
        with timer() as t:
            bundle.decrypt_stage(big, into=warm)
        warm_t.append(t[1])
        with timer() as t:
            buf = bundle.decrypt_stage(big)
        fresh_t.append(t[1])
        del buf
    return {
        "decrypt_gbps": size / min(warm_t) / 1e9,
        "stage_load_gbps": size / min(fresh_t) / 1e9,
        "stage_mib": size / 2**20,
        "chunk_mib": bundle.header.chunk_size / 2**20,
    }


def cold_start(work: Path, bundles: dict[str, Path], quick: bool) -> dict:
    """Cold start to the first prediction through the whole model: the sealed bundle (verify the
    header, decrypt every stage, build its session, run one sample through every stage) against one
    session on the plain ONNX file of the whole model, with the same session options."""
    import onnxruntime as ort

    from branchy_tee.core.fileio import read_key_file
    from branchy_tee.tee.criteria import ENTROPY
    from branchy_tee.tee.engine import early_exit
    from branchy_tee.tee.graphs import INPUT, PROVIDERS, session_options
    from branchy_tee.tee.sealed.bundle import open_bundle
    from branchy_tee.tee.stages import StageStore

    log("cold start: sealed bundle vs the plain ONNX file")
    model_key = read_key_file(work / "model.key")
    x1 = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)

    def sealed_start():
        b = open_bundle(bundles["full"], model_key)
        early_exit(StageStore(b).get, b.num_stages, x1, ENTROPY, [ENTROPY.never] * (b.num_stages - 1))

    def plain_start():
        session = ort.InferenceSession(str(work / "plain.onnx"), session_options(), providers=PROVIDERS)
        session.run(None, {INPUT: x1})

    def staged_start():  # the sample leaves by exit 1: stages 0 and 1 are all that is decrypted and built
        b = open_bundle(bundles["staged"], model_key)
        early_exit(StageStore(b).get, b.num_stages, x1, b.header.criterion, b.header.exit_thresholds())

    sealed_t: list[float] = []
    plain_t: list[float] = []
    staged_t: list[float] = []
    for _ in range(2 if quick else 5):
        for fn, acc in ((plain_start, plain_t), (sealed_start, sealed_t), (staged_start, staged_t)):
            with timer() as t:
                fn()
            acc.append(t[1])
    cold = {
        "sealed_s": statistics.median(sealed_t),
        "plain_s": statistics.median(plain_t),
        "sealed_exit_1_s": statistics.median(staged_t),
    }
    cold["ratio"] = cold["sealed_s"] / cold["plain_s"]
    return cold
