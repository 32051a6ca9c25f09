"""The server's TLS identity and the renewal of its model key and allow-list from the model broker."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from branchy_tee.core.errors import BranchyError

if TYPE_CHECKING:
    import ssl

    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from branchy_tee.tee.attest.client import AttestedKeys
    from branchy_tee.tee.attest.providers import EvidenceSource
    from branchy_tee.tee.serve.https import Server
    from branchy_tee.tee.startup import Log


@dataclass(frozen=True)
class ServerTls:
    """What the server's TLS context is made of: its attested key and certificate, and the anchors of
    the identities it lets in (the model owner's always), signed by a throwaway key."""

    key: EllipticCurvePrivateKey
    cert_der: bytes
    owner: bytes
    signer: Ed25519PrivateKey

    def context_for(self, allowed: Iterable[bytes]) -> ssl.SSLContext:
        from branchy_tee.tee.serve.https import anchors_for, tls_context

        return tls_context(self.key, self.cert_der, anchors_for(set(allowed) | {self.owner}, self.signer))

    @classmethod
    def fresh(cls, provider: EvidenceSource, owner: bytes, settings: bytes) -> "ServerTls":
        """A new key pair and attested certificate (short-lived: ``tee.attest.ratls``)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from branchy_tee.tee.attest.ratls import make_server_certificate

        key, cert = make_server_certificate(provider, settings=settings)
        return cls(key, cert, owner, Ed25519PrivateKey.generate())  # (OpenSSL does not check anchors' signatures)


class Renewal:
    """Every ``--renew`` seconds: attest to the model broker again, take its allow-list, and make a new
    TLS key and certificate (the old certificate expires soon after). A refusal (the model owner
    revoked this enclave, or every data owner) stops the answers at once; a broker that cannot be
    reached stops them after ``GRACE`` failed renewals in a row.

    The host chooses ``--renew`` (at most MAX_PERIOD: the cap is code, so it is measured) and, under
    SGX, the enclave's clock. So the answers are bounded by count too: after MAX_REQUESTS answers
    without a successful renewal the server stops answering and renews at once; a revoked data
    owner gets at most that many answers, whatever time the host makes the enclave see."""

    GRACE = 3
    MAX_PERIOD = 300.0
    MAX_REQUESTS = 10_000

    def __init__(self, server: Server, keys: AttestedKeys, kid: str, tls: ServerTls, period: float, log: Log) -> None:
        self.server, self.keys, self.kid, self.tls, self.period, self.log = server, keys, kid, tls, period, log
        self.failures = 0
        self.stopping = threading.Event()
        self.now = threading.Event()  # renew at once (the answers' budget is spent)
        self.answers_left = self.MAX_REQUESTS
        self._lock = threading.Lock()

    def answered(self) -> None:
        """One more answer given: the last one allowed before a renewal stops the answers."""
        with self._lock:
            self.answers_left -= 1
            if self.answers_left <= 0 and self.server.state == "ok":
                self.server.state = "renewing"
                self.now.set()

    def run(self) -> None:
        from branchy_tee.core.errors import AttestationError

        while True:
            self.now.wait(self.period)
            self.now.clear()
            if self.stopping.is_set():
                return
            try:
                new = frozenset(self.keys.renew(self.kid))
            except AttestationError as e:
                self._revoke(f"the model broker refused to renew ({e})")
                continue
            except BranchyError as e:
                self.failures += 1
                if self.failures >= self.GRACE:
                    self._revoke(f"the model broker was unreachable {self.failures} times in a row ({e})")
                continue
            self.failures = 0
            self.tls = ServerTls.fresh(self.keys.provider, self.tls.owner, self.keys.settings)
            self.server.context = self.tls.context_for(new)
            if new != self.server.allowed:
                self.server.allowed = new
                self.log(f"allow-list renewed: {len(new)} data owner(s)")
            with self._lock:
                self.answers_left = self.MAX_REQUESTS
                if self.server.state in ("revoked", "renewing"):
                    self.server.state = "ok"

    def _revoke(self, why: str) -> None:
        self.server.state = "revoked"
        self.log(f"{why}; no longer answering")
