"""How much activation memory the runtime needs per sample of a batch (standard library only, so
that ``enclave build`` can size the enclave without importing torch).

The engine (``tee.engine``) runs one batch through one stage at a time and parks the samples
that go on to stage k in a queue until a full batch of them is waiting. So besides the batch in
flight (the hungriest stage's input and output), fewer than 2 x batch samples (batch-1 waiting, plus
up to a batch just added by the run of stage k-1) wait in front of every later stage k, each holding
stage k's input. ``activation_elems`` per stage is recorded at sealing time: one sample's graph
input plus every output the graph computes (a graph may compute an earlier stage again,
``export.onnx``). Stage k's input is stage k-1's features output, so it is at most the smaller of
the two stages' figures; the bound below uses that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from branchy_tee.tee.sealed.header import BundleHeader

FLOAT_BYTES = 4
# A stage runs on at most this many bytes of activations at once (``run_size``): activations that
# stay in the CPU's caches are faster per sample (BENCHMARKS.md, "Runtime choices"). Small stages
# keep whole batches: a run has a fixed cost.
RUN_BYTES = 4 << 20
MIN_RUN = 8


def activation_bytes_per_sample(header: BundleHeader) -> int:
    """Upper bound of the activation bytes per unit of batch size, from a bundle header."""
    elems = [s.activation_elems for s in header.stages]
    waiting = sum(min(elems[k - 1], elems[k]) for k in range(1, len(elems)))
    return FLOAT_BYTES * (max(elems) + 2 * waiting)


def run_size(activation_elems: int) -> int | None:
    """How many samples a stage with this per-sample activation figure runs at once (None: any)."""
    if activation_elems <= 0:
        return None
    return max(MIN_RUN, RUN_BYTES // (FLOAT_BYTES * activation_elems))
