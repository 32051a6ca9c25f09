"""atheris: the in-place safetensors reader (seal.bundle.tensors_from_safetensors), which views a
decrypted stage's buffer as tensors. Only ValueError may escape (documented); what it returns must
lie inside the buffer and match the declared shapes."""

import sys

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.seal.bundle import tensors_from_safetensors


def TestOneInput(data: bytes) -> None:
    buf = bytearray(data)
    try:
        out = tensors_from_safetensors(buf)
    except ValueError as e:
        common.one_line(e)
        return
    for name, t in out.items():
        if t.numel() * t.element_size() > len(buf):
            raise common.Finding(f"tensor {name} is larger than the buffer")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
