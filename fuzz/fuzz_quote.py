"""atheris: DCAP quote parser (attest.quote.parse_quote). Only AttestationError (one line) may escape;
a successful parse must be self-consistent."""

import sys

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.core.errors import AttestationError
    from branchy_tee.tee.attest.quote import parse_quote


def TestOneInput(data: bytes) -> None:
    try:
        q = parse_quote(data)
    except AttestationError as e:
        common.one_line(e)
        return
    if not all(0 <= s <= e <= len(data) for _, s, e in q.spans):
        raise common.Finding(f"span outside the quote: {q.spans}")
    if q.signed_data != data[: q.span("body")[1]] or q.trailing_len < 0:
        raise common.Finding("signed data is not the header and body")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
