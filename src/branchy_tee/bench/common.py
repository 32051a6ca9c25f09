"""What the parts of ``branchy-tee bench`` share: the log line, a timer, the machine's description,
the engine's thread count, and ``predict`` run as its own process (for its peak RSS)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from branchy_tee.core.errors import BranchyError

# Intra-op threads of the enclave's sessions here (predict's default): on this 2-core machine, shared
# with other jobs, a second thread without spinning made early exit slower at batch 1 and at batch
# 128 (threads that sleep between operators must be woken for each; see BENCHMARKS.md).
ENGINE_THREADS = 1


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@contextmanager
def timer():
    """``with timer() as t: ...``; afterwards ``t[1]`` holds the seconds taken."""
    t = [time.perf_counter()]
    yield t
    t.append(time.perf_counter() - t[0])


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def predict_subprocess(
    work: Path, bundle: Path, name: str, batch_size: int, request: str = "req.enc", extra=()
) -> dict:
    """``predict`` on ``work/request`` in a process of its own (keys in ``work``); its statistics."""
    stats = work / f"{name}.stats.json"
    cmd = [
        sys.executable,
        "-m",
        "branchy_tee.tee.predict",
        "--bundle",
        str(bundle),
        "--input",
        str(work / request),
        "--output",
        str(work / f"{name}.res"),
        "--model-key",
        str(work / "model.key"),
        "--data-key",
        str(work / "data.key"),
        "--stats-json",
        str(stats),
        "--quiet",
        "--batch-size",
        str(batch_size),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode
        raise BranchyError(f"predict subprocess failed: {last}")
    return json.loads(stats.read_text())
