"""atheris: the key broker's request handling (attest.broker.Broker.request_keys, no HTTP), with the
simulated-evidence parser behind it. Placeholders in the input become the broker's real key id
(``0123456789abcdef``) and a nonce it just issued (80 ``0`` digits), so mutations get past the early
checks. Every request must end in a 4xx Refusal with a one-line reason: a 500 is a bug, a grant a hole."""

import sys

import atheris

import common

with atheris.instrument_imports(include=["branchy_tee"]):
    from branchy_tee.broker.broker import Broker, Refusal
    from branchy_tee.core.keys import generate_key, key_id

_KEY = generate_key()
BROKER = Broker([_KEY], {"allowed_mrenclave": ["00" * 32], "allow_simulation": True})
KID = key_id(_KEY).encode()


def TestOneInput(data: bytes) -> None:
    body = data.replace(b"0123456789abcdef", KID).replace(b"0" * 80, BROKER.nonces.issue().hex().encode())
    try:
        BROKER.request_keys(body, "127.0.0.1")
    except Refusal as r:
        if r.status >= 500 or "\n" in r.reason:
            raise common.Finding(f"HTTP {r.status} {r.code}: {r.reason}") from None
        return
    raise common.Finding("granted a key to a fuzzed request")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
