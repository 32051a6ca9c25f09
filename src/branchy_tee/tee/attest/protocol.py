"""The key-release wire format shared by the enclave (``client.online``) and the key broker (``broker``).

One exchange per broker::

    enclave                                        broker (Ed25519 identity I)
    X25519 key pair (sk, pk), once per run
    GET  /v1/nonce                           ->    {"nonce": hex(40 bytes), "expires_in": s,
                                             <-     "key_ids": [ids this broker releases], ...}
    report_data = SHA-256("branchy-tee/v1" || pk || nonce) || settings digest (32 bytes, see below)
    evidence    = quote (gramine, DCAP) or signed document (simulated) carrying report_data
    POST /v1/keys {"protocol", "evidence_type", "evidence": b64, "public_key": hex(pk),
                   "nonce": hex, "key_ids": [...], "collateral": {...} (optional)}
                                             ->    verify evidence, policy, binding, nonce
                                             <-    {"identity": hex(I), "keys": {kid: b64(HPKE enc || ct)},
                                                    "min_model_version": n,
                                                    "allowed_data_owners": [hex, ...] | null,
                                                    "signature": hex(Ed25519 by I over KeyRelease.message)}

Each key is sealed with HPKE (RFC 9180, base mode) suite X25519 / HKDF-SHA256 / AES-256-GCM to
``pk``; ``info`` binds the protocol label, the key id and the nonce, and the plaintext is
``b"BTK1" || u64 min_model_version || key``. HPKE base mode does not authenticate the sender, so
the broker signs the whole release with its identity: the enclave's public key, the nonce, every
key id with its sealed key, the minimum model version and the allow-list of data owners
(``KeyRelease.message``, a length-prefixed binary encoding). The enclave accepts a release only under
the identity it expects (the model broker's is measured; a data broker's must be on the model
owner's signed allow-list), and a key only if its id (``core.keys.key_id``, an HKDF of the key) is
the id it asked for.

Standard library and ``cryptography`` only: the enclave imports this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hpke

from branchy_tee.core.choices import Choice
from branchy_tee.core.keys import KEY_BYTES, KEY_ID_RE
from branchy_tee.core.strict import hex_member

PROTOCOL = "branchy-tee/v1"
LABEL = PROTOCOL.encode()
SUITE_NAME = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class EvidenceType(Choice):
    """What a key request's evidence is (its ``evidence_type``)."""

    DCAP = "dcap"  # an SGX DCAP quote (gramine provider)
    SIMULATED = "simulated"  # a dev-key-signed document (simulated provider)


PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 40  # issued-at ms (8) || random (16) || tag (16), see broker.NonceBook
MAX_KEY_IDS = 64
MAX_BODY = 64 * 1024  # request body limit of the broker
MAX_RESPONSE = 1 << 20  # response size limit of the client

_KEY_MAGIC = b"BTK1"


def report_data(public_key: bytes, nonce: bytes, settings: bytes = bytes(32)) -> bytes:
    """REPORTDATA binding the enclave's public key to the broker's nonce (the first 32 bytes), and the
    enclave's measured settings digest (``measured.settings_binding``, the last 32), which a policy that
    pins only MRSIGNER checks (``allowed_settings``)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must be {PUBLIC_KEY_BYTES} bytes")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    if len(settings) != 32:
        raise ValueError("the settings digest must be 32 bytes")
    return hashlib.sha256(LABEL + public_key + nonce).digest() + settings


def key_info(kid: str, nonce: bytes) -> bytes:
    """HPKE ``info`` for one released key."""
    return LABEL + b" key\0" + kid.encode("ascii") + b"\0" + nonce


def pack_key(key: bytes, min_model_version: int) -> bytes:
    return _KEY_MAGIC + struct.pack(">Q", min_model_version) + key


def unpack_key(plaintext: bytes) -> tuple[bytes, int]:
    """(key, min_model_version); ValueError when malformed."""
    if len(plaintext) != len(_KEY_MAGIC) + 8 + KEY_BYTES or plaintext[:4] != _KEY_MAGIC:
        raise ValueError("malformed key record")
    (min_version,) = struct.unpack(">Q", plaintext[4:12])
    return plaintext[12:], min_version


# --------------------------------------------------------------------------- typed messages
class MessageError(ValueError):
    """A message that is not what the protocol says (one-line reason, no secrets)."""


def _hexfield(doc: dict[str, Any], name: str, size: int) -> bytes:
    return hex_member(doc, name, size, MessageError)


def _b64field(doc: dict[str, Any], name: str, limit: int) -> bytes:
    v = doc.get(name)
    if not isinstance(v, str):
        raise MessageError(f"'{name}' must be a base64 string")
    if len(v) > limit * 4 // 3 + 4:
        raise MessageError(f"'{name}' is too large")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"'{name}' is not valid base64") from None


def _json_object(body: bytes | dict[str, Any], what: str) -> dict[str, Any]:
    import json

    if isinstance(body, dict):
        return body
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise MessageError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise MessageError(f"{what} must be a JSON object")
    return doc


def _key_ids(v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or len(v) > MAX_KEY_IDS or not all(isinstance(k, str) for k in v):
        raise MessageError(f"'key_ids' must be a list of 1..{MAX_KEY_IDS} key ids")
    bad = [k for k in v if not KEY_ID_RE.fullmatch(k)]
    if bad:
        raise MessageError(f"'key_ids': {ascii(bad[0][:40])} is not a key id (16 lower-case hex digits)")
    return tuple(dict.fromkeys(v))


@dataclass(frozen=True)
class NonceOffer:
    """GET /v1/nonce: a single-use nonce, the key ids the broker releases, and its identity (claimed
    here, unauthenticated: the signed release decides)."""

    nonce: bytes
    key_ids: tuple[str, ...]
    identity: bytes | None
    expires_in: float

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "identity": self.identity.hex() if self.identity else None,
            "nonce": self.nonce.hex(),
            "expires_in": self.expires_in,
            "key_ids": list(self.key_ids),
        }

    @classmethod
    def parse(cls, body: bytes | dict[str, Any]) -> "NonceOffer":
        doc = _json_object(body, "nonce response")
        nonce = _hexfield(doc, "nonce", NONCE_BYTES)
        kids = doc.get("key_ids", [])
        if (
            not isinstance(kids, list)
            or len(kids) > MAX_KEY_IDS
            or not all(isinstance(k, str) and KEY_ID_RE.fullmatch(k) for k in kids)
        ):
            raise MessageError("'key_ids' must be a list of key ids")
        identity = _hexfield(doc, "identity", IDENTITY_BYTES) if doc.get("identity") is not None else None
        ttl = doc.get("expires_in", 0)
        return cls(nonce, tuple(kids), identity, float(ttl) if isinstance(ttl, (int, float)) else 0.0)


@dataclass(frozen=True)
class KeyRequest:
    """POST /v1/keys: evidence bound to the enclave's public key and the broker's nonce, and the key
    ids wanted. ``collateral`` (dcap-qvl layout) is used only where the broker's policy accepts it."""

    evidence_type: EvidenceType
    evidence: bytes
    public_key: bytes
    nonce: bytes
    key_ids: tuple[str, ...]
    collateral: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "protocol": PROTOCOL,
            "evidence_type": self.evidence_type,
            "evidence": base64.b64encode(self.evidence).decode(),
            "public_key": self.public_key.hex(),
            "nonce": self.nonce.hex(),
            "key_ids": list(self.key_ids),
        }
        if self.collateral is not None:
            doc["collateral"] = self.collateral
        return doc

    @classmethod
    def parse(cls, body: bytes | dict[str, Any]) -> "KeyRequest":
        """Every member checked in turn (MessageError names the first that is wrong)."""
        doc = _json_object(body, "request body")
        if doc.get("protocol", PROTOCOL) != PROTOCOL:
            raise MessageError(
                f"unsupported protocol {ascii(str(doc.get('protocol'))[:40])}; this broker speaks {PROTOCOL}"
            )
        etype = doc.get("evidence_type")
        if etype not in EvidenceType.names():
            raise MessageError(f"'evidence_type' must be one of {', '.join(EvidenceType.names())}")
        kids = _key_ids(doc.get("key_ids"))
        public_key = _hexfield(doc, "public_key", PUBLIC_KEY_BYTES)
        nonce = _hexfield(doc, "nonce", NONCE_BYTES)
        evidence = _b64field(doc, "evidence", MAX_BODY)
        if not evidence:
            raise MessageError("'evidence' is empty")
        collateral = doc.get("collateral")
        if collateral is not None and not isinstance(collateral, dict):
            raise MessageError("'collateral' must be a JSON object (dcap-qvl layout)")
        return cls(EvidenceType(etype), evidence, public_key, nonce, kids, collateral)


# --------------------------------------------------------------------------- signed key release
RELEASE_PURPOSE = b"key-release"
IDENTITY_BYTES = 32
MAX_ALLOWED_DATA_OWNERS = 4096


@dataclass(frozen=True)
class KeyRelease:
    """Everything a key-release response says that the enclave acts on (all of it signed)."""

    broker: bytes  # the broker's identity (raw Ed25519 public key)
    nonce: bytes
    public_key: bytes  # the enclave's X25519 public key the keys are sealed to
    keys: tuple[tuple[str, bytes], ...]  # (key id, HPKE enc || ciphertext), sorted by key id
    min_model_version: int
    allowed_data_owners: tuple[bytes, ...] | None  # None: this broker says nothing about data owners
    plaintext_results: bool = False  # a data owner's consent to plaintext results of its requests

    def message(self) -> bytes:
        """The canonical bytes a broker signs: fixed-size fields as they are, variable ones length-prefixed,
        lists sorted, so that two releases have the same bytes exactly when they say the same thing."""
        out = [
            LABEL,
            b"\0",
            self.broker,
            struct.pack(">H", len(self.nonce)),
            self.nonce,
            self.public_key,
            struct.pack(">I", len(self.keys)),
        ]
        for kid, sealed in sorted(self.keys):
            k = kid.encode("ascii")
            out += [struct.pack(">H", len(k)), k, struct.pack(">I", len(sealed)), sealed]
        out.append(struct.pack(">Q", self.min_model_version))
        if self.allowed_data_owners is None:
            out.append(b"\0")
        else:
            owners = sorted(set(self.allowed_data_owners))
            out += [b"\1", struct.pack(">I", len(owners)), *owners]
        out.append(b"\1" if self.plaintext_results else b"\0")
        return b"".join(out)

    def to_json(self, signature: bytes) -> dict[str, Any]:
        """The JSON of a signed release (the broker's POST /v1/keys answer)."""
        return {
            "protocol": PROTOCOL,
            "suite": SUITE_NAME,
            "identity": self.broker.hex(),
            "keys": {kid: base64.b64encode(sealed).decode() for kid, sealed in self.keys},
            "min_model_version": self.min_model_version,
            "allowed_data_owners": None
            if self.allowed_data_owners is None
            else sorted(o.hex() for o in self.allowed_data_owners),
            "plaintext_results": self.plaintext_results,
            "signature": signature.hex(),
        }

    @classmethod
    def parse(cls, doc: dict[str, Any], nonce: bytes, public_key: bytes) -> "tuple[KeyRelease, bytes]":
        """(release, signature) from a response, for the nonce and public key the enclave used;
        MessageError when a member is missing or malformed. The signature is not checked here."""
        try:
            broker = _hexfield(doc, "identity", IDENTITY_BYTES)
            signature = _hexfield(doc, "signature", 64)
            keys_doc, version, owners_doc = doc["keys"], doc["min_model_version"], doc["allowed_data_owners"]
            plaintext = doc["plaintext_results"]
            if not isinstance(plaintext, bool):
                raise MessageError("'plaintext_results' must be true or false")
            if not isinstance(keys_doc, dict) or not 0 < len(keys_doc) <= MAX_KEY_IDS:
                raise MessageError("'keys' must map 1..64 key ids to sealed keys")
            keys = []
            for kid, sealed in keys_doc.items():
                if not KEY_ID_RE.fullmatch(kid) or not isinstance(sealed, str):
                    raise MessageError("'keys' must map key ids to base64 strings")
                keys.append((kid, base64.b64decode(sealed, validate=True)))
            if type(version) is not int or not 0 <= version < 1 << 63:
                raise MessageError("'min_model_version' must be an integer")
            owners = None
            if owners_doc is not None:
                if not isinstance(owners_doc, list) or len(owners_doc) > MAX_ALLOWED_DATA_OWNERS:
                    raise MessageError("'allowed_data_owners' must be a list of identities")
                owners = tuple(_hexfield({"o": o}, "o", IDENTITY_BYTES) for o in owners_doc)
        except (KeyError, TypeError, binascii.Error, ValueError) as e:
            why = e if isinstance(e, MessageError) else "a member is missing"
            raise MessageError(f"malformed key release ({why})") from None
        return cls(broker, nonce, public_key, tuple(sorted(keys)), version, owners, plaintext), signature
