"""What every subcommand shares: output helpers and argument types."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from branchy_tee.core.errors import BranchyError, UsageError

PROG = "branchy-tee"


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def iso8601_utc(text: str):
    """argparse type for --now: ISO 8601; 'Z' and naive times mean UTC."""
    from datetime import timezone

    from branchy_tee.core.strict import iso8601

    try:
        dt = iso8601(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def read_input(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BranchyError(f"cannot read {what} {path}: {e.strerror or e}") from None


SEED_NETS = [
    "LeNet5",
    "AlexNet",
    "VGG16",
    "VGG19",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "DenseNet121",
    "MobileNetv1",
    "MobileNetV2",
]


def net_name(value: str) -> str:
    from branchy_tee.models import resolve_name

    try:
        return resolve_name(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def key_value(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    for conv in (int, float):
        try:
            return key, conv(raw)
        except ValueError:
            pass
    return key, raw


def add_data_arguments(p, default="fashion-mnist", required=False, default_help=None) -> None:
    from branchy_tee.train.choices import DATASETS

    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None if required else default,
        help=f"dataset (default: {default_help or ('as trained' if default is None else default)})",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="dataset location (default for fashion-mnist: /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--download", action="store_true", help="download CIFAR-10 (official URL, MD5 checked) when missing")


ENCLAVE_ENV = ".enclave-env"  # = gramine.env.DEFAULT_ENV_DIR (not imported here: the parser stays light)


def progress(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
