"""How large the enclave must be, from a measurement.

``enclave build`` runs the enclave runtime once, natively: the enclave environment's interpreter
and packages, the manifest's loader.env (MALLOC_ARENA_MAX=1, OMP_NUM_THREADS, PYTHONHOME, ...),
on a stand-in for the bundle: the same architecture and configuration (the header's), random
weights, sealed under a throwaway key, so no model key is needed. It answers one request of
``2 x --batch-size`` random samples at ``--batch-size`` through every stage (``--full-model``: all
stages loaded and run, the most weights and activations) and reports its peak virtual memory
(VmPeak): an enclave must hold all of its virtual memory, not only the part that is resident.

    need = VmPeak of that run
         + the inputs it did not hold: 3 x (--max-samples - samples run) x input bytes (the sealed
           request, its decrypted payload and the batched tensor)
         + the samples that wait between stages at --batch-size (tee.budget's bound; with every
           sample going through every stage the run parks none)
         + Gramine's own share, GRAMINE_SHARE
    sgx.enclave_size = the smallest power of two >= need, and at least 256M

Gramine's own share is 128 MiB. Up to Gramine 1.3 the PAL reserved 64 MiB for its internal state
by default (``loader.pal_internal_mem_size``: the parsed manifest and its trusted-file table,
handles, the directory entries of opened files), and needed 128 MiB for manifests above 15 MB;
since 1.4 that memory comes out of the enclave size on demand. Our hashed manifest stays under
3 MB, so 64 MiB for that state plus 64 MiB for the LibOS and PAL themselves, their per-thread
stacks and the exception-handling areas of sgx.max_threads threads. It is an estimate from
Gramine's documentation and history, not measured on SGX hardware (none was available).

The measured run starts the runtime through one small function (peak.py: ``run_runtime``), and the
stand-in is made by one function (``stand_in``): that is the hook to change when the runtime moves
to other model files (exported graphs of the random model instead of its weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from branchy_tee.core.errors import BranchyError
from branchy_tee.tee.budget import activation_bytes_per_sample

if TYPE_CHECKING:
    from branchy_tee.tee.sealed.header import BundleHeader

MIB = 1 << 20
GRAMINE_SHARE = 128 * MIB
MIN_ENCLAVE = 256 * MIB
INPUT_COPIES = 3
RUNNER = Path(__file__).resolve().parent / "peak.py"
CACHE = "branchy-tee-sizes.json"  # in the enclave environment's folder, outside what is trusted


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def size_string(n: int) -> str:
    """Gramine's size syntax: "512M", "2G"."""
    return f"{n // (1 << 30)}G" if n % (1 << 30) == 0 else f"{n // MIB}M"


def parse_size(text: str) -> int:
    """ "512M", "2G" (Gramine's syntax) -> bytes; a power of two of at least 256M."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        n = int(text[:-1]) * units[text[-1].upper()]
    except (ValueError, KeyError, IndexError):
        raise BranchyError(f"--enclave-size {text!r}: give a size like 512M or 2G") from None
    if n < MIN_ENCLAVE or n & (n - 1):
        raise BranchyError(
            f"--enclave-size {text}: SGX enclave sizes are powers of two, and this one needs at least 256M"
        )
    return n


def stand_in(header: BundleHeader, workdir: Path, samples: int) -> list[str]:
    """A bundle of the header's architecture with random weights, sealed the way ``seal`` seals a
    trained model (with the header's model facts: everything the runtime's memory depends on), its
    keys, and one encrypted request of ``samples`` random inputs, in
    ``workdir``. Returns predict's arguments for them (the hook: see the module docstring)."""
    import torch

    from branchy_tee.client.envelopes import seal_request
    from branchy_tee.core.fileio import write_key_file
    from branchy_tee.core.keys import generate_key
    from branchy_tee.models import create_model
    from branchy_tee.seal.bundle import seal_model

    torch.manual_seed(0)
    model = create_model(header.arch, **header.config).eval()
    model_key, data_key = generate_key(), generate_key()
    write_key_file(workdir / "model.key", model_key)
    write_key_file(workdir / "data.key", data_key)
    seal_model(model, header, model_key, workdir / "model.btee", chunk_size=header.chunk_size)
    x = torch.rand(samples, *header.preprocessing.input_shape)
    (workdir / "request.bin").write_bytes(seal_request(x, data_key))
    return [
        "--bundle",
        str(workdir / "model.btee"),
        "--input",
        str(workdir / "request.bin"),
        "--output",
        str(workdir / "result.bin"),
        "--model-key",
        str(workdir / "model.key"),
        "--data-key",
        str(workdir / "data.key"),
    ]


def measurement_environment(loader_env: dict[str, str]) -> dict[str, str]:
    """The manifest's loader.env and nothing else, except BRANCHY_TEE_ENCLAVE: the measured run
    reads its keys from files, which the runtime refuses inside an enclave."""
    return {k: v for k, v in loader_env.items() if k != "BRANCHY_TEE_ENCLAVE"}


def cache_what(
    header: BundleHeader, python: str, env_dir: str, loader_env: dict, batch_size: int, samples: int
) -> dict:
    """Everything a measured peak depends on: a result for the same values is reused."""
    record = json.loads((Path(env_dir) / "branchy-tee-env.json").read_text())
    return {
        "runner": hashlib.sha256(RUNNER.read_bytes()).hexdigest(),
        "python": python,
        "env": {k: record.get(k) for k in ("spec", "files_sha256", "package_sha256")},
        "header": {**header.facts_json(), "chunk_size": header.chunk_size},
        "stages": [(s.plaintext_size, s.weight_bytes) for s in header.stages],
        "loader_env": measurement_environment(loader_env),
        "batch_size": batch_size,
        "samples": samples,
    }


def cached(env_dir: str, what: dict, compute) -> dict:
    """``compute()``'s result for ``what``, reused from ENV/branchy-tee-sizes.json when measured before."""
    from branchy_tee.core.fileio import atomic_write_text

    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    cache_file = Path(env_dir) / CACHE
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return {**cache[key], "cached": True}
    result = compute()
    cache[key] = result
    atomic_write_text(cache_file, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return {**result, "cached": False}


def measure_peak(
    header: BundleHeader,
    python: str,
    env_dir: str,
    loader_env: dict[str, str],
    batch_size: int,
    max_samples: int,
    log=lambda msg: None,
) -> dict:
    """Run the runtime once (see the module docstring); returns VmPeak, VmHWM and the samples run."""
    samples = min(max_samples, 2 * batch_size)
    what = cache_what(header, python, env_dir, loader_env, batch_size, samples)
    return cached(env_dir, what, lambda: _measure(header, python, loader_env, batch_size, samples, log))


def _measure(header: BundleHeader, python: str, loader_env: dict, batch_size: int, samples: int, log) -> dict:
    log(
        f"measuring the runtime's peak memory: {header.arch}, {samples} samples at batch size {batch_size}, "
        "random weights, in the enclave environment"
    )
    with tempfile.TemporaryDirectory(prefix="branchy-tee-size-") as tmp:
        argv = stand_in(header, Path(tmp), samples)
        argv += ["--batch-size", str(batch_size), "--full-model", "--quiet"]
        proc = subprocess.run(
            [python, str(RUNNER), *argv],
            env=measurement_environment(loader_env),
            cwd=tmp,
            capture_output=True,
            text=True,
        )
    try:
        status = json.loads(proc.stdout.strip().splitlines()[-1])
        ok = proc.returncode == 0 and status["exit_code"] == 0 and status["VmPeak"] > 0
    except (IndexError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        lines = proc.stderr.strip().splitlines()
        raise BranchyError(
            f"the runtime failed in the enclave environment while measuring its memory (exit "
            f"{proc.returncode}): {lines[-1] if lines else 'no output'}"
        )
    return {"vm_peak": status["VmPeak"], "vm_hwm": status["VmHWM"], "samples": samples, "batch_size": batch_size}


def enclave_size(
    header: BundleHeader, measured: dict, max_samples: int, gramine_share: int = GRAMINE_SHARE, inflight: int = 0
) -> dict:
    """The terms of ``need`` (module docstring), bytes, and the size chosen. ``gramine_share``: what
    Gramine adds beyond the measured run (less when that run was inside Gramine: ``direct_peak``);
    ``inflight``: serve's measured cap on request bytes being read or waiting (the queue's included)."""
    input_bytes = 4 * math.prod(header.preprocessing.input_shape)
    terms = {
        "measured_peak": measured["vm_peak"],
        "inputs_not_run": INPUT_COPIES * max(0, max_samples - measured["samples"]) * input_bytes,
        "parked_samples": measured["batch_size"] * activation_bytes_per_sample(header),
        "gramine": gramine_share,
        "inflight_requests": inflight,
    }
    need = sum(terms.values())
    size = max(MIN_ENCLAVE, next_power_of_two(need))
    return {
        "terms": terms,
        "need": need,
        "enclave_size": size,
        "enclave_size_str": size_string(size),
        "margin": need - measured["vm_peak"],
        "spare": size - need,
    }
