"""The enclave's measured settings: environment variables that the Gramine manifest sets in
``loader.env``. They are part of MRENCLAVE, so inside an enclave they, and never the host's command
line, decide whom the enclave trusts (the model broker and its identity, the model it serves).

Defined here once; the build (manifest), the runtime (predict) and the simulated evidence provider
(which measures them together with the code) all import these names. Standard library only: the
enclave imports this module.
"""

from __future__ import annotations

import json
import re
from typing import Mapping

ENCLAVE = "BRANCHY_TEE_ENCLAVE"  # "1": running inside an enclave
ATTEST = "BRANCHY_TEE_ATTEST"  # evidence provider: gramine | simulated
MODEL_BROKER = "BRANCHY_TEE_MODEL_BROKER"  # the model owner's key broker URL ("" = none)
MODEL_BROKER_IDENTITY = "BRANCHY_TEE_MODEL_BROKER_IDENTITY"  # its Ed25519 identity (64 hex)
DATA_BROKERS = "BRANCHY_TEE_DATA_BROKERS"  # comma-separated default data-broker URLs
BUNDLE_ID = "BRANCHY_TEE_BUNDLE_ID"  # the one sealed bundle this enclave serves
MODEL_KEY_ID = "BRANCHY_TEE_MODEL_KEY_ID"  # the model key id that seals it
MIN_MODEL_VERSION = "BRANCHY_TEE_MIN_MODEL_VERSION"
ALLOW_PLAINTEXT = "BRANCHY_TEE_ALLOW_PLAINTEXT"  # "1": --plaintext-result allowed
BROKER_CA = "BRANCHY_TEE_BROKER_CA"  # CA certificate for HTTPS brokers (a trusted file)
DEV_KEY = "BRANCHY_TEE_DEV_KEY"  # simulated builds only: the shared development attestation key (trusted file)
ENTRY = "BRANCHY_TEE_ENTRY"  # "predict" or "serve": the one command this enclave runs
ALLOW_FULL_MODEL = "BRANCHY_TEE_ALLOW_FULL_MODEL"  # "1": --full-model (the thresholds ignored) allowed
SERVE_CAPS = "BRANCHY_TEE_SERVE_CAPS"  # serve builds: "max_connections=N,max_inflight_mib=N,max_queue=N"
SETTINGS_DIGEST = "BRANCHY_TEE_SETTINGS_SHA256"  # every other manifest value (gramine.config.settings_digest)

# Not a variable: a fixed path the manifest mounts as an in-enclave tmpfs (never host-backed) and
# the build refuses to mount anything over. The only place the enclave writes a secret to a file
# (the ssl module loads the TLS key from files only).
SECRETS_DIR = "/branchy-tee-secrets"

NAMES = (
    ENCLAVE,
    ATTEST,
    MODEL_BROKER,
    MODEL_BROKER_IDENTITY,
    DATA_BROKERS,
    BUNDLE_ID,
    MODEL_KEY_ID,
    MIN_MODEL_VERSION,
    ALLOW_PLAINTEXT,
    BROKER_CA,
    ENTRY,
    ALLOW_FULL_MODEL,
    SERVE_CAPS,
    SETTINGS_DIGEST,
)

# serve's limits that the build sizes the enclave for: inside the enclave the host may only lower them.
CAP_NAMES = ("max_connections", "max_inflight_mib", "max_queue")

# DEV_KEY is not in NAMES: owners who share one development key at different paths share the
# simulated measurement; their policies pin the key's public key instead (the release statement's).

IDENTITY_RE = re.compile(r"[0-9a-f]{64}")  # a raw Ed25519 public key, lower-case hex

# Ed25519 public keys of small order (libsodium's blocklist; the sign bit is ignored). Under such a
# key, signatures that verify for every message exist (OpenSSL does not refuse them), so it is no
# identity at all: refused wherever an identity is accepted.
_SMALL_ORDER = tuple(
    bytes.fromhex(h)
    for h in (
        "00" * 32,  # y = 0 (order 4)
        "01" + "00" * 31,  # y = 1 (order 1)
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "ec" + "ff" * 30 + "7f",  # y = p - 1 (order 2)
        "ed" + "ff" * 30 + "7f",  # y = p, a non-canonical 0
        "ee" + "ff" * 30 + "7f",  # y = p + 1, a non-canonical 1
    )
)


def identity_problem(identity: object) -> str | None:
    """Why ``identity`` (64 hex characters, or 32 raw bytes) is not a usable identity; None if it is."""
    if isinstance(identity, str):
        if not IDENTITY_RE.fullmatch(identity):
            return "is not an identity (64 lower-case hex characters, as `branchy-tee keygen --identity` prints)"
        identity = bytes.fromhex(identity)
    if not isinstance(identity, bytes) or len(identity) != 32:
        return "is not an identity (32 bytes)"
    masked = identity[:31] + bytes([identity[31] & 0x7F])
    if masked in _SMALL_ORDER:
        return "is a small-order Ed25519 key, under which anyone can sign anything: not an identity"
    return None


# Broker URLs are measured (manifest TOML strings, ',' separates the data brokers) and shown in
# messages: printable ASCII of RFC 3986, without quotes, backslashes, '$' or ','.
_URL_RE = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!&()*+;=%]+")


def broker_url_problem(url: object) -> str | None:
    """Why ``url`` cannot be a key broker's URL (None if it can): the one check the build and the
    enclave share, so that the build never measures a URL the enclave would refuse."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not _URL_RE.fullmatch(url):
        return "is not an http:// or https:// URL of printable ASCII (no spaces, quotes, '\\', '$' or ',')"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        return "is not a well-formed URL"
    if not parts.hostname:
        return "names no host"
    return None


def inside_enclave(env: Mapping[str, str]) -> bool:
    return env.get(ENCLAVE) == "1"


def settings(env: Mapping[str, str]) -> dict[str, str]:
    """Every measured setting's value in ``env`` ("" when unset), in a fixed order."""
    return {name: env.get(name, "") for name in NAMES}


def settings_bytes(env: Mapping[str, str]) -> bytes:
    """The canonical bytes of the measured settings (what simulated evidence measures)."""
    return json.dumps(settings(env), separators=(",", ":"), ensure_ascii=True).encode()


def settings_binding(env: Mapping[str, str]) -> bytes:
    """The second half of every REPORTDATA the enclave produces (32 bytes): SHA-256 of the measured
    settings it runs with (``settings_bytes``: every NAMES value, SETTINGS_DIGEST of the rest of the
    manifest among them), recomputed from its own environment, so that a broker or client that pins
    only the signer (MRSIGNER) still sees which settings it deals with. Zeros outside an enclave."""
    if not inside_enclave(env):
        return bytes(32)
    import hashlib

    return hashlib.sha256(b"branchy-tee/v1 settings\0" + settings_bytes(env)).digest()


def serve_caps_text(caps: Mapping[str, int]) -> str:
    return ",".join(f"{name}={int(caps[name])}" for name in CAP_NAMES)


def serve_caps(env: Mapping[str, str]) -> dict[str, int]:
    """The measured caps on serve's limits ({} when none are measured); ValueError when malformed."""
    text = env.get(SERVE_CAPS, "")
    if not text:
        return {}
    caps = dict(item.split("=", 1) for item in text.split(","))
    if sorted(caps) != sorted(CAP_NAMES) or not all(v.isascii() and v.isdigit() for v in caps.values()):
        raise ValueError(f"{SERVE_CAPS} is not {serve_caps_text(dict.fromkeys(CAP_NAMES, 0)).replace('0', 'N')}")
    return {name: int(caps[name]) for name in CAP_NAMES}
