"""Named values that are their own strings, and the evidence providers the enclave knows."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A named value that is its own string: JSON, environment variables and messages carry the
    value (``"gramine"``), and it compares equal to that string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The values, for argparse's ``core.choices`` and messages."""
        return tuple(m.value for m in cls)


class EvidenceProvider(Choice):
    """How the enclave proves what it is (``--attest``; ``tee.attest.providers``)."""

    GRAMINE = "gramine"  # DCAP quotes from Gramine's /dev/attestation
    SIMULATED = "simulated"  # development only: a document signed by a local dev key
