"""How much activation memory the runtime needs per sample of a batch (standard library only, so
that ``enclave build`` can size the enclave without importing torch).

The engine (``runtime.engine``) runs one batch through one stage at a time and parks the samples
that go on to stage k in a queue until a full batch of them is waiting. So besides the batch in
flight (the hungriest stage's input and output), up to batch-1 samples wait in front of every later
stage. ``activation_elems`` per stage is recorded at sealing time: one sample's stage input plus
output, which over-counts a waiting sample (only its input is held) and so gives an upper bound.
"""

from __future__ import annotations

FLOAT_BYTES = 4


def activation_bytes_per_sample(header: dict) -> int:
    """Upper bound of the activation bytes per unit of batch size, from a bundle header."""
    elems = [int(s["activation_elems"]) for s in header["stages"]]
    return FLOAT_BYTES * (max(elems) + sum(elems[1:]))
