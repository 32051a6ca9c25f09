"""atheris: the sealed bundle's header.json as the enclave reads it (seal.bundle.read_header_unverified
and open_bundle with the model key). The first byte chooses the mode:

  even: the rest is header.json as stored (forged: no model key);
  odd:  the rest is a header document that is then MAC'd with the model key, i.e. an authentic
        header with arbitrary fields (a sealing bug must still end in a clean refusal).

Only BranchyError (one line) may escape; a forged header must never open."""

import json
import os
import sys
import tempfile

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.core.errors import BranchyError
    from branchy_tee.tee.sealed import bundle

KEY = common.read_key("mo.key")
GENUINE = (common.WORLD / "model.btee" / bundle.HEADER_FILE).read_bytes()
DIR = tempfile.mkdtemp(prefix="fuzz-bundle-", dir=common.SCRATCH)
HEADER = os.path.join(DIR, bundle.HEADER_FILE)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    forged = True
    if mode & 1:
        try:
            doc = json.loads(rest)
            header = doc["header"] if isinstance(doc, dict) and isinstance(doc.get("header"), dict) else doc
            if not isinstance(header, dict):
                return
            rest = bundle.header_file_bytes({"header": header, "mac": bundle.header_mac(KEY, header)})
            forged = False
        except (ValueError, RecursionError, TypeError):
            return
    with open(HEADER, "wb") as f:
        f.write(rest)
    try:
        bundle.read_header_unverified(DIR)
    except BranchyError as e:
        common.one_line(e)
    try:
        bundle.open_bundle(DIR, KEY)
    except BranchyError as e:
        common.one_line(e)
        return
    if forged and rest != GENUINE:
        raise common.Finding("a header.json without the model key's MAC opened")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
