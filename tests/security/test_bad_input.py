"""Bad input through the command line and the key broker: a clear one-line reason, exit code 1 (2 for
usage), no traceback, nothing written; a broker keeps serving (/v1/health after each).

Fills the gaps left by tests/test_predict.py (shapes, dtypes, NaN/Inf, empty requests, flips) and
tests/test_broker.py (malformed JSON, oversized bodies, unknown key ids, expired/replayed nonces)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import time

import pytest

from branchy_tee.broker.server import start_broker
from branchy_tee.cli import main
from branchy_tee.core.keys import generate_key, key_id
from branchy_tee.tee.attest.providers import SimulatedProvider
from branchy_tee.tee.sealed.envelope import MAX_FILE, REQUEST_MAGIC
from campaign import http_call
from world import quiet_call


def _main(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors
        return e.code


def run_cli(argv, expect: int, match: str) -> str:
    rc, out, err = quiet_call(_main, argv)
    assert rc == expect, (argv, rc, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, (match, err)
    return err


@pytest.fixture
def w(world, tmp_path):
    """A private copy of the world's bundle, keys and request that a test may break."""
    for name in ("mo.key", "do1.key", "do2.key", "do1.req"):
        shutil.copy2(world.dir / name, tmp_path / name)
    shutil.copytree(world.bundle, tmp_path / "m.btee")
    (tmp_path / "out").mkdir()
    return tmp_path


def predict_argv(d, req="do1.req", bundle="m.btee", mo="mo.key", do="do1.key"):
    return [
        "predict",
        "--bundle",
        str(d / bundle),
        "--input",
        str(d / req),
        "--output",
        str(d / "out" / "res.enc"),
        "--model-key",
        str(d / mo),
        "--data-key",
        str(d / do),
        "--quiet",
        "--threads",
        "1",
    ]


def assert_nothing_written(d):
    assert os.listdir(d / "out") == []


# --------------------------------------------------------------------------- predict
def test_oversized_request_is_refused_before_it_is_read(w):
    big = w / "big.req"
    with open(big, "wb") as f:  # sparse: no disk, but stat says > 1 GiB
        f.write(REQUEST_MAGIC + struct.pack(">I", 2) + b"{}")
        f.truncate(MAX_FILE + 1)
    t = time.perf_counter()
    run_cli(predict_argv(w, req="big.req"), 1, f"{MAX_FILE + 1} bytes, over the {MAX_FILE}-byte limit")
    assert time.perf_counter() - t < 5
    assert_nothing_written(w)


@pytest.mark.parametrize("kind", ["dev-zero", "directory", "fifo"])
def test_request_that_is_not_a_regular_file(w, kind):
    path = {"dev-zero": "/dev/zero", "directory": str(w / "adir"), "fifo": str(w / "fifo")}[kind]
    if kind == "directory":
        os.mkdir(path)
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading must not wait for a writer
    argv = predict_argv(w)
    argv[argv.index(str(w / "do1.req"))] = path
    run_cli(argv, 1, "Is a directory" if kind == "directory" else "not a regular file")
    assert_nothing_written(w)


@pytest.mark.parametrize(
    "blob,match",
    [
        (b"", "not a branchy-tee request file"),
        (REQUEST_MAGIC, "not a branchy-tee request file"),
        (REQUEST_MAGIC + b"\xff\xff\xff\xff" + b"{}" * 40, "truncated or malformed request header"),
        (REQUEST_MAGIC + struct.pack(">I", 60000) + b"[" * 60000 + bytes(40), "request header is not valid JSON"),
        (REQUEST_MAGIC + struct.pack(">I", 5000) + b"7" * 5000 + bytes(40), "request header is not valid JSON"),
        (REQUEST_MAGIC + struct.pack(">I", 2) + b"[]" + bytes(40), "lacks a request id or key id"),
    ],
    ids=["empty", "magic-only", "absurd-header-length", "deep-nesting", "huge-integer", "not-an-object"],
)
def test_malformed_request_files(w, blob, match):
    (w / "bad.req").write_bytes(blob)
    run_cli(predict_argv(w, req="bad.req"), 1, match)
    assert_nothing_written(w)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda raw, mac: b"[" * 200_000, "header is not valid JSON"),
        (
            lambda raw, mac: raw.replace(b'"model_version": 1', b'"model_version": 1' + b"0" * 5000),
            "header is not valid JSON",
        ),
        (lambda raw, mac: raw.replace(mac, b"\\u00e9" + mac[1:]), "header failed authentication"),
        (lambda raw, mac: raw.replace(b'\n "mac"', b'\n\t"mac"'), "header bytes differ from the sealed file"),
        # a duplicate key: JSON readers differ on which one counts; ours takes the last (authentic) one, the bytes
        # check refuses
        (
            lambda raw, mac: raw.replace(b'"model_version": 1', b'"model_version": 2, "model_version": 1'),
            "header bytes differ",
        ),
        (lambda raw, mac: b"", "header is not valid JSON"),
        # a flipped byte in a member's *name* was a configuration error; the MAC comes first now
        (
            lambda raw, mac: raw.replace(b'"model_version":', b'"model_versiom":'),
            "could not be authenticated here (no model key): tampered?",
        ),
        (
            lambda raw, mac: raw.replace(b'"key_id":', b'"kay_id":'),
            "could not be authenticated here (no model key): tampered?",
        ),
    ],
    ids=[
        "deep-nesting",
        "huge-integer",
        "non-ascii-mac",
        "whitespace",
        "duplicate-key",
        "empty",
        "name",
        "key-id-name",
    ],
)
def test_malformed_bundle_headers(w, edit, match):
    hdr = w / "m.btee" / "header.json"
    raw = hdr.read_bytes()
    hdr.write_bytes(edit(raw, json.loads(raw)["mac"].encode()))
    run_cli(predict_argv(w), 1, match)
    assert_nothing_written(w)


@pytest.mark.parametrize("name", [b'"model_version":', b'"key_id":', b'"stages":'])
def test_a_flipped_byte_in_a_header_members_name_is_tampering_where_the_key_is_at_hand(w, name):
    from branchy_tee.core.errors import IntegrityError
    from branchy_tee.core.fileio import read_key_file
    from branchy_tee.tee.sealed.bundle import open_bundle

    hdr = w / "m.btee" / "header.json"
    hdr.write_bytes(hdr.read_bytes().replace(name, name[:-3] + bytes([name[-3] ^ 1]) + name[-2:], 1))
    with pytest.raises(IntegrityError, match=r"header failed authentication \(tampered"):
        open_bundle(w / "m.btee", read_key_file(w / "mo.key"))


def test_bundle_files_that_are_not_files(w):
    shutil.rmtree(w / "m.btee" / "stage-01.bin", ignore_errors=True)
    (w / "m.btee" / "stage-01.bin").unlink()
    (w / "m.btee" / "stage-01.bin").mkdir()
    run_cli(predict_argv(w), 1, "stage-01.bin: cannot read")
    (w / "not-a-bundle").write_text("x")
    run_cli(predict_argv(w, bundle="not-a-bundle"), 1, "not a sealed bundle (no header.json)")
    run_cli(predict_argv(w, bundle="missing.btee"), 1, "not a sealed bundle")
    assert_nothing_written(w)


def test_encrypt_input_with_a_broken_header(w):
    (w / "m.btee" / "header.json").write_bytes(b"[" * 200_000)
    (w / "x.npy").write_bytes(b"")
    run_cli(
        [
            "encrypt-input",
            str(w / "x.npy"),
            "--bundle",
            str(w / "m.btee"),
            "--key",
            str(w / "do1.key"),
            "--out",
            str(w / "out" / "r.req"),
        ],
        1,
        "header is not valid JSON",
    )
    assert_nothing_written(w)


# --------------------------------------------------------------------------- decrypt-result
@pytest.mark.parametrize(
    "blob,match",
    [
        (b"", "not a branchy-tee result file"),
        (b"BTEERES1" + b"\0\0\0\0", "truncated or malformed result header"),
        (b"BTEEREQ1" + b"\0" * 100, "not a branchy-tee result file"),
    ],
    ids=["zero-bytes", "header-only", "a-request"],
)
def test_malformed_result_files(w, blob, match):
    (w / "bad.res").write_bytes(blob)
    run_cli(
        [
            "decrypt-result",
            str(w / "bad.res"),
            "--key",
            str(w / "do1.key"),
            "--request",
            str(w / "do1.req"),
            "--out",
            str(w / "out" / "r.json"),
        ],
        1,
        match,
    )
    assert_nothing_written(w)


def test_a_request_is_not_a_result(w):
    run_cli(
        ["decrypt-result", str(w / "do1.req"), "--key", str(w / "do1.key"), "--request", str(w / "do1.req")],
        1,
        "not a branchy-tee result file",
    )


# --------------------------------------------------------------------------- keys
@pytest.mark.parametrize(
    "problem,match",
    [
        ("directory", "cannot read key file"),
        ("short", "holds 5 bytes"),
        ("missing", "not found"),
        ("empty", "holds 0 bytes"),
    ],
)
def test_unusable_key_files_for_every_command(w, problem, match):
    bad = w / "bad.key"
    if problem == "directory":
        bad.mkdir()
    elif problem == "short":
        bad.write_bytes(b"short")
    elif problem == "empty":
        bad.write_bytes(b"")
    if bad.is_file():
        os.chmod(bad, 0o600)
    (w / "x.npy").write_bytes(b"")
    commands = [
        predict_argv(w, mo="bad.key"),
        predict_argv(w, do="bad.key"),
        ["seal", str(w), "--key", str(bad), "--out", str(w / "out" / "s.btee")],
        [
            "encrypt-input",
            str(w / "x.npy"),
            "--bundle",
            str(w / "m.btee"),
            "--key",
            str(bad),
            "--out",
            str(w / "out" / "r"),
        ],
        [
            "decrypt-result",
            str(w / "do1.req"),
            "--key",
            str(bad),
            "--request",
            str(w / "do1.req"),
            "--out",
            str(w / "out" / "r.json"),
        ],
        [
            "key-broker",
            "--keys",
            str(bad),
            "--policy",
            str(w / "none.toml"),
            "--identity",
            str(w / "none.id"),
            "--listen",
            "127.0.0.1:0",
        ],
    ]
    for argv in commands:
        run_cli(argv, 1, match if not (problem == "directory" and argv[0] == "key-broker") else "holds no *.key files")
    assert_nothing_written(w)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_key_file_without_read_permission(w):
    os.chmod(w / "mo.key", 0o000)
    run_cli(predict_argv(w), 1, "Permission denied")


# --------------------------------------------------------------------------- usage errors (exit code 2)
@pytest.mark.parametrize(
    "extra,match",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--batch-size", "many"], "invalid int value"),
        (["--threads", "x"], "invalid int value"),
        (["--memory-budget", "lots"], "invalid float value"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--attest", "sev"], "invalid choice"),
        (["--output", "second.res"], "one result file per request"),
    ],
)
def test_predict_usage_errors(w, extra, match):
    run_cli(predict_argv(w) + extra, 2, match)
    assert_nothing_written(w)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["decrypt-result", "x.res"], "the following arguments are required: --key"),
        (
            [
                "key-broker",
                "--keys",
                "k",
                "--policy",
                "p",
                "--identity",
                "i",
                "--listen",
                "127.0.0.1:0",
                "--nonce-ttl",
                "0",
            ],
            "--nonce-ttl must be positive",
        ),
        (
            ["key-broker", "--keys", "k", "--policy", "p", "--identity", "i", "--listen", "127.0.0.1:99999"],
            "out of range",
        ),
        (["decrypt-result", "x.res", "--key", "k"], "one of the arguments --request --request-digest is required"),
        (
            ["decrypt-result", "x.res", "--key", "k", "--request", "r", "--request-digest", "ab"],
            "not allowed with argument",
        ),
        (["decrypt-result", "x.res", "--key", "k", "--request-digest", "xyz"], "--request-digest is a SHA-256"),
        (
            ["encrypt-input", "x.npy", "--bundle", "b", "--key", "k", "--out", "o", "--request-id", "a\udcffb"],
            "is not valid Unicode text",
        ),
        (
            ["encrypt-input", "x.npy", "--bundle", "b", "--key", "k", "--out", "o", "--request-id", "a\x1b[31mb"],
            "must be printable text",
        ),
        (["encrypt-input", "--bundle", "b", "--key", "k", "--out", "o"], "the following arguments are required: INPUT"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_other_usage_errors(w, argv, match):
    run_cli(argv, 2, match)


# --------------------------------------------------------------------------- key broker
@pytest.fixture
def broker(tmp_path):
    sim = quiet_call(SimulatedProvider, tmp_path / "devkey")[0]
    key = generate_key()
    policy = {"allowed_mrenclave": [sim.mrenclave.hex()], "allow_simulation": True}
    h = quiet_call(start_broker, [key], policy, audit_log=tmp_path / "audit.jsonl")[0]
    yield h, key_id(key)
    h.stop()


def good_body(url: str, kid: str, **over) -> dict:
    nonce = json.loads(http_call(url + "/v1/nonce")[1])["nonce"]
    return {
        "evidence_type": "simulated",
        "evidence": "e30=",
        "public_key": "09" * 32,
        "nonce": nonce,
        "key_ids": [kid],
        **over,
    }


def test_malformed_broker_requests_then_health(broker):
    h, kid = broker
    url = h.url + "/v1/keys"
    cases = [
        (b"[" * 60_000, 400, "not JSON"),
        (b'{"key_ids": ' + b"1" * 5000 + b"}", 400, "not JSON"),
        (b"\xff\xfe{}", 400, "not JSON"),
        (json.dumps(good_body(h.url, kid, key_ids=[kid] * 65)).encode(), 400, "'key_ids' must be a list of 1..64"),
        (json.dumps(good_body(h.url, kid, evidence=12345)).encode(), 400, "'evidence' must be a base64 string"),
        (json.dumps(good_body(h.url, kid, public_key="09" * 31)).encode(), 400, "'public_key' must be 32 bytes"),
        (json.dumps(good_body(h.url, kid, nonce="zz" * 40)).encode(), 400, "'nonce' is not hex"),
        (json.dumps(good_body(h.url, kid, key_ids=[kid.upper()])).encode(), 400, "is not a key id"),
        (json.dumps(good_body(h.url, kid, evidence_type=None)).encode(), 400, "'evidence_type' must be one of"),
        (json.dumps(good_body(h.url, kid, collateral=[1])).encode(), 400, "'collateral' must be a JSON object"),
        (json.dumps(good_body(h.url, kid)).encode(), 403, "simulated evidence is not a signed JSON document"),
        (json.dumps(good_body(h.url, kid, evidence_type="dcap")).encode(), 403, "evidence does not verify"),
        (json.dumps(good_body(h.url, kid, nonce="00" * 40)).encode(), 403, "not issued by this broker"),
    ]
    for body, status, match in cases:
        st, raw = http_call(url, "POST", body)
        doc = json.loads(raw)
        assert st == status and match in doc["error"] and "\n" not in doc["error"], (st, doc, match)
        assert http_call(h.url + "/v1/health")[0] == 200
    assert h.broker.granted == 0 and h.broker.refused == len(cases)


def _raw(port: int, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if not read:
            return b""
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


def test_broken_http_then_health(broker):
    h, kid = broker
    port = h.port
    garbage = [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS hello to a plain-HTTP broker
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
        b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b'POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"a"',  # then closes: body never completes
        b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        bytes(range(256)) * 4,
    ]
    for g in garbage:
        reply = _raw(port, g)
        assert not reply or reply.startswith(b"HTTP/1.") and b" 200 " not in reply.split(b"\r\n", 1)[0], reply[:200]
        assert http_call(h.url + "/v1/health")[0] == 200
    for _ in range(200):  # connections opened and dropped without a request
        _raw(port, b"", read=False)
    assert http_call(h.url + "/v1/health")[0] == 200
    assert h.broker.granted == 0
