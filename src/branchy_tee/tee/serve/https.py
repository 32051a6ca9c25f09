"""The HTTPS front of ``branchy-tee serve``: routes, limits and metrics (``http.server`` + ``ssl``
from the standard library, so nothing joins the enclave for it), the attested TLS context, and
client certificates checked against the allowed identities. See ``tee.serve.server`` for the API.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from branchy_tee.core.errors import shown
from branchy_tee.tee import measured
from branchy_tee.tee.serve.metrics import Metrics

if TYPE_CHECKING:
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from branchy_tee.tee.serve.batching import Batcher
    from branchy_tee.tee.serve.model import LoadedModel

UNAUTHENTICATED_CONNECTIONS = 8  # at once, without a client certificate: they may only ask /v1/health
_ASCII_DIGITS = re.compile(r"[0-9]{1,12}")


def parse_inputs(body: bytes, input_shape: Sequence[int], max_samples: int) -> np.ndarray:
    """The request body's float32 (N, C, H, W) array; ValueError with a one-line reason otherwise."""
    import numpy as np
    from safetensors.numpy import load

    try:
        tensors = load(body)
    except Exception:  # noqa: BLE001 -- the parser's own error types vary
        raise ValueError("the body is not a safetensors payload") from None
    x = tensors.get("inputs")
    if x is None or len(tensors) != 1:
        raise ValueError("the payload must hold exactly one tensor named 'inputs'")
    if x.dtype != np.float32:
        raise ValueError(f"'inputs' is {x.dtype}, expected float32")
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"'inputs' has shape {tuple(x.shape)}, the model takes (N, {', '.join(map(str, input_shape))})"
        )
    if not 1 <= x.shape[0] <= max_samples:
        raise ValueError(f"a request holds 1 to {max_samples} samples, not {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("'inputs' contains NaN or infinite values")
    return np.ascontiguousarray(x)


# --------------------------------------------------------------------------- HTTP
class Handler(http.server.BaseHTTPRequestHandler):
    server: "Server"
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # headers and body leave in one write (else Nagle + delayed ACK add ~40 ms)
    server_version = "branchy-tee"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.timeout_s)  # what StreamRequestHandler does with its timeout

    def handle_one_request(self) -> None:
        # One deadline for the request line, the headers and the body together (the socket's timeout
        # is per read: a client dripping a byte every few seconds would never meet it).
        self.server.set_deadline(self.connection)
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's name
        pass  # request lines carry host-visible paths only; per-request logs would also reveal timing detail

    def _reply(
        self, status: int, obj: object, *, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        body = obj if isinstance(obj, bytes) else (json.dumps(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> None:
        self._reply(status, {"error": reason, "code": code}, headers=headers)

    _client: tuple[bytes | None] | None = None  # this connection's identity, once read from its certificate

    def _identity(self) -> bytes | None:
        """The identity of this connection's client certificate. One handler serves one connection,
        and its certificate cannot change after the handshake (TLS 1.3 only: no renegotiation; no
        post-handshake authentication is ever requested), so the certificate's checks (an Ed25519
        signature: ~0.2 ms of the server's time) run once per connection, not per request. Whether the
        identity is allowed is still decided at every request, against the current allow-list."""
        from branchy_tee.tee.attest.ratls import client_identity

        if self._client is None:
            self._client = (client_identity(self.connection.getpeercert(binary_form=True)),)
        return self._client[0]

    def _authorise(self, who: str) -> bool:
        state = self.server.state
        if state != "ok":
            retry = {"draining": "5", "renewing": "1"}.get(state)
            self._error(503, state, f"the server is {state}", {"Retry-After": retry} if retry else None)
            return False
        identity = self._identity()
        allowed = self.server.owner_identities if who == "model owner" else self.server.allowed
        if identity is None or identity not in allowed:
            self.server.metrics.observe("refused")
            what = "no client certificate" if identity is None else f"identity {identity.hex()} is not allowed"
            self._error(403, "forbidden", f"{what}: this endpoint is for the {who}")
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        if self.path == "/v1/health":  # anyone may ask: nothing about the load (the metrics are the model owner's)
            self._reply(200, {"status": self.server.state})
        elif self.path == "/v1/model":
            if self._authorise("data owners on the model owner's allow-list"):
                self._reply(200, self.server.model.info)
        elif self.path == "/v1/metrics":
            if self._authorise("model owner"):
                b = self.server.batcher
                text = self.server.metrics.prometheus(self.server.model.exit_counts, b.waiting, b.batches)
                self._reply(200, text.encode(), content_type="text/plain; version=0.0.4")
        else:
            self._error(404, "not_found", f"no such endpoint {shown(self.path, 60)}")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v1/predict":
            self.close_connection = True  # (its body is not read)
            self._error(404, "not_found", f"no such endpoint {shown(self.path, 60)}")
            return
        t0 = time.perf_counter()
        # Who is asking, before a byte of the body is read: no certificate, or one not on the
        # allow-list, gets its answer and the connection closed with the body unread.
        if not self._authorise("data owners on the model owner's allow-list"):
            self.close_connection = True
            return
        length = self.headers.get("Content-Length") or ""
        if not _ASCII_DIGITS.fullmatch(length):  # (str.isdigit() takes '²' and other digits int() refuses)
            self.close_connection = True
            self._error(411, "length_required", "send Content-Length (ASCII digits)")
            return
        n = int(length)
        if n > self.server.max_body:
            self.close_connection = True
            self._error(413, "too_large", f"request body over {self.server.max_body} bytes")
            self._discard_body(n)
            return
        if not self.server.reserve(n):
            self.close_connection = True
            self.server.metrics.observe("busy")
            self._error(503, "busy", "too many request bytes in flight", {"Retry-After": "1"})
            self._discard_body(n)  # (read and dropped, bounded: the client then reads the 503)
            return
        try:
            body = self._read_body(n)
            self.server.clear_deadline(self.connection)  # read in time: the answer may take longer
            if body is not None:
                self._predict(body, t0)
        finally:
            self.server.release(n)

    def _body_chunks(self, n: int, seconds: float) -> Iterator[bytes]:
        """The next ``n`` bytes of the body as they arrive; TimeoutError after ``seconds``,
        ConnectionError if the client stops sending first."""
        deadline = time.monotonic() + seconds
        while n > 0:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = self.rfile.read1(min(1 << 20, n))
            if not chunk:
                raise ConnectionError
            n -= len(chunk)
            yield chunk

    def _read_body(self, n: int) -> bytes | None:
        try:
            return b"".join(self._body_chunks(n, self.server.timeout_s))
        except (TimeoutError, socket.timeout, ConnectionError, ssl.SSLError, OSError):
            self.close_connection = True
            self.server.metrics.observe("error")
            return None

    def _discard_body(self, n: int) -> None:
        """After refusing a body: read and drop what the client is still sending, briefly and bounded,
        so that it can finish sending and read our answer. Closing at once with its bytes unread makes
        the client's send fail before it sees the 413 (nginx's "lingering close")."""
        try:
            self.wfile.flush()
            for _ in self._body_chunks(min(n, 64 << 20), 2.0):
                pass
        except (OSError, ValueError):
            pass

    def _predict(self, body: bytes, t0: float) -> None:
        from branchy_tee.tee.serve.batching import Busy, Stopped

        s = self.server
        try:
            x = parse_inputs(body, s.model.input_shape, s.max_request_samples)
        except ValueError as e:
            s.metrics.observe("refused")
            self._error(400, "bad_request", str(e))
            return
        try:
            job = s.batcher.submit(x)
        except Busy as e:
            s.metrics.observe("busy")
            self._error(503, "busy", str(e), {"Retry-After": "1"})
            return
        except Stopped as e:
            self._error(503, "draining", str(e), {"Retry-After": "5"})
            return
        try:
            results = job.wait(s.answer_timeout)
        except Exception as e:  # noqa: BLE001 -- a bug or a timeout: fail this request, keep serving
            s.metrics.observe("error")
            self._error(500, "internal_error", f"no answer ({type(e).__name__})")
            return
        seconds = time.perf_counter() - t0
        s.metrics.observe("ok", len(x), seconds, job.compute_seconds)
        s.on_answer()
        # Only this request's own figures: the batch it shared with other data owners (its size, its
        # compute time) would tell them about each other's requests.
        self._reply(200, {"model": s.model.identity, "samples": len(x), "results": results})


class Server(http.server.ThreadingHTTPServer):
    """HTTPS with attested certificate; the TLS handshake runs in each connection's own thread, so a
    client that stalls in the handshake holds only its own thread. At most ``max_connections``
    connections at once (one thread each: the manifest's sgx.max_threads counts them), of which
    UNAUTHENTICATED_CONNECTIONS without a client certificate; each request (from its connection's
    acceptance, for the first) must arrive whole within ``timeout_s``; request bodies in flight hold
    at most ``max_inflight`` bytes (each counted twice: the body and the array parsed from it)."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        model: LoadedModel,
        batcher: Batcher,
        context: ssl.SSLContext,
        *,
        allowed: Iterable[bytes],
        owner: Iterable[bytes],
        timeout_s: float,
        max_body: int,
        max_request_samples: int,
        max_connections: int,
        max_inflight: int,
        log: Callable[[str], None],
    ) -> None:
        self.model, self.batcher, self.context = model, batcher, context
        self.allowed, self.owner_identities = frozenset(allowed), frozenset(owner)
        self.timeout_s, self.max_body, self.max_request_samples = timeout_s, max_body, max_request_samples
        self.max_connections, self.max_inflight = max_connections, max_inflight
        self.answer_timeout = 600.0
        self.state = "ok"
        self.on_answer: Callable[[], None] = lambda: None  # the renewal counts answers (tee.serve.renewal)
        self.metrics = Metrics()
        self.log = log
        self._lock = threading.Lock()
        self._connections = 0
        self._unauthenticated = 0
        self._inflight = 0
        self._deadlines: dict[ssl.SSLSocket, float] = {}
        self._closed = threading.Event()
        super().__init__(address, Handler)
        threading.Thread(target=self._enforce_deadlines, name="deadlines", daemon=True).start()

    # ---- limits
    def reserve(self, n: int) -> bool:
        with self._lock:
            if self._inflight + 2 * n > self.max_inflight:
                return False
            self._inflight += 2 * n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._inflight -= 2 * n

    def set_deadline(self, sock: ssl.SSLSocket) -> None:
        with self._lock:
            self._deadlines[sock] = time.monotonic() + self.timeout_s

    def clear_deadline(self, sock: ssl.SSLSocket) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def _enforce_deadlines(self) -> None:
        """Shut down connections whose request did not arrive in time: their blocked read returns."""
        while not self._closed.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, t in self._deadlines.items() if t < now]
                for sock in late:
                    del self._deadlines[sock]
            for sock in late:
                self.metrics.deadline_closes += 1
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:  # no thread for it: closed at once
            self.metrics.refused_connections += 1
            self.shutdown_request(request)
            return
        self.set_deadline(request)  # the handshake and the first request
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.clear_deadline(request)
            with self._lock:
                self._connections -= 1

    # ---- connections
    def get_request(self) -> tuple[ssl.SSLSocket, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small answers go out at once
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        assert isinstance(request, ssl.SSLSocket)  # what get_request hands out
        self.metrics.connections += 1
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            self.metrics.tls_failures += 1  # malformed TLS, a refused client certificate, a stalled client
            _close_gently(request)
            return
        anonymous = not request.getpeercert(binary_form=True)
        if anonymous:
            with self._lock:
                full = self._unauthenticated >= UNAUTHENTICATED_CONNECTIONS
                if not full:
                    self._unauthenticated += 1
            if full:
                self.metrics.refused_connections += 1
                return
        try:
            super().finish_request(request, client_address)
        finally:
            if anonymous:
                with self._lock:
                    self._unauthenticated -= 1

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        """One connection failed (reset mid-request, ...): count it, say what, keep serving."""
        self.metrics.observe("error")
        e = sys.exc_info()[1]
        if not isinstance(e, (OSError, TimeoutError)):  # a bug, not a client going away
            self.log(f"request failed: {type(e).__name__}: {shown(str(e), 200)}")


def _close_gently(sock: ssl.SSLSocket) -> None:
    """After a failed handshake: let the TLS alert reach the client. Closing a socket with unread
    bytes (the client's first request) makes the kernel send a reset, which can overtake the alert,
    so read what is there (briefly, raw) and close only after the client's end of file."""
    try:
        sock.settimeout(1.0)
        socket.socket.shutdown(sock, socket.SHUT_WR)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and socket.socket.recv(sock, 65536):
            pass
    except OSError:
        pass


# --------------------------------------------------------------------------- TLS
def tls_context(key: EllipticCurvePrivateKey, cert_der: bytes, anchors: list[bytes]) -> ssl.SSLContext:
    """A TLS 1.3 server context: our attested certificate, and client certificates verified against
    one anchor per allowed identity (optional: /v1/health needs none)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cert_pem = x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # The ssl module loads a certificate and key only from files. Inside the enclave they go to the
    # manifest's in-enclave tmpfs, which nothing host-backed may cover (the build refuses it), so the
    # private key never reaches the host; the file is removed at once. (Outside Gramine, e.g.
    # `enclave run --backend native`, that folder does not exist and no enclave protects anything.)
    d = tempfile.mkdtemp(
        prefix="branchy-tee-tls-", dir=measured.SECRETS_DIR if os.path.isdir(measured.SECRETS_DIR) else None
    )
    try:
        path = os.path.join(d, "tls.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + cert_pem)
        ctx.load_cert_chain(path)
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    if anchors:
        ctx.load_verify_locations(cadata=b"".join(anchors).decode())
    return ctx


def anchors_for(identities: Iterable[bytes], signer: Ed25519PrivateKey) -> list[bytes]:
    from branchy_tee.tee.attest.ratls import identity_anchor

    return [identity_anchor(i, signer) for i in sorted(identities)]
