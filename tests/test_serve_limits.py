"""The host's (or anyone's) moves against serve's front door, each refused before it costs the
enclave memory or threads: bodies from clients without a certificate, Content-Length that is not
ASCII digits, a request dripped byte by byte, a flood of connections, more request bytes in flight
than the budget, and answers or health that would tell one data owner about another's requests."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest

from branchy_tee.client.tls import anonymous_context, client_context
from branchy_tee.core.errors import BranchyError
from branchy_tee.tee.attest.identity import load_identity
from test_serve import Served, check_answers, world_fixture  # noqa: F401 -- the `world` fixture


def _server_cert(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with anonymous_context().wrap_socket(raw) as tls:
            cert = tls.getpeercert(binary_form=True)
    assert cert
    return cert


def _tls(port: int, identity=None) -> ssl.SSLSocket:
    """A TLS connection to serve: anonymous, or with a data owner's identity (pinned server cert)."""
    ctx = client_context(load_identity(identity), _server_cert(port)) if identity else anonymous_context()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw)


def _answer(tls: ssl.SSLSocket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed without an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(v for k, v in (h.split(b": ", 1) for h in head.split(b"\r\n")[1:]) if k.lower() == b"content-length")
    )
    while len(body) < length:
        body += tls.recv(65536)
    return int(head.split()[1]), json.loads(body)


def test_a_body_without_a_client_certificate_is_refused_before_it_is_read(world):
    """Eight connections without a certificate each announced 64 MiB and stalled: the server grew by
    1 GB reading them before it said 403. Now the answer comes at once, with no body byte read."""
    with Served(world) as s:
        with _tls(s.server.server_address[1]) as tls:
            tls.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 67108863\r\n\r\n")
            t0 = time.monotonic()
            status, doc = _answer(tls)
            assert status == 403 and "no client certificate" in doc["error"]
            assert time.monotonic() - t0 < 2  # not after a timeout: before the body
            assert tls.recv(1) == b""  # and the connection closed, the body never read


def test_content_length_must_be_ascii_digits(world):
    """'²' passed str.isdigit() and ended in an unhandled ValueError."""
    with Served(world) as s:
        for bad in ("²", "٣", "+5", "5 ", "0x10", ""):
            with _tls(s.server.server_address[1], world["d"] / "do1.id") as tls:
                tls.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {bad}\r\n\r\n".encode())
                status, doc = _answer(tls)
                assert status == 411 and "ASCII digits" in doc["error"], bad
        with s.client("do1") as c:
            check_answers(world, c.predict(world["x"][:2]))


def test_a_request_dripped_byte_by_byte_is_cut_off_at_the_deadline(world):
    """A byte every 0.4 s never meets the per-read timeout (2 s here); the whole request must arrive
    within it, so the connection is shut after about 2 s instead of holding a thread for ever."""
    with Served(world, extra=("--timeout", "2")) as s:
        with _tls(s.server.server_address[1]) as tls:
            t0 = time.monotonic()
            closed_after = None
            for b in b"GET /v1/health HTTP/1.1\r\nX-Drip: " + b"a" * 40:
                try:
                    tls.sendall(bytes([b]))
                except OSError:
                    closed_after = time.monotonic() - t0
                    break
                time.sleep(0.4)
                if s.server.metrics.deadline_closes:
                    closed_after = time.monotonic() - t0
                    break
        assert closed_after is not None and closed_after < 4.5, closed_after
        assert s.server.metrics.deadline_closes >= 1


def test_a_connection_flood_is_held_to_max_connections(world):
    """Thirty connections that never speak, against --max-connections 4: the server gives at most four
    of them a thread and closes the rest at once; once they are gone it answers again."""
    with Served(world, extra=("--max-connections", "4", "--timeout", "2")) as s:
        port = s.server.server_address[1]
        threads_before = threading.active_count()
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        time.sleep(0.5)
        assert threading.active_count() - threads_before <= 4
        assert s.server.metrics.refused_connections >= 26
        for c in flood:
            c.close()
        time.sleep(0.3)
        with s.client("do1") as c:
            check_answers(world, c.predict(world["x"][:2]))


def test_connections_without_a_certificate_have_their_own_small_cap(world):
    with Served(world) as s:
        port = s.server.server_address[1]
        anonymous = [_tls(port) for _ in range(12)]
        time.sleep(0.5)
        assert s.server.metrics.refused_connections >= 4  # only 8 may wait without a certificate
        with s.client("do1") as c:  # data owners still get in
            check_answers(world, c.predict(world["x"][:2]))
        for a in anonymous:
            a.close()


def test_request_bytes_in_flight_are_bounded(world):
    """With a 1 MiB budget (each body counted twice: bytes and array), a 1.2 MB request is refused
    with 503 before it is read; a small one is answered."""
    with Served(world, extra=("--max-inflight-mib", "1")) as s:
        with s.client("do1", retries=1) as c:
            big = world["x"][:1].repeat(400, axis=0)
            with pytest.raises(BranchyError, match="busy"):
                c.predict(big)
            check_answers(world, c.predict(world["x"][:2]))
        assert s.server.metrics.requests["busy"] >= 1


def test_answers_and_health_tell_nothing_about_other_requests(world):
    """Co-batched with another data owner's request, an answer carried the batch's size (the other
    owner's secret request size + 1) and its compute time; /v1/health showed the queue to anyone."""
    with Served(world, extra=("--max-wait-ms", "100")) as s:
        other = threading.Thread(target=lambda: s.client("do2").predict(world["x"][:7]))
        other.start()
        with s.client("do1") as c:
            doc, _ = c._request("POST", "/v1/predict", _payload(world["x"][:1]))
        other.join()
        assert set(doc) == {"model", "samples", "results"} and doc["samples"] == 1
        with _tls(s.server.server_address[1]) as tls:
            tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(tls) == (200, {"status": "ok"})


def _payload(x) -> bytes:
    from safetensors.numpy import save

    return save({"inputs": x})


def test_the_measured_caps_may_only_be_lowered_by_the_host(world):
    """The enclave is sized for its build's --max-connections, --max-inflight-mib and --max-queue
    (measured); inside it the host's larger values were taken as given. Now they are refused in one
    line, smaller ones are kept, and the caps are the defaults."""
    from branchy_tee.core.commandline import ArgumentParser
    from branchy_tee.core.errors import UsageError
    from branchy_tee.tee import measured
    from branchy_tee.tee.serve import server as srv

    env = {measured.ENCLAVE: "1", measured.SERVE_CAPS: "max_connections=16,max_inflight_mib=64,max_queue=32"}

    def limits(*argv: str):
        p = ArgumentParser()
        srv.add_arguments(p)
        args = p.parse_args(["--bundle", "b", "--listen", "127.0.0.1:0", *argv])
        srv._check_limits(args, env)
        return args.max_connections, args.max_inflight_mib, args.max_queue

    assert limits() == (16, 64, 32)
    assert limits("--max-connections", "4", "--max-queue", "8") == (4, 64, 8)
    for flag in ("--max-connections", "--max-inflight-mib", "--max-queue"):
        with pytest.raises(UsageError, match=f"{flag} 1000 is above the cap .* the host may only lower it"):
            limits(flag, "1000")
    with pytest.raises(UsageError, match="BRANCHY_TEE_SERVE_CAPS is not"):
        srv._check_limits(ArgumentParser().parse_args([]), {**env, measured.SERVE_CAPS: "max_connections=²"})
    outside = srv.DEFAULT_CAPS
    args = ArgumentParser()
    srv.add_arguments(args)
    parsed = args.parse_args(["--bundle", "b", "--listen", "127.0.0.1:0"])
    srv._check_limits(parsed, {})
    assert (parsed.max_connections, parsed.max_inflight_mib, parsed.max_queue) == tuple(outside.values())
