"""The stage graphs the enclave runs, on ONNX Runtime.

Stage k of a model is one ONNX graph (exported by ``branchy_tee.export.onnx``) that computes the
stage and its exit head:

    input (N, *stage input)  ->  features (N, *stage output), log_probs (N, classes)

The last stage's graph has only ``log_probs``. The runtime builds one ONNX Runtime session per stage
from the graph's bytes in memory (decrypted in the enclave, never written to a file).

Session options, measured on the benchmark model (MobileNetV1 x0.5, Fashion-MNIST, 2 cores shared
with other jobs; see BENCHMARKS.md): all graph optimisations (the NCHWc convolution layouts come
only with ORT_ENABLE_ALL: the extended level was 3x slower at batch 1), intra-op threads from the
caller (OMP_NUM_THREADS in the enclave), no spinning (idle pool threads sleep instead of burning a
core another stage, session or tenant could use; spinning bought nothing measurable here), and one
thread pool shared by every stage's session instead of one pool per session (fewer threads: each is
an SGX thread slot). The CPU memory arena stays on: without it every run allocates afresh and batch-1
latency rose by a fifth.

Standard library, numpy and onnxruntime only (enclave side).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import IntegrityError

INPUT, FEATURES, LOG_PROBS = "input", "features", "log_probs"
PROVIDERS = ["CPUExecutionProvider"]

_global_threads: int | None = None


def use_threads(threads: int) -> None:
    """Set up what every stage session shares, once per process (ONNX Runtime creates its
    environment with the first session and cannot change it afterwards): the thread pool, sized
    ``threads`` (0: one thread per physical core), and one memory arena. With an arena per session,
    each would keep the high-water mark of its own stage's activations; shared, they reuse the same
    memory (measured on the benchmark model at batch 64: 42 against 23 MiB over the sessions' weights)."""
    global _global_threads
    if _global_threads is None:
        ort.set_global_thread_pool_sizes(intra_op_num_threads=max(0, threads), inter_op_num_threads=1)
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0: unlimited; extend strategy 1 (kSameAsRequested): grow by what is asked, not to
        # the next power of two; chunk sizes and dead bytes: ONNX Runtime's defaults.
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, 1, -1, -1))
        _global_threads = max(0, threads)


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.use_per_session_threads = False  # the shared pool of use_threads()
    so.add_session_config_entry("session.use_env_allocators", "1")  # the shared arena of use_threads()
    # No memory pattern: it plans each stage's intermediate tensors as one block, allocated on the
    # second run of a batch size beside the arena memory the first run already holds (12 MiB more for
    # stage 0 of the benchmark model at batch 64); the arena serves the same tensors one by one.
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: warnings would interleave with the command's own output
    return so


def load_session(graph: bytes, what: str) -> ort.InferenceSession:
    """An inference session for one serialised graph (authenticated bytes, held only in memory)."""
    if not isinstance(graph, bytes):
        graph = bytes(graph)
    if _global_threads is None:
        use_threads(0)  # ONNX Runtime's default size (one thread per physical core)
    try:
        session = ort.InferenceSession(graph, session_options(), providers=PROVIDERS)
    except Exception as e:  # onnxruntime raises its own exception types for malformed graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise IntegrityError(f"{what}: authentic but not a usable ONNX graph ({first[:200]})") from None
    # The Python wrapper keeps the model bytes for a provider fallback that CPU-only sessions never
    # use; dropped, or every loaded stage would stay resident twice.
    session._model_bytes = None
    return session


class StageGraph:
    """One stage's session, called as ``features, log_probs = stage(h)`` (features None for the last)."""

    def __init__(self, session: ort.InferenceSession, what: str = "stage graph"):
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [INPUT] or outputs not in ([FEATURES, LOG_PROBS], [LOG_PROBS]):
            raise IntegrityError(f"{what}: graph has inputs {inputs} and outputs {outputs}, not a branchy-tee stage graph")
        self.session = session
        self.last = outputs == [LOG_PROBS]
        self._outputs = outputs
        self._run = session._sess.run  # the C++ entry point: skips the wrapper's per-call argument checks
        self.input_shape = session.get_inputs()[0].shape[1:]

    def __call__(self, h: np.ndarray):
        out = self._run(self._outputs, {INPUT: h}, None)
        return (None, out[0]) if self.last else (out[0], out[1])
