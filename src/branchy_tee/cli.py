"""The ``branchy-tee`` command: one subcommand per task, each a thin layer over the modules.

Heavy imports (torch, aiohttp) happen inside the handlers, so ``--help`` stays fast.
Expected failures raise ``BranchyError`` and end as one line on stderr with exit code 1
(usage errors: 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from .errors import BranchyError, UsageError

PROG = "branchy-tee"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


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


# --------------------------------------------------------------------------- wiring
# Each entry adds one subcommand (or group) to the parser; keep them in the DESIGN.md order.
BUILDERS: list[Callable] = [add_models]


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
