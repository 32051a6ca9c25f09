"""The runtime's peak virtual memory inside Gramine's LibOS (gramine-direct), for sgx.enclave_size.

Where gramine-manifest and gramine-direct are installed, ``enclave build`` repeats ``measure``'s run
(the random stand-in of the bundle, 2 x --batch-size samples at --batch-size, --full-model) inside
Gramine: the build's own template and values, except that the stand-in's folder is the bundle and
I/O folder, the entry script is predict's and BRANCHY_TEE_ENCLAVE is left out (the run reads
throwaway key files). The host's /proc then shows the Gramine process's VmPeak: the runtime plus the
LibOS, the PAL and Gramine's glibc around it, which the native run cannot show.

It is still a lower bound for SGX: an SGX enclave also holds what gramine-direct does not allocate
(each thread's TCS, SSA frames and PAL stacks, and the PAL's enclave-side state), SGX_ONLY_SHARE, an
estimate, not measured on SGX hardware. VmPeak is sampled every SAMPLE_SECONDS from the host; it only
grows, so a sample misses at most the growth of the process's last interval.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from branchy_tee.core.errors import BranchyError
from branchy_tee.gramine import MANIFEST_NAME
from branchy_tee.gramine.measure import MIB, cache_what, cached, measurement_environment, stand_in
from branchy_tee.gramine.tools import MANIFEST_TEMPLATE, gramine_manifest_argv, run_tool, which

if TYPE_CHECKING:
    from branchy_tee.gramine.config import EnclaveConfig
    from branchy_tee.tee.sealed.header import BundleHeader

SGX_ONLY_SHARE = 64 * MIB
SAMPLE_SECONDS = 0.01
TEMPLATE = Path(__file__).resolve().parent / "templates" / MANIFEST_TEMPLATE
TOOLS = ("gramine-manifest", "gramine-direct")


def _tool(name: str) -> Path | None:
    """``name`` from the installation of the gramine-direct on PATH: its renderer writes the
    loader.entrypoint that its PAL loads (another release's renderer names another LibOS)."""
    direct = which("gramine-direct")
    tool = Path(direct).parent / name if direct else None
    return tool if tool and tool.is_file() else None


def available() -> bool:
    return all(_tool(t) for t in TOOLS)


def gramine_fingerprint() -> str:
    """Which Gramine runs the measurement (part of the cache key): the direct PAL's hash."""
    prefix = Path(which("gramine-direct") or "").resolve().parent.parent
    pals = sorted(prefix.glob("lib*/**/gramine/direct/libpal.so"))
    return hashlib.sha256(pals[0].read_bytes()).hexdigest() if pals else str(prefix)


def vm_peak_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return children + [g for c in children for g in _descendants(c)]


def run_sampling_vm_peak(argv: list[str], **kw) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``argv``; (its result, the largest VmPeak in bytes of it or any process it started)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, *(vm_peak_kib(p) for p in [proc.pid, *_descendants(proc.pid)]))
        time.sleep(SAMPLE_SECONDS)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), peak * 1024


def measure_direct_peak(cfg: EnclaveConfig, header: BundleHeader, entry: str, log=lambda msg: None) -> dict:
    """Run the stand-in under gramine-direct with ``cfg``'s manifest values (``entry``: the text of
    predict's entry script); VmPeak (bytes) and the samples run, reused when measured before."""
    samples = min(cfg.max_samples, 2 * cfg.batch_size)
    what = cache_what(header, cfg.interpreter, cfg.env_dir, cfg.env, cfg.batch_size, samples)
    what.update(
        backend="gramine-direct",
        gramine=gramine_fingerprint(),
        template=hashlib.sha256(TEMPLATE.read_bytes()).hexdigest(),
        entry=entry,
        threads=cfg.max_threads,
    )
    return cached(cfg.env_dir, what, lambda: _measure(cfg, header, entry, samples, log))


def _measure(cfg: EnclaveConfig, header: BundleHeader, entry: str, samples: int, log) -> dict:
    from branchy_tee.core.fileio import atomic_write_text
    from branchy_tee.gramine.config import loader_env_toml, manifest_defines

    log(f"measuring the runtime's peak memory under gramine-direct: {samples} samples at batch size {cfg.batch_size}")
    with tempfile.TemporaryDirectory(prefix="branchy-tee-size-direct-") as tmp:
        d = Path(tmp).resolve()
        argv = stand_in(header, d, samples) + ["--batch-size", str(cfg.batch_size), "--full-model", "--quiet"]
        launcher = d / f"{MANIFEST_NAME}-predict"
        atomic_write_text(launcher, entry, mode=0o755)
        # The stand-in's folder holds its bundle, keys, request and result: the one I/O folder.
        sizing = cfg.replace(dir=str(d), bundle=str(d / "model.btee"), bundle_files=(), io_dirs=(str(d),))
        defines = {**manifest_defines(sizing.replace(launcher=str(launcher)))}
        defines["loader_env"] = loader_env_toml(measurement_environment(sizing.env))
        shutil.copyfile(TEMPLATE, d / MANIFEST_TEMPLATE)
        run_tool([str(_tool("gramine-manifest")), *gramine_manifest_argv(defines)[1:]], cwd=str(d))
        done, peak = run_sampling_vm_peak([str(_tool("gramine-direct")), f"./{MANIFEST_NAME}", *argv], cwd=str(d))
    if done.returncode != 0 or peak == 0:
        lines = done.stderr.strip().splitlines()
        raise BranchyError(
            f"the runtime failed under gramine-direct while measuring its memory (exit {done.returncode}): "
            f"{lines[-1] if lines else 'no output'}"
        )
    return {"vm_peak": peak, "samples": samples, "batch_size": cfg.batch_size}
