"""Model owner's commands on a run directory: models, train, eval, calibrate, export."""

from __future__ import annotations

from branchy_tee.cli.common import SEED_NETS, add_data_arguments, emit_json, floats, key_value, net_name
from branchy_tee.core.errors import UsageError
from branchy_tee.tee.criteria import NAMES as CRITERIA


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered multi-exit models with their exits and cost")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the models built to count parameters")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from branchy_tee.models import list_models
    from branchy_tee.models.cost import describe_model

    rows = [describe_model(name, num_classes=args.num_classes) for name in list_models()]
    if args.json:
        emit_json(rows)
        return 0
    print(
        f"{'model':<12} {'params (backbone/heads)':>26} {'exits':>5} {'size MiB':>9}  "
        "cumulative GFLOPs per exit (3x32x32)"
    )
    for r in rows:
        params = f"{r['backbone_params'] / 1e6:.2f}M / {r['head_params'] / 1e6:.2f}M"
        flops = " ".join(f"{f / 1e9:.3f}" for f in r["exit_flops"])
        print(f"{r['name']:<12} {params:>26} {r['exits']:>5} {r['size_mib']:>9.1f}  {flops}")
    return 0


def add_train(sub) -> None:
    from branchy_tee.train.choices import OPTIMIZERS

    p = sub.add_parser(
        "train",
        help="train a multi-exit model, or attach early exits to a trained one",
        description="Train a multi-exit network (the seed's flags are accepted verbatim). "
        "Writes RUN_DIR/model.safetensors, model.json, checkpoint.pt and metrics.jsonl, "
        "then calibrates the exit thresholds on the validation split.",
    )
    # The seed's flags, verbatim (defaults as in the seed).
    p.add_argument("--lr", type=float, default=0.0001, help="learning rate (default 0.0001)")
    p.add_argument("--cuda", action="store_true", help="require CUDA (fail if there is none)")
    p.add_argument("--batch-size", type=int, default=100, help="training batch size")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument(
        "--net",
        type=net_name,
        default=None,
        metavar="NET",
        help=f"model: one of {', '.join(SEED_NETS)} (any case) (default MobileNetv1, or the run's with --attach-exits)",
    )
    p.add_argument("--epochs", type=int, default=100, help="most epochs (early stopping may end sooner)")
    p.add_argument("--resume", "-r", action="store_true", help="resume from RUN_DIR/checkpoint.pt")
    p.add_argument("--force", action="store_true", help="replace a run already in RUN_DIR (else refused)")
    p.add_argument("--patience", "-p", type=int, default=7, help="early-stopping patience in epochs")
    p.add_argument("--optim", "-o", choices=OPTIMIZERS, default="adamw", help="optimizer")
    # Ours.
    add_data_arguments(p, default=None, default_help="fashion-mnist, or the run's with --attach-exits")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train (auto: CUDA if present)"
    )
    _add_loss_arguments(p)
    _add_attach_arguments(p)
    _add_run_arguments(p)
    p.set_defaults(func=cmd_train)


def _add_loss_arguments(p) -> None:
    from branchy_tee.train.choices import DISTILL

    p.add_argument(
        "--distill",
        choices=DISTILL,
        default="none",
        help="teacher for the early exits: the final exit, a trained --teacher, or none (default: none; "
        "distillation did not raise early-exit accuracy in the measurements of docs/training.md)",
    )
    p.add_argument(
        "--teacher", metavar="CKPT", help="run directory or checkpoint.pt of a trained teacher (--distill teacher)"
    )
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.2,
        help="share of distillation in each early exit's loss: (1-alpha)*CE + alpha*T^2*KL (default 0.2)",
    )
    p.add_argument(
        "--distill-warmup",
        type=float,
        default=0.0,
        metavar="EPOCHS",
        help="ramp alpha up linearly from 0 over this many epochs (default 0)",
    )
    p.add_argument("--exit-weights", type=floats, metavar="W0,W1,...", help="loss weight per exit (default all 1)")
    p.add_argument(
        "--exit-grad-scale",
        type=float,
        default=1.0,
        metavar="G",
        help="scale the gradient the early exits send into the shared backbone (default 1)",
    )


def _add_attach_arguments(p) -> None:
    attach = p.add_mutually_exclusive_group()
    attach.add_argument(
        "--attach-exits",
        metavar="RUN_DIR",
        help="train only the early exits of a trained run: its backbone and final exit stay frozen "
        "(bit for bit), its data set and validation split are reused",
    )
    attach.add_argument(
        "--backbone-weights",
        metavar="FILE",
        help="attach new early exits to a plain single-exit --net (safetensors or weights-only torch "
        "state dict; names in docs/training.md); backbone and final exit stay frozen",
    )
    p.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="train on the images as they are (default: random padded crops and horizontal flips)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the training set held out for validation and calibration (default 0.1)",
    )


def _add_run_arguments(p) -> None:
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4 for SGD, 0.01 for AdamW, 0 for Adam")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, data order, split)")
    p.add_argument("--out", default="runs/latest", metavar="RUN_DIR", help="run directory (default runs/latest)")
    p.add_argument("--max-batches", type=int, default=None, help="at most this many batches per epoch (quick runs)")
    p.add_argument(
        "--model-config",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra model option, e.g. width=16 for a narrow ResNet (repeatable)",
    )
    p.add_argument("--synthetic-channels", type=int, choices=[1, 3], default=3, help="--dataset synthetic: channels")
    p.add_argument("--synthetic-size", type=int, default=32, help="--dataset synthetic: image side")
    p.add_argument(
        "--synthetic-samples", type=int, default=None, help="training samples of the synthetic set (default 10000)"
    )
    p.add_argument("--criterion", choices=CRITERIA, default="entropy", help="exit criterion calibrated at the end")
    p.add_argument(
        "--max-accuracy-drop", type=float, default=0.01, help="calibration budget (fraction; default 0.01 = 1 point)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def cmd_train(args) -> int:
    from branchy_tee.train.trainer import TrainConfig, fit

    synthetic = {"channels": args.synthetic_channels, "size": args.synthetic_size}
    if args.synthetic_samples:
        synthetic["n"] = args.synthetic_samples
    cfg = TrainConfig(
        net=args.net,
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        out=args.out,
        lr=args.lr,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        epochs=args.epochs,
        patience=args.patience,
        optim=args.optim,
        weight_decay=args.weight_decay,
        device=args.device,
        require_cuda=args.cuda,
        distill=args.distill,
        teacher=args.teacher,
        temperature=args.temperature,
        alpha=args.alpha,
        exit_weights=args.exit_weights,
        distill_warmup=args.distill_warmup,
        exit_grad_scale=args.exit_grad_scale,
        attach_exits=args.attach_exits,
        backbone_weights=args.backbone_weights,
        val_fraction=args.val_fraction,
        augment=args.augment,
        seed=args.seed,
        max_batches=args.max_batches,
        resume=args.resume,
        force=args.force,
        model_config=dict(args.model_config),
        synthetic=synthetic if args.dataset == "synthetic" else {},
        criterion=args.criterion,
        max_accuracy_drop=args.max_accuracy_drop,
        quiet=args.json,
    )
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
    print(
        f"calibrated ({cal['criterion']}, budget {100 * cal['max_accuracy_drop']:.2f} points, "
        f"margin {cal['margin_se']} SE): "
        f"thresholds {', '.join(f'{t:.4f}' for t in cal['thresholds'])}"
    )
    print(
        f"  validation accuracy {100 * cal['accuracy']:.2f}% vs final exit {100 * cal['final_accuracy']:.2f}%; "
        f"mean cost {cal['mean_flops'] / cal['full_flops']:.3f} of the full model "
        f"({cal['full_flops'] / max(cal['mean_flops'], 1):.2f}x fewer FLOPs); exits taken {fr}"
    )


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="per-exit accuracy, cost, calibrated early exit, sweep and oracle on the test split",
        description="Evaluate the run's exported stage graphs (exported first if missing or stale) on the "
        "test split, run by the enclave's engine on ONNX Runtime: what is sealed is what is evaluated.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_data_arguments(p, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--plot", metavar="FILE", help="write an accuracy-vs-cost plot (.png, .pdf or .svg: the suffix says)"
    )
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches of 256")
    p.add_argument("--latency-reps", type=int, default=20, help="timed repetitions per exit (batch 1)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from branchy_tee.evaluate.exits import evaluate_run
    from branchy_tee.evaluate.plots import plot_format

    if args.plot:
        plot_format(args.plot)  # before the evaluation, not after it
    report = evaluate_run(
        args.run_dir,
        args.dataset,
        args.data_dir,
        max_batches=args.max_batches,
        latency_reps=args.latency_reps,
        show=not args.json,
    )
    if args.plot:
        from branchy_tee.evaluate.plots import plot_accuracy_vs_cost

        report["plot"] = str(plot_accuracy_vs_cost(report, args.plot))
    if args.json:
        emit_json(report)
        return 0
    full = report["full_flops"]
    print(f"{report['arch']} on {report['samples']} test samples")
    print(f"{'exit':>4} {'accuracy':>9} {'GFLOPs':>8} {'of full':>8} {'latency ms':>11}")
    for e in report["exits"]:
        print(
            f"{e['index']:>4} {100 * e['accuracy']:>8.2f}% {e['flops'] / 1e9:>8.4f} {e['flops'] / full:>8.3f} "
            f"{e['latency_ms']:>11.3f}"
        )
    cal, orc = report["calibrated"], report["oracle"]
    label = "calibrated" if cal["calibrated"] else "uncalibrated (no early exits)"
    fr = " / ".join(f"{100 * f:.1f}%" for f in cal["exit_fractions"])
    print(
        f"{label} ({cal['criterion']}): accuracy {100 * cal['accuracy']:.2f}% "
        f"(final exit {100 * report['final_accuracy']:.2f}%), mean cost {cal['mean_flops'] / full:.3f} of full "
        f"({full / max(cal['mean_flops'], 1):.2f}x fewer FLOPs); exits {fr}"
    )
    print(
        f"oracle: accuracy {100 * orc['accuracy']:.2f}%, mean cost {orc['mean_flops'] / full:.3f} of full "
        f"({full / max(orc['mean_flops'], 1):.2f}x fewer FLOPs)"
    )
    if args.plot:
        print(f"plot: {report['plot']}")
    return 0


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="choose exit thresholds on the validation split within an accuracy budget")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--max-accuracy-drop", type=float, default=0.01, help="allowed drop vs the final exit (fraction; default 0.01)"
    )
    p.add_argument("--criterion", choices=CRITERIA, default=None, help="default: the model's current criterion")
    p.add_argument(
        "--margin-se",
        type=float,
        default=None,
        help="also keep this many standard errors of margin (default 2.5, which met the budget on the test "
        "split in every run of docs/training.md; 0 = exactly the budget on validation)",
    )
    add_data_arguments(p, default=None)
    p.add_argument("--max-batches", type=int, default=None, help="use at most this many batches (default: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from branchy_tee.evaluate.calibrate import DEFAULT_MARGIN_SE, calibrate_run

    if not 0 <= args.max_accuracy_drop < 1:
        raise UsageError("--max-accuracy-drop is a fraction in [0, 1), e.g. 0.01 for one point")
    margin = DEFAULT_MARGIN_SE if args.margin_se is None else args.margin_se
    if margin < 0:
        raise UsageError("--margin-se must not be negative")
    result = calibrate_run(
        args.run_dir,
        args.max_accuracy_drop,
        args.criterion,
        margin,
        dataset=args.dataset,
        data_dir=args.data_dir,
        max_batches=args.max_batches,
        show=not args.json,
    )
    if args.json:
        emit_json(result)
    else:
        _print_calibration(result)
        print(f"thresholds written to {args.run_dir}/model.json")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export each stage with its exit head as an ONNX graph into RUN_DIR/onnx",
        description="Export the run's model as one ONNX graph per stage (stage input -> stage output and "
        "the exit's log-probabilities; dynamic batch). Training does this at its end; eval, "
        "calibrate and seal redo it when the weights changed since.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print export.json")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from branchy_tee.export.onnx import EXPORT_DIR, export_run

    doc = export_run(args.run_dir, show=not args.json)
    if args.json:
        emit_json(doc)
    else:
        for e in doc["stages"]:
            print(
                f"{args.run_dir}/{EXPORT_DIR}/{e['file']}: {e['size'] / 2**20:.2f} MiB, "
                f"weights {e['weight_bytes'] / 2**20:.2f} MiB{_graph_note(e)}"
            )
    return 0


def _graph_note(entry: dict) -> str:
    """What a stage graph computes, where it is not simply its own stage (``export.onnx``)."""
    stages = entry["computes"]
    note = f", computes stages {stages[0]}-{stages[-1]}" if len(stages) > 1 else ""
    if entry["passes_input"]:
        note += ", passes its input on (the next graph computes this stage again)"
    return note


def add_images(sub) -> None:
    p = sub.add_parser(
        "images", help="write images of a dataset split as PNG files (e.g. test images to encrypt and query)"
    )
    add_data_arguments(p)
    p.add_argument("--split", choices=["train", "test"], default="test", help="which split")
    p.add_argument("--count", type=int, default=8, help="how many (the split's first ones)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to create (never overwritten)")
    p.set_defaults(func=cmd_images)


def cmd_images(args) -> int:
    """NNNN-CLASS.png for the split's first ``--count`` images, in a directory that did not exist."""
    from pathlib import Path

    from PIL import Image

    from branchy_tee.core.errors import UsageError
    from branchy_tee.data import load_dataset

    out = Path(args.out)
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    if out.exists():
        raise UsageError(f"--out {out} exists: give a new directory")
    ds = load_dataset(args.dataset, args.split, args.data_dir)
    out.mkdir(parents=True)
    for i in range(min(args.count, len(ds.images))):
        pixels = ds.images[i].permute(1, 2, 0).numpy()
        name = ds.classes[int(ds.labels[i])].replace("/", "-").replace(" ", "-")
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(out / f"{i:04d}-{name}.png")
    print(f"wrote {min(args.count, len(ds.images))} {args.dataset} {args.split} images to {out}")
    return 0
