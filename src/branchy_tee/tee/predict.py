"""The enclave entry point: decrypt requests, run batched early exit over the sealed bundle, seal
one result per request.

Run as ``python -m branchy_tee.tee.predict`` inside Gramine (or natively), or as
``branchy-tee predict``. Nothing is written until every input has been verified and answered; each
output appears atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from branchy_tee.core.commandline import ArgumentParser
from branchy_tee.core.errors import BranchyError, UsageError
from branchy_tee.tee.startup import Log, Trust, add_trust_arguments, compute_threads, make_log, trust

if TYPE_CHECKING:
    import numpy as np

    from branchy_tee.tee.engine import Answers
    from branchy_tee.tee.sealed.bundle import SealedBundle
    from branchy_tee.tee.sealed.envelope import RequestHeader

    Request = tuple[RequestHeader, np.ndarray, bytes]  # (its header, its inputs, the file's bytes)

PROG = "branchy-tee predict"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="sealed model bundle directory (model.btee)")
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="REQUEST",
        help="encrypted request from a data owner (repeat for several)",
    )
    p.add_argument(
        "--output",
        action="append",
        required=True,
        metavar="RESULT",
        help="encrypted result file, one per --input, in the same order",
    )
    keys = p.add_argument_group("keys (development: from files)")
    keys.add_argument("--model-key", metavar="FILE", help="model owner's key file")
    keys.add_argument(
        "--data-key", action="append", default=[], metavar="FILE", help="a data owner's key file (repeatable)"
    )
    add_trust_arguments(p, data_brokers=True)
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch through the stages")
    p.add_argument(
        "--memory-budget", type=float, metavar="MiB", help="limit for resident weights + one batch's activations"
    )
    p.add_argument("--min-version", type=int, default=0, help="refuse bundles older than this model version")
    p.add_argument(
        "--plaintext-result", metavar="FILE", help="also write the answers in plain text (the host can read it)"
    )
    p.add_argument("--mprofile", metavar="DIR", help="write an mprofile_<timestamp>.dat memory trace into DIR")
    p.add_argument("--stats-json", metavar="FILE", help="write run statistics as JSON")
    p.add_argument(
        "--full-model",
        action="store_true",
        help="ignore the exit thresholds: every sample through the final exit (for comparisons)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads (default: OMP_NUM_THREADS, else 1): a request of several batches runs that many "
        "batches at once on single-threaded stage sessions; with --memory-budget, one batch at a time with "
        "that many threads inside each stage",
    )
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")


def records_for(answers: Answers, classes: Sequence[str], lo: int, hi: int) -> list[dict[str, Any]]:
    return [
        {
            "index": i - lo,
            "label": int(answers.labels[i]),
            "class_name": classes[int(answers.labels[i])],
            "confidence": round(float(answers.confidences[i]), 6),
            "exit": int(answers.exits[i]),
        }
        for i in range(lo, hi)
    ]


def plaintext_lines(request_id: str, records: list[dict[str, Any]]) -> list[str]:
    lines = [f"# request {request_id}", "index\tlabel\tclass_name\tconfidence\texit"]
    return lines + [
        f"{r['index']}\t{r['label']}\t{r['class_name']}\t{r['confidence']:.4f}\t{r['exit']}" for r in records
    ]


def _check_arguments(args: argparse.Namespace) -> None:
    if len(args.input) != len(args.output):
        raise UsageError(f"{len(args.input)} --input but {len(args.output)} --output; give one result file per request")
    written = [*args.output, *([args.plaintext_result] if args.plaintext_result else [])]
    if len(set(map(os.path.abspath, written))) != len(written):
        raise UsageError("two --output (or --plaintext-result) paths are the same")
    from branchy_tee.core.fileio import check_output
    from branchy_tee.tee.sealed.envelope import REQUEST_MAGIC

    outputs = [("--output", p) for p in args.output] + [("--plaintext-result", args.plaintext_result)] * bool(
        args.plaintext_result
    )
    for option, path in outputs:  # results are replaced; inputs, requests and directories never
        check_output(path, option, [*args.input, args.bundle], replace=True, keep_magic=REQUEST_MAGIC)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")


def _open_bundle_and_requests(
    args: argparse.Namespace, trust: Trust, log: Log
) -> tuple[SealedBundle, list[Request], dict[str, bytes], set[str]]:
    """Verify the bundle and every request; return (bundle, [(header, inputs, raw)], data keys, the data
    key ids whose owners consented to plaintext results)."""
    from branchy_tee.tee.sealed.bundle import open_bundle, read_header_unverified
    from branchy_tee.tee.sealed.envelope import open_request, read_file, request_key_id

    keys = trust.key_source()
    bundle_header = read_header_unverified(args.bundle)
    trust.check_pins(bundle_header, args.bundle)
    # Learn which data keys are needed before asking for any key.
    raw_requests = [read_file(p, "request") for p in args.input]
    kids = [request_key_id(data, p) for data, p in zip(raw_requests, args.input, strict=True)]
    model_key = keys.model_key(trust.model_key_id or bundle_header.key_id)
    data_keys = keys.data_keys(sorted(set(kids)))
    bundle = open_bundle(args.bundle, model_key, min_version=max(trust.min_version, keys.min_model_version()))
    h = bundle.header
    trust.check_pins(h, args.bundle)  # the file read first may have been swapped since
    log(f"bundle {h.arch} v{h.model_version} ({bundle.num_stages} stages) verified")
    shape = h.preprocessing.input_shape
    requests: list[Request] = [
        (*open_request(data, data_keys, shape, p), data) for data, p in zip(raw_requests, args.input, strict=True)
    ]
    log(f"{len(requests)} request(s), {sum(len(r[1]) for r in requests)} samples verified")
    return bundle, requests, data_keys, {k for k in data_keys if keys.plaintext_allowed(k)}


def _write_results(
    args: argparse.Namespace,
    bundle: SealedBundle,
    requests: list[Request],
    data_keys: dict[str, bytes],
    answers: Answers,
    plaintext_ok: set[str],
) -> None:
    """Seal every data owner's answers for it; all answers exist before the first file is written.
    The plaintext file holds only the requests whose data owner's signed key release allows it."""
    from branchy_tee.core.fileio import atomic_write_bytes, atomic_write_text
    from branchy_tee.tee.sealed.envelope import request_digest, seal_result

    outputs: list[tuple[str, bytes]] = []
    text: list[str] = []
    lo = 0
    for (req_header, inputs, raw), path in zip(requests, args.output, strict=True):
        hi = lo + len(inputs)
        recs = records_for(answers, bundle.header.classes, lo, hi)
        model = bundle.header.model_ref
        outputs.append((path, seal_result(recs, req_header, request_digest(raw), model, data_keys[req_header.key_id])))
        if req_header.key_id in plaintext_ok:
            text += plaintext_lines(req_header.request_id, recs)
        else:
            text.append(f"# request {req_header.request_id}: withheld (its data owner allows no plaintext results)")
        lo = hi
    for path, blob in outputs:
        atomic_write_bytes(path, blob)
    if args.plaintext_result:
        print(
            f"{PROG}: warning: writing plaintext results to {args.plaintext_result}; the host can read them",
            file=sys.stderr,
        )
        atomic_write_text(args.plaintext_result, "\n".join(text) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here so that building the command line (``--help``) does not load the inference runtime.
    import numpy as np

    from branchy_tee.core.fileio import atomic_write_text
    from branchy_tee.tee.engine import early_exit
    from branchy_tee.tee.graphs import use_threads
    from branchy_tee.tee.memprof import MemorySampler
    from branchy_tee.tee.stages import MIB, StageStore
    from branchy_tee.tee.tuning import tune_allocator

    log = make_log(args.quiet)
    _check_arguments(args)
    settings = trust(args, "predict")  # before anything is read: inside an enclave the measured settings decide
    tune_allocator()
    threads = compute_threads(args.threads)
    # Whole batches in parallel scale better than threads inside a stage (tee.engine._in_parallel),
    # but each batch in flight holds its own activations and may hold a stage the budget would evict.
    workers = 1 if args.memory_budget is not None else threads
    use_threads(threads if workers == 1 else 1)
    t0 = time.perf_counter()
    with MemorySampler() if args.mprofile or args.stats_json else contextlib.nullcontext() as sampler:
        bundle, requests, data_keys, plaintext_ok = _open_bundle_and_requests(args, settings, log)
        h = bundle.header
        x = np.concatenate([r[1] for r in requests])
        store = StageStore(bundle, args.memory_budget, args.batch_size, log)
        thresholds = h.exit_thresholds(args.full_model)
        t_infer = time.perf_counter()
        answers = early_exit(store.get, bundle.num_stages, x, h.criterion, thresholds, args.batch_size, workers=workers)
        inference_seconds = time.perf_counter() - t_infer
        _write_results(args, bundle, requests, data_keys, answers, plaintext_ok)
        seconds = time.perf_counter() - t0
    stats = {
        "samples": len(x),
        "exit_counts": answers.exit_counts(bundle.num_stages),
        "stages_loaded": sorted(store.loaded_ever),
        "peak_rss_mib": round(sampler.peak_mib, 2) if sampler else None,
        "seconds": round(seconds, 4),
        "inference_seconds": round(inference_seconds, 6),  # early exit alone (stage loads included)
        "stage_loads": store.loads,
        "evictions": store.evictions,
        "resident_weights_peak_mib": round(store.resident_peak / MIB, 3),
        "activation_allowance_mib": round(store.activation_bytes / MIB, 3),
        "stage_load_seconds": round(store.load_seconds, 4),
        **h.model_ref.to_json(),
        "requests": len(requests),
        "batch_size": args.batch_size,
        "memory_budget_mib": args.memory_budget,
    }
    if args.mprofile and sampler:
        stats["mprofile"] = str(sampler.write(args.mprofile))
    if args.stats_json:
        atomic_write_text(args.stats_json, json.dumps(stats, indent=2) + "\n")
    log(
        f"answered {len(x)} samples in {seconds:.3f} s; exits {stats['exit_counts']}; "
        f"stages loaded {stats['stages_loaded']}"
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
        return 0
    except BranchyError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
