"""The key-release wire format shared by the enclave (``client``) and the key broker (``broker``).

One exchange per broker::

    enclave                                        broker
    X25519 key pair (sk, pk), once per run
    GET  /v1/nonce                           ->    {"nonce": hex(40 bytes), "expires_in": s,
                                             <-     "key_ids": [ids this broker releases], ...}
    report_data = SHA-256("branchy-tee/v1" || pk || nonce) || 0^32
    evidence    = quote (gramine, DCAP) or signed document (simulated) carrying report_data
    POST /v1/keys {"protocol", "evidence_type", "evidence": b64, "public_key": hex(pk),
                   "nonce": hex, "key_ids": [...], "collateral": {...} (optional)}
                                             ->    verify evidence, policy, binding, nonce
                                             <-    {"keys": {kid: b64(HPKE enc || ct)},
                                                    "min_model_version": n, ...}

Each key is sealed with HPKE (RFC 9180, base mode) suite X25519 / HKDF-SHA256 / AES-256-GCM to
``pk``; ``info`` binds the protocol label, the key id and the nonce, and the plaintext is
``b"BTK1" || u64 min_model_version || key``. HPKE base mode does not authenticate the sender: the
enclave accepts a key only if its id (``seal.keys.key_id``, an HKDF of the key) is the id it asked
for, which nobody without the key can arrange, so the plaintext (min model version included) is
authentic once the id matches.

Standard library and ``cryptography`` only: the enclave imports this module.
"""

from __future__ import annotations

import hashlib
import re
import struct

from cryptography.hazmat.primitives import hpke

PROTOCOL = "branchy-tee/v1"
LABEL = PROTOCOL.encode()
SUITE_NAME = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

EVIDENCE_DCAP = "dcap"  # an SGX DCAP quote (gramine provider)
EVIDENCE_SIMULATED = "simulated"  # a dev-key-signed document (simulated provider)
EVIDENCE_TYPES = (EVIDENCE_DCAP, EVIDENCE_SIMULATED)

PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 40  # issued-at ms (8) || random (16) || tag (16), see broker.NonceBook
REPORT_DATA_BYTES = 64
MAX_KEY_IDS = 64
MAX_BODY = 64 * 1024  # request body limit of the broker
MAX_RESPONSE = 1 << 20  # response size limit of the client

KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_KEY_MAGIC = b"BTK1"


def report_data(public_key: bytes, nonce: bytes) -> bytes:
    """REPORTDATA binding the enclave's public key to the broker's nonce (64 bytes)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must be {PUBLIC_KEY_BYTES} bytes")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    return hashlib.sha256(LABEL + public_key + nonce).digest() + bytes(32)


def key_info(kid: str, nonce: bytes) -> bytes:
    """HPKE ``info`` for one released key."""
    return LABEL + b" key\0" + kid.encode("ascii") + b"\0" + nonce


def pack_key(key: bytes, min_model_version: int) -> bytes:
    return _KEY_MAGIC + struct.pack(">Q", min_model_version) + key


def unpack_key(plaintext: bytes) -> tuple[bytes, int]:
    """(key, min_model_version); ValueError when malformed."""
    if len(plaintext) != len(_KEY_MAGIC) + 8 + 32 or plaintext[:4] != _KEY_MAGIC:
        raise ValueError("malformed key record")
    (min_version,) = struct.unpack(">Q", plaintext[4:12])
    return plaintext[12:], min_version
