"""The stage payload the model owner seals and the enclave loads (``tee.graphs.unpack``): a stage
graph with its large weights moved out of the protobuf into one aligned blob after it.

Owner side (onnx). Deterministic: the same graph always packs to the same bytes, so what ``eval`` and
``calibrate`` load (``evaluate.exits.stage_graphs``) is byte for byte what ``seal`` encrypts.
"""

from __future__ import annotations

from branchy_tee.tee.graphs import EXTERNAL_MIN, PAYLOAD_ALIGN, WEIGHT_ALIGN, WEIGHTS


def pack(graph: bytes) -> bytes:
    """A stage payload of one serialised ONNX graph: every initializer stored as ``raw_data`` of
    EXTERNAL_MIN bytes or more moves, in graph order, to the blob at the next WEIGHT_ALIGN offset."""
    import onnx

    model = onnx.load_from_string(graph)
    blob = bytearray()
    for t in model.graph.initializer:
        size = len(t.raw_data) if t.HasField("raw_data") else 0
        if size < EXTERNAL_MIN:
            continue
        at = -(-len(blob) // WEIGHT_ALIGN) * WEIGHT_ALIGN
        blob += bytes(at - len(blob)) + t.raw_data
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", WEIGHTS), ("offset", str(at)), ("length", str(size))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return join(model.SerializeToString(), bytes(blob))


def join(graph: bytes, blob: bytes) -> bytes:
    """``u64 graph length | graph | zero padding to PAYLOAD_ALIGN | blob``."""
    head = len(graph).to_bytes(8, "little") + graph
    return head + bytes(-len(head) % PAYLOAD_ALIGN) + blob
