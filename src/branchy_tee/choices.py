"""Names the command line offers as choices, and the named values that several modules share.
Kept free of heavy imports so that building the parser (``--help``, ``key-broker``) does not load
torch or numpy; standard library only (the enclave imports it)."""

from __future__ import annotations

from enum import Enum

from .runtime.criteria import NAMES as CRITERIA  # noqa: F401 (the exit criteria, defined there)

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
OPTIMIZERS = ("sgd", "adam", "adamw")
DISTILL = ("final", "teacher", "none")


class Choice(str, Enum):
    """A named value that is its own string: JSON, environment variables and messages carry the
    value (``"gramine"``), and it compares equal to that string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The values, for argparse's ``choices`` and messages."""
        return tuple(m.value for m in cls)


class EvidenceProvider(Choice):
    """How the enclave proves what it is (``--attest``; ``attest.providers``)."""

    GRAMINE = "gramine"  # DCAP quotes from Gramine's /dev/attestation
    SIMULATED = "simulated"  # development only: a document signed by a local dev key


class LaunchBackend(Choice):
    """How ``enclave run`` starts the enclave's runtime (``enclave.launch``)."""

    SGX = "sgx"  # gramine-sgx: a real enclave
    DIRECT = "direct"  # gramine-direct: Gramine without SGX
    NATIVE = "native"  # the enclave environment's Python, no Gramine
