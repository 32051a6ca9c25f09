"""Error types shared by every part of branchy-tee.

The command line turns a ``BranchyError`` into one line on stderr and exit code 1
(``UsageError``: exit code 2). Anything else is a bug and keeps its traceback.
Standard library only: the enclave imports this module.
"""


class BranchyError(Exception):
    """An expected failure: bad input, a refused operation, missing files."""

    exit_code = 1


class UsageError(BranchyError):
    """The command was called wrongly (unknown name, conflicting flags)."""

    exit_code = 2


class DatasetError(BranchyError):
    """A dataset file is missing, truncated, corrupted or has the wrong checksum."""


class IntegrityError(BranchyError):
    """Authenticated data did not verify: tampering, a wrong key or a foreign file."""


class AttestationError(BranchyError):
    """Evidence (a quote or a simulated document) did not verify."""


class PolicyError(BranchyError):
    """Evidence verified but the policy refuses it."""


def shown(value: object, limit: int = 80) -> str:
    """A host-controlled value as it may appear in a message or log line: quoted, every character
    outside printable ASCII escaped (no newlines, terminal escapes or lone surrogates get through),
    and cut to ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return ascii(text)


def one_line(text: object, limit: int = 300) -> str:
    """Text from elsewhere (a broker's error, a parser's complaint) as one printable ASCII line."""
    s = " ".join(str(text).split())
    s = "".join(c if c.isprintable() and c.isascii() else "?" for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."
