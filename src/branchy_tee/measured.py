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

NAMES = (ENCLAVE, ATTEST, MODEL_BROKER, MODEL_BROKER_IDENTITY, DATA_BROKERS, BUNDLE_ID, MODEL_KEY_ID,
         MIN_MODEL_VERSION, ALLOW_PLAINTEXT, BROKER_CA)  # fmt: skip

IDENTITY_RE = re.compile(r"[0-9a-f]{64}")  # a raw Ed25519 public key, lower-case hex


def inside_enclave(env: Mapping[str, str]) -> bool:
    return env.get(ENCLAVE) == "1"


def settings(env: Mapping[str, str]) -> dict[str, str]:
    """Every measured setting's value in ``env`` ("" when unset), in a fixed order."""
    return {name: env.get(name, "") for name in NAMES}


def settings_bytes(env: Mapping[str, str]) -> bytes:
    """The canonical bytes of the measured settings (what simulated evidence measures)."""
    return json.dumps(settings(env), separators=(",", ":"), ensure_ascii=True).encode()
