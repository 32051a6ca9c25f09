"""The ``branchy-tee`` command: one subcommand per task, each a thin layer over the modules.

Heavy imports (torch, aiohttp) happen inside the handlers, so ``--help`` stays fast.
Expected failures raise ``BranchyError`` and end as one line on stderr with exit code 1
(usage errors: 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from branchy_tee.cli.common import PROG
from branchy_tee.cli.enclave import add_enclave
from branchy_tee.cli.model import add_calibrate, add_eval, add_export, add_images, add_models, add_train
from branchy_tee.cli.owners import (
    add_decrypt_result,
    add_encrypt_input,
    add_key_broker,
    add_keygen,
    add_quote,
    add_seal,
)
from branchy_tee.cli.runtime import add_bench, add_demo, add_predict, add_query, add_serve
from branchy_tee.core.commandline import ArgumentParser
from branchy_tee.core.errors import BranchyError

# Each entry adds one subcommand (or group) to the parser, in the order --help lists them.
BUILDERS: list[Callable] = [
    add_models,
    add_train,
    add_eval,
    add_calibrate,
    add_export,
    add_images,
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
    from branchy_tee import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for build in BUILDERS:
        build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from branchy_tee.tee.tuning import tune_allocator

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
