"""atheris: building a stage's ONNX Runtime session from its decrypted payload (runtime.graphs: the
graph, then its weight blob), what the enclave does with every stage it loads. The bytes are
authenticated before this runs, so only a buggy or malicious model owner could send malformed ones;
still, only a one-line IntegrityError may escape, never another exception or a crash."""

import sys

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.errors import IntegrityError
    from branchy_tee.runtime.graphs import StageGraph, load_session, use_threads

use_threads(1)


def TestOneInput(data: bytes) -> None:
    try:
        StageGraph(load_session(data, "stage"), "stage")
    except IntegrityError as e:
        common.one_line(e)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
