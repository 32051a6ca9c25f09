"""The ``branchy-tee`` command: one subcommand per task, each a thin layer over the modules.

Heavy imports (torch, aiohttp) happen inside the handlers, so ``--help`` stays fast.
Expected failures raise ``BranchyError`` and end as one line on stderr with exit code 1
(usage errors: 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Callable

from .choices import CRITERIA
from .errors import BranchyError, UsageError, shown
from .parsing import ArgumentParser

PROG = "branchy-tee"


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


# --------------------------------------------------------------------------- models
def add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered multi-exit models with their exits and cost")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from .models import list_models
    from .models.cost import describe_model

    rows = [describe_model(name, num_classes=args.num_classes) for name in list_models()]
    if args.json:
        emit_json(rows)
        return 0
    print(f"{'model':<12} {'params (backbone/heads)':>26} {'exits':>5} {'size MiB':>9}  cumulative GFLOPs per exit (3x32x32)")
    for r in rows:
        params = f"{r['backbone_params'] / 1e6:.2f}M / {r['head_params'] / 1e6:.2f}M"
        flops = " ".join(f"{f / 1e9:.3f}" for f in r["exit_flops"])
        print(f"{r['name']:<12} {params:>26} {r['exits']:>5} {r['size_mib']:>9.1f}  {flops}")
    return 0


# --------------------------------------------------------------------------- quote
def _iso8601_utc(text: str):
    """argparse type for --now: ISO 8601; 'Z' and naive times mean UTC."""
    from datetime import datetime, timezone

    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def add_quote(sub) -> None:
    p = sub.add_parser("quote", help="SGX/TDX DCAP quotes")
    qsub = p.add_subparsers(dest="quote_command", metavar="SUBCOMMAND", parser_class=ArgumentParser)
    qsub.required = True
    v = qsub.add_parser(
        "verify",
        help="verify a DCAP quote (PCK chain to the Intel root, signatures; TCB status with --collateral)",
    )
    v.add_argument("quote", metavar="QUOTE", help="raw quote file (e.g. Gramine's /dev/attestation/quote)")
    v.add_argument("--collateral", metavar="FILE", help="collateral JSON (dcap-qvl layout) for the TCB status")
    v.add_argument("--now", metavar="ISO8601", type=_iso8601_utc, help="verification time (default: now)")
    v.add_argument("--root", metavar="PEM", help="pinned root CA (default: the bundled Intel SGX Root CA)")
    v.add_argument("--json", action="store_true", help="print the claims as a JSON object")
    v.set_defaults(func=cmd_quote_verify)


def _read_input(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BranchyError(f"cannot read {what} {path}: {e.strerror or e}") from None


def cmd_quote_verify(args) -> int:
    from .attest.verify import read_collateral_file, verify_quote

    data = _read_input(args.quote, "quote")
    root = _read_input(args.root, "root CA") if args.root else None
    collateral = read_collateral_file(args.collateral) if args.collateral else None
    vq = verify_quote(data, collateral=collateral, now=args.now, root_pem=root)
    for w in vq.warnings:
        warn(w)
    if args.json:
        emit_json(vq.to_json())
        return 0
    tee = "TDX" if vq.tee == "tdx" else "SGX"
    if vq.tcb_status is None:
        tcb = "not checked (no --collateral)"
    else:
        tcb = vq.tcb_status + (f" ({', '.join(vq.advisories)})" if vq.advisories else "")
    names = ("MRTD", "MRSIGNERSEAM") if vq.tee == "tdx" else ("MRENCLAVE", "MRSIGNER")
    print(f"quote OK: {tee} quote v{vq.version}, PCK chain and signatures verify")
    print(f"  {names[0]:<12} {vq.mrenclave.hex()}")
    print(f"  {names[1]:<12} {vq.mrsigner.hex()}")
    if vq.tee == "sgx":
        print(f"  {'ISVPRODID':<12} {vq.isv_prod_id}   ISVSVN {vq.isv_svn}")
    print(f"  {'DEBUG':<12} {'yes' if vq.debug else 'no'}")
    print(f"  {'REPORTDATA':<12} {vq.report_data.hex()}")
    print(f"  {'FMSPC':<12} {vq.fmspc}   PCE-ID {vq.pce_id}")
    print(f"  {'TCB status':<12} {tcb}")
    return 0


# --------------------------------------------------------------------------- train / eval / calibrate
SEED_NETS = ["LeNet5", "AlexNet", "VGG16", "VGG19", "ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152",
             "DenseNet121", "MobileNetv1", "MobileNetV2"]  # fmt: skip


def _net_name(value: str) -> str:
    from .models import resolve_name

    try:
        return resolve_name(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _key_value(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    for conv in (int, float):
        try:
            return key, conv(raw)
        except ValueError:
            pass
    return key, raw


def add_data_arguments(p, default="fashion-mnist", required=False) -> None:
    from .choices import DATASETS

    p.add_argument("--dataset", choices=DATASETS, default=None if required else default,
                   help=f"dataset (default: {'as trained' if default is None else default})")
    p.add_argument("--data-dir", default=None, help="dataset location (default for fashion-mnist: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 (official URL, MD5 checked) when missing")


def add_train(sub) -> None:
    from .choices import DISTILL, OPTIMIZERS

    p = sub.add_parser("train", help="train a multi-exit model with distillation into the early exits",
                       description="Train a multi-exit network (the seed's flags are accepted verbatim). "
                                   "Writes RUN_DIR/model.safetensors, model.json, checkpoint.pt and metrics.jsonl, "
                                   "then calibrates the exit thresholds on the validation split.")
    # The seed's flags, verbatim (defaults as in the seed).
    p.add_argument("--lr", type=float, default=0.0001, help="learning rate (default 0.0001)")
    p.add_argument("--cuda", action="store_true", help="require CUDA (fail if there is none)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--net", type=_net_name, default="mobilenetv1", metavar="NET",
                   help=f"model: one of {', '.join(SEED_NETS)} (any case) (default MobileNetv1)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--resume", "-r", action="store_true", help="resume from RUN_DIR/checkpoint.pt")
    p.add_argument("--patience", "-p", type=int, default=7, help="early-stopping patience in epochs")
    p.add_argument("--optim", "-o", choices=OPTIMIZERS, default="adamw")
    # Ours.
    add_data_arguments(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--distill", choices=DISTILL, default="final", help="teacher for the early exits (default: the final exit)")
    p.add_argument("--teacher", metavar="CKPT", help="run directory or checkpoint.pt of a trained teacher (--distill teacher)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")
    p.add_argument("--exit-weights", type=_floats, metavar="W0,W1,...", help="cross-entropy weight per exit (default all 1)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest", metavar="RUN_DIR", help="run directory (default runs/latest)")
    p.add_argument("--max-batches", type=int, default=None, help="at most this many batches per epoch (quick runs)")
    p.add_argument("--model-config", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra model option, e.g. width=16 for a narrow ResNet (repeatable)")
    p.add_argument("--synthetic-channels", type=int, choices=[1, 3], default=3)
    p.add_argument("--synthetic-size", type=int, default=32)
    p.add_argument("--synthetic-samples", type=int, default=None, help="training samples of the synthetic set (default 10000)")
    p.add_argument("--criterion", choices=CRITERIA, default="entropy", help="exit criterion calibrated at the end")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01, help="calibration budget (fraction; default 0.01 = 1 point)")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .train.trainer import TrainConfig, fit

    synthetic = {"channels": args.synthetic_channels, "size": args.synthetic_size}
    if args.synthetic_samples:
        synthetic["n"] = args.synthetic_samples
    cfg = TrainConfig(
        net=args.net, dataset=args.dataset, data_dir=args.data_dir, download=args.download, out=args.out,
        lr=args.lr, batch_size=args.batch_size, num_workers=args.num_workers, epochs=args.epochs,
        patience=args.patience, optim=args.optim, weight_decay=args.weight_decay, device=args.device,
        require_cuda=args.cuda, distill=args.distill, teacher=args.teacher, temperature=args.temperature,
        alpha=args.alpha, exit_weights=args.exit_weights, seed=args.seed, max_batches=args.max_batches,
        resume=args.resume, model_config=dict(args.model_config), synthetic=synthetic if args.dataset == "synthetic" else {},
        criterion=args.criterion, max_accuracy_drop=args.max_accuracy_drop, quiet=args.json,
    )  # fmt: skip
    summary = fit(cfg)
    cal = summary.get("calibration")
    if args.json:
        if cal:
            cal = {k: v for k, v in cal.items() if k != "candidates"}
        emit_json({**summary, "calibration": cal, "run_dir": args.out})
    elif cal:
        _print_calibration(cal)
        print(f"run directory: {args.out}")
    return 0


def _print_calibration(cal: dict) -> None:
    fr = " / ".join(f"{100 * f:.1f}%" for f in cal["exit_fractions"])
    print(f"calibrated ({cal['criterion']}, budget {100 * cal['max_accuracy_drop']:.2f} points, margin {cal['margin_se']} SE): "
          f"thresholds {', '.join(f'{t:.4f}' for t in cal['thresholds'])}")
    print(f"  validation accuracy {100 * cal['accuracy']:.2f}% vs final exit {100 * cal['final_accuracy']:.2f}%; "
          f"mean cost {cal['mean_flops'] / cal['full_flops']:.3f} of the full model "
          f"({cal['full_flops'] / max(cal['mean_flops'], 1):.2f}x fewer FLOPs); exits taken {fr}")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="per-exit accuracy, cost, calibrated early exit, sweep and oracle on the test split",
                       description="Evaluate the run's exported stage graphs (exported first if missing or stale) on the "
                                   "test split, run by the enclave's engine on ONNX Runtime: what is sealed is what is evaluated.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_data_arguments(p, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="write an accuracy-vs-cost plot")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches of 256")
    p.add_argument("--latency-reps", type=int, default=20, help="timed repetitions per exit (batch 1)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .evaluate.exits import evaluate_run

    report = evaluate_run(args.run_dir, args.dataset, args.data_dir, max_batches=args.max_batches,
                          latency_reps=args.latency_reps, show=not args.json)
    if args.plot:
        from .evaluate.plots import plot_accuracy_vs_cost

        report["plot"] = str(plot_accuracy_vs_cost(report, args.plot))
    if args.json:
        emit_json(report)
        return 0
    full = report["full_flops"]
    print(f"{report['arch']} on {report['samples']} test samples")
    print(f"{'exit':>4} {'accuracy':>9} {'GFLOPs':>8} {'of full':>8} {'latency ms':>11}")
    for e in report["exits"]:
        print(f"{e['index']:>4} {100 * e['accuracy']:>8.2f}% {e['flops'] / 1e9:>8.4f} {e['flops'] / full:>8.3f} {e['latency_ms']:>11.3f}")
    cal, orc = report["calibrated"], report["oracle"]
    label = "calibrated" if cal["calibrated"] else "uncalibrated (no early exits)"
    fr = " / ".join(f"{100 * f:.1f}%" for f in cal["exit_fractions"])
    print(f"{label} ({cal['criterion']}): accuracy {100 * cal['accuracy']:.2f}% (final exit {100 * report['final_accuracy']:.2f}%), "
          f"mean cost {cal['mean_flops'] / full:.3f} of full ({full / max(cal['mean_flops'], 1):.2f}x fewer FLOPs); exits {fr}")
    print(f"oracle: accuracy {100 * orc['accuracy']:.2f}%, mean cost {orc['mean_flops'] / full:.3f} of full "
          f"({full / max(orc['mean_flops'], 1):.2f}x fewer FLOPs)")
    if args.plot:
        print(f"plot: {report['plot']}")
    return 0


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="choose exit thresholds on the validation split within an accuracy budget")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01, help="allowed drop vs the final exit (fraction; default 0.01)")
    p.add_argument("--criterion", choices=CRITERIA, default=None, help="default: the model's current criterion")
    p.add_argument("--margin-se", type=float, default=1.0,
                   help="also keep this many standard errors of margin (default 1; 0 = exactly the budget on validation)")
    add_data_arguments(p, default=None)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from .evaluate.calibrate import calibrate_run

    if not 0 <= args.max_accuracy_drop < 1:
        raise UsageError("--max-accuracy-drop is a fraction in [0, 1), e.g. 0.01 for one point")
    result = calibrate_run(args.run_dir, args.max_accuracy_drop, args.criterion, args.margin_se,
                           dataset=args.dataset, data_dir=args.data_dir, max_batches=args.max_batches, show=not args.json)
    if args.json:
        emit_json(result)
    else:
        _print_calibration(result)
        print(f"thresholds written to {args.run_dir}/model.json")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export each stage with its exit head as an ONNX graph into RUN_DIR/onnx",
                       description="Export the run's model as one ONNX graph per stage (stage input -> stage output and "
                                   "the exit's log-probabilities; dynamic batch). Training does this at its end; eval, "
                                   "calibrate and seal redo it when the weights changed since.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print export.json")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export.onnx import EXPORT_DIR, export_run

    doc = export_run(args.run_dir, show=not args.json)
    if args.json:
        emit_json(doc)
    else:
        for e in doc["stages"]:
            print(f"{args.run_dir}/{EXPORT_DIR}/{e['file']}: {e['size'] / 2**20:.2f} MiB, weights {e['weight_bytes'] / 2**20:.2f} MiB")
    return 0


# --------------------------------------------------------------------------- keys, sealing, inputs, predict, results
def add_keygen(sub) -> None:
    p = sub.add_parser("keygen", help="create a random 256-bit key, or with --identity a party's Ed25519 identity (mode 0600)")
    p.add_argument("--out", required=True, metavar="FILE", help="file to create (never overwritten)")
    p.add_argument("--identity", action="store_true",
                   help="an Ed25519 identity (PEM) for a key broker, the model owner or a data owner; prints "
                        "`identity: <64 hex>`, the public part others pin")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keygen)


def cmd_keygen(args) -> int:
    from .fileio import write_key_file
    from .seal.keys import generate_key, key_id

    if args.identity:
        from .attest.identity import create_identity, identity_hex

        public = identity_hex(create_identity(args.out))
        if args.json:
            emit_json({"identity_file": args.out, "identity": public})
        else:
            print(f"wrote {args.out} (Ed25519 identity, mode 0600)")
            print(f"identity: {public}")
        return 0
    key = generate_key()
    write_key_file(args.out, key)
    if args.json:
        emit_json({"key_file": args.out, "key_id": key_id(key)})
    else:
        print(f"wrote {args.out} (key id {key_id(key)})")
    return 0


def add_seal(sub) -> None:
    p = sub.add_parser("seal", help="seal a trained run into an encrypted, authenticated model bundle",
                       description="Encrypt the run's exported stage graphs (exported first if missing or stale), one "
                                   "AES-256-GCM file per stage, under an authenticated header.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--key", required=True, metavar="MODEL_KEY", help="the model owner's key file")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to create, e.g. model.btee")
    p.add_argument("--version", type=int, default=1, help="model version (brokers can refuse older ones)")
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="AEAD chunk size in bytes (default 1 MiB)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_seal)


def cmd_seal(args) -> int:
    from .fileio import read_key_file
    from .seal.bundle import seal_run

    key = read_key_file(args.key)
    header = seal_run(args.run_dir, key, args.out, version=args.version, chunk_size=args.chunk_size, show=not args.json)
    summary = {"bundle": args.out, "bundle_id": header["bundle_id"], "model_version": header["model_version"],
               "key_id": header["key_id"], "stages": [s["sealed_size"] for s in header["stages"]]}
    if args.json:
        emit_json(summary)
    else:
        sizes = ", ".join(f"{s / 2**20:.2f}" for s in summary["stages"])
        print(f"sealed {header['arch']} v{args.version} into {args.out} (bundle {header['bundle_id']}, model key id {header['key_id']}); "
              f"stage files (MiB): {sizes}")
    return 0


def add_encrypt_input(sub) -> None:
    p = sub.add_parser("encrypt-input", help="(data owner) preprocess images or a tensor file and encrypt them as a request")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG images, or a .safetensors/.npy/.pt tensor file")
    p.add_argument("--bundle", required=True, help="the sealed bundle (only its plaintext header is read)")
    p.add_argument("--key", required=True, metavar="DATA_KEY", help="the data owner's key file")
    p.add_argument("--out", required=True, metavar="REQUEST")
    p.add_argument("--request-id", help="default: a random id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_encrypt_input)


def cmd_encrypt_input(args) -> int:
    from .data.preprocess import load_inputs
    from .fileio import atomic_write_bytes, read_key_file
    from .seal.bundle import read_header_unverified
    from .seal.envelope import check_request_id, new_request_id, request_digest, seal_request

    request_id = check_request_id(args.request_id) if args.request_id is not None else new_request_id()
    key = read_key_file(args.key)
    header = read_header_unverified(args.bundle)["header"]
    x = load_inputs(args.inputs, header["preprocessing"])
    sealed = seal_request(x, key, request_id)
    atomic_write_bytes(args.out, sealed, mode=0o644)
    digest = request_digest(sealed)
    if args.json:
        emit_json({"request": args.out, "request_id": request_id, "samples": len(x), "request_sha256": digest})
    else:
        print(f"wrote {args.out}: {len(x)} samples, request id {request_id}")
        print(f"request digest (SHA-256; its result binds it): {digest}")
    return 0


def add_predict(sub) -> None:
    from .runtime.predict import add_arguments

    p = sub.add_parser("predict", help="(enclave) answer encrypted requests with the sealed model, early exit")
    add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the run statistics as JSON")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from .runtime.predict import run

    stats = run(args)
    if args.json:
        emit_json(stats)
    return 0


def add_decrypt_result(sub) -> None:
    p = sub.add_parser("decrypt-result", help="(data owner) verify and decrypt the result of one of your requests",
                       description="Open a result only as the answer to the request it answers: give that request "
                                   "file (--request) or its digest (--request-digest, printed by encrypt-input). A "
                                   "result for any other request, e.g. an old one replayed for a reused request id, is "
                                   "refused. Prints which sealed model answered.")  # fmt: skip
    p.add_argument("result", metavar="RESULT")
    p.add_argument("--key", required=True, metavar="DATA_KEY")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--request", metavar="REQUEST", help="the request file this result answers")
    which.add_argument("--request-digest", metavar="HEX", help="that request's SHA-256 (encrypt-input prints it)")
    p.add_argument("--expect-bundle", metavar="ID", help="refuse a result answered by any other sealed bundle")
    p.add_argument("--out", metavar="FILE", help="also write the records as JSON to FILE")
    p.add_argument("--json", action="store_true",
                   help="print {request_id, request_sha256, bundle_id, model_version, model_key_id, records: "
                        "[{index, label, class_name, confidence, exit}]}")
    p.set_defaults(func=cmd_decrypt_result)


def cmd_decrypt_result(args) -> int:
    from .fileio import atomic_write_text, read_key_file
    from .seal.envelope import MODEL_FIELDS, open_result, read_file, request_digest

    if args.request is not None:
        digest = request_digest(read_file(args.request, "request"))
    else:
        digest = args.request_digest.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise UsageError("--request-digest is a SHA-256: 64 hex characters")
    key = read_key_file(args.key)
    header, records = open_result(read_file(args.result, "result"), key, args.result, digest)
    model = {k: header[k] for k in MODEL_FIELDS}
    if args.expect_bundle is not None and model["bundle_id"] != args.expect_bundle:
        raise BranchyError(f"{args.result} was answered by bundle {shown(model['bundle_id'], 40)}, not the expected "
                           f"{shown(args.expect_bundle, 40)}")
    if args.out:
        atomic_write_text(args.out, json.dumps(records, indent=1) + "\n", mode=0o600)
    if args.json:
        emit_json({"request_id": header["request_id"], "request_sha256": header["request_sha256"], **model,
                   "records": records})
        return 0
    print(f"result for request {header['request_id']}: {len(records)} samples")
    print(f"answered by bundle {shown(model['bundle_id'], 40)}, model version {shown(model['model_version'])}, "
          f"model key id {shown(model['model_key_id'], 20)}")
    for r in records:
        print(f"{r['index']:>6}  {r['class_name']:<16} confidence {r['confidence']:.3f}  exit {r['exit']}")
    return 0


# --------------------------------------------------------------------------- online service
def add_serve(sub) -> None:
    from .runtime.server import add_arguments

    p = sub.add_parser("serve", help="(enclave) answer data owners online over attested TLS, batching across requests",
                       description="Serve the sealed model online: get the model key by attestation (the measured pins "
                                   "inside an enclave), then answer over TLS with an RA-TLS certificate (the quote binds "
                                   "its key); data owners authenticate with client certificates from their identities, "
                                   "matched against the model owner's allow-list; requests are batched across "
                                   "connections. Stops on SIGINT/SIGTERM after finishing accepted requests.")  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .runtime.server import run

    return run(args)


def add_query(sub) -> None:
    p = sub.add_parser("query", help="(data owner) verify the server's attestation, then classify images online",
                       description="Connect to `branchy-tee serve` (one or more replicas), verify the enclave's "
                                   "RA-TLS certificate against your policy before sending anything, authenticate "
                                   "with your identity, and print one answer per input.")  # fmt: skip
    p.add_argument("url", metavar="URL", help="https://HOST:PORT of a server (comma-separated for replicas)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG images, or a .safetensors/.npy/.pt tensor file")
    p.add_argument("--policy", required=True, metavar="POLICY.toml", help="your policy (the one your key broker uses)")
    p.add_argument("--identity", required=True, metavar="FILE", help="your identity (`keygen --identity`)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--json", action="store_true", help="print a JSON list of {label, class_name, confidence, exit, model}")
    p.set_defaults(func=cmd_query)


def cmd_query(args) -> int:
    from .client import Client

    with Client(args.url.split(","), policy=args.policy, identity=args.identity, timeout=args.timeout) as c:
        results = c.predict(args.inputs)
    if args.json:
        emit_json(results)
        return 0
    model = results[0]["model"]
    print(f"answered by bundle {model['bundle_id']} (model version {model['model_version']}), attestation verified")
    for i, r in enumerate(results):
        print(f"{i:>6}  {r['class_name']:<16} confidence {r['confidence']:.3f}  exit {r['exit']}")
    return 0


# --------------------------------------------------------------------------- key broker
def add_key_broker(sub) -> None:
    p = sub.add_parser("key-broker", help="(owner) release keys to attested enclaves that match a policy",
                       description="Serve a key broker: enclaves attest (DCAP quote, or simulated evidence when the "
                                   "policy allows it) and get the keys the policy releases, HPKE-sealed to them. "
                                   "Stops on SIGINT/SIGTERM.")
    p.add_argument("--keys", required=True, metavar="KEYSTORE", help="directory of *.key files (mode 0600), or one key file")
    p.add_argument("--identity", required=True, metavar="FILE",
                   help="the broker's Ed25519 identity (`keygen --identity`); it signs every key release")
    p.add_argument("--policy", required=True, metavar="POLICY.toml", help="key-release policy (TOML)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on (port 0: any free port)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--audit-log", metavar="FILE", help="append one JSON line per decision (fsynced; never a key)")
    p.add_argument("--nonce-ttl", type=float, default=60.0, metavar="SECONDS", help="nonce lifetime (default 60)")
    p.add_argument("--quiet", action="store_true", help="no per-decision lines on stderr")
    p.set_defaults(func=cmd_key_broker)


def cmd_key_broker(args) -> int:
    from .attest.broker_server import serve

    return serve(args.keys, args.policy, args.listen, identity=args.identity, tls_cert=args.tls_cert,
                 tls_key=args.tls_key, audit_log=args.audit_log, nonce_ttl=args.nonce_ttl, quiet=args.quiet)


# --------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole flow end to end on this machine: train, seal, brokers, enclave, results")
    p.add_argument("--out", default=None, help="demo directory (default runs/demo-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="tiny model and 64 images (for tests)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST location (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo model's training epochs")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import time as _time

    from .demo import run_demo

    out = args.out or f"runs/demo-{_time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_demo(out, quick=args.quick, data_dir=args.data_dir, epochs=args.epochs)
    if args.json:
        emit_json({k: v for k, v in summary.items() if k != "data_owners"} | {"data_owners": {
            w: {k: v for k, v in o.items() if k != "records"} for w, o in summary["data_owners"].items()}})
    return 0


# --------------------------------------------------------------------------- bench
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure early exit vs full model, staged memory, AEAD, cold start, quote verification")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    p.add_argument("--quick", action="store_true", help="tiny models and few repetitions (for tests; figures are not meaningful)")
    p.add_argument("--cache-dir", default="runs/bench-cache", help="where the trained benchmark model is kept and reused")
    p.add_argument("--skip", action="append", default=[], choices=["early_exit", "enclave", "exit_profile", "sealed", "quote"],
                   help="leave out one part (repeatable)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .bench import format_report, run_bench
    from .fileio import atomic_write_text

    result = run_bench(quick=args.quick, cache_dir=args.cache_dir, skip=tuple(args.skip))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(format_report(result))
    return 0


# --------------------------------------------------------------------------- enclave (Gramine packaging)
def add_enclave(sub) -> None:
    p = sub.add_parser("enclave", help="build, sign and run the Gramine SGX enclave")
    esub = p.add_subparsers(dest="enclave_command", metavar="SUBCOMMAND", parser_class=ArgumentParser)
    esub.required = True
    b = esub.add_parser(
        "build", help="render the Gramine manifest for a bundle, write a Makefile, sign with --sgx",
        description="Write DIR/: the Gramine manifest (rendered with gramine-manifest when installed, else by "
                    "branchy-tee for inspection), the enclave's entry script, a Makefile (`make SGX=1` builds and "
                    "signs, `make` builds for gramine-direct) and enclave.json. The model broker's URL and identity "
                    "and the bundle (id, model key id, minimum version) are measured. With --sgx also sign with "
                    "gramine-sgx-sign and print MRENCLAVE. Owners do not pin what the host prints: the model owner "
                    "reproduces the build and signs a release statement (`enclave release`).")  # fmt: skip
    b.add_argument("--bundle", required=True, help="the sealed bundle the enclave serves (its architecture sets sgx.enclave_size)")
    b.add_argument("--out", required=True, metavar="DIR", help="build directory")
    b.add_argument("--sgx", action="store_true", help="sign for SGX (needs Gramine and a signing key)")
    b.add_argument("--debug", action="store_true", help="debug enclave (sgx.debug = true; never for production)")
    b.add_argument("--edmm", action="store_true", help="sgx.edmm_enable = true (SGX2 CPUs, Linux >= 6.0)")
    b.add_argument("--model-broker", metavar="URL", help="the model owner's key broker (measured)")
    b.add_argument("--model-broker-identity", metavar="HEX",
                   help="its identity (measured; required with --model-broker): only releases it signed are accepted")
    b.add_argument("--data-broker", action="append", default=[], metavar="URL", help="a data owner's key broker (repeatable; measured)")
    b.add_argument("--attest", choices=["gramine", "simulated"], default="gramine", help="evidence provider (default gramine: DCAP)")
    b.add_argument("--broker-ca", metavar="PEM", help="CA certificate of HTTPS brokers (a trusted file in the enclave)")
    b.add_argument("--threads", type=int, default=4, help="OMP_NUM_THREADS in the enclave (default 4); sgx.max_threads = this + 8")
    b.add_argument("--allow-plaintext-result", action="store_true", help="let predict --plaintext-result work in the enclave")
    b.add_argument("--min-model-version", type=int, default=None, metavar="N",
                   help="refuse older bundles (measured; default: the bundle's model version)")
    b.add_argument("--io-dir", action="append", default=[], metavar="DIR",
                   help="directory of requests and results, the only data the enclave may open besides the bundle "
                        "(repeatable; default DIR/io)")
    b.add_argument("--stats-dir", action="append", default=[], metavar="DIR", help="directory for --stats-json/--mprofile output (repeatable)")
    b.add_argument("--signing-key", metavar="PEM",
                   help="gramine-sgx-sign --key (default ~/.config/gramine/enclave-key.pem; create one with gramine-sgx-gen-private-key)")
    b.add_argument("--isv-prod-id", type=int, default=0, help="sgx.isvprodid (default 0)")
    b.add_argument("--isv-svn", type=int, default=0, help="sgx.isvsvn, raise it with every security fix (default 0)")
    b.add_argument("--accept-tcb", action="append", default=None, metavar="STATUS",
                   help="TCB status the policy snippet accepts (repeatable; default UpToDate)")
    b.add_argument("--batch-size", type=int, default=64, help="largest predict --batch-size to size the enclave for (default 64)")
    b.add_argument("--max-samples", type=int, default=4096, help="most samples per run to size the enclave for (default 4096)")
    b.add_argument("--env", default=ENCLAVE_ENV, metavar="DIR",
                   help=f"the enclave's Python environment, made when missing (default {ENCLAVE_ENV}; see `enclave env`)")
    b.add_argument("--enclave-size", metavar="SIZE",
                   help="sgx.enclave_size (e.g. 1G) instead of measuring the runtime: to reproduce a build (its "
                        "enclave.json has the size)")  # fmt: skip
    b.add_argument("--serve", action="store_true",
                   help="the enclave runs `serve` (online, attested TLS) instead of `predict`")
    b.add_argument("--max-connections", type=int, default=64,
                   help="serve: concurrent connections to have threads for (sgx.max_threads; default 64)")
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    b.set_defaults(func=cmd_enclave_build)

    e = esub.add_parser(
        "env", help="make (or check and reuse) the enclave's own Python environment",
        description="Make DIR: the standard library without test suites and the like, and only the packages the "
                    "enclave-side code imports (the `enclave` extra of pyproject.toml, pinned; constraints.txt pins "
                    "what they pull in), without .pyc, headers, stubs and tests. `enclave build` does this too.")  # fmt: skip
    e.add_argument("--env", default=ENCLAVE_ENV, metavar="DIR", help=f"default {ENCLAVE_ENV}")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_enclave_env)

    r = esub.add_parser(
        "run", help="run predict (or serve) in the enclave: gramine-sgx, gramine-direct or natively",
        usage="branchy-tee enclave run [-h] [--backend {sgx,direct,native}] DIR -- {predict,serve} ARGS...",
        description="Launch the enclave built in DIR: `gramine-sgx ./branchy-tee ARGS` (sgx), `gramine-direct "
                    "./branchy-tee ARGS` (direct), or `python -m branchy_tee.runtime.predict ARGS` (`.server` for "
                    "serve) from the enclave environment with the manifest's environment (native). The command must "
                    "be the one the enclave was built for (serve: `enclave build --serve`). Exits with its exit code.")  # fmt: skip
    r.add_argument("--backend", choices=["sgx", "direct", "native"], default="sgx", help="default sgx")
    r.add_argument("dir", metavar="DIR", help="the build directory of `enclave build`")
    r.add_argument("predict_args", nargs=argparse.REMAINDER, metavar="-- {predict,serve} ARGS", help="its arguments")
    r.set_defaults(func=cmd_enclave_run)

    rel = esub.add_parser(
        "release", help="(model owner) sign a release statement for the enclave you built (reproduced) in DIR",
        description="Sign, with the model owner's identity, what the enclave built in DIR is: its measurement "
                    "(MRENCLAVE, MRSIGNER; the simulated measurement for --attest simulated) and what it pins (bundle "
                    "id, model version, model key id, minimum version, model broker and its identity). Build it "
                    "yourself from the same commit and bundle first: never sign a measurement the host printed.")  # fmt: skip
    rel.add_argument("dir", metavar="DIR")
    rel.add_argument("--identity", required=True, metavar="FILE", help="the model owner's identity (`keygen --identity`)")
    rel.add_argument("--model-key", required=True, metavar="FILE",
                     help="your model key: the enclave must pin your bundle, sealed under it")
    rel.add_argument("--model-broker-identity", metavar="HEX",
                     help="your key broker's identity, if it is not the --identity itself")
    rel.add_argument("--out", required=True, metavar="release.json")
    rel.add_argument("--json", action="store_true")
    rel.set_defaults(func=cmd_enclave_release)

    pol = esub.add_parser(
        "policy", help="(owners) verify a model owner's release statement and write a key-broker policy from it",
        description="Verify release.json under the model owner's identity and write a key-broker policy that "
                    "releases keys only to the enclave it names (MRENCLAVE pinned, no debug, minimum model version).")  # fmt: skip
    pol.add_argument("--release", required=True, metavar="release.json")
    pol.add_argument("--model-owner", required=True, metavar="HEX", help="the model owner's identity, known out of band")
    pol.add_argument("--out", required=True, metavar="POLICY.toml")
    pol.add_argument("--accept-tcb", action="append", default=None, metavar="STATUS",
                     help="TCB status to accept (repeatable; default UpToDate)")
    pol.add_argument("--collateral", metavar="FILE", help="collateral file for DCAP quotes (dcap-qvl layout)")
    pol.add_argument("--allowed-data-owner", action="append", default=None, metavar="HEX",
                     help="(model owner's own policy) a data owner's identity that may use the model (repeatable)")
    pol.add_argument("--allow-simulated", action="store_true",
                     help="accept a release statement for a SIMULATED enclave (development only: no TEE)")
    pol.add_argument("--json", action="store_true")
    pol.set_defaults(func=cmd_enclave_policy)


ENCLAVE_ENV = ".enclave-env"  # = enclave.env.DEFAULT_ENV_DIR (not imported here: the parser stays light)


def _progress(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def cmd_enclave_env(args) -> int:
    from .enclave.env import count_files, ensure_env

    e = ensure_env(args.env, log=_progress)
    summary = {"env": e.dir, "python": e.python, "requirements": e.requirements, "packages": e.packages,
               "unpinned": e.unpinned, "files": count_files(e.home_lib), "status": e.status}  # fmt: skip
    if args.json:
        emit_json(summary)
        return 0
    print(f"{e.status} {e.dir}: Python {e.python}, {summary['files']} files; "
          + " ".join(f"{n}=={v}" for n, v in sorted(e.packages.items())))
    if e.unpinned:
        warn(f"not pinned by the enclave extra or constraints.txt: {', '.join(e.unpinned)}")
    return 0


def cmd_enclave_build(args) -> int:
    from .enclave.build import BuildOptions, build

    opts = BuildOptions(
        bundle=args.bundle, out=args.out, sgx=args.sgx, debug=args.debug, edmm=args.edmm,
        model_broker=args.model_broker, model_broker_identity=args.model_broker_identity,
        data_brokers=args.data_broker, attest=args.attest, threads=args.threads,
        allow_plaintext_result=args.allow_plaintext_result, min_model_version=args.min_model_version,
        signing_key=args.signing_key, io_dirs=args.io_dir, stats_dirs=args.stats_dir, broker_ca=args.broker_ca,
        isv_prod_id=args.isv_prod_id, isv_svn=args.isv_svn, batch_size=args.batch_size, max_samples=args.max_samples,
        accepted_tcb_statuses=args.accept_tcb or ["UpToDate"], env=args.env, enclave_size=args.enclave_size,
        serve=args.serve, max_connections=args.max_connections,
    )  # fmt: skip
    s = build(opts, log=_progress)
    for w in s["warnings"]:
        warn(w)
    if args.json:
        emit_json(s)
        return 0
    mib = 2**20
    print(f"wrote {s['manifest']} (rendered by {s['rendered_by']})")
    if s["manifest_sha256"]:
        print(f"  trusted files {s['trusted_files']:,}; hashed manifest {s['manifest_bytes'] / 1e6:.2f} MB, "
              f"SHA-256 {s['manifest_sha256']}")
    else:
        print(f"  trusted files {s['trusted_files']:,} (counted by branchy-tee); the hashed manifest, its size and its "
              "SHA-256 come from gramine-manifest (`make` in the build directory)")
    print(f"  enclave environment {s['env']}: {' '.join(s['env_requirements'])}")
    d = s["enclave_size_detail"]
    if d["given"]:
        print(f"  sgx.enclave_size {s['enclave_size']} (given with --enclave-size, not measured)")
    else:
        t = {k: v / mib for k, v in d["terms"].items()}
        print(f"  sgx.enclave_size {s['enclave_size']}: measured peak {t['measured_peak']:.0f} MiB (VmPeak, {d['samples']} "
              f"samples at batch size {d['batch_size']}{', measured earlier' if d['cached'] else ''}) + margin "
              f"{d['margin'] / mib:.0f} MiB (inputs of a full run {t['inputs_not_run']:.0f}, waiting samples "
              f"{t['parked_samples']:.0f}, Gramine {t['gramine']:.0f}) = {d['need'] / mib:.0f} MiB, {d['spare'] / mib:.0f} MiB spare")
    print(f"  sgx.max_threads {s['max_threads']}, debug {'yes' if s['debug'] else 'no'}, EDMM {'yes' if s['edmm'] else 'no'}")
    print(f"wrote {s['makefile']}: `make SGX=1` in {s['dir']} builds and signs for gramine-sgx, `make` builds for gramine-direct")
    print(f"  measured: bundle {s['bundle_id']} (model key id {s['model_key_id']}, minimum model version "
          f"{s['min_model_version']}); model broker {s['model_broker'] or 'none'}"
          + (f" (identity {s['model_broker_identity']})" if s["model_broker_identity"] else ""))
    if s["signed"]:
        print(f"signed: {s['sgx_manifest']}, {s['sigstruct']}")
        print(f"MRENCLAVE {s['mrenclave']}")
        print(f"MRSIGNER  {s['mrsigner']}")
    else:
        print(f"NOT SIGNED: nothing was signed ({'no --sgx' if not args.sgx else 'Gramine missing'}); on an SGX machine "
              f"with Gramine run `make SGX=1` in {s['dir']}")
    print(f"the model owner reproduces this build and signs it: `branchy-tee enclave release {s['dir']} --identity "
          "mo.id --model-key mo.key --out release.json`")
    return 0


def cmd_enclave_run(args) -> int:
    from .enclave.launch import run_enclave, split_run_arguments

    head, command, command_args = split_run_arguments(args.predict_args)
    if head:  # run options given after DIR: `enclave run DIR --backend native -- predict ...`
        p = ArgumentParser(prog=f"{PROG} enclave run")
        p.add_argument("--backend", choices=["sgx", "direct", "native"], default=args.backend)
        args.backend = p.parse_args(head).backend
    return run_enclave(args.dir, args.backend, command_args, command)


def cmd_enclave_release(args) -> int:
    from .attest.identity import load_identity
    from .enclave.release import write_release

    from .fileio import read_key_file

    statement = write_release(args.dir, load_identity(args.identity), args.out, read_key_file(args.model_key),
                              args.model_broker_identity)  # fmt: skip
    if args.json:
        emit_json(statement)
        return 0
    print(f"wrote {args.out}: release statement signed by {statement['model_owner']}")
    print(f"  MRENCLAVE {statement['mrenclave']} ({statement['attest']})")
    print(f"  bundle {statement['bundle_id']} (model version {statement['model_version']}), model broker identity "
          f"{statement['model_broker_identity']}")
    return 0


def cmd_enclave_policy(args) -> int:
    from .enclave.release import write_policy_from_release

    statement = write_policy_from_release(args.release, args.model_owner, args.out,
                                          accepted_tcb_statuses=args.accept_tcb or ["UpToDate"],
                                          collateral=args.collateral, allowed_data_owners=args.allowed_data_owner,
                                          allow_simulated=args.allow_simulated)  # fmt: skip
    if args.json:
        emit_json({"policy": args.out, "release": statement})
        return 0
    print(f"release statement verified (signed by the model owner {args.model_owner})")
    print(f"wrote {args.out}: releases keys only to MRENCLAVE {statement['mrenclave']} "
          f"(bundle {statement['bundle_id']}, model version >= {statement['min_model_version']})")
    return 0


# --------------------------------------------------------------------------- wiring
# Each entry adds one subcommand (or group) to the parser; keep them in the DESIGN.md order.
BUILDERS: list[Callable] = [
    add_models, add_train, add_eval, add_calibrate, add_export, add_keygen, add_seal, add_encrypt_input, add_predict,
    add_decrypt_result, add_quote, add_key_broker, add_demo, add_bench, add_enclave, add_serve, add_query,
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for build in BUILDERS:
        build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runtime.tuning import tune_allocator

    tune_allocator()
    try:
        return int(args.func(args) or 0)
    except BranchyError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. `branchy-tee models --json | head`
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
