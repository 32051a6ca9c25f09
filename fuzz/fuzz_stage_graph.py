"""atheris: building a stage's ONNX Runtime session from its decrypted payload (runtime.graphs: the
graph, then its weight blob), what the enclave does with every stage it loads. The bytes are
authenticated before this runs, so only a buggy or malicious model owner could send malformed ones;
still, only a one-line IntegrityError may escape, never another exception or a crash.

The input is the graph; the payload is built around it with the world's genuine weight blob, so
that mutations reach ONNX Runtime's parser and its external-data checks rather than stopping at the
payload's length field (``test_parser_fuzz`` covers that field and the blob's bounds)."""

import sys

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.core.errors import IntegrityError
    from branchy_tee.export.payload import join
    from branchy_tee.tee.graphs import StageGraph, load_session, unpack, use_threads
    from branchy_tee.tee.sealed.bundle import open_bundle

use_threads(1)
_, BLOB = unpack(open_bundle(common.WORLD / "model.btee", common.read_key("mo.key")).decrypt_stage(0), "stage")
BLOB = bytes(BLOB)


def TestOneInput(data: bytes) -> None:
    try:
        StageGraph(load_session(join(data, BLOB), "stage"), "stage")
    except IntegrityError as e:
        common.one_line(e)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
