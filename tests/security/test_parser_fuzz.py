"""Property-based fuzzing of every parser that reads host-controlled bytes: only declared errors
(``branchy_tee.core.errors.*``; ``ValueError`` where a function documents it) may escape.

tests/test_quote.py already fuzzes ``parse_quote`` with arbitrary bytes, a valid header followed by
random bytes and byte edits of two real quotes; here: length fields set to arbitrary values, the
third real quote, and the invariants of a successful parse. The coverage-guided counterparts are
in fuzz/ (``make fuzz``)."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from branchy_tee.broker.broker import Broker, Refusal
from branchy_tee.client.envelopes import open_result
from branchy_tee.core.errors import AttestationError, BranchyError, IntegrityError
from branchy_tee.core.keys import generate_key, key_id
from branchy_tee.tee.attest.quote import parse_quote
from branchy_tee.tee.sealed import bundle as bundle_mod
from branchy_tee.tee.sealed.bundle import HEADER_FILE, open_bundle, read_header_unverified
from branchy_tee.tee.sealed.envelope import (
    REQUEST_MAGIC,
    RESULT_FORMAT,
    RESULT_MAGIC,
    open_request,
    read_envelope_header,
    seal_envelope,
)
from branchy_tee.verifier.dcap import verify_quote
from branchy_tee.verifier.evidence import verify_simulated
from branchy_tee.verifier.policy import SETTINGS, load_policy, parse_policy
from runs import mutate_bytes
from world import SGX_QUOTES

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=16
)


def _quote(name: str) -> bytes:
    path = SGX_QUOTES / f"{name}.quote.bin"
    if not path.is_file():
        pytest.skip(f"real SGX quotes not found in {SGX_QUOTES}")
    return path.read_bytes()


# --------------------------------------------------------------------------- quotes
def _length_fields(raw: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every length/type field of a parsed quote."""
    q = parse_quote(raw)
    body_end = q.span("body")[1]
    fields = [(0, 2), (2, 2), (4, 4), (body_end, 4)]  # version, key type, tee type, signature data length
    for name in ("qe_auth_data", "certification_data"):
        start = q.span(name)[0]
        fields += [(start - 2, 2)] if name == "qe_auth_data" else [(start - 6, 2), (start - 4, 4)]
    if q.version == 4:
        ak_end = q.span("attestation_key")[1]
        fields += [(ak_end, 2), (ak_end + 2, 4)]  # outer certification data type and size
    return fields


@FUZZ
@given(st.sampled_from(["phala-1", "phala-2", "mobilecoin-1"]), st.data())
def test_quote_length_fields_set_to_anything(name, data):
    raw = bytearray(_quote(name))
    for _ in range(data.draw(st.integers(1, 3))):
        off, width = data.draw(st.sampled_from(_length_fields(bytes(raw))))
        value = data.draw(
            st.integers(0, 2 ** (8 * width) - 1)
            | st.sampled_from([0, 1, 2 ** (8 * width) - 1, len(raw), len(raw) - off])
        )
        raw[off : off + width] = value.to_bytes(width, "little")
        try:
            q = parse_quote(bytes(raw))
        except AttestationError as e:
            assert "\n" not in str(e)
            break
        # a successful parse is self-consistent: spans inside the quote, signed bytes a prefix
        assert all(0 <= s <= e <= len(raw) for _, s, e in q.spans)
        assert q.signed_data == bytes(raw[: q.span("body")[1]])
        assert all(p in bytes(raw) for p in q.pck_chain_pem)
    try:
        verify_quote(bytes(raw))
    except AttestationError as e:
        assert e.__cause__ is None, repr(e.__cause__)  # no unexpected exception behind the refusal


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3))
def test_mobilecoin_quote_byte_flips(flips):
    raw = bytearray(_quote("mobilecoin-1"))
    for pos, x in flips:
        raw[pos % len(raw)] ^= x
    try:
        verify_quote(bytes(raw))
    except AttestationError as e:
        assert e.__cause__ is None, repr(e.__cause__)


# --------------------------------------------------------------------------- bundle header
@pytest.fixture(scope="module")
def sealed_header(world):
    return json.loads((world.bundle / HEADER_FILE).read_text())


def _write_bundle(tmp_path, raw: bytes):
    d = tmp_path / "b.btee"
    d.mkdir(exist_ok=True)
    (d / HEADER_FILE).write_bytes(raw)
    return d


def _open_both(d, key):
    for fn in (lambda: read_header_unverified(d), lambda: open_bundle(d, key)):
        try:
            fn()
        except BranchyError as e:
            assert "\n" not in str(e)


@FUZZ
@given(st.binary(max_size=3000))
def test_bundle_header_arbitrary_bytes(tmp_path, data):
    _open_both(_write_bundle(tmp_path, data), generate_key())


@FUZZ
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6), json_values)
def test_bundle_header_forged_documents(tmp_path, world, sealed_header, overrides, mac):
    """Forged headers (no model key): every field may be anything; the MAC any JSON value."""
    doc = {
        "header": {**sealed_header["header"], **overrides},
        "mac": mac if isinstance(mac, str) else sealed_header["mac"],
    }
    assume(doc != sealed_header)
    d = _write_bundle(tmp_path, json.dumps(doc, indent=1).encode() + b"\n")
    with pytest.raises(IntegrityError):
        open_bundle(d, world.key("mo"))


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["stages", "chunk_size", "model_version", "bundle_id", "key_id", "format", "x"]),
        json_values,
        min_size=1,
        max_size=3,
    )
)
def test_bundle_header_authentic_but_unusable(tmp_path, world, sealed_header, overrides):
    """Headers with a valid MAC (a model owner's sealing bug) but odd fields: refused cleanly, never a crash."""
    key = world.key("mo")
    header = {**sealed_header["header"], **overrides}
    try:
        mac = bundle_mod.header_mac(key, header)
    except ValueError:  # NaN: cannot even be authenticated
        return
    d = _write_bundle(tmp_path, bundle_mod.header_file_bytes({"header": header, "mac": mac}))
    try:
        b = open_bundle(d, key)
    except BranchyError as e:
        assert "\n" not in str(e)
        return
    assert b.header.to_json() == header  # the typed header says exactly what was authenticated


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["xor", "delete", "insert"]), st.integers(0, 10**5), st.binary(min_size=1, max_size=4)
        ),
        min_size=1,
        max_size=3,
    )
)
def test_bundle_header_byte_edits_never_verify(tmp_path, world, edits):
    orig = (world.bundle / HEADER_FILE).read_bytes()
    raw = mutate_bytes(orig, edits)
    assume(raw != orig)
    d = _write_bundle(tmp_path, raw)
    with pytest.raises(IntegrityError):
        open_bundle(d, world.key("mo"))


def test_bundle_header_regressions(tmp_path, world, sealed_header):
    """Inputs that used to escape as RecursionError, ValueError or TypeError (found by this suite)."""
    key = world.key("mo")
    raw = (world.bundle / HEADER_FILE).read_bytes()
    cases = {
        "nesting": b"[" * 200_000,
        "huge integer": b'{"header": {"format": "x", "n": ' + b"1" * 5000 + b'}, "mac": "0"}',
        "non-ASCII MAC": raw.replace(sealed_header["mac"].encode(), b"\\u00e9" + sealed_header["mac"][1:].encode()),
        "whitespace only change": raw.replace(b'\n "mac"', b'\n\t"mac"'),
        "equivalent escape": raw.replace(b'"c1"', b'"\\u0063\\u0031"'),
        "appended newline": raw + b"\n",
    }
    for name, data in cases.items():
        d = _write_bundle(tmp_path, data)
        with pytest.raises(IntegrityError) as e:
            open_bundle(d, key)
        assert "\n" not in str(e.value), name


# --------------------------------------------------------------------------- requests and results
@FUZZ
@given(st.binary(max_size=400), st.sampled_from([REQUEST_MAGIC, RESULT_MAGIC]))
def test_envelope_arbitrary_bytes(data, magic):
    for blob in (data, magic + data):
        try:
            read_envelope_header(blob, magic, "f")
        except IntegrityError as e:
            assert "\n" not in str(e)


@FUZZ
@given(json_values, st.binary(max_size=64), st.integers(0, 2**32 - 1) | st.none())
def test_envelope_crafted_headers(world, header, tail, length):
    hbytes = json.dumps(header).encode()
    n = len(hbytes) if length is None else length
    for magic in (REQUEST_MAGIC, RESULT_MAGIC):
        blob = magic + struct.pack(">I", n) + hbytes + tail
        try:
            open_request(blob, {key_id(world.key("do1")): world.key("do1")}, [1, 28, 28], "req")
        except BranchyError as e:
            assert "\n" not in str(e)
        try:
            open_result(blob, world.key("do1"), "res", DIGEST)
        except BranchyError as e:
            assert "\n" not in str(e)


DIGEST = "ab" * 32  # the request a crafted result claims to answer


def result_header(rid, samples) -> dict:
    """A result header with every member a result has (so that parsing reaches the payload)."""
    return {
        "format": RESULT_FORMAT,
        "request_id": rid,
        "request_sha256": DIGEST,
        "bundle_id": "cd" * 16,
        "model_version": 1,
        "model_key_id": "ef" * 8,
        "samples": samples,
    }


tensor_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])


@FUZZ
@given(
    st.binary(max_size=200)
    | st.builds(
        lambda t: st_save({"inputs": t}),
        st.builds(lambda s, d: torch.zeros(s, dtype=d), st.lists(st.integers(0, 4), max_size=5), tensor_dtypes),
    ),
    json_values,
    st.text(max_size=8),
)
def test_authentic_requests_and_results_with_odd_payloads(world, payload, samples, rid):
    """Payloads sealed under the right key (a data owner's bug, or a hostile data owner): only BranchyError."""
    key = world.key("do1")
    try:
        req = seal_envelope(REQUEST_MAGIC, {"request_id": rid, "samples": samples}, payload, key)
    except ValueError:  # NaN in the header: our sealer refuses to write it
        return
    try:
        open_request(req, {key_id(key): key}, [1, 28, 28], "req")
    except BranchyError as e:
        assert "\n" not in str(e)
    res = seal_envelope(RESULT_MAGIC, result_header(rid, samples), payload, key)
    try:
        open_result(res, key, "res", DIGEST)
    except BranchyError as e:
        assert "\n" not in str(e)


def test_result_payload_regressions(world):
    key = world.key("do1")
    for payload in (b"[" * 100_000, b"1" * 5000):  # RecursionError, ValueError (integer digit limit) before the fix
        res = seal_envelope(RESULT_MAGIC, result_header("r", 1), payload, key)
        with pytest.raises(IntegrityError, match="malformed result payload"):
            open_result(res, key, "res", DIGEST)
    for header in (b"[" * 60_000, b"1" * 5000):
        blob = REQUEST_MAGIC + struct.pack(">I", len(header)) + header + bytes(40)
        with pytest.raises(IntegrityError, match="header is not valid JSON"):
            read_envelope_header(blob, REQUEST_MAGIC, "req")


# ----------------------------------------------------------------------- stage graphs (authentic bytes to ONNX Runtime)
@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["xor", "delete", "insert", "set"]),
            st.integers(0, 1 << 16),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_stage_graph_edits_give_one_line_errors(world, edits):
    """Only a buggy or malicious model owner can make authentic stage bytes malformed; even then the
    enclave refuses them with one line (or runs a graph that still has a stage graph's interface)."""
    from branchy_tee.tee.graphs import StageGraph, load_session

    graph = bytes(open_bundle(world.bundle, world.key("mo")).decrypt_stage(0))
    try:
        StageGraph(load_session(mutate_bytes(graph, edits), "stage-00.bin"), "stage-00.bin")
    except IntegrityError as e:
        assert "\n" not in str(e) and str(e).startswith("stage-00.bin: ")


def test_stage_graph_regressions(world):
    """Inputs the atheris harness found: a symbolic dimension that is not UTF-8 (ONNX Runtime raised
    UnicodeDecodeError only when asked for the input's shape), and a non-batch dimension left symbolic."""
    from branchy_tee.tee.graphs import StageGraph, load_session

    graph = bytes(open_bundle(world.bundle, world.key("mo")).decrypt_stage(0))
    not_utf8 = _with_input_dim(graph, 0, "zzzzz").replace(b"zzzzz", b"\x9czzzz")
    for bad, match in ((not_utf8, "not UTF-8"), (_with_input_dim(graph, 2, "height"), "input shape")):
        with pytest.raises(IntegrityError, match=match):
            StageGraph(load_session(bad, "stage-00.bin"), "stage-00.bin")


def _with_input_dim(payload: bytes, dim: int, name: str) -> bytes:
    def edit(m):
        m.graph.input[0].type.tensor_type.shape.dim[dim].dim_param = name

    return _edited(payload, edit)


def _edited(payload: bytes, edit) -> bytes:
    """The stage payload with its graph edited (its weight blob as it was)."""
    import onnx

    from branchy_tee.export.payload import join
    from branchy_tee.tee.graphs import unpack

    graph, blob = unpack(payload, "stage")
    m = onnx.load_from_string(graph)
    edit(m)
    return join(m.SerializeToString(), bytes(blob))


def _external(m, key: str, value: str) -> None:
    """Set ``key`` of the first initializer kept in the weight blob."""
    t = next(t for t in m.graph.initializer if t.external_data)
    next(e for e in t.external_data if e.key == key).value = value


def test_stage_payload_weights_come_only_from_its_own_blob(world, tmp_path, monkeypatch):
    """A stage payload names where its weights lie; whatever it says, they are read from the
    decrypted blob or not at all: never from a file (the host's), never outside the blob."""
    from branchy_tee.tee.graphs import StageGraph, load_session

    payload = bytes(open_bundle(world.bundle, world.key("mo")).decrypt_stage(0))
    StageGraph(load_session(payload, "stage-00.bin"), "stage-00.bin")  # as sealed: fine
    monkeypatch.chdir(tmp_path)
    (tmp_path / "host.bin").write_bytes(bytes(1 << 20))  # weights the host would like to see used
    blob_at = 4096 * -(-(8 + int.from_bytes(payload[:8], "little")) // 4096)  # the layout, worked out here
    blob_size = len(payload) - blob_at
    for key, value, match in (
        ("location", "host.bin", "External file: host.bin not found"),
        ("location", str(tmp_path / "host.bin"), "External file: .*host.bin not found"),
        ("offset", str(blob_size), "given file_length"),
        ("offset", "-64", "given file_length"),
        ("length", str(1 << 30), "size mismatch"),
    ):
        bad = _edited(payload, lambda m, key=key, value=value: _external(m, key, value))
        with pytest.raises(IntegrityError, match=match):
            load_session(bad, "stage-00.bin")
    for bad, match in (
        (payload[:7], "has no graph length"),
        ((len(payload)).to_bytes(8, "little") + payload[8:], "does not fit"),
        (bytes(8) + payload[8:], "does not fit"),
        (payload[: blob_at - 1], "does not fit"),
    ):
        with pytest.raises(IntegrityError, match=match):
            load_session(bad, "stage-00.bin")


# --------------------------------------------------------------------------- policy (TOML)
@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_policy_arbitrary_text(tmp_path, text):
    p = tmp_path / "policy.toml"
    p.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    try:
        load_policy(p)
    except BranchyError as e:
        assert "\n" not in str(e)


@FUZZ
@given(st.dictionaries(st.sampled_from(SETTINGS) | st.text(max_size=8), json_values, max_size=5))
def test_policy_arbitrary_settings(tmp_path, data):
    try:
        parse_policy(data, "p", tmp_path)
    except BranchyError:
        pass


def test_policy_regressions(tmp_path):
    p = tmp_path / "policy.toml"
    for text in ["a = " + "[" * 5000 + "]" * 5000, "min_isv_svn = 1" + "0" * 5000, "\udcff"]:
        p.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(BranchyError, match="not valid TOML"):
            load_policy(p)


# --------------------------------------------------------------------------- simulated evidence and broker bodies
@FUZZ
@given(
    st.binary(max_size=300)
    | st.builds(lambda v: json.dumps(v).encode(), json_values)
    | st.builds(
        lambda d, s: json.dumps({"document": d, "signature": s}).encode(),
        st.text(max_size=40) | st.builds(json.dumps, json_values),
        st.text(max_size=130),
    )
)
def test_simulated_evidence_parser(data):
    try:
        verify_simulated(data)
    except AttestationError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def broker():
    keys = [generate_key()]
    b = Broker(keys, {"allowed_mrenclave": ["00" * 32], "allow_simulation": True})
    yield b, key_id(keys[0])
    b.close()


@FUZZ
@given(
    st.binary(max_size=300)
    | st.builds(lambda v: json.dumps(v).encode(), json_values)
    | st.builds(
        lambda over: json.dumps(
            {
                "evidence_type": "simulated",
                "evidence": base64.b64encode(b"{}").decode(),
                "public_key": "11" * 32,
                "nonce": "00" * 40,
                "key_ids": ["0123456789abcdef"],
                **over,
            }
        ).encode(),
        st.dictionaries(
            st.sampled_from(["protocol", "evidence_type", "evidence", "public_key", "nonce", "key_ids", "collateral"]),
            json_values,
            max_size=3,
        ),
    )
)
def test_broker_request_bodies(broker, body):
    b, kid = broker  # placeholders become the broker's real key id and a nonce it issued, to get deeper
    body = body.replace(b"0123456789abcdef", kid.encode()).replace(b"00" * 40, b.nonces.issue().hex().encode())
    try:
        b.request_keys(body, "127.0.0.1")
    except Refusal as r:
        assert r.status < 500 and "\n" not in r.reason, (r.status, r.reason)
    else:
        pytest.fail("granted a key to a fuzzed request")
