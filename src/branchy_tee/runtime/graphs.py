"""The stage graphs the enclave runs, on ONNX Runtime.

Stage k of a model is one ONNX graph (exported by ``branchy_tee.export.onnx``) that computes the
stage and its exit head:

    input (N, *stage input)  ->  features (N, *stage output), log_probs (N, classes)

The last stage's graph has only ``log_probs``. The runtime builds one ONNX Runtime session per stage
from the graph's bytes in memory (decrypted in the enclave, never written to a file).

Session options (``session_options``; measured on this project's 2-core machine, see BENCHMARKS.md):
all graph optimisations (the blocked NCHWc convolution layouts come only with ORT_ENABLE_ALL; the
extended level was 3x slower at batch 1), intra-op threads from the caller (one: predict spends its
threads on whole batches at once, ``runtime.engine``), no thread spinning, one memory arena shared by
every stage's session, no memory pattern.

Standard library, numpy and onnxruntime only (enclave side).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as _C  # see load_session

from ..errors import IntegrityError

INPUT, FEATURES, LOG_PROBS = "input", "features", "log_probs"
PROVIDERS = ["CPUExecutionProvider"]

_threads = 1  # predict's default too: see use_threads
_arena_registered = False


def use_threads(threads: int) -> None:
    """Intra-op threads of every stage session created from now on (0: one per physical core; 1 by
    default: on a 2-core machine shared with other jobs a second thread that sleeps between operators
    made early exit slower at batch 1 and at batch 128, and spinning ones were far worse), and, once
    per process, the memory arena they all share. With an arena per session, each would keep the
    high-water mark of its own stage's activations; shared, they reuse the same memory (measured on
    the benchmark model at batch 64: 42 against 23 MiB over the sessions' weights)."""
    global _threads, _arena_registered
    _threads = max(0, int(threads))
    if not _arena_registered:
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0: unlimited; extend strategy 1 (kSameAsRequested): grow by what is asked, not to
        # the next power of two; chunk sizes and dead bytes: ONNX Runtime's defaults.
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, 1, -1, -1))
        _arena_registered = True


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = _threads
    so.inter_op_num_threads = 1
    # Idle pool threads sleep at once instead of spinning for the next operator: on a shared machine
    # (or an enclave's few cores) a spinning thread takes a core from another job. ONNX Runtime's
    # process-wide thread pool would spare each session its own threads, but its spinning cannot be
    # turned off from Python.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.use_env_allocators", "1")  # the shared arena of use_threads()
    # No memory pattern: it plans each stage's intermediate tensors as one block, allocated on the
    # second run of a batch size beside the arena memory the first run already holds (12 MiB more for
    # stage 0 of the benchmark model at batch 64); the arena serves the same tensors one by one.
    so.enable_mem_pattern = False
    so.log_severity_level = 3  # errors only: warnings would interleave with the command's own output
    return so


def load_session(graph: bytes | bytearray, what: str) -> ort.InferenceSession:
    """An inference session for one serialised graph (authenticated bytes, held only in memory).

    Built with ONNX Runtime's C-level session, which takes a ``bytearray`` as it is: the public
    wrapper wants ``bytes``, one more copy of the graph in fresh memory (for a 155 MiB stage, about
    a quarter of the sealed cold start). The caller may wipe ``graph`` once this returns."""
    if not isinstance(graph, (bytes, bytearray)):
        graph = bytes(graph)
    if not _arena_registered:
        use_threads(_threads)
    try:
        c_session = _C.InferenceSession(session_options(), graph, False, False)
        c_session.initialize_session(PROVIDERS, [{}], set())
    except Exception as e:  # onnxruntime raises its own exception types for malformed graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise IntegrityError(f"{what}: authentic but not a usable ONNX graph ({first[:200]})") from None
    # The public object around it, keeping neither the model's bytes (every loaded stage would
    # otherwise stay resident twice) nor a provider fallback (CPU-only).
    return ort.InferenceSession._from_initialized_c_session(c_session)


class StageGraph:
    """One stage's session, called as ``features, log_probs = stage(h)`` (features None for the last)."""

    def __init__(self, session: ort.InferenceSession, what: str = "stage graph"):
        try:  # ONNX Runtime decodes names and symbolic dimensions only when asked (found by fuzz_stage_graph)
            inputs = [i.name for i in session.get_inputs()]
            outputs = [o.name for o in session.get_outputs()]
            shape = session.get_inputs()[0].shape if inputs else []
        except UnicodeDecodeError:
            raise IntegrityError(f"{what}: graph's input or output description is not UTF-8") from None
        if inputs != [INPUT] or outputs not in ([FEATURES, LOG_PROBS], [LOG_PROBS]):
            raise IntegrityError(
                f"{what}: graph has inputs {inputs} and outputs {outputs}, not a branchy-tee stage graph"
            )
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise IntegrityError(f"{what}: graph's input shape {shape} is not (batch, fixed sizes...)")
        self.session = session
        # The C-level run: the public one checks the feed's names and ownership on every call (2-3
        # microseconds a stage at batch 1); this feed is always {INPUT: one float32 array}.
        self._run = session._sess.run
        self.last = outputs == [LOG_PROBS]
        self._outputs = outputs
        self.input_shape: list[int] = shape[1:]

    def __call__(self, h: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        out = self._run(self._outputs, {INPUT: h}, None)
        return (None, out[0]) if self.last else (out[0], out[1])
