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


class Renewal:
    """Every ``--renew`` seconds: attest to the model broker again and take its allow-list. A refusal
    (the model owner revoked this enclave, or every data owner) stops the answers at once; a broker
    that cannot be reached stops them after ``GRACE`` failed renewals in a row."""

    GRACE = 3

    def __init__(self, server: Server, keys: AttestedKeys, kid: str, tls: ServerTls, period: float, log: Log) -> None:
        self.server, self.keys, self.kid, self.tls, self.period, self.log = server, keys, kid, tls, period, log
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        from branchy_tee.core.errors import AttestationError

        while not self.stopping.wait(self.period):
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
            if new != self.server.allowed:
                self.server.context = self.tls.context_for(new)
                self.server.allowed = new
                self.log(f"allow-list renewed: {len(new)} data owner(s)")
            if self.server.state == "revoked":
                self.server.state = "ok"

    def _revoke(self, why: str) -> None:
        self.server.state = "revoked"
        self.log(f"{why}; no longer answering")
