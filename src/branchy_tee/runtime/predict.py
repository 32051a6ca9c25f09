"""The enclave entry point: decrypt requests, run batched early exit over the sealed bundle, seal
one result per request.

Run as ``python -m branchy_tee.runtime.predict`` inside Gramine (or natively), or as
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
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .. import measured
from ..choices import EvidenceProvider
from ..errors import BranchyError, IntegrityError, UsageError, shown
from ..parsing import ArgumentParser

if TYPE_CHECKING:
    import numpy as np

    from ..seal.bundle import SealedBundle
    from ..seal.envelope import RequestHeader
    from ..seal.header import BundleHeader
    from .engine import Answers
    from .keysource import KeySource

    Request = tuple[RequestHeader, np.ndarray, bytes]  # (its header, its inputs, the file's bytes)

Log = Callable[[str], None]

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
    att = p.add_argument_group("keys by remote attestation")
    att.add_argument("--attest", choices=EvidenceProvider.names(), help="fetch keys from the owners' key brokers")
    att.add_argument("--model-broker", metavar="URL", help="the model owner's key broker")
    att.add_argument(
        "--model-broker-identity",
        metavar="HEX",
        help="its identity (64 hex, `keygen --identity` prints it); only releases it signed are accepted",
    )
    att.add_argument(
        "--data-broker", action="append", default=[], metavar="URL", help="a data owner's key broker (repeatable)"
    )
    att.add_argument("--attestation-dir", default="/dev/attestation", help=argparse.SUPPRESS)
    att.add_argument("--broker-ca", metavar="PEM", help="CA certificate for brokers served over HTTPS")
    p.add_argument("--batch-size", type=int, default=64)
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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(pinned_bundle_id=None, pinned_model_key_id=None)  # set only from measured settings


def _no_log(msg: str) -> None:
    pass


def _log_to_stderr(msg: str) -> None:
    print(f"[enclave] {msg}", file=sys.stderr, flush=True)


def make_log(quiet: bool) -> Log:
    """The enclave's progress messages: to stderr, or nowhere with --quiet."""
    return _no_log if quiet else _log_to_stderr


def _measured_only(args: argparse.Namespace, dest: str, option: str, value: str, what: str) -> None:
    """Inside the enclave ``value`` (measured) decides; the host may repeat it, never change it."""
    given = getattr(args, dest)
    if given and given != value:
        raise UsageError(
            f"inside the enclave {what} comes only from its measured settings; {option} {shown(given)} "
            f"is refused (measured: {shown(value) if value else 'none'})"
        )
    setattr(args, dest, value or None)


def apply_enclave_settings(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> None:
    """In an enclave, the measured settings (the manifest's loader.env, part of MRENCLAVE) decide
    whom it trusts; the host's command line cannot change them.

    Keys come only from attested key release: the model key from the measured model broker, signed
    by its measured identity, for the measured bundle and model key id. Data-broker URLs may come from
    the command line (their identities are checked against the model owner's signed allow-list).
    Plaintext results are refused unless the manifest allows them; the minimum model version is at
    least the manifest's.
    """
    if not measured.inside_enclave(env):
        return
    if args.model_key or args.data_key:
        raise UsageError(
            "inside the enclave keys come only from attested key release; --model-key/--data-key are refused"
        )
    if args.plaintext_result and env.get(measured.ALLOW_PLAINTEXT) != "1":
        raise UsageError("this enclave was built without plaintext results; --plaintext-result is refused")
    attest = env.get(measured.ATTEST) or EvidenceProvider.GRAMINE
    if args.attest and args.attest != attest:
        raise UsageError(f"--attest {args.attest} differs from the enclave's measured setting {attest}")
    args.attest = attest
    _measured_only(args, "model_broker", "--model-broker", env.get(measured.MODEL_BROKER, ""), "the model broker")
    _measured_only(
        args,
        "model_broker_identity",
        "--model-broker-identity",
        env.get(measured.MODEL_BROKER_IDENTITY, ""),
        "the model broker's identity",
    )
    if not args.model_broker or not args.model_broker_identity:
        raise UsageError(
            "this enclave was built without a model broker and its identity (measured "
            f"{measured.MODEL_BROKER} is empty), so it can never get the model key; rebuild it with "
            "`enclave build --model-broker URL --model-broker-identity HEX`"
        )
    if not args.data_broker:
        args.data_broker = [u for u in env.get(measured.DATA_BROKERS, "").split(",") if u]
    args.pinned_bundle_id = env.get(measured.BUNDLE_ID) or None
    args.pinned_model_key_id = env.get(measured.MODEL_KEY_ID) or None
    if not args.pinned_bundle_id or not args.pinned_model_key_id:
        raise UsageError(
            f"this enclave was built without a measured bundle ({measured.BUNDLE_ID}, {measured.MODEL_KEY_ID} "
            "are empty); rebuild it with `enclave build --bundle B`"
        )
    args.min_version = max(args.min_version, int(env.get(measured.MIN_MODEL_VERSION, "0") or 0))
    args.broker_ca = env.get(measured.BROKER_CA) or None
    args.attestation_dir = "/dev/attestation"  # Gramine's pseudo-files; never a host-chosen directory


def _key_source(args: argparse.Namespace) -> KeySource:
    apply_enclave_settings(args)
    if args.attest:
        if args.model_key or args.data_key:
            raise UsageError("use either key files (--model-key/--data-key) or --attest, not both")
        if not args.model_broker or not args.model_broker_identity or not args.data_broker:
            raise UsageError(
                "--attest needs --model-broker URL, --model-broker-identity HEX and at least one --data-broker URL"
            )
        from ..attest.client import AttestedKeys
        from ..attest.identity import parse_identity

        identity = parse_identity(args.model_broker_identity, "--model-broker-identity")
        return AttestedKeys(
            args.attest,
            args.model_broker,
            identity,
            args.data_broker,
            attestation_dir=args.attestation_dir,
            ca_file=args.broker_ca,
            min_version=args.min_version,
        )
    if not args.model_key or not args.data_key:
        raise UsageError("give --model-key and --data-key files, or --attest with key brokers")
    from .keysource import FileKeys

    return FileKeys(args.model_key, args.data_key, args.min_version)


def check_pins(header: BundleHeader, args: argparse.Namespace, what: str) -> None:
    """The bundle must be the one the enclave was built for (measured bundle id and model key id)."""
    for value, pinned, name in (
        (header.bundle_id, args.pinned_bundle_id, "bundle"),
        (header.key_id, args.pinned_model_key_id, "model key id"),
    ):
        if pinned is not None and value != pinned:
            raise IntegrityError(
                f"{what}: {name} {shown(value, 40)} is not the measured {name} {pinned} "
                "this enclave serves (another model is refused)"
            )


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
    if len(set(map(os.path.abspath, args.output))) != len(args.output):
        raise UsageError("two --output paths are the same")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")


def _open_bundle_and_requests(
    args: argparse.Namespace, log: Log
) -> tuple[SealedBundle, list[Request], dict[str, bytes]]:
    """Verify the bundle and every request; return (bundle, [(header, inputs, raw)], data keys)."""
    from ..seal.bundle import open_bundle, read_header_unverified
    from ..seal.envelope import open_request, read_file, request_key_id

    keys = _key_source(args)
    bundle_header = read_header_unverified(args.bundle)
    check_pins(bundle_header, args, args.bundle)
    # Learn which data keys are needed before asking for any key.
    raw_requests = [read_file(p, "request") for p in args.input]
    kids = [request_key_id(data, p) for data, p in zip(raw_requests, args.input, strict=True)]
    model_key = keys.model_key(args.pinned_model_key_id or bundle_header.key_id)
    data_keys = keys.data_keys(sorted(set(kids)))
    bundle = open_bundle(args.bundle, model_key, min_version=max(args.min_version, keys.min_model_version()))
    h = bundle.header
    check_pins(h, args, args.bundle)  # the file read first may have been swapped since
    log(f"bundle {h.arch} v{h.model_version} ({bundle.num_stages} stages) verified")
    shape = h.preprocessing.input_shape
    requests: list[Request] = [
        (*open_request(data, data_keys, shape, p), data) for data, p in zip(raw_requests, args.input, strict=True)
    ]
    log(f"{len(requests)} request(s), {sum(len(r[1]) for r in requests)} samples verified")
    return bundle, requests, data_keys


def _write_results(
    args: argparse.Namespace,
    bundle: SealedBundle,
    requests: list[Request],
    data_keys: dict[str, bytes],
    answers: Answers,
) -> None:
    """Seal every data owner's answers for it; all answers exist before the first file is written."""
    from ..fileio import atomic_write_bytes, atomic_write_text
    from ..seal.envelope import request_digest, seal_result

    outputs: list[tuple[str, bytes]] = []
    text: list[str] = []
    lo = 0
    for (req_header, inputs, raw), path in zip(requests, args.output, strict=True):
        hi = lo + len(inputs)
        recs = records_for(answers, bundle.header.classes, lo, hi)
        model = bundle.header.model_ref
        outputs.append((path, seal_result(recs, req_header, request_digest(raw), model, data_keys[req_header.key_id])))
        text += plaintext_lines(req_header.request_id, recs)
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

    from ..fileio import atomic_write_text
    from .engine import early_exit
    from .graphs import use_threads
    from .memprof import MemorySampler
    from .stages import MIB, StageStore
    from .tuning import tune_allocator

    log = make_log(args.quiet)
    _check_arguments(args)
    tune_allocator()
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    # Whole batches in parallel scale better than threads inside a stage (runtime.engine._in_parallel),
    # but each batch in flight holds its own activations and may hold a stage the budget would evict.
    workers = 1 if args.memory_budget is not None else threads
    use_threads(threads if workers == 1 else 1)
    t0 = time.perf_counter()
    with MemorySampler() if args.mprofile or args.stats_json else contextlib.nullcontext() as sampler:
        bundle, requests, data_keys = _open_bundle_and_requests(args, log)
        h = bundle.header
        x = np.concatenate([r[1] for r in requests])
        store = StageStore(bundle, args.memory_budget, args.batch_size, log)
        thresholds = h.exit_thresholds(args.full_model)
        answers = early_exit(store.get, bundle.num_stages, x, h.criterion, thresholds, args.batch_size, workers=workers)
        _write_results(args, bundle, requests, data_keys, answers)
        seconds = time.perf_counter() - t0
    stats = {
        "samples": len(x),
        "exit_counts": answers.exit_counts(bundle.num_stages),
        "stages_loaded": sorted(store.loaded_ever),
        "peak_rss_mib": round(sampler.peak_mib, 2) if sampler else None,
        "seconds": round(seconds, 4),
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
