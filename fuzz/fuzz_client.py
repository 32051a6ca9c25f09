"""atheris: the enclave client's parsing of key broker responses (attest.client.AttestedKeys), the
way a host between enclave and broker could change them. The input is the GET /v1/nonce response,
a NUL byte, then the POST /v1/keys response; they are served by a canned HTTP handler to a client
whose key pair is the one the seed responses were sealed to. Only BranchyError (one line) may
escape, and a key that comes out must be the real one."""

import json
import sys
import urllib.request

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.core.errors import BranchyError
    from branchy_tee.tee.attest.client import AttestedKeys

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from campaign import _Canned, _StubProvider  # noqa: E402

REC = json.loads((common.WORLD / "client-exchange.json").read_text())
SK = X25519PrivateKey.from_private_bytes(bytes.fromhex(REC["sk"]))
PK = bytes.fromhex(REC["pk"])
KEY = bytes.fromhex(REC["key"])
IDENTITY = bytes.fromhex(REC["identity"])  # the recorded broker's: the one the client expects


def TestOneInput(data: bytes) -> None:
    nonce_body, _, keys_body = data.partition(b"\0")
    ak = AttestedKeys(
        "simulated", "http://broker.invalid:1", IDENTITY, ["http://broker.invalid:1"], provider=_StubProvider()
    )
    ak._sk, ak.public_key = SK, PK
    ak._opener = urllib.request.build_opener(_Canned({"/v1/nonce": nonce_body, "/v1/keys": keys_body}))
    try:
        key = ak.model_key(REC["kid"])
    except BranchyError as e:
        common.one_line(e)
        return
    if key != KEY:
        raise common.Finding("the client accepted a key that is not the broker's")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
