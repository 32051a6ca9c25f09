"""Running the model: predict, serve, query, demo, bench."""

from __future__ import annotations

import json

from branchy_tee.cli.common import emit_json
from branchy_tee.train.cache import DEFAULT_CACHE


def add_predict(sub) -> None:
    from branchy_tee.tee.predict import add_arguments

    p = sub.add_parser("predict", help="(enclave) answer encrypted requests with the sealed model, early exit")
    add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the run statistics as JSON")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from branchy_tee.tee.predict import run

    stats = run(args)
    if args.json:
        emit_json(stats)
    return 0


def add_serve(sub) -> None:
    from branchy_tee.tee.serve.server import add_arguments

    p = sub.add_parser(
        "serve",
        help="(enclave) answer data owners online over attested TLS, batching across requests",
        description="Serve the sealed model online: get the model key by attestation (the measured pins "
        "inside an enclave), then answer over TLS with an RA-TLS certificate (the quote "
        "binds its key); data owners authenticate with client certificates from their "
        "identities, matched against the model owner's allow-list; requests are batched "
        "across connections. Stops on SIGINT/SIGTERM after finishing accepted "
        "requests.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from branchy_tee.tee.serve.server import run

    return run(args)


def add_query(sub) -> None:
    p = sub.add_parser(
        "query",
        help="(data owner) verify the server's attestation, then classify images online",
        description="Connect to `branchy-tee serve` (one or more replicas), verify the enclave's "
        "RA-TLS certificate against your policy before sending anything, authenticate "
        "with your identity, and print one answer per input.",
    )
    p.add_argument("url", metavar="URL", help="https://HOST:PORT of a server (comma-separated for replicas)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG images, or a .safetensors/.npy/.pt tensor file")
    p.add_argument("--policy", required=True, metavar="POLICY.toml", help="your policy (the one your key broker uses)")
    p.add_argument("--identity", required=True, metavar="FILE", help="your identity (`keygen --identity`)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
    p.add_argument("--resize", action="store_true", help="resize images of any size to the model's input")
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {label, class_name, confidence, exit, model, attestation}",
    )
    p.set_defaults(func=cmd_query)


def cmd_query(args) -> int:
    from branchy_tee.client.online import Client

    with Client(
        args.url.split(","), policy=args.policy, identity=args.identity, timeout=args.timeout, resize=args.resize
    ) as c:
        results = c.predict(args.inputs)
    if args.json:
        emit_json(results)
        return 0
    model = results[0]["model"]
    how = results[0]["attestation"]
    verified = (
        "attestation SIMULATED (development only: no TEE protected your images)"
        if how == "simulated"
        else f"attestation verified ({how})"
    )
    print(f"answered by bundle {model['bundle_id']} (model version {model['model_version']}), {verified}")
    for i, r in enumerate(results):
        print(f"{i:>6}  {r['class_name']:<16} confidence {r['confidence']:.3f}  exit {r['exit']}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole flow end to end on this machine: train, seal, brokers, enclave, results")
    p.add_argument("--out", default=None, help="demo directory (default runs/demo-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="tiny model and 64 images (for tests)")
    p.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST location (default /usr/share/datasets/fashion-mnist)"
    )
    p.add_argument("--epochs", type=int, default=None, help="override the demo model's training epochs")
    p.add_argument(
        "--cache-dir", default=DEFAULT_CACHE, help="where the trained model is kept and reused (shared with bench)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import time as _time

    from branchy_tee.demo.run import run_demo

    out = args.out or f"runs/demo-{_time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_demo(out, quick=args.quick, data_dir=args.data_dir, epochs=args.epochs, cache_dir=args.cache_dir)
    if args.json:
        emit_json(
            {k: v for k, v in summary.items() if k != "data_owners"}
            | {
                "data_owners": {
                    w: {k: v for k, v in o.items() if k != "records"} for w, o in summary["data_owners"].items()
                }
            }
        )
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure early exit vs full model, staged memory, AEAD, cold start, quote verification"
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    p.add_argument(
        "--quick", action="store_true", help="tiny models and few repetitions (for tests; figures are not meaningful)"
    )
    p.add_argument(
        "--cache-dir", default=DEFAULT_CACHE, help="where the trained model is kept and reused (shared with demo)"
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["early_exit", "enclave", "exit_profile", "sealed", "quote"],
        help="leave out one part (repeatable)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="also load the online service, early exit vs --full-model: 1, 8 and 64 clients sending one image "
        "a request, then 8 clients sending 64 images a request (about 2 min more)",
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from branchy_tee.bench.run import format_report, run_bench
    from branchy_tee.core.fileio import atomic_write_text

    result = run_bench(quick=args.quick, cache_dir=args.cache_dir, skip=tuple(args.skip), serve=args.serve)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(format_report(result))
    return 0
