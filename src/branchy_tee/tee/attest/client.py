"""Enclave side of attested key release: a :class:`~branchy_tee.tee.keysource.KeySource` whose
keys come from the owners' key brokers after remote attestation (wire format: ``protocol``).

One X25519 key pair per run. Per broker: ``GET /v1/nonce`` (which also lists the key ids the broker
releases), evidence over ``report_data(public key, nonce)``, ``POST /v1/keys`` for the ids wanted
from it. A response counts only if its signature verifies under the identity expected of that
broker, over this run's public key and nonce and everything the enclave acts on; then each key is
HPKE-opened and accepted only if its id is the id asked for.

Whom the enclave trusts: the model broker's identity is given (inside an enclave: measured). Its
signed release carries the model owner's ``allowed_data_owners``; data keys are taken only from
brokers whose identity is on that list, whatever URL the host gives for them, and not at all when
the list is missing or empty. Each data key id is asked of the first data broker that lists it; if
that broker's identity is not on the list the run is refused (before any evidence is sent to it).
Several data owners, each with their own broker, work in one run. The minimum model version
is the largest of the caller's and every broker's (signed, and inside the sealed key record).

Trusted computing base: standard library (``urllib``), ``cryptography`` and branchy_tee's
errors/fileio/seal.keys and tee.attest.protocol/providers only.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from branchy_tee.core.errors import AttestationError, BranchyError, one_line, shown
from branchy_tee.core.keys import KEY_ID_RE, key_id
from branchy_tee.tee.attest.identity import verify as verify_signature
from branchy_tee.tee.attest.protocol import (
    MAX_RESPONSE,
    PROTOCOL,
    RELEASE_PURPOSE,
    SUITE,
    KeyRelease,
    KeyRequest,
    MessageError,
    NonceOffer,
    key_info,
    report_data,
    unpack_key,
)
from branchy_tee.tee.attest.providers import DEFAULT_ATTESTATION_DIR, EvidenceSource, make_provider
from branchy_tee.tee.measured import broker_url_problem

__all__ = ["AttestedKeys", "BrokerOffer"]


def _broker_url(url: str, what: str) -> str:
    if not isinstance(url, str) or not url:
        raise BranchyError(f"{what}: no URL given")
    problem = broker_url_problem(url)
    if problem:
        raise BranchyError(f"{what} {shown(url)} {problem}")
    return url.rstrip("/")


@dataclass(frozen=True)
class BrokerOffer:
    """A broker's answer to GET /v1/nonce."""

    url: str
    nonce: bytes
    key_ids: tuple[str, ...]
    identity: bytes | None = None  # as the broker claims it (unauthenticated: the signed release decides)


class AttestedKeys:
    """Keys by remote attestation from the owners' brokers (``predict --attest gramine|simulated``)."""

    def __init__(
        self,
        attest: str,
        model_broker: str,
        model_broker_identity: bytes,
        data_brokers: str | Sequence[str],
        attestation_dir: str = DEFAULT_ATTESTATION_DIR,
        ca_file: str | None = None,
        min_version: int = 0,
        *,
        dev_key: str | os.PathLike[str] | None = None,
        settings: bytes = bytes(32),
        timeout: float = 30.0,
        provider: EvidenceSource | None = None,
    ) -> None:
        self.provider = (
            provider
            if provider is not None
            else make_provider(attest, attestation_dir=attestation_dir, dev_key=dev_key)
        )
        self.model_broker = _broker_url(model_broker, "model key broker")
        if not isinstance(model_broker_identity, bytes) or len(model_broker_identity) != 32:
            raise BranchyError("the model key broker's identity must be 32 bytes (its Ed25519 public key)")
        self.model_broker_identity = model_broker_identity
        self.allowed_data_owners: tuple[bytes, ...] | None = None  # from the model broker's signed release
        if isinstance(data_brokers, str):
            data_brokers = [data_brokers]
        self.data_brokers = [_broker_url(u, "data key broker") for u in data_brokers]
        self.timeout = timeout
        self.settings = settings  # REPORTDATA's second half (measured.settings_binding)
        self._min_version = int(min_version)
        self._sk = X25519PrivateKey.generate()  # one key pair per run; never leaves the enclave
        self.public_key = self._sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # talk to the brokers directly
        if ca_file:
            try:
                ctx = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise BranchyError(f"cannot load broker CA certificate {ca_file}: {e}") from None
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        self._opener = urllib.request.build_opener(*handlers)
        self._model: dict[str, bytes] = {}
        self.sources: dict[str, str] = {}  # key id -> broker URL that released it
        self.identities: dict[str, str] = {}  # key id -> identity (hex) of the broker that signed it
        self._plaintext: dict[str, bool] = {}  # data key id -> its owner's signed consent to plaintext results

    # ---- KeySource
    def model_key(self, kid: str) -> bytes:
        if not isinstance(kid, str) or not KEY_ID_RE.fullmatch(kid):
            raise BranchyError(f"model key id {shown(kid)} is not a key id (16 lower-case hex digits)")
        if kid not in self._model:
            offer = self.offer(self.model_broker)
            if kid not in offer.key_ids:
                raise BranchyError(
                    f"model key broker {offer.url} does not release model key id {kid} "
                    f"(it releases: {', '.join(offer.key_ids) or 'none'})"
                )
            keys, release = self.exchange(offer, [kid], self.model_broker_identity)
            self._model.update(keys)
            self.allowed_data_owners = release.allowed_data_owners or ()
        return self._model[kid]

    def renew(self, kid: str) -> tuple[bytes, ...]:
        """Attest to the model broker again (a long-running server does this periodically): the model
        owner may have changed the allow-list, or revoked the deployment. Returns the new allow-list;
        raises like :meth:`model_key` when the broker refuses."""
        self._model.pop(kid, None)
        self.model_key(kid)
        return self.allowed_data_owners or ()

    def data_keys(self, kids: list[str]) -> dict[str, bytes]:
        bad = [k for k in kids if not isinstance(k, str) or not KEY_ID_RE.fullmatch(k)]
        if bad:
            raise BranchyError(f"data key id {shown(bad[0])} is not a key id (16 lower-case hex digits)")
        if self.allowed_data_owners is None:
            raise BranchyError("data keys are fetched after the model key (its broker says who may use the model)")
        if not self.allowed_data_owners:
            raise AttestationError(
                f"the model owner's broker {self.model_broker} allows no data owner to use this model "
                "(its policy has no allowed_data_owners); no data key is used"
            )
        remaining = list(dict.fromkeys(kids))
        out: dict[str, bytes] = {}
        for url in self.data_brokers:
            if not remaining:
                break
            offer = self.offer(url)
            mine = [k for k in remaining if k in offer.key_ids]
            if mine and offer.identity not in self.allowed_data_owners:
                # refuse before sending evidence (the signed release would be refused anyway)
                who = offer.identity.hex() if offer.identity else "none given"
                raise AttestationError(
                    f"data key broker {url} has identity {who}, which the model owner does not "
                    "allow to use this model (not in allowed_data_owners); its keys are refused"
                )
            if mine:
                out.update(self.exchange(offer, mine, None)[0])
                remaining = [k for k in remaining if k not in out]
        if remaining:
            raise BranchyError(
                f"no data key broker releases data key id(s) {', '.join(remaining)} "
                f"(asked {', '.join(self.data_brokers) or 'none'})"
            )
        return out

    def min_model_version(self) -> int:
        return self._min_version

    def plaintext_allowed(self, kid: str) -> bool:
        return self._plaintext.get(kid, False) and kid not in self._model

    # ---- protocol steps
    def offer(self, url: str) -> BrokerOffer:
        """GET /v1/nonce: a fresh nonce and the key ids the broker releases."""
        try:
            offer = NonceOffer.parse(self._call(url, "GET", "/v1/nonce"))
        except MessageError as e:
            raise AttestationError(f"key broker {url}: malformed nonce response ({e})") from None
        return BrokerOffer(url, offer.nonce, offer.key_ids, offer.identity)

    def exchange(
        self, offer: BrokerOffer, kids: list[str], expect: bytes | None
    ) -> tuple[dict[str, bytes], KeyRelease]:
        """Attest to one broker with its nonce; return the keys ``kids`` it released and its signed release.

        ``expect``: the identity the release must be signed by (the model broker's), or None for a
        data broker, whose identity must then be on the model owner's allow-list."""
        url, nonce = offer.url, offer.nonce
        evidence = self.provider.evidence(report_data(self.public_key, nonce, self.settings))
        body = KeyRequest(self.provider.evidence_type, evidence, self.public_key, nonce, tuple(kids)).to_json()
        release = self.verify_release(
            url, self._call(url, "POST", "/v1/keys", json.dumps(body).encode()), nonce, kids, expect
        )
        out: dict[str, bytes] = {}
        min_version = release.min_model_version
        for kid, ct in release.keys:
            try:
                key, sealed_version = unpack_key(SUITE.decrypt(ct, self._sk, info=key_info(kid, nonce)))
            except (InvalidTag, ValueError, TypeError):
                raise AttestationError(
                    f"key broker {url}: sealed key {kid} does not open (tampered or misdirected)"
                ) from None
            if key_id(key) != kid:  # only the key's owner can produce a key with this id
                raise AttestationError(f"key broker {url}: returned a key with id {key_id(key)} for key id {kid}")
            out[kid] = key
            self._plaintext[kid] = release.plaintext_results
            self.sources[kid] = url
            self.identities[kid] = release.broker.hex()
            min_version = max(min_version, sealed_version)
        self._min_version = max(self._min_version, min_version)
        return out, release

    def verify_release(
        self, url: str, doc: dict[str, Any], nonce: bytes, kids: list[str], expect: bytes | None
    ) -> KeyRelease:
        """The signed release in ``doc``, checked: well-formed, exactly the key ids asked for, signed over
        this run's nonce and public key by the expected identity (or, for a data broker, by an identity
        on the model owner's allow-list)."""
        try:
            release, signature = KeyRelease.parse(doc, nonce, self.public_key)
        except MessageError as e:
            raise AttestationError(f"key broker {url}: {e}") from None
        if expect is not None and release.broker != expect:
            raise AttestationError(
                f"key broker {url} answered with identity {release.broker.hex()}, not the expected "
                f"{expect.hex()} (impersonated, or the wrong broker at that address)"
            )
        if expect is None and release.broker not in (self.allowed_data_owners or ()):
            raise AttestationError(
                f"data key broker {url} has identity {release.broker.hex()}, which the model owner "
                "does not allow to use this model (not in allowed_data_owners); its keys are refused"
            )
        if not verify_signature(release.broker, RELEASE_PURPOSE, release.message(), signature):
            raise AttestationError(
                f"key broker {url}: the key release's signature does not verify under identity "
                f"{release.broker.hex()} (forged or tampered)"
            )
        if sorted(kid for kid, _ in release.keys) != sorted(set(kids)):
            raise AttestationError(f"key broker {url}: response does not hold exactly the key ids asked for")
        return release

    def _call(self, base: str, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            base + path,
            data=body,
            method=method,
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "branchy-tee-enclave/1",
            },
        )
        deadline = time.monotonic() + self.timeout  # for the whole answer: a broker dripping bytes is cut off
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                chunks, size = [], 0
                while size <= MAX_RESPONSE:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no complete answer within {self.timeout:g} s")
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                data = b"".join(chunks)
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read(8192)).get("error") or e.reason
            except Exception:  # noqa: BLE001 -- any unreadable error body
                reason = e.reason
            raise AttestationError(f"key broker {base} refused: {one_line(reason)} (HTTP {e.code})") from None
        except urllib.error.URLError as e:
            hint = (
                " (is the broker serving plain HTTP? give an http:// URL, or start it with --tls-cert)"
                if base.startswith("https://") and "WRONG_VERSION_NUMBER" in str(e.reason)
                else ""
            )
            raise BranchyError(f"key broker {base} is unreachable: {one_line(e.reason)}{hint}") from None
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, malformed HTTP
            raise BranchyError(f"key broker {base} is unreachable: {one_line(e) or type(e).__name__}") from None
        if len(data) > MAX_RESPONSE:
            raise AttestationError(f"key broker {base}: response larger than {MAX_RESPONSE} bytes")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise AttestationError(f"key broker {base}: response is not a JSON object")
        if doc.get("protocol", PROTOCOL) != PROTOCOL:
            raise AttestationError(f"key broker {base} speaks {one_line(doc.get('protocol'), 40)}, not {PROTOCOL}")
        return doc
