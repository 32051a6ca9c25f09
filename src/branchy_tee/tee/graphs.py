"""The stage graphs the enclave runs, on ONNX Runtime.

Stage k of a model is one ONNX graph (exported by ``branchy_tee.export.onnx``) that computes the
stage and its exit head:

    input (N, *stage input)  ->  features (N, *stage output), log_probs (N, classes)

The last stage's graph has only ``log_probs``. The runtime builds one ONNX Runtime session per stage
from the stage's payload in memory (decrypted in the enclave, never written to a file): the graph,
then its weights in one aligned blob that the session uses in place (``unpack``).

Session options (``session_options``; the figures behind them are in BENCHMARKS.md): all graph
optimisations (the blocked NCHWc convolution layouts come only with ORT_ENABLE_ALL), intra-op
threads from the caller, no thread spinning, one memory arena shared by every stage's session, no
memory pattern.

Standard library, numpy and onnxruntime only (enclave side).
"""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort

from branchy_tee.core.errors import IntegrityError

INPUT, FEATURES, LOG_PROBS = "input", "features", "log_probs"
PROVIDERS = ["CPUExecutionProvider"]
# The stage payload (``unpack``): the blob starts at a page boundary of the decrypted buffer, each
# weight in it at a multiple of WEIGHT_ALIGN, and the graph names the blob WEIGHTS.
PAYLOAD_ALIGN, WEIGHT_ALIGN, EXTERNAL_MIN, WEIGHTS = 4096, 64, 1024, "weights"
_EMPTY = memoryview(bytearray(1))  # what ONNX Runtime is given for an empty blob (it wants a buffer)
Buffer = bytes | bytearray | memoryview | mmap.mmap

_threads = 1  # predict's default too: see use_threads
_arena_registered = False


def use_threads(threads: int) -> None:
    """Intra-op threads of every stage session created from now on (0: one per physical core), and,
    once per process, the memory arena they all share: with an arena per session each would keep
    the high-water mark of its own stage's activations; shared, they reuse the same memory."""
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
    # second run of a batch size beside the arena memory the first run already holds.
    so.enable_mem_pattern = False
    so.log_severity_level = 3  # errors only: warnings would interleave with the command's own output
    return so


def unpack(payload: Buffer, what: str) -> tuple[bytes, memoryview]:
    """(graph bytes, weight blob) of a stage payload; one-line IntegrityError for a malformed one.

    A stage payload is ``u64 little-endian graph length | graph | zero padding to PAYLOAD_ALIGN |
    weight blob``: the graph's initializers of ``EXTERNAL_MIN`` bytes or more live in the blob, as
    ONNX external data of the file named ``WEIGHTS`` at 64-byte-aligned offsets
    (``export.payload.pack`` writes it). ONNX Runtime parses only the small graph and takes the
    weights from the blob where they lie, instead of copying a whole graph of weights into a string
    and parsing it."""
    view = memoryview(payload).cast("B")
    if len(view) < 8:
        raise IntegrityError(f"{what}: stage payload of {len(view)} bytes has no graph length")
    n = int.from_bytes(view[:8], "little")
    blob_at = -(-(8 + n) // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
    if n == 0 or blob_at > len(view):
        raise IntegrityError(f"{what}: stage payload's graph length {n} does not fit its {len(view)} bytes")
    return bytes(view[8 : 8 + n]), view[blob_at:]


def load_session(payload: Buffer, what: str) -> ort.InferenceSession:
    """An inference session for one stage payload (authenticated bytes, held only in memory; see
    ``unpack``). The session uses the weights in ``payload`` where they are, so it keeps
    ``payload`` alive itself: dropping the session is what frees them."""
    graph, blob = unpack(payload, what)
    if not _arena_registered:
        use_threads(_threads)
    so = session_options()
    # Always registered, even empty: with no in-memory table ONNX Runtime would look for the
    # external file on disk, which the host controls. With the table it refuses any other name and
    # any offset or length outside the blob.
    so.add_external_initializers_from_files_in_memory([WEIGHTS], [blob if len(blob) else _EMPTY], [len(blob)])
    so.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
    try:
        session = ort.InferenceSession(graph, so, providers=PROVIDERS)
    except Exception as e:  # onnxruntime raises its own exception types for malformed graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise IntegrityError(f"{what}: authentic but not a usable ONNX graph ({first[:200]})") from None
    # The wrapper keeps the graph's bytes for a provider fallback that CPU-only sessions never use.
    session._model_bytes = None
    session._branchy_tee_weights = payload  # ONNX Runtime holds pointers into it, not a reference
    return session


class StageGraph:
    """One stage's session, called as ``features, log_probs = stage(h)`` (features None for the last)."""

    def __init__(self, session: ort.InferenceSession, what: str = "stage graph", run_size: int | None = None):
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
        self.run_size = run_size  # the most samples the engine runs through it at once (tee.budget)
        # The C-level run: the public one checks the feed's names and ownership on every call (2-3
        # microseconds a stage at batch 1); this feed is always {INPUT: one float32 array}.
        self._run = session._sess.run
        self.last = outputs == [LOG_PROBS]
        self._outputs = outputs
        self.input_shape: list[int] = shape[1:]
        # The decrypted weights the session uses in place: set last, so that when a stage is dropped
        # they are released after the C-level session (``_run`` holds it too), never before.
        self._weights = getattr(session, "_branchy_tee_weights", None)

    def __call__(self, h: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        out = self._run(self._outputs, {INPUT: h}, None)
        return (None, out[0]) if self.last else (out[0], out[1])
