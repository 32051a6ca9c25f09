"""atheris: encrypted requests and results (seal.envelope). The first byte chooses the mode:

  0-3: the rest is a request or result file as the host hands it over
       (read_envelope_header, open_request, open_result);
  4-7: the rest is a payload sealed with the data owner's real key under a fuzzed header, i.e.
       authentic but arbitrary content (safetensors loading, input checks, result JSON).

Only BranchyError (one line) may escape."""

import sys

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.core.errors import BranchyError
    from branchy_tee.core.keys import key_id
    from branchy_tee.tee.sealed import envelope

KEY = common.read_key("do1.key")
KEYS = {key_id(KEY): KEY}
SHAPE = [1, 28, 28]
DIGEST = "ab" * 32  # the request a fuzzed result claims to answer


def _try(fn, *args):
    try:
        fn(*args)
    except BranchyError as e:
        common.one_line(e)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] & 7, data[1:]
    if mode < 4:
        magic = envelope.REQUEST_MAGIC if mode & 1 else envelope.RESULT_MAGIC
        _try(envelope.read_envelope_header, rest, magic, "f")
        _try(envelope.open_request, rest, KEYS, SHAPE, "req")
        _try(envelope.open_result, rest, KEY, "res", DIGEST)
        return
    fdp = atheris.FuzzedDataProvider(rest)
    samples = fdp.ConsumeIntInRange(-1, 8)
    rid = fdp.ConsumeUnicodeNoSurrogates(8)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    header = {"request_id": rid, "samples": samples if samples >= 0 else "x"}
    model = {"bundle_id": "cd" * 16, "model_version": 1, "model_key_id": "ef" * 8}
    for magic in (envelope.REQUEST_MAGIC, envelope.RESULT_MAGIC):
        if magic == envelope.RESULT_MAGIC:
            header = {"format": envelope.RESULT_FORMAT, **header, "request_sha256": DIGEST, **model}
        blob = envelope.seal_envelope(magic, header, payload, KEY)
        if magic == envelope.REQUEST_MAGIC:
            _try(envelope.open_request, blob, KEYS, SHAPE, "req")
        else:
            _try(envelope.open_result, blob, KEY, "res", DIGEST)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
