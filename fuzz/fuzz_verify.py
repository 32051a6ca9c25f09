"""atheris: full DCAP quote verification (PEM chain, DER, PCK extension, signatures) on mutated quotes.
Only AttestationError may escape, and never as the fail-closed wrapper of an unexpected exception."""

import sys
from datetime import datetime, timezone

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.core.errors import AttestationError
    from branchy_tee.verifier.dcap import verify_quote

NOW = datetime(2025, 6, 20, tzinfo=timezone.utc)


def TestOneInput(data: bytes) -> None:
    try:
        verify_quote(data, now=NOW)
    except AttestationError as e:
        common.one_line(e)
        if e.__cause__ is not None:
            raise common.Finding(f"unexpected {type(e.__cause__).__name__} inside verification: {e}") from e.__cause__


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
