"""The ``branchy-tee`` command: one subcommand per task, each a thin layer over the modules.

Heavy imports (torch, aiohttp) happen inside the handlers, so ``--help`` stays fast.
Expected failures raise ``BranchyError`` and end as one line on stderr with exit code 1
(usage errors: 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from ..errors import BranchyError
from ..parsing import ArgumentParser
from .common import PROG
from .enclave import add_enclave
from .model import add_calibrate, add_eval, add_export, add_models, add_train
from .owners import add_decrypt_result, add_encrypt_input, add_key_broker, add_keygen, add_quote, add_seal
from .runtime import add_bench, add_demo, add_predict, add_query, add_serve

# Each entry adds one subcommand (or group) to the parser; keep them in the DESIGN.md order.
BUILDERS: list[Callable] = [
    add_models,
    add_train,
    add_eval,
    add_calibrate,
    add_export,
    add_keygen,
    add_seal,
    add_encrypt_input,
    add_predict,
    add_decrypt_result,
    add_quote,
    add_key_broker,
    add_demo,
    add_bench,
    add_enclave,
    add_serve,
    add_query,
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for build in BUILDERS:
        build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..runtime.tuning import tune_allocator

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
