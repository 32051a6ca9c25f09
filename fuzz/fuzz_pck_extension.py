"""atheris: the hand-written DER reader of the PCK certificate's SGX extension
(attest.pck.parse_pck_extension), fed the extension's bytes directly."""

import sys

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.core.errors import AttestationError
    from branchy_tee.verifier.pck import SGX_EXTENSION_OID, parse_pck_extension


class _Value:
    def __init__(self, raw):
        self.value = raw


class _Extensions:
    def __init__(self, raw):
        self.raw = raw

    def get_extension_for_oid(self, oid):
        assert oid == SGX_EXTENSION_OID
        return _Value(_Value(self.raw))


class FakeCert:
    """Just enough of x509.Certificate for parse_pck_extension."""

    def __init__(self, raw: bytes):
        self.extensions = _Extensions(raw)


def TestOneInput(data: bytes) -> None:
    try:
        ext = parse_pck_extension(FakeCert(data))
    except AttestationError as e:
        common.one_line(e)
        return
    if len(ext.tcb_comp_svns) != 16 or len(ext.cpu_svn) != 16 or len(ext.fmspc) != 6:
        raise common.Finding("accepted an extension with wrong field sizes")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
