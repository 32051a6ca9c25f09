"""Launch the enclave runtime built by ``enclave build``: under gramine-sgx, gramine-direct, or
natively (``python -m branchy_tee.tee.predict`` or ``.server`` from the enclave environment)
with the environment the manifest sets. The command after ``--`` must be the build's entry
(``predict``, or ``serve`` for a build with ``--serve``).

For the Gramine backends, the command's arguments are parsed here first, with its own parser, and
passed on in canonical form (``--option=value``, paths made absolute). Gramine runs in the build
directory, and the enclave sees host paths only through the manifest's identity mounts. Arguments
the enclave would refuse or could not open stop here with a clear message: key files, another
bundle, paths outside the data directories.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from branchy_tee.core.choices import Choice
from branchy_tee.core.errors import BranchyError, UsageError
from branchy_tee.gramine import MANIFEST_NAME
from branchy_tee.gramine.config import ENTRIES, EnclaveConfig, load_config
from branchy_tee.gramine.tools import (
    INSTALL_HINT,
    MANIFEST,
    SGX_MANIFEST,
    SIGSTRUCT,
    gramine_manifest_argv,
    run_tool,
    which,
)


class LaunchBackend(Choice):
    """How ``enclave run`` starts the enclave's runtime."""

    SGX = "sgx"  # gramine-sgx: a real enclave
    DIRECT = "direct"  # gramine-direct: Gramine without SGX
    NATIVE = "native"  # the enclave environment's Python, no Gramine


TOOLS: dict[str, str] = {LaunchBackend.SGX: "gramine-sgx", LaunchBackend.DIRECT: "gramine-direct"}
# predict's options that name files the enclave reads or writes.
DATA_PATHS = ("input", "output", "plaintext_result", "mprofile", "stats_json")
PATH_OPTIONS = {"bundle", "model_key", "data_key", "broker_ca", *DATA_PATHS}


def split_run_arguments(rest: list[str]) -> tuple[list[str], str, list[str]]:
    """``[run options] -- COMMAND ARGS`` -> (run options, command, its arguments). The command is
    ``predict`` (the default when left out) or ``serve``; no other command runs in the enclave."""
    if "--" in rest:
        i = rest.index("--")
        head, tail = rest[:i], rest[i + 1 :]
    else:  # argparse already dropped the `--`: leading run options, then predict's arguments
        i = 0
        while i < len(rest) and (
            rest[i] in ("--backend", "--gramine") or rest[i].startswith(("--backend=", "--gramine="))
        ):
            i += 1 if "=" in rest[i] else 2
        head, tail = rest[:i], rest[i:]
    command = "predict"
    if tail and tail[0] in ENTRIES:
        command, tail = tail[0], tail[1:]
    elif tail and not tail[0].startswith("-"):
        raise UsageError(
            f"only predict or serve run in the enclave, not {tail[0]!r}: use `enclave run DIR -- predict --bundle ...`"
        )
    if not tail:
        raise UsageError(
            f"nothing to run: give {command}'s arguments after `--`, e.g. "
            "`branchy-tee enclave run DIR -- predict --bundle model.btee --input req.bin --output res.bin`"
        )
    return head, command, tail


def command_parser(command: str = "predict") -> argparse.ArgumentParser:
    from branchy_tee.core.commandline import ArgumentParser

    if command == "serve":
        from branchy_tee.tee.serve.server import PROG, add_arguments
    else:
        from branchy_tee.tee.predict import PROG, add_arguments
    p = ArgumentParser(prog=PROG)
    add_arguments(p)
    return p


def canonical_argv(parser: argparse.ArgumentParser, ns: argparse.Namespace, absolute: bool = True) -> list[str]:
    """Rebuild a command line from parsed arguments: full option names (no abbreviations),
    ``--option=value`` (a value may start with '-'), paths absolute."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        value = getattr(ns, action.dest, None)
        if value is None or value == action.default:
            continue
        opt = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true
            argv.append(opt)
            continue
        values = value if isinstance(action, argparse._AppendAction) else [value]
        for v in values:
            v = str(v)
            if absolute and action.dest in PATH_OPTIONS:
                v = os.path.abspath(v)
            argv.append(f"{opt}={v}")
    return argv


def _inside(path: str, dirs: list[str]) -> bool:
    p = Path(os.path.realpath(path))
    return any(p == q or q in p.parents for q in (Path(os.path.realpath(d)) for d in dirs))


def check_for_enclave(ns: argparse.Namespace, cfg: EnclaveConfig) -> None:
    """Refuse, before starting Gramine, what the enclave would refuse or could not open."""
    if getattr(ns, "model_key", None) or getattr(ns, "data_key", None):  # (predict's options only)
        raise UsageError(
            "inside the enclave keys come only from attested key release; --model-key/--data-key "
            "are refused (use --backend native for development with key files)"
        )
    if ns.attestation_dir != "/dev/attestation":
        raise UsageError("inside the enclave the attestation evidence comes from Gramine's /dev/attestation only")
    if getattr(ns, "plaintext_result", None) and not cfg.allow_plaintext:
        raise UsageError("this enclave was built without --allow-plaintext-result; --plaintext-result is refused")
    if getattr(ns, "full_model", None) and not cfg.allow_full_model:
        raise UsageError("this enclave was built without --allow-full-model; --full-model is refused")
    if os.path.realpath(ns.bundle) != os.path.realpath(cfg.bundle):
        raise UsageError(
            f"this enclave was built for the bundle {cfg.bundle}, not {os.path.abspath(ns.bundle)}; "
            "rebuild it with `branchy-tee enclave build --bundle ...`"
        )
    for dest in DATA_PATHS:
        value = getattr(ns, dest, None)
        for path in value if isinstance(value, list) else [value] if value else []:
            if not _inside(os.path.abspath(path), list(cfg.io_dirs)):
                raise UsageError(
                    f"{path} is outside the enclave's data directories ({', '.join(cfg.io_dirs)}); "
                    "move it there or rebuild with --io-dir/--stats-dir"
                )
    if ns.broker_ca and cfg.broker_ca and os.path.realpath(ns.broker_ca) != os.path.realpath(cfg.broker_ca):
        raise UsageError(f"--broker-ca must be the measured {cfg.broker_ca} (only it is a trusted file in the enclave)")
    if ns.broker_ca and not cfg.broker_ca:
        raise UsageError("this enclave was built without --broker-ca; rebuild with it to use an HTTPS broker CA")
    if cfg.broker_ca:
        ns.broker_ca = cfg.broker_ca


def native_environment(cfg: EnclaveConfig, with_key_files: bool) -> dict[str, str]:
    """The process environment without its PYTHON* variables, plus the manifest's loader.env: the
    enclave environment's interpreter and packages (PYTHONHOME), its libraries, its settings. With
    key files there is no enclave to pretend to be: BRANCHY_TEE_ENCLAVE is left out, since predict
    refuses key files inside an enclave."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(cfg.env)
    if with_key_files:
        env.pop("BRANCHY_TEE_ENCLAVE", None)
    return env


def run_enclave(directory: str, backend: str, args: list[str], command: str = "predict") -> int:
    """Run ``command`` (predict or serve) in the enclave built in ``directory``; returns its exit code."""
    if backend not in LaunchBackend.names():
        raise UsageError(f"--backend is one of {', '.join(LaunchBackend.names())}")
    if backend in TOOLS and not which(TOOLS[backend]):
        raise BranchyError(
            f"{TOOLS[backend]} not found on PATH: {INSTALL_HINT}, or give --gramine DIR (a Gramine installation); "
            "or use --backend native"
        )
    cfg = load_config(directory)
    if command != cfg.entry:
        raise UsageError(
            f"the enclave in {directory} was built to run {cfg.entry}, not {command}"
            + (" (build it with --serve)" if command == "serve" else "")
        )
    parser = command_parser(command)
    ns = parser.parse_args(args)
    d = Path(directory).resolve()
    if backend == LaunchBackend.NATIVE:
        keys = command == "predict" and bool(ns.model_key or ns.data_key)  # serve takes no key files
        if keys:
            print(
                "branchy-tee enclave run: note: native run with key files: no enclave, so the manifest's measured "
                "settings (brokers, plaintext results, minimum model version) are not enforced",
                file=sys.stderr,
            )
        return _run_forwarding_signals(
            [cfg.interpreter, "-m", ENTRIES[command], *args], env=native_environment(cfg, keys)
        )

    check_for_enclave(ns, cfg)
    if backend == LaunchBackend.DIRECT:
        _render_if_needed(d, cfg)
    needed = [SGX_MANIFEST, SIGSTRUCT] if backend == LaunchBackend.SGX else [MANIFEST]
    missing = [n for n in needed if not (d / n).is_file()]
    if missing:
        sgx = backend == LaunchBackend.SGX
        how = f"`make SGX=1` in {d} (or `branchy-tee enclave build --sgx`)" if sgx else f"`make` in {d}"
        raise BranchyError(f"{', '.join(missing)} missing in {d}: run {how}")
    if backend == LaunchBackend.DIRECT and (d / MANIFEST).stat().st_mtime == 0:
        raise BranchyError(f"{d / MANIFEST} was rendered without Gramine (for inspection); run `make` in {d} first")
    return _run_forwarding_signals([TOOLS[backend], f"./{MANIFEST_NAME}", *canonical_argv(parser, ns)], cwd=str(d))


def _render_if_needed(d: Path, cfg: EnclaveConfig) -> None:
    """gramine-direct needs the manifest gramine-manifest hashed: render it here, exactly as the build
    directory's Makefile would, if the build ran without Gramine."""
    m = d / MANIFEST
    if (not m.is_file() or m.stat().st_mtime == 0) and which("gramine-manifest"):
        run_tool(gramine_manifest_argv(cfg.defines), cwd=str(d))


def _run_forwarding_signals(argv: list[str], **kw) -> int:
    """Run the enclave's process and pass SIGTERM/SIGINT on to it, so that stopping `enclave run`
    stops (gracefully: serve finishes its accepted requests) what it started; its exit code."""
    import signal
    import threading

    proc = subprocess.Popen(argv, **kw)
    forward = lambda sig, _frame: proc.send_signal(sig)  # noqa: E731
    main_thread = threading.current_thread() is threading.main_thread()  # (only it may set handlers)
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
