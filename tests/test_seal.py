import io
import json
import os

import numpy as np
import pytest
import torch

from branchy_tee.client.envelopes import open_result, seal_request
from branchy_tee.core.errors import BranchyError, IntegrityError, UsageError
from branchy_tee.core.fileio import read_key_file, write_key_file
from branchy_tee.core.keys import derive, generate_key, key_id
from branchy_tee.seal.bundle import seal_chunks, seal_model
from branchy_tee.tee.sealed import aead
from branchy_tee.tee.sealed.bundle import open_bundle
from branchy_tee.tee.sealed.envelope import open_request, request_digest, seal_result
from branchy_tee.tee.sealed.header import ModelRef
from runs import make_random_run

KEY = bytes(range(32))


def _stream(data, chunk=16, ctx=b"ctx"):
    return b"".join(seal_chunks(KEY, data, ctx, chunk))


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 64, 100])
def test_stream_round_trip(size):
    data = os.urandom(size)
    sealed = _stream(data)
    assert len(sealed) == aead.sealed_size(size, 16)
    assert bytes(aead.open_chunks(KEY, io.BytesIO(sealed), b"ctx", size, 16, "s")) == data


def test_stream_detects_every_kind_of_change():
    data = os.urandom(100)
    sealed = _stream(data)
    step = 16 + aead.TAG
    cases = {
        "flipped": sealed[:40] + bytes([sealed[40] ^ 1]) + sealed[41:],
        "truncated at a chunk boundary": sealed[: 3 * step],
        "truncated inside a chunk": sealed[:-5],
        "extended": sealed + b"\0",
        "chunks swapped": sealed[step : 2 * step] + sealed[:step] + sealed[2 * step :],
        "other context": _stream(data, ctx=b"other"),
    }
    for name, bad in cases.items():
        with pytest.raises(IntegrityError):
            aead.open_chunks(KEY, io.BytesIO(bad), b"ctx", 100, 16, name)
    # A stream cut after chunk 2 and declared shorter fails: chunk 2 was not sealed as the last one.
    with pytest.raises(IntegrityError, match="chunk 2"):
        aead.open_chunks(KEY, io.BytesIO(sealed[: 3 * step]), b"ctx", 48, 16, "cut")


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("bad", ["first", "middle", "last", "truncated", "extended"])
def test_a_failed_stream_leaves_no_unverified_plaintext_and_names_the_first_bad_chunk(monkeypatch, workers, bad):
    # AES-GCM decrypt_into writes a chunk's plaintext before it checks the tag; the output buffer
    # must be wiped before the error escapes, with one thread or several.
    monkeypatch.setattr(aead, "_decrypt_workers", lambda: workers)
    data = b"A" * (16 * 12)
    sealed = bytearray(_stream(data))
    step = 16 + aead.TAG
    flip = {"first": 0, "middle": 5, "last": 11}
    if bad in flip:
        sealed[flip[bad] * step + 3] ^= 1
        sealed[9 * step + 3] ^= 1  # a later bad chunk too: the first one is named
    elif bad == "truncated":
        sealed = sealed[:-3]
    else:
        sealed += b"x"
    into = bytearray(len(data))
    with pytest.raises(IntegrityError) as e:
        aead.open_chunks(KEY, io.BytesIO(bytes(sealed)), b"ctx", len(data), 16, "s", into=into)
    assert into == bytes(len(data))
    if bad in flip:
        assert f"chunk {min(flip[bad], 9)} failed" in str(e.value)
    else:
        assert ("truncated" if bad == "truncated" else "after the last chunk") in str(e.value)
    # the same stream, intact, decrypts whole with any number of workers
    assert bytes(aead.open_chunks(KEY, io.BytesIO(_stream(data)), b"ctx", len(data), 16, "s")) == data


def test_keys_are_separated_and_ids_public():
    k = generate_key()
    assert len(k) == 32 and k != generate_key()
    assert derive(k, "a") != derive(k, "b") and derive(k, "a", b"1") != derive(k, "a", b"2")
    assert len(key_id(k)) == 16 and key_id(k) != key_id(generate_key())
    assert key_id(k) not in k.hex()


def test_key_files_are_private(tmp_path):
    p = tmp_path / "k.key"
    write_key_file(p, KEY)
    assert (p.stat().st_mode & 0o777) == 0o600
    assert read_key_file(p) == KEY
    with pytest.raises(BranchyError, match="already exists"):
        write_key_file(p, KEY)
    os.chmod(p, 0o644)
    with pytest.raises(BranchyError, match="accessible by others.*chmod 600"):
        read_key_file(p)
    os.chmod(p, 0o600)
    p.write_bytes(b"short")
    with pytest.raises(BranchyError, match="5 bytes"):
        read_key_file(p)


def test_bundle_round_trip_and_header_binding(tmp_path):
    from branchy_tee.seal.bundle import seal_run

    make_random_run(tmp_path / "run", "lenet5")
    header = seal_run(tmp_path / "run", KEY, tmp_path / "m.btee", version=3, chunk_size=4096)
    assert header.model_version == 3 and header.key_id == key_id(KEY)
    b = open_bundle(tmp_path / "m.btee", KEY, min_version=3)
    # What is sealed is the run's exported stage graphs, byte for byte, each packed with its weights
    # in a blob after it (the payload eval and calibrate load too), and nothing else.
    import onnx

    from branchy_tee.export.payload import pack
    from branchy_tee.tee.graphs import unpack

    export = json.loads((tmp_path / "run" / "onnx" / "export.json").read_text())
    for k in range(b.num_stages):
        graph = (tmp_path / "run" / "onnx" / f"stage-{k:02d}.onnx").read_bytes()
        payload = bytes(b.decrypt_stage(k))
        assert payload == pack(graph) and header.stages[k].plaintext_size == len(payload)
        assert header.stages[k].weight_bytes == export["stages"][k]["weight_bytes"] > 0
        small, blob = unpack(payload, "stage")
        inits = {t.name: t for t in onnx.load_from_string(graph).graph.initializer}
        moved = [t for t in onnx.load_from_string(small).graph.initializer if t.external_data]
        assert moved and len(small) < len(graph)
        for t in moved:  # each weight moved to the blob is the exported one, at a 64-byte boundary
            at, n = (int(next(e.value for e in t.external_data if e.key == key)) for key in ("offset", "length"))
            assert at % 64 == 0 and bytes(blob[at : at + n]) == inits[t.name].raw_data
    with pytest.raises(IntegrityError, match="older than the minimum 4"):
        open_bundle(tmp_path / "m.btee", KEY, min_version=4)
    with pytest.raises(IntegrityError, match="model key id"):
        open_bundle(tmp_path / "m.btee", generate_key())
    with pytest.raises(BranchyError, match="already exists"):
        seal_run(tmp_path / "run", KEY, tmp_path / "m.btee")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.btee", "run"]  # no temporary left behind


def test_requests_and_results_are_bound_to_key_and_request():
    do1, do2 = generate_key(), generate_key()
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28), dtype=np.float32)
    blob = seal_request(x, do1, "req-1")
    header, got = open_request(blob, {key_id(do1): do1}, [1, 28, 28], "r")
    assert header.request_id == "req-1" and isinstance(got, np.ndarray) and np.array_equal(got, x)
    assert np.array_equal(
        open_request(seal_request(torch.from_numpy(x), do1), {key_id(do1): do1}, [1, 28, 28], "r")[1], x
    )
    with pytest.raises(IntegrityError, match="no key for"):
        open_request(blob, {key_id(do2): do2}, [1, 28, 28], "r")
    # Relabelling the request for another key id does not help: the header is authenticated.
    forged = blob.replace(key_id(do1).encode(), key_id(do2).encode())
    with pytest.raises(IntegrityError, match="failed authentication"):
        open_request(forged, {key_id(do2): do2}, [1, 28, 28], "r")
    records = [{"index": 0, "label": 1, "class_name": "c1", "confidence": 0.5, "exit": 0}]
    model = ModelRef("ab" * 16, 3, "cd" * 8)
    res = seal_result(records, header, request_digest(blob), model, do1)
    got_header, got = open_result(res, do1, "res", request_digest(blob))
    assert got == records and got_header.model == model
    # A new request that reuses the request id: the old result is a replay, refused.
    again = seal_request(x, do1, "req-1")
    with pytest.raises(IntegrityError, match="answers another request .* a replayed or misdirected result"):
        open_result(res, do1, "res", request_digest(again))
    with pytest.raises(IntegrityError):
        open_result(res, do2, "res", request_digest(blob))
    # A request can never be opened as a result (different key derivation and magic).
    with pytest.raises(IntegrityError):
        open_result(blob, do1, "res", request_digest(blob))
    # Nor is any result opened without the digest of its request.
    with pytest.raises(UsageError, match="only with the digest of the request"):
        open_result(res, do1, "res", None)


@pytest.mark.parametrize("bad", ["", "x" * 129, "a\nb", "\udcff", "tab\there"])
def test_request_ids_must_be_printable_unicode(bad):
    with pytest.raises(UsageError, match="request id"):
        seal_request(torch.randn(1, 1, 28, 28), generate_key(), bad)


def test_host_strings_in_request_headers_are_checked_and_escaped():
    """A request header is host-controlled until it authenticates: a request id that is not valid
    Unicode (a lone surrogate, escaped in JSON) or a key id with terminal escapes is a one-line error
    that shows the value escaped, before anything is derived from it."""
    import json
    import struct

    from branchy_tee.tee.sealed.envelope import REQUEST_MAGIC, read_envelope_header

    for header, match in (
        ({"request_id": "\ud800", "key_id": "ab" * 8}, "is not valid Unicode text"),
        ({"request_id": "r\n1", "key_id": "ab" * 8}, "must be printable text"),
        ({"request_id": "r1", "key_id": "\x1b[31mred"}, "is not a key id"),
    ):
        h = json.dumps(header).encode()  # ensure_ascii: the surrogate travels as \ud800
        blob = REQUEST_MAGIC + struct.pack(">I", len(h)) + h + bytes(40)
        with pytest.raises(IntegrityError, match=match) as e:
            read_envelope_header(blob, REQUEST_MAGIC, "req")
        assert str(e.value).isascii() and "\n" not in str(e.value) and "\x1b" not in str(e.value)


@pytest.fixture
def bundle(tmp_path):
    model, meta = make_random_run(tmp_path / "run", "lenet5")
    key = generate_key()
    seal_model(model, meta, key, tmp_path / "m.btee")
    return tmp_path / "m.btee", key


def test_header_json_that_is_not_a_small_regular_file_is_never_read(bundle, tmp_path):
    from branchy_tee.tee.sealed.bundle import MAX_HEADER_BYTES, read_header_unverified

    path, key = bundle
    header = path / "header.json"
    good = header.read_bytes()
    header.unlink()
    header.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(IntegrityError, match="not a regular file"):
        read_header_unverified(path)
    with pytest.raises(IntegrityError, match="not a regular file"):
        open_bundle(path, key)
    header.unlink()
    os.mkfifo(header)  # opening must not wait for a writer
    with pytest.raises(IntegrityError, match="not a regular file"):
        read_header_unverified(path)
    header.unlink()
    with open(header, "wb") as f:  # sparse: checked by size before a byte is read
        f.truncate(MAX_HEADER_BYTES + 1)
    with pytest.raises(IntegrityError, match="over the .*-byte limit"):
        read_header_unverified(path)
    header.unlink()
    header.write_bytes(good)
    assert open_bundle(path, key).header.arch == "lenet5"


def test_header_json_must_have_exactly_the_sealed_members_in_order(bundle):
    import json

    from branchy_tee.tee.sealed.bundle import read_header_unverified

    path, key = bundle
    header = path / "header.json"
    doc = json.loads(header.read_text())
    variants = [
        {"mac": doc["mac"], "header": doc["header"]},  # members reordered
        {**doc, "extra": 1},
        {"header": {**doc["header"], "note": "x"}, "mac": doc["mac"]},
        {"header": dict(reversed(list(doc["header"].items()))), "mac": doc["mac"]},
        {"header": {k: v for k, v in doc["header"].items() if k != "thresholds"}, "mac": doc["mac"]},
        {
            "header": {
                **doc["header"],
                "stages": [{**doc["header"]["stages"][0], "x": 1}, *doc["header"]["stages"][1:]],
            },
            "mac": doc["mac"],
        },
    ]
    for v in variants:
        header.write_text(json.dumps(v, indent=1) + "\n")
        with pytest.raises(IntegrityError, match="members"):
            read_header_unverified(path)
        with pytest.raises(IntegrityError):
            open_bundle(path, key)
