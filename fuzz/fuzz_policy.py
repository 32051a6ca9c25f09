"""atheris: key-release policy files (attest.policy.load_policy: TOML, then every setting checked).
Only BranchyError may escape."""

import os
import sys
import tempfile

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee", "tomllib"]):
    from branchy_tee.core.errors import BranchyError
    from branchy_tee.verifier.policy import load_policy

DIR = tempfile.mkdtemp(prefix="fuzz-policy-", dir=common.SCRATCH)
PATH = os.path.join(DIR, "policy.toml")


def TestOneInput(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        load_policy(PATH)
    except BranchyError as e:
        common.one_line(e)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
