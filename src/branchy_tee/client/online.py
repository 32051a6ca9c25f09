"""The data owner's client for ``branchy-tee serve``: it checks the enclave's attestation before it
sends anything.

    from branchy_tee.client.online import Client
    with Client("https://host:8443", policy="do-policy.toml", identity="do.id") as c:
        for r in c.predict(["shirt.png", "boot.jpg"]):
            print(r["class_name"], r["confidence"], r["exit"], r["model"]["bundle_id"])

At every connection (including a reconnect, and every replica) the client first connects without
a client certificate, takes the certificate the server presented, verifies its evidence (DCAP
quote to Intel's root, with the policy's own collateral and the current time, or simulated evidence
where the policy allows it), checks that REPORTDATA binds that certificate's public key, that the
certificate is valid now and short-lived, and judges the claims with the data owner's own policy
(the same policy file and verifier its key broker uses). Only then does it connect again, with a
client certificate made from the data owner's identity key and that one server certificate as its
only trust anchor: the identity never reaches a server that has not proved it holds the attested key.
A connection is dropped before its certificate expires (serve renews it at every key renewal).

Several URLs (replicas behind any load balancer, or listed here) are used in turn; a replica that
fails or answers 503 is skipped for the next one, and each is verified on its own.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Iterable

from branchy_tee.core.errors import AttestationError, BranchyError, UsageError, shown
from branchy_tee.tee.serve.api import ModelInfo

MAX_RESPONSE = 64 << 20


def _retry_after(value: str | None) -> float:
    """Seconds to wait before the next try: the server's Retry-After (in seconds), at most 5."""
    try:
        seconds = float(value or 1)
    except ValueError:
        return 1.0
    return min(seconds, 5.0) if seconds >= 0 else 1.0  # NaN too


class _Connection(http.client.HTTPSConnection):
    """An HTTPS connection that never reconnects by itself (every connection the client uses is one
    it verified) and sends a small request's headers and body in one write. http.client writes them
    separately: two TLS records, so two reads on the server (and two packets) for every request."""

    auto_open = 0
    ONE_WRITE = 1 << 16  # larger bodies span several TLS records anyway: not worth a copy
    _held: list[bytes] | None = None

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kw: Any) -> None:
        if not isinstance(body, bytes) or len(body) > self.ONE_WRITE:
            super().request(method, url, body, headers or {}, **kw)
            return
        self._held = []
        try:
            super().request(method, url, body, headers or {}, **kw)
            data = b"".join(self._held)
        finally:
            self._held = None
        super().send(data)

    def send(self, data: Any) -> None:
        if self._held is None:
            super().send(data)
        else:
            self._held.append(bytes(data))


class _Replica:
    """One server URL and its verified connection (re-verified whenever it reconnects)."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise UsageError(f"{shown(url)} is not an https:// URL of a branchy-tee server")
        self.url, self.host, self.port = url.rstrip("/"), parts.hostname, parts.port or 443
        self.conn: _Connection | None = None
        self.claims = None
        self.expires = 0.0  # (time.time()) when the verified certificate of ``conn`` stops being valid


class Client:
    """Attested, authenticated access to one or more ``branchy-tee serve`` replicas."""

    def __init__(
        self,
        urls: str | Iterable[str],
        policy,
        identity,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        resize: bool = False,
    ):
        self.resize = resize  # images far from the model's size are refused unless True (data.preprocess)
        from branchy_tee.tee.attest.identity import load_identity
        from branchy_tee.verifier.policy import Policy, load_policy, parse_policy

        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise UsageError("give at least one server URL")
        self.replicas = [_Replica(u) for u in urls]
        if isinstance(policy, Policy):
            self.policy = policy
        elif isinstance(policy, dict):
            self.policy = parse_policy(policy)
        else:
            self.policy = load_policy(policy)
        self.identity = identity if not isinstance(identity, (str, os.PathLike)) else load_identity(identity)
        from branchy_tee.tee.attest.identity import identity_hex

        self.identity_hex = identity_hex(self.identity)
        self.timeout, self.retries = timeout, retries
        self._next = 0
        self._lock = threading.Lock()
        self._info: ModelInfo | None = None
        self.verifications = 0  # attestation checks made (one per connection)
        self.attest_seconds: list[float] = []

    # ---- connections
    def _connect(self, r: _Replica) -> _Connection:
        from branchy_tee.client.tls import anonymous_context, client_context
        from branchy_tee.verifier.ratls import check_validity, verify_server_certificate

        t0 = time.perf_counter()
        first = _Connection(r.host, r.port, timeout=self.timeout, context=anonymous_context())
        try:
            first.connect()
            cert = first.sock.getpeercert(binary_form=True)
        finally:
            first.close()
        if not cert:
            raise AttestationError(f"{r.url} presented no certificate")
        r.claims = verify_server_certificate(cert, self.policy)
        self.attest_seconds.append(time.perf_counter() - t0)
        self.verifications += 1
        conn = _Connection(r.host, r.port, timeout=self.timeout, context=client_context(self.identity, cert))
        try:
            conn.connect()  # OpenSSL refuses any certificate but the verified one before it sends ours
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # request headers and body: no Nagle wait
            if conn.sock.getpeercert(binary_form=True) != cert:
                raise AttestationError(f"{r.url} presented another certificate than the one just verified")
        except BaseException:
            conn.close()
            raise
        r.conn, r.expires = conn, check_validity(cert).timestamp()
        return conn

    def _call(
        self, r: _Replica, method: str, path: str, body: bytes | None, content_type: str
    ) -> tuple[int, bytes, http.client.HTTPMessage]:
        """(status, body, headers: case-insensitive ``.get``) of one request to ``r``."""
        if r.conn is not None and time.time() > r.expires - 30:
            self._drop(r)  # its certificate is about to expire: verify the server's current one
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect (and re-verify) once
            conn = r.conn or self._connect(r)
            try:
                conn.request(method, path, body=body, headers={"Content-Type": content_type} if body else {})
                resp = conn.getresponse()
                data = resp.read(MAX_RESPONSE + 1)
                if len(data) > MAX_RESPONSE:
                    raise BranchyError(f"{r.url}: response larger than {MAX_RESPONSE} bytes")
                if (resp.headers.get("Connection") or "").lower() == "close":
                    self._drop(r)
                return resp.status, data, resp.headers
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop(r)
                if attempt or r.conn is not None:
                    raise BranchyError(f"{r.url}: connection lost ({type(e).__name__})") from None
        raise AssertionError("unreachable")

    def _drop(self, r: _Replica) -> None:
        if r.conn is not None:
            r.conn.close()
        r.conn = None

    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/octet-stream"
    ) -> tuple[dict, str]:
        """JSON answer from the first replica that gives one (round robin, failover); the URL used."""
        errors: list[str] = []
        with self._lock:
            for attempt in range(self.retries * len(self.replicas)):
                if attempt and errors and "(503)" not in errors[-1]:  # a refused or reset connection: back off
                    time.sleep(min(1.0, 0.05 * 2**attempt) / len(self.replicas))
                r = self.replicas[self._next % len(self.replicas)]
                self._next += 1
                try:
                    status, data, headers = self._call(r, method, path, body, content_type)
                except AttestationError:
                    self._drop(r)
                    raise  # an enclave our policy refuses: never fall back silently
                except ssl.SSLError as e:
                    self._drop(r)
                    if "UNKNOWN_CA" in str(e) or "CERTIFICATE_REQUIRED" in str(e):
                        raise BranchyError(
                            f"{r.url} does not accept your identity {self.identity_hex} (it is not on "
                            "the model owner's allow-list)"
                        ) from None
                    errors.append(f"{r.url}: TLS: {e}"[:200])
                    continue
                except (OSError, http.client.HTTPException, BranchyError) as e:
                    self._drop(r)
                    errors.append(f"{r.url}: {type(e).__name__}: {e}"[:200])
                    continue
                if status == 503:
                    errors.append(f"{r.url}: busy or draining (503)")
                    time.sleep(_retry_after(headers.get("Retry-After")) / len(self.replicas))
                    continue
                try:
                    doc = json.loads(data)
                except ValueError:
                    raise BranchyError(f"{r.url}: answered HTTP {status} with a body that is not JSON") from None
                if status != 200:
                    raise BranchyError(f"{r.url} refused: {shown(doc.get('error'), 200)} (HTTP {status})")
                return doc, r.url
        raise BranchyError("no server answered: " + "; ".join(errors[-len(self.replicas) :]))

    # ---- API
    def model_info(self) -> ModelInfo:
        """The served model: architecture, classes, preprocessing, exit criterion, number of exits and
        the sealed bundle (``.model``: bundle id, model version, model key id)."""
        if self._info is None:
            doc, url = self._request("GET", "/v1/model")
            self._info = ModelInfo.parse(doc, url)
        return self._info

    def predict(self, images) -> list[dict[str, Any]]:
        """Answers for PNG/JPEG paths, PIL images, or an array/tensor of raw images (N, C, H, W) or
        (N, H, W): each {label, class_name, confidence, exit, model, attestation} (attestation: "sgx",
        "tdx", or "simulated": development evidence, no TEE protected the images)."""
        from safetensors.numpy import save

        x = self._inputs(images)
        doc, url = self._request("POST", "/v1/predict", save({"inputs": x}))
        results, model = doc.get("results"), doc.get("model")
        if not isinstance(results, list) or len(results) != len(x) or not isinstance(model, dict):
            raise BranchyError(f"{url}: malformed answer")
        claims = next(r.claims for r in self.replicas if r.url == url)
        tee = claims.tee if claims is not None else None  # (set by the connection that answered)
        return [{**r, "model": model, "attestation": tee} for r in results]

    def _inputs(self, images):
        """One batch from image paths, PIL images, arrays or tensors (one image or a batch), mixed in a
        list or alone; BranchyError in one line for anything else."""
        import numpy as np
        import torch

        from branchy_tee.data.preprocess import image_to_pixels, load_inputs, tensor_to_inputs

        prep = self.model_info().preprocessing
        if (
            isinstance(images, (list, tuple))
            and images
            and all(isinstance(i, (np.ndarray, list, int, float)) for i in images)
        ):
            try:
                images = np.asarray(images)  # numbers only: one array, as before (a batch, or one image)
            except ValueError:
                pass  # ragged: item by item
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise BranchyError("images: nothing to classify")
        parts = []
        for i, item in enumerate(items):
            where = f"images[{i}]" if isinstance(images, (list, tuple)) else "images"
            if isinstance(item, (str, os.PathLike)):
                parts.append(load_inputs([str(item)], prep, self.resize))
            elif hasattr(item, "convert"):  # a PIL image
                pixels = image_to_pixels(item, prep.input_shape, where, self.resize)
                parts.append(tensor_to_inputs(pixels[None], prep, where))
            elif isinstance(item, (torch.Tensor, np.ndarray, list)):
                t = item if isinstance(item, torch.Tensor) else torch.as_tensor(np.asarray(item))
                parts.append(tensor_to_inputs(t, prep, where))
            else:
                raise BranchyError(f"{where} is a {type(item).__name__}: give image paths, PIL images or arrays")
        return np.ascontiguousarray(torch.cat(parts).numpy().astype(np.float32))

    def close(self) -> None:
        for r in self.replicas:
            self._drop(r)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
