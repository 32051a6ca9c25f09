"""Tamper campaign: random single-byte flips, truncations and extensions of every artifact the host
can touch, each fed to the code that consumes it.

    python fuzz/campaign.py --trials 1000        # what `make fuzz` runs
    pytest tests/security/test_tamper_campaign.py           # a short version (make test)

Artifacts and consumers:

- ``bundle/header.json``, ``bundle/stage-0k.bin``: ``predict`` (in-process, key files); thresholds
  are off, so every stage file is decrypted.
- ``request``: ``predict``.  ``result``: ``decrypt-result --request --out``.
- ``result replayed``: an old authentic result (tampered or not) offered as the answer to a new
  request that reuses its request id: ``decrypt-result --request NEW`` must refuse every trial.
- ``quote/<name>``: real DCAP quotes (../shared/testdata/sgx-quotes) through ``verify_quote`` with
  their collateral (or CRLs) at a time inside its validity; ``collateral/phala-1``: the collateral
  JSON an enclave may send along with its quote.
- ``broker/POST /v1/keys``: a fresh, valid key request (simulated evidence) per trial, tampered,
  then POSTed to a running key broker over loopback.
- ``client/GET /v1/nonce response``, ``client/POST /v1/keys response``: a recorded broker
  response, tampered and fed to the enclave client's parsing path (``AttestedKeys.model_key``)
  through a canned HTTP handler.
- ``client/impersonated model broker``: the host answers at the model broker's address: a recorded
  key release, tampered, then re-signed with the host's own identity (and, in every other trial,
  carrying the host's own key for the measured key id). The enclave must refuse every trial.

Each trial ends in one of:

rejected   the consumer refused with a declared error whose message is one line (broker: a 4xx
           JSON error, and it still answers /v1/health), and wrote nothing: no output file, no
           temporary file (predict, decrypt-result), no key released (broker).
benign     the consumer accepted, and what it produced is identical to the untampered run
           (same answers, same claims, same keys) *and* the authenticated content is identical:
           the change was only in bytes that carry no authenticated meaning, and each such trial
           is explained (e.g. padding after a quote's signature data, JSON whitespace in a broker
           message, hex digit case). A byte change of authenticated content is never benign.
accepted   the consumer accepted something different from the authentic input: a real finding.
crash      an undeclared exception, a traceback, a multi-line message, or output left behind.

``accepted`` and ``crash`` must be 0.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
import urllib.parse
import urllib.request
import urllib.response
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "security")]  # world, runs: the tests' helpers
from world import SGX_QUOTES, World, build_world, quiet_call  # noqa: E402

MODES = ("flip", "truncate", "extend")
PHALA_NOW = datetime(2025, 6, 20, tzinfo=timezone.utc)
MOBILECOIN_NOW = datetime(2023, 5, 1, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- tampering
def tamper(data: bytes, mode: str, rng: random.Random) -> tuple[bytes, str]:
    """(tampered bytes, description). Every result differs from ``data``."""
    if mode == "flip" or (mode == "truncate" and not data):
        if not data:
            return b"\0", "flip of an empty file: one byte"
        pos = rng.randrange(len(data))
        b = bytearray(data)
        b[pos] ^= rng.randrange(1, 256)
        return bytes(b), f"flip@{pos}"
    if mode == "truncate":
        n = rng.randrange(len(data))
        return data[:n], f"truncate to {n} of {len(data)}"
    n = rng.choice([1, 1, 2, 3, 8, 16, 17, 64, 4112])
    extra = bytes(rng.randrange(256) for _ in range(n))
    return data + extra, f"extend by {n}"


@dataclass
class Outcome:
    kind: str  # rejected | benign | accepted | crash
    detail: str


@dataclass
class Row:
    artifact: str
    trials: int = 0
    rejected: int = 0
    benign: int = 0
    accepted: int = 0
    crashes: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    benign_why: Counter = field(default_factory=Counter)
    findings: list = field(default_factory=list)

    def add(self, outcome: Outcome, what: str) -> None:
        self.trials += 1
        if outcome.kind == "rejected":
            self.rejected += 1
            self.reasons[_reason_class(outcome.detail)] += 1
        elif outcome.kind == "benign":
            self.benign += 1
            self.benign_why[outcome.detail] += 1
        else:
            if outcome.kind == "accepted":
                self.accepted += 1
            else:
                self.crashes += 1
            if len(self.findings) < 20:
                self.findings.append(f"{what}: {outcome.kind}: {outcome.detail}")

    def as_dict(self) -> dict:
        return {
            "artifact": self.artifact,
            "trials": self.trials,
            "rejected": self.rejected,
            "benign": self.benign,
            "accepted": self.accepted,
            "crashes": self.crashes,
            "seconds": round(self.seconds, 2),
            "top_reasons": self.reasons.most_common(6),
            "benign_why": dict(self.benign_why),
            "findings": self.findings,
        }


def _reason_class(msg: str) -> str:
    """A reason without its variable parts (paths, numbers, hex), to count reasons by kind."""
    msg = re.sub(r"(/[^\s:]+)+", "<path>", msg)
    msg = re.sub(r"\b[0-9a-f]{16,}\b", "<hex>", msg)
    msg = re.sub(r"\d+", "N", msg)
    return msg[:150]


def _one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip() and "Traceback" not in text


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# --------------------------------------------------------------------------- targets
class Target:
    name = "?"

    def pristine(self, rng: random.Random) -> bytes:
        return self.data

    def run(self, tampered: bytes) -> Outcome:
        raise NotImplementedError

    def close(self) -> list[str]:
        """Checks at the end of the campaign; returns problems found."""
        return []


class PredictTarget(Target):
    """A bundle file or the request, consumed by predict."""

    def __init__(self, world: World, work: Path, which: str):
        self.world, self.which = world, which
        self.out = work / "predict-out"
        self.out.mkdir(parents=True, exist_ok=True)
        if which == "request":
            self.name = "request (predict)"
            self.path = work / "tampered.req"
        else:
            self.name = f"bundle/{which}"
            self.path = world.bundle / which
        self.data = (world.requests["do1"] if which == "request" else self.path).read_bytes()
        argv = world.predict_argv(("do1",), self.out, "--stats-json", str(self.out / "stats.json"))
        if which == "request":
            argv[argv.index(str(world.requests["do1"]))] = str(self.path)
        self.argv = argv

    def run(self, tampered: bytes) -> Outcome:
        from branchy_tee.client.envelopes import open_result
        from branchy_tee.tee import predict

        self.path.write_bytes(tampered)
        try:
            try:
                rc, _, err = quiet_call(predict.main, self.argv)
            except BaseException:  # noqa: BLE001 -- a crash is a finding
                return Outcome("crash", traceback.format_exc(limit=3).strip().splitlines()[-1])
            left = _files(self.out)
            if rc == 1:
                if not _one_line(err) or not err.startswith("branchy-tee predict: error: "):
                    return Outcome("crash", f"rc 1 but not one clean line: {err[:300]!r}")
                if left:
                    return Outcome("crash", f"refused but left {left} in the output directory")
                return Outcome("rejected", err.strip()[len("branchy-tee predict: error: ") :])
            if rc != 0:
                return Outcome("crash", f"exit code {rc}: {err[:300]!r}")
            from branchy_tee.tee.sealed.envelope import request_digest

            answered = tampered if self.which == "request" else self.world.requests["do1"].read_bytes()
            recs = open_result(
                (self.out / "do1.res").read_bytes(), self.world.key("do1"), "res", request_digest(answered)
            )[1]
            same = recs == self.world.records["do1"]
            return Outcome(
                "benign" if same else "accepted",
                "identical answers" if same else "predict answered a tampered input differently",
            )
        finally:
            if self.which != "request":
                self.path.write_bytes(self.data)
            for name in _files(self.out):
                (self.out / name).unlink()


class ResultTarget(Target):
    """The result of do1's request, fed to decrypt-result with that request (``replay=False``), or
    replayed as the answer to a new request of do1 that reuses the same request id (``replay=True``:
    a fresh envelope, so another digest; every trial, tampered or not, must be refused)."""

    def __init__(self, world: World, work: Path, replay: bool = False):
        self.world, self.replay = world, replay
        self.name = "result replayed for a new request" if replay else "result (decrypt-result)"
        self.data = world.results["do1"].read_bytes()
        self.dir = work / ("replay" if replay else "result")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "tampered.res"
        self.request = world.requests["do1"]
        if replay:
            from branchy_tee.client.envelopes import seal_request

            self.request = work / "new-request-same-id.req"
            self.request.write_bytes(seal_request(world.inputs["do1"], world.key("do1"), world.request_ids["do1"]))

    def run(self, tampered: bytes) -> Outcome:
        from branchy_tee.cli import main

        self.path.write_bytes(tampered)
        out = self.dir / "records.json"
        argv = [
            "decrypt-result",
            str(self.path),
            "--key",
            str(self.world.do_keys["do1"]),
            "--request",
            str(self.request),
            "--out",
            str(out),
            "--json",
        ]
        try:
            rc, stdout, err = quiet_call(main, argv)
        except BaseException:  # noqa: BLE001
            return Outcome("crash", traceback.format_exc(limit=3).strip().splitlines()[-1])
        left = [n for n in _files(self.dir) if n != "tampered.res"]
        try:
            if rc == 1:
                if not _one_line(err) or not err.startswith("branchy-tee: error: "):
                    return Outcome("crash", f"rc 1 but not one clean line: {err[:300]!r}")
                if left or stdout:
                    return Outcome("crash", f"refused but wrote {left or 'to stdout'}")
                return Outcome("rejected", err.strip()[len("branchy-tee: error: ") :])
            if rc != 0:
                return Outcome("crash", f"exit code {rc}: {err[:300]!r}")
            if self.replay:
                return Outcome("accepted", "an old result was accepted as the answer to a new request")
            same = json.loads(stdout)["records"] == self.world.records["do1"]
            return Outcome(
                "benign" if same else "accepted", "identical records" if same else "different records accepted"
            )
        finally:
            for n in left:
                (self.dir / n).unlink()


def _quote_signed_parts(raw: bytes):
    """Everything a verified quote's claims rest on: the signed bytes and the certificates (DER)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from branchy_tee.tee.attest.quote import parse_quote

    q = parse_quote(raw)
    sd = q.signature_data
    ders = tuple(x509.load_pem_x509_certificate(p).public_bytes(Encoding.DER) for p in q.pck_chain_pem)
    return (
        q.signed_data,
        sd.signature,
        sd.attestation_key,
        sd.qe_report_bytes,
        sd.qe_report_signature,
        sd.qe_auth_data,
        sd.certification_data.cert_type,
        ders,
    )


class QuoteTarget(Target):
    def __init__(self, name: str):
        self.name = f"quote/{name}"
        self.data = (SGX_QUOTES / f"{name}.quote.bin").read_bytes()
        if name.startswith("phala"):
            self.kw = {"collateral": json.loads((SGX_QUOTES / f"{name}.collateral.json").read_text()), "now": PHALA_NOW}
        else:
            self.kw = {
                "now": MOBILECOIN_NOW,
                "crls": [
                    (SGX_QUOTES / f"{name}.root_crl.der").read_bytes(),
                    (SGX_QUOTES / f"{name}.processor_crl.der").read_bytes(),
                ],
            }
        from branchy_tee.tee.attest.quote import parse_quote
        from branchy_tee.verifier.dcap import verify_quote

        self.claims = verify_quote(self.data, **self.kw).to_json()
        self.signed = _quote_signed_parts(self.data)
        q = parse_quote(self.data)
        self.trailing_from = len(self.data) - q.trailing_len
        self.cert_span = q.span("certification_data")

    def run(self, tampered: bytes) -> Outcome:
        from branchy_tee.core.errors import AttestationError
        from branchy_tee.verifier.dcap import verify_quote

        try:
            vq = verify_quote(tampered, **self.kw)
        except AttestationError as e:
            msg = str(e)
            if not _one_line(msg):
                return Outcome("crash", f"multi-line reason {msg[:200]!r}")
            if e.__cause__ is not None:  # fail-closed wrapper around an unexpected exception: a parser gap
                return Outcome("crash", f"unexpected {type(e.__cause__).__name__} inside verification: {msg[:200]}")
            return Outcome("rejected", msg)
        except BaseException:  # noqa: BLE001
            return Outcome("crash", traceback.format_exc(limit=3).strip().splitlines()[-1])
        if vq.to_json() != self.claims:
            return Outcome("accepted", f"verified with different claims {vq.to_json()}")
        if _quote_signed_parts(tampered) != self.signed:
            return Outcome("accepted", "verified although signed bytes or certificates changed")
        return Outcome("benign", self._why(tampered))

    def _why(self, tampered: bytes) -> str:
        n = len(self.data)
        if len(tampered) > n and tampered[:n] == self.data:
            return "bytes appended after the signature data (unsigned padding, ignored by design)"
        diff = next((i for i in range(min(n, len(tampered))) if tampered[i] != self.data[i]), None)
        if diff is None:
            return "padding after the signature data cut (unsigned, ignored by design)"
        if diff >= self.trailing_from:
            return "padding after the signature data changed (unsigned, ignored by design)"
        s, e = self.cert_span
        if s <= diff < e:
            return "PEM text around the certificates changed, certificates (DER) identical"
        return f"other: byte {diff}"


def _collateral_content(obj) -> dict | None:
    """The collateral's authenticated content: DER certificates, CRL bytes, signatures, signed JSON text."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if not isinstance(obj, dict):
        return None
    out = {}
    for k, v in sorted(obj.items()):
        if isinstance(v, str) and "BEGIN CERTIFICATE" in v:
            try:
                out[k] = tuple(c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(v.encode()))
            except ValueError:
                out[k] = ("unparsable", v)
        elif isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]*", v):
            out[k] = bytes.fromhex(v) if len(v) % 2 == 0 else v
        else:
            out[k] = v
    return out


class CollateralTarget(Target):
    """The collateral JSON an enclave sends along with its quote (the host can change it on the way)."""

    def __init__(self, name: str = "phala-1"):
        from branchy_tee.verifier.dcap import verify_quote

        self.name = f"collateral/{name} (sent with the quote)"
        self.quote = (SGX_QUOTES / f"{name}.quote.bin").read_bytes()
        self.data = (SGX_QUOTES / f"{name}.collateral.json").read_bytes()
        self.claims = verify_quote(self.quote, collateral=json.loads(self.data), now=PHALA_NOW).to_json()
        self.content = _collateral_content(json.loads(self.data))

    def run(self, tampered: bytes) -> Outcome:
        from branchy_tee.core.errors import AttestationError
        from branchy_tee.verifier.dcap import verify_quote

        try:
            obj = json.loads(tampered)
        except (ValueError, RecursionError):
            return Outcome("rejected", "collateral is not JSON (the broker answers 400 'request body is not JSON')")
        if not isinstance(obj, dict):
            return Outcome("rejected", "collateral is not a JSON object (the broker answers 400)")
        try:
            vq = verify_quote(self.quote, collateral=obj, now=PHALA_NOW)
        except AttestationError as e:
            if not _one_line(str(e)):
                return Outcome("crash", f"multi-line reason {str(e)[:200]!r}")
            if e.__cause__ is not None:
                return Outcome("crash", f"unexpected {type(e.__cause__).__name__} inside verification: {str(e)[:200]}")
            return Outcome("rejected", str(e))
        except BaseException:  # noqa: BLE001
            return Outcome("crash", traceback.format_exc(limit=3).strip().splitlines()[-1])
        if vq.to_json() != self.claims:
            return Outcome("accepted", f"verified with different claims {vq.to_json()}")
        changed = [
            k
            for k in set(self.content) | set(_collateral_content(obj) or {})
            if self.content.get(k) != (_collateral_content(obj) or {}).get(k)
        ]
        if not changed:
            return Outcome("benign", "JSON whitespace/escapes, hex digit case or PEM line breaks: content identical")
        if changed == ["pck_crl_issuer_chain"]:
            # verify_quote checks the PCK CRL against the PCK CA of the quote's own chain (which ends at
            # the pinned root), so this member is required but never used: a change to it changes nothing.
            return Outcome(
                "benign",
                "pck_crl_issuer_chain changed: not used (the PCK CRL is checked against the "
                "PCK CA of the quote's own chain, pinned root)",
            )
        return Outcome("accepted", f"verified although collateral fields {sorted(changed)} changed")


# ---- brokers
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_call(url: str, method: str = "GET", raw: bytes | None = None, timeout: float = 20) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=raw, method=method, headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _x25519():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _post_semantics(body: bytes):
    """What the broker acts on in a POST /v1/keys body, decoded (None if it does not parse)."""
    try:
        req = json.loads(body)
        ev = base64.b64decode(req["evidence"], validate=True)
        outer = json.loads(ev)
        return (
            req.get("protocol", "branchy-tee/v1"),
            req["evidence_type"],
            tuple(req["key_ids"]),
            bytes.fromhex(req["public_key"]),
            bytes.fromhex(req["nonce"]),
            outer["document"],
            bytes.fromhex(outer["signature"]),
            json.dumps(req.get("collateral"), sort_keys=True),
        )
    except Exception:  # noqa: BLE001 -- anything unparsable
        return None


class BrokerPostTarget(Target):
    name = "broker/POST /v1/keys body"

    def __init__(self, work: Path, keys: list[bytes]):
        from branchy_tee.broker.server import start_broker
        from branchy_tee.core.keys import key_id
        from branchy_tee.tee.attest.providers import SimulatedProvider

        self.keys = keys
        self.kid = key_id(keys[0])
        self.sim = SimulatedProvider(work / "devkey")
        self.audit = work / "broker-audit.jsonl"
        policy = {"allowed_mrenclave": [self.sim.mrenclave.hex()], "allow_simulation": True, "min_model_version": 3}
        self.handle, _, _ = quiet_call(start_broker, keys, policy, audit_log=self.audit)
        self.url = self.handle.url
        self.posts = 0

    def pristine(self, rng: random.Random) -> bytes:
        from branchy_tee.tee.attest.protocol import report_data

        nonce = bytes.fromhex(json.loads(http_call(self.url + "/v1/nonce")[1])["nonce"])
        self.sk, pk = _x25519()
        evidence, _, _ = quiet_call(self.sim.evidence, report_data(pk, nonce))
        body = {
            "protocol": "branchy-tee/v1",
            "evidence_type": "simulated",
            "evidence": base64.b64encode(evidence).decode(),
            "public_key": pk.hex(),
            "nonce": nonce.hex(),
            "key_ids": [self.kid],
        }
        self.body = json.dumps(body).encode()
        return self.body

    def run(self, tampered: bytes) -> Outcome:
        from branchy_tee.tee.attest.protocol import SUITE, key_info, unpack_key

        try:
            (status, raw), _, _ = quiet_call(http_call, self.url + "/v1/keys", "POST", tampered)
        except BaseException:  # noqa: BLE001
            return Outcome("crash", traceback.format_exc(limit=2).strip().splitlines()[-1])
        self.posts += 1
        health = http_call(self.url + "/v1/health")[0]
        if health != 200:
            return Outcome("crash", f"broker stopped answering /v1/health ({health})")
        try:
            doc = json.loads(raw)
        except ValueError:
            return Outcome("crash", f"HTTP {status} with a non-JSON body {raw[:100]!r}")
        if status != 200:
            if status >= 500 or "keys" in doc or not _one_line(doc.get("error", "")):
                return Outcome("crash", f"HTTP {status}: {doc}")
            return Outcome("rejected", f"{status} {doc.get('code')}: {doc.get('error')}")
        # granted: the keys must be exactly the ones for this enclave's key pair and nonce
        nonce = bytes.fromhex(json.loads(self.body)["nonce"])
        try:
            got = {
                k: unpack_key(SUITE.decrypt(base64.b64decode(v), self.sk, info=key_info(k, nonce)))
                for k, v in doc["keys"].items()
            }
        except Exception as e:  # noqa: BLE001
            return Outcome("accepted", f"granted keys the requesting enclave cannot open ({type(e).__name__})")
        if got != {self.kid: (self.keys[0], 3)}:
            return Outcome("accepted", f"granted something else: {sorted(got)}")
        if _post_semantics(tampered) == _post_semantics(self.body):
            return Outcome("benign", "same request after decoding (JSON whitespace, hex case, base64 padding bits)")
        sem_t = _post_semantics(tampered)
        if sem_t is None:
            # parses for the broker but not for our decoder: e.g. an unknown member replaced 'protocol'
            try:
                t = json.loads(tampered)
                if "protocol" not in t and all(
                    t.get(k) == json.loads(self.body)[k] for k in t if k in json.loads(self.body)
                ):
                    return Outcome(
                        "benign", "the optional 'protocol' member renamed (default used, unknown member ignored)"
                    )
            except ValueError:
                pass
        return Outcome("benign", "other: granted the same keys to the same enclave key")

    def close(self) -> list[str]:
        problems = []
        self.handle.stop()
        lines = self.audit.read_text().splitlines()
        try:
            decisions = [json.loads(ln) for ln in lines]
        except ValueError:
            return ["audit log holds a torn line"]
        if len(decisions) != self.posts:
            problems.append(f"audit log has {len(decisions)} lines for {self.posts} decisions")
        data = self.audit.read_bytes()
        for k in self.keys:
            for form in (k, k.hex().encode(), base64.b64encode(k), base64.urlsafe_b64encode(k)):
                if form in data:
                    problems.append("key material in the audit log")
        return problems


class _Canned(urllib.request.BaseHandler):
    """Answers every HTTP request from a dict path -> body (status 200)."""

    handler_order = 100  # before the real HTTPHandler

    def __init__(self, bodies: dict[str, bytes]):
        self.bodies = bodies

    def http_open(self, req):
        path = urllib.parse.urlsplit(req.full_url).path
        headers = http.client.HTTPMessage()
        headers["Content-Type"] = "application/json"
        resp = urllib.response.addinfourl(io.BytesIO(self.bodies[path]), headers, req.full_url, 200)
        resp.msg = "OK"
        return resp


class _StubProvider:
    evidence_type = "simulated"

    def evidence(self, report_data: bytes) -> bytes:
        return b'{"stub": true}'


class ClientResponseTarget(Target):
    """A recorded broker response, tampered, fed to the enclave client's parsing path."""

    def __init__(self, work: Path, keys: list[bytes], which: str, recorded: dict | None = None):
        self.which = which
        self.name = f"client/{'GET /v1/nonce' if which == 'nonce' else 'POST /v1/keys'} response"
        self.keys = keys
        self.rec = recorded or record_exchange(work, keys)
        self.data = self.rec["nonce_body"] if which == "nonce" else self.rec["keys_body"]

    def run(self, tampered: bytes) -> Outcome:
        from branchy_tee.core.errors import BranchyError
        from branchy_tee.tee.attest.client import AttestedKeys

        bodies = {"/v1/nonce": self.rec["nonce_body"], "/v1/keys": self.rec["keys_body"]}
        bodies["/v1/nonce" if self.which == "nonce" else "/v1/keys"] = tampered
        ak = AttestedKeys(
            "simulated",
            "http://broker.invalid:1",
            self.rec["identity"],
            ["http://broker.invalid:1"],
            provider=_StubProvider(),
        )
        ak._sk, ak.public_key = self.rec["sk"], self.rec["pk"]
        ak._opener = urllib.request.build_opener(_Canned(bodies))
        try:
            key = ak.model_key(self.rec["kid"])
        except BranchyError as e:
            if not _one_line(str(e)):
                return Outcome("crash", f"multi-line reason {str(e)[:200]!r}")
            return Outcome("rejected", str(e))
        except BaseException:  # noqa: BLE001
            return Outcome("crash", traceback.format_exc(limit=3).strip().splitlines()[-1])
        if key != self.keys[0] or ak.min_model_version() != 3:
            return Outcome("accepted", "the client accepted a different key or minimum model version")
        return Outcome("benign", self._why(tampered))

    def _why(self, tampered: bytes) -> str:
        try:
            t, o = json.loads(tampered), json.loads(self.data)
        except ValueError:
            return "other"
        if self.which == "nonce":
            same = bytes.fromhex(t["nonce"]) == bytes.fromhex(o["nonce"]) and t.get("key_ids") == o.get("key_ids")
            if bytes.fromhex(t["nonce"]) == bytes.fromhex(o["nonce"]) and t.get("key_ids") != o.get("key_ids"):
                return "key_ids changed in an id the client did not ask for (it only decides whom to ask)"
            used = ("nonce", "key_ids")
        else:
            from branchy_tee.tee.attest.protocol import KeyRelease

            nonce = bytes.fromhex(json.loads(self.rec["nonce_body"])["nonce"])
            same = KeyRelease.parse(t, nonce, self.rec["pk"]) == KeyRelease.parse(o, nonce, self.rec["pk"])
            used = ("identity", "keys", "min_model_version", "allowed_data_owners", "signature")
        if not same:
            return "other: used fields differ"
        # members of the original the tampering changed or renamed (a renamed one is absent: 'protocol' defaults)
        ignored = sorted(k for k in o if k not in used and t.get(k) != o[k])
        if ignored:
            return f"a member the client does not use changed or was renamed ({', '.join(ignored)})"
        return "JSON whitespace, hex case or base64 padding bits: same decoded content"


def record_exchange(work: Path, keys: list[bytes]) -> dict:
    """One real nonce + key exchange with a broker (simulated evidence), as raw response bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from branchy_tee.broker.server import start_broker
    from branchy_tee.core.keys import key_id
    from branchy_tee.tee.attest.protocol import report_data
    from branchy_tee.tee.attest.providers import SimulatedProvider

    sim = SimulatedProvider(work / "devkey")
    policy = {
        "allowed_mrenclave": [sim.mrenclave.hex()],
        "allow_simulation": True,
        "min_model_version": 3,
        "allowed_data_owners": ["ab" * 32],
    }
    identity = Ed25519PrivateKey.generate()
    handle, _, _ = quiet_call(start_broker, keys, policy, identity=identity)
    try:
        st, nonce_body = http_call(handle.url + "/v1/nonce")
        nonce = bytes.fromhex(json.loads(nonce_body)["nonce"])
        sk, pk = _x25519()
        kid = key_id(keys[0])
        evidence, _, _ = quiet_call(sim.evidence, report_data(pk, nonce))
        body = json.dumps(
            {
                "evidence_type": "simulated",
                "evidence": base64.b64encode(evidence).decode(),
                "public_key": pk.hex(),
                "nonce": nonce.hex(),
                "key_ids": [kid],
            }
        ).encode()
        (st2, keys_body), _, _ = quiet_call(http_call, handle.url + "/v1/keys", "POST", body)
        assert st == 200 and st2 == 200, (st, st2, keys_body)
    finally:
        handle.stop()
    from branchy_tee.tee.attest.identity import public_bytes

    return {
        "nonce_body": nonce_body,
        "keys_body": keys_body,
        "sk": sk,
        "pk": pk,
        "kid": kid,
        "identity": public_bytes(identity),
    }


class ImpersonatedBrokerTarget(ClientResponseTarget):
    """The host's broker at the model broker's address. Each trial starts from the genuine release (or
    the tampered bytes, when they still parse as one) and makes one of the host's moves, in turn:
    re-sign it with the host's identity; hand out the host's own key for the measured key id; lower the
    minimum model version; put the host on the allow-list; keep the genuine identity but sign with the
    host's key. The enclave expects the measured identity: every trial must be refused."""

    MOVES = ("re-signed", "host key", "rollback", "host allowed", "forged signature")

    def __init__(self, work: Path, keys: list[bytes], recorded: dict):
        super().__init__(work, keys, "keys", recorded)
        self.name = "client/impersonated model broker"
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.host = Ed25519PrivateKey.generate()
        self.trial = 0

    def run(self, tampered: bytes) -> Outcome:
        from dataclasses import replace

        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        from branchy_tee.core.keys import generate_key
        from branchy_tee.tee.attest import identity as ident
        from branchy_tee.tee.attest.protocol import RELEASE_PURPOSE, SUITE, KeyRelease, key_info, pack_key

        move = self.MOVES[self.trial % len(self.MOVES)]
        self.trial += 1
        nonce = bytes.fromhex(json.loads(self.rec["nonce_body"])["nonce"])
        try:
            release, _ = KeyRelease.parse(json.loads(tampered), nonce, self.rec["pk"])
        except (ValueError, RecursionError, TypeError, AttributeError):
            release, _ = KeyRelease.parse(json.loads(self.data), nonce, self.rec["pk"])
        host = ident.public_bytes(self.host)
        if move == "host key":
            ct = SUITE.encrypt(
                pack_key(generate_key(), 0),
                X25519PublicKey.from_public_bytes(self.rec["pk"]),
                info=key_info(self.rec["kid"], nonce),
            )
            release = replace(release, keys=((self.rec["kid"], ct),))
        elif move == "rollback":
            release = replace(release, min_model_version=0)
        elif move == "host allowed":
            release = replace(release, allowed_data_owners=(host,))
        if move != "forged signature":
            release = replace(release, broker=host)
        signature = ident.sign(self.host, RELEASE_PURPOSE, release.message())
        forged = {"protocol": "branchy-tee/v1", **release.to_json(signature)}
        out = super().run(json.dumps(forged).encode())
        return Outcome(out.kind, f"{move}: {out.detail}")


# --------------------------------------------------------------------------- the campaign
def make_targets(world: World, work: Path, quotes: bool = True) -> list[Target]:
    from branchy_tee.core.keys import generate_key

    targets: list[Target] = [PredictTarget(world, work, "header.json")]
    targets += [PredictTarget(world, work, p.name) for p in sorted(world.bundle.glob("stage-*.bin"))]
    targets += [
        PredictTarget(world, work, "request"),
        ResultTarget(world, work),
        ResultTarget(world, work, replay=True),
    ]
    if quotes and (SGX_QUOTES / "phala-1.quote.bin").is_file():
        targets += [QuoteTarget(n) for n in ("phala-1", "phala-2", "mobilecoin-1")] + [CollateralTarget("phala-1")]
    keys = [generate_key(), generate_key()]
    targets.append(BrokerPostTarget(work, keys))
    rec = record_exchange(work, keys)
    targets += [
        ClientResponseTarget(work, keys, "nonce", rec),
        ClientResponseTarget(work, keys, "keys", rec),
        ImpersonatedBrokerTarget(work, keys, rec),
    ]
    return targets


def run_campaign(
    world: World, work: Path, trials: int, seed: int = 2026, quotes: bool = True, progress=None
) -> tuple[list[Row], list[str]]:
    import torch

    torch.set_num_threads(1)
    rows, problems = [], []
    for target in make_targets(world, work, quotes):
        row = Row(target.name)
        t0 = time.perf_counter()
        for i in range(trials):
            rng = random.Random(f"{seed}/{target.name}/{i}")
            mode = MODES[i % len(MODES)]
            tampered, what = tamper(target.pristine(rng), mode, rng)
            row.add(target.run(tampered), f"{mode} ({what})")
        problems += [f"{target.name}: {p}" for p in target.close()]
        row.seconds = time.perf_counter() - t0
        rows.append(row)
        if progress:
            progress(row)
    return rows, problems


def format_table(rows: list[Row]) -> str:
    w = max(len(r.artifact) for r in rows)
    lines = [
        f"{'artifact':<{w}} {'trials':>7} {'rejected':>9} {'benign':>7} {'accepted':>9} {'crashes':>8} {'seconds':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.artifact:<{w}} {r.trials:>7} {r.rejected:>9} {r.benign:>7} {r.accepted:>9} {r.crashes:>8} "
            f"{r.seconds:>8.1f}"
        )
    tot = Row("total")
    for r in rows:
        tot.trials += r.trials
        tot.rejected += r.rejected
        tot.benign += r.benign
        tot.accepted += r.accepted
        tot.crashes += r.crashes
        tot.seconds += r.seconds
    lines.append(
        f"{'total':<{w}} {tot.trials:>7} {tot.rejected:>9} {tot.benign:>7} {tot.accepted:>9} {tot.crashes:>8} "
        f"{tot.seconds:>8.1f}"
    )
    return "\n".join(lines)


def format_details(rows: list[Row]) -> str:
    out = []
    for r in rows:
        out.append(f"{r.artifact}:")
        for reason, n in r.reasons.most_common(4):
            out.append(f"    {n:>5}  rejected: {reason}")
        for why, n in r.benign_why.most_common():
            out.append(f"    {n:>5}  benign: {why}")
        for f in r.findings:
            out.append(f"    FINDING {f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000, help="trials per artifact (default 1000)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--work", help="work directory (default: a temporary one, removed afterwards)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="btee-campaign-"))
    try:
        t0 = time.perf_counter()
        world, _, _ = quiet_call(build_world, work / "world")
        print(
            f"tamper campaign: {args.trials} trials per artifact (flip / truncate / extend in turn), seed {args.seed}",
            flush=True,
        )
        rows, problems = run_campaign(
            world,
            work,
            args.trials,
            args.seed,
            progress=lambda r: print(
                f"  {r.artifact}: {r.rejected}/{r.trials} rejected, "
                f"{r.benign} benign, {r.accepted} accepted, "
                f"{r.crashes} crashes ({r.seconds:.1f} s)",
                flush=True,
            ),
        )
        print()
        print(format_table(rows))
        print()
        print(format_details(rows))
        for pr in problems:
            print(f"PROBLEM {pr}")
        print(f"\nmeasured {time.strftime('%Y-%m-%d')} in {time.perf_counter() - t0:.0f} s")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(
                json.dumps(
                    {
                        "date": time.strftime("%Y-%m-%d"),
                        "trials": args.trials,
                        "seed": args.seed,
                        "rows": [r.as_dict() for r in rows],
                        "problems": problems,
                    },
                    indent=1,
                )
                + "\n"
            )
        bad = sum(r.accepted + r.crashes for r in rows) + len(problems)
        return 1 if bad else 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
