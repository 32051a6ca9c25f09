"""How much activation memory the runtime needs per sample of a batch (standard library only, so
that ``enclave build`` can size the enclave without importing torch).

The engine (``runtime.engine``) runs one batch through one stage at a time and parks the samples
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
    from ..seal.header import BundleHeader

FLOAT_BYTES = 4
# A stage runs on at most this many bytes of activations at once (``run_size``). Measured on the
# benchmark model at batch 128 on this project's 2-core Xeon VM: runs of 2-4 MiB gave 6-7 % more
# samples/s than whole batches (stages 0 and 1 cost 17 and 55 microseconds a sample in runs of 8, 21
# and 75 in runs of 128); 8 MiB gave nothing. Small stages keep whole batches: a run has a fixed cost.
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
