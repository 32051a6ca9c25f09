"""Verify Intel DCAP quotes (SGX v3/v4, TDX v4) on ``cryptography``: chain, signatures, collateral, TCB.

Without collateral (``verify_quote(q)``):

1. the PCK chain in the quote (leaf "Intel SGX PCK Certificate", a "PCK Processor/Platform CA",
   root) is verified with ``cryptography.x509.verification`` at ``now`` up to the pinned root, and
   the chain's last certificate must be byte-identical to the pinned root;
2. the QE report signature verifies with the PCK leaf key;
3. QE report data == SHA-256(attestation key || QE auth data) || 32 zero bytes;
4. the quote signature verifies with the attestation key over header || report body.

With collateral (the dcap-qvl ``QuoteCollateralV3`` JSON layout: PEM issuer chains, ``tcb_info`` and
``qe_identity`` as the exact signed JSON strings, hex raw r||s signatures, hex DER CRLs), also:

5. the TCB info and QE identity issuer chains ("Intel SGX TCB Signing" + root) verify to the pinned
   root, and both signatures verify with that leaf;
6. the root CA CRL (issuer: root) and the PCK CRL (issuer: the quote's intermediate CA) have valid
   signatures and windows, and no certificate of either chain is revoked;
7. TCB info and QE identity windows (issueDate <= now <= nextUpdate);
8. FMSPC / PCE-ID from the PCK certificate's SGX extension match the TCB info;
9. the QE report matches the QE identity (MRSIGNER, ISVPRODID, masked MISCSELECT/ATTRIBUTES);
10. the TCB status as in Intel's QVL: the platform TCB level (first level whose SGX components and
    PCESVN are <= the PCK certificate's; for TDX also the TDX components vs TEE_TCB_SVN), the TDX
    module identity level, and the QE identity level (by QE ISVSVN), converged into one status.
    Advisory ids are the union of the matched levels' ids (platform first).

Time problems of the collateral (step 6 windows, step 7) raise by default; with
``strict_time=False`` they are returned as ``VerifiedQuote.warnings`` instead (a policy layer may
decide to only flag stale collateral). Certificate validity periods are always enforced.

Only :class:`~branchy_tee.errors.AttestationError` (a subclass of ``BranchyError``) leaves
:func:`verify_quote`: anything unexpected raised while checking attacker-supplied data is turned
into an ``AttestationError`` as well (fail closed).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import verification as xv
from cryptography.x509.oid import NameOID

from ..errors import AttestationError, BranchyError
from .quote import (
    CERT_TYPE_PCK_CHAIN,
    INTEL_QE_VENDOR_ID,
    Quote,
    TdReportBody,
    parse_quote,
    split_pem_chain,
)

__all__ = [
    "VerifiedQuote",
    "PckExtension",
    "verify_quote",
    "load_root",
    "read_collateral_file",
    "parse_pck_extension",
    "TCB_STATUSES",
]

TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "TDRelaunchAdvised",
        "TDRelaunchAdvisedConfigurationNeeded",
        "Revoked",
    }
)

PCK_LEAF_CN = "Intel SGX PCK Certificate"
PCK_CA_CNS = ("Intel SGX PCK Processor CA", "Intel SGX PCK Platform CA")
TCB_SIGNING_CN = "Intel SGX TCB Signing"
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")

_COLLATERAL_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


_TAG_INTEGER, _TAG_BIT_STRING, _TAG_OCTETS, _TAG_OID, _TAG_SEQUENCE = 0x02, 0x03, 0x04, 0x06, 0x30


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class PckExtension:
    """The fields of the PCK certificate's SGX extension (OID 1.2.840.113741.1.13.1) we use."""

    ppid: bytes
    tcb_comp_svns: tuple[int, ...]  # 16 SGX TCB component SVNs
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes  # 2 bytes
    fmspc: bytes  # 6 bytes


@dataclass(frozen=True)
class VerifiedQuote:
    """Claims of a quote that verified. Hex is lower-case in ``to_json``.

    ``tcb_status`` is None when no collateral was given (then neither the QE identity nor the TCB
    level were checked). ``advisories`` lists Intel advisory ids of the matched TCB levels.
    ``warnings`` holds collateral time problems found with ``strict_time=False`` (empty otherwise).
    For TDX, ``mrenclave`` is MRTD and ``mrsigner`` is MRSIGNERSEAM, ``isv_prod_id``/``isv_svn`` are 0
    (see :class:`~branchy_tee.attest.quote.Quote`); ``quote.body`` has every TD report field.
    """

    version: int
    tee: str
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    report_data: bytes
    tcb_status: str | None
    advisories: list[str]
    fmspc: str  # hex, from the PCK certificate
    pce_id: str  # hex, from the PCK certificate
    warnings: list[str] = field(default_factory=list)
    platform_tcb_status: str | None = None
    qe_tcb_status: str | None = None
    tdx_module_tcb_status: str | None = None
    tcb_date: str | None = None
    quote: Quote | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "tee": self.tee,
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "debug": self.debug,
            "report_data": self.report_data.hex(),
            "tcb_status": self.tcb_status,
            "advisories": list(self.advisories),
            "fmspc": self.fmspc,
            "pce_id": self.pce_id,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- small helpers
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(reason: str) -> AttestationError:
    return AttestationError(_one_line(reason))


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if not isinstance(now, datetime):
        raise _fail(f"'now' must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None:  # naive: taken as UTC
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _raw_sig_to_der(sig: bytes) -> bytes:
    if len(sig) != 64:
        raise _fail(f"ECDSA signature must be 64 bytes (r||s), got {len(sig)}")
    return encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))


def _p256_from_raw(key: bytes, what: str) -> ec.EllipticCurvePublicKey:
    if len(key) != 64:
        raise _fail(f"{what}: expected a 64-byte raw P-256 point, got {len(key)} bytes")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + key)
    except ValueError:
        raise _fail(f"{what} is not a valid P-256 point") from None


def _require_p256(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except (ValueError, TypeError) as e:  # unsupported key algorithm
        raise _fail(f"{what}: unusable public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _fail(f"{what}: public key is not ECDSA P-256")
    return key


def _verify_raw_sig(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes, what: str) -> None:
    try:
        key.verify(_raw_sig_to_der(sig), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _fail(f"{what} does not verify") from None
    except ValueError as e:  # e.g. r or s out of range for the encoder
        raise _fail(f"{what} does not verify ({e})") from None


def _cn(name: x509.Name) -> str | None:
    try:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError):
        return None
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        return None
    return attrs[0].value


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------- root / chains
@functools.lru_cache(maxsize=8)
def _root_from_bytes(data: bytes) -> tuple[x509.Certificate, bytes]:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except _X509_ERRORS as e:
        raise _fail(f"pinned root CA is not a PEM or DER certificate ({e})") from None
    return cert, _der(cert)


@functools.lru_cache(maxsize=1)
def _bundled_root_bytes() -> bytes:
    return resources.files("branchy_tee.attest").joinpath("data/intel-sgx-root-ca.pem").read_bytes()


def load_root(root_pem: bytes | None = None) -> x509.Certificate:
    """The pinned root: ``root_pem`` (PEM or DER bytes) or the bundled Intel SGX Root CA."""
    return _root_from_bytes(bytes(root_pem) if root_pem is not None else _bundled_root_bytes())[0]


# What cryptography raises for malformed certificates/CRLs (some fields are parsed lazily).
_X509_ERRORS = (
    ValueError,
    TypeError,
    x509.DuplicateExtension,
    x509.InvalidVersion,
    x509.UnsupportedGeneralNameType,
)


def _strict_parse(what: str, parse):
    """Run ``parse()``; cryptography's warnings about non-conformant DER (negative serials, bad
    attribute lengths) reject the input instead of reaching stderr. (``catch_warnings`` touches
    global state: do not verify quotes from several threads at once.)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = parse()
        except _X509_ERRORS as e:
            raise _fail(f"{what} is malformed ({e})") from None
    if caught:
        raise _fail(f"{what} is not well-formed ({caught[0].message})")
    return out


def _check_signature_bits(der: bytes) -> None:
    """Certificate = SEQUENCE { tbs, algorithm, BIT STRING }: the signature BIT STRING must have
    0 unused bits. cryptography ignores that count, so without this check a changed count would
    give a different byte string for the same certificate (a signature-preserving mutation)."""
    top = _der_items(der, 0, len(der), "certificate")
    if len(top) != 1 or top[0][0] != _TAG_SEQUENCE:
        raise _fail("certificate: not one DER SEQUENCE")
    parts = _der_items(der, top[0][1], top[0][2], "certificate")
    if len(parts) != 3 or parts[2][0] != _TAG_BIT_STRING or parts[2][2] <= parts[2][1]:
        raise _fail("certificate: not (tbsCertificate, signatureAlgorithm, signatureValue)")
    if der[parts[2][1]] != 0:
        raise _fail("certificate: signature BIT STRING has unused bits")


def _load_pem_cert(block: bytes) -> x509.Certificate:
    def parse() -> x509.Certificate:
        cert = x509.load_pem_x509_certificate(block)
        # touch the lazily parsed fields now, so a malformed certificate fails here, not mid-check
        cert.subject, cert.issuer, cert.extensions, cert.serial_number  # noqa: B018
        return cert

    cert = _strict_parse("a certificate", parse)
    _check_signature_bits(_der(cert))
    return cert


@functools.lru_cache(maxsize=64)
def _certs_from_pem_blocks(blocks: tuple[bytes, ...]) -> tuple[x509.Certificate, ...]:
    # Certificates are immutable, so caching the parse of identical bytes is safe.
    return tuple(_load_pem_cert(b) for b in blocks)


def _load_chain(blocks: Sequence[bytes], what: str) -> tuple[x509.Certificate, ...]:
    try:
        return _certs_from_pem_blocks(tuple(bytes(b) for b in blocks))
    except AttestationError as e:
        raise _fail(f"{what}: {e}") from None


def _pem_chain_from_text(text: Any, what: str) -> tuple[x509.Certificate, ...]:
    if isinstance(text, str):
        try:
            data = text.encode("ascii")
        except UnicodeEncodeError:
            raise _fail(f"{what} is not ASCII PEM") from None
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
    else:
        raise _fail(f"{what} must be a PEM string")
    blocks = split_pem_chain(data)
    if not blocks:
        raise _fail(f"{what} holds no PEM certificate")
    return _load_chain(blocks, what)


def _verifier(root: x509.Certificate, now: datetime):
    builder = (
        xv.PolicyBuilder()
        .store(xv.Store([root]))
        .time(now)
        .max_chain_depth(4)
        .extension_policies(
            ca_policy=xv.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=xv.ExtensionPolicy.permit_all(),
        )
    )
    return builder.build_client_verifier()


def _verify_chain(
    certs: Sequence[x509.Certificate],
    root: x509.Certificate,
    root_der: bytes,
    now: datetime,
    what: str,
    leaf_cn: str,
    ca_cns: Sequence[str],
) -> None:
    """Verify ``certs`` = leaf, CAs named ``ca_cns`` (one each), root; the root must be the pinned one."""
    expected = "leaf, CA, root" if ca_cns else "leaf, root"
    if len(certs) != (3 if ca_cns else 2):
        raise _fail(f"{what}: expected {expected.count(',') + 1} certificates ({expected}), got {len(certs)}")
    if _der(certs[-1]) != root_der:
        raise _fail(f"{what} does not end at the pinned root CA ({_cn(certs[-1].subject)!r} is not it)")
    if _cn(certs[0].subject) != leaf_cn:
        raise _fail(f"{what}: leaf is {_cn(certs[0].subject)!r}, expected {leaf_cn!r}")
    for c in certs[1:-1]:
        if _cn(c.subject) not in ca_cns:
            raise _fail(f"{what}: intermediate CA {_cn(c.subject)!r} is not one of {list(ca_cns)}")
    try:
        built = _verifier(root, now).verify(certs[0], list(certs[1:-1]))
    except (xv.VerificationError, *_X509_ERRORS) as e:
        raise _fail(f"{what} does not verify at {_iso(now)}: {e}") from None
    if len(built.chain) != len(certs) or _der(built.chain[-1]) != root_der:
        raise _fail(f"{what}: the verified path is not the given chain")


# --------------------------------------------------------------------------- SGX extension (DER)
def _oid_bytes(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray()
    for n in [parts[0] * 40 + parts[1], *parts[2:]]:
        chunk = [n & 0x7F]
        n >>= 7
        while n:
            chunk.append(0x80 | (n & 0x7F))
            n >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


_SGX_OID_PREFIX = "1.2.840.113741.1.13.1"
_OID_PPID = _oid_bytes(_SGX_OID_PREFIX + ".1")
_OID_TCB = _oid_bytes(_SGX_OID_PREFIX + ".2")
_OID_TCB_COMP = {_oid_bytes(f"{_SGX_OID_PREFIX}.2.{i}"): i for i in range(1, 19)}
_OID_PCEID = _oid_bytes(_SGX_OID_PREFIX + ".3")
_OID_FMSPC = _oid_bytes(_SGX_OID_PREFIX + ".4")


def _der_items(buf: bytes, start: int, end: int, what: str = "SGX extension") -> list[tuple[int, int, int]]:
    """The TLV items in ``buf[start:end]`` as (tag, content_start, content_end); strict DER lengths."""
    items = []
    pos = start
    while pos < end:
        if end - pos < 2:
            raise _fail(f"{what}: truncated DER item")
        tag = buf[pos]
        if tag & 0x1F == 0x1F:
            raise _fail(f"{what}: high-tag-number DER form not expected")
        first = buf[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4:
                raise _fail(f"{what}: unsupported DER length form")
            if end - pos < n:
                raise _fail(f"{what}: truncated DER length")
            length = int.from_bytes(buf[pos : pos + n], "big")
            pos += n
            if length < 0x80 or buf[pos - n] == 0:
                raise _fail(f"{what}: non-minimal DER length")
        if length > end - pos:
            raise _fail(f"{what}: DER item runs past its container")
        items.append((tag, pos, pos + length))
        pos += length
    return items


def _der_uint(buf: bytes, s: int, e: int, what: str) -> int:
    if e <= s or e - s > 4:
        raise _fail(f"SGX extension: {what} is not a small INTEGER")
    if buf[s] & 0x80:
        raise _fail(f"SGX extension: {what} is negative")
    if e - s > 1 and buf[s] == 0 and not buf[s + 1] & 0x80:
        raise _fail(f"SGX extension: {what} is not minimally encoded")
    return int.from_bytes(buf[s:e], "big")


def parse_pck_extension(cert: x509.Certificate) -> PckExtension:
    """Read PPID, TCB (16 component SVNs, PCESVN, CPUSVN), PCE-ID and FMSPC from a PCK certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID)
    except x509.ExtensionNotFound:
        raise _fail("PCK certificate has no SGX extension (1.2.840.113741.1.13.1)") from None
    value = ext.value
    raw = getattr(value, "value", None)
    if not isinstance(raw, bytes):
        raise _fail("PCK certificate: SGX extension is not opaque DER")
    top = _der_items(raw, 0, len(raw))
    if len(top) != 1 or top[0][0] != _TAG_SEQUENCE:
        raise _fail("SGX extension: expected one SEQUENCE")
    fields: dict[bytes, tuple[int, int, int]] = {}
    for tag, s, e in _der_items(raw, top[0][1], top[0][2]):
        if tag != _TAG_SEQUENCE:
            raise _fail("SGX extension: entry is not a SEQUENCE")
        pair = _der_items(raw, s, e)
        if len(pair) != 2 or pair[0][0] != _TAG_OID:
            raise _fail("SGX extension: entry is not (OID, value)")
        oid = raw[pair[0][1] : pair[0][2]]
        if oid in fields:
            raise _fail("SGX extension: duplicate entry")
        fields[oid] = pair[1]

    def octets(oid: bytes, what: str, size: int) -> bytes:
        if oid not in fields:
            raise _fail(f"SGX extension: {what} missing")
        tag, s, e = fields[oid]
        if tag != _TAG_OCTETS or e - s != size:
            raise _fail(f"SGX extension: {what} is not a {size}-byte OCTET STRING")
        return raw[s:e]

    ppid = octets(_OID_PPID, "PPID", 16)
    pce_id = octets(_OID_PCEID, "PCE-ID", 2)
    fmspc = octets(_OID_FMSPC, "FMSPC", 6)
    if _OID_TCB not in fields or fields[_OID_TCB][0] != _TAG_SEQUENCE:
        raise _fail("SGX extension: TCB missing")
    _, ts, te = fields[_OID_TCB]
    comps: dict[int, tuple[int, int, int]] = {}
    for tag, s, e in _der_items(raw, ts, te):
        if tag != _TAG_SEQUENCE:
            raise _fail("SGX extension: TCB entry is not a SEQUENCE")
        pair = _der_items(raw, s, e)
        if len(pair) != 2 or pair[0][0] != _TAG_OID:
            raise _fail("SGX extension: TCB entry is not (OID, value)")
        idx = _OID_TCB_COMP.get(raw[pair[0][1] : pair[0][2]])
        if idx is None:
            continue  # unknown TCB entries are ignored
        if idx in comps:
            raise _fail("SGX extension: duplicate TCB entry")
        comps[idx] = pair[1]
    if set(comps) != set(range(1, 19)):
        raise _fail("SGX extension: TCB lacks some of the 16 component SVNs, PCESVN or CPUSVN")
    svns = []
    for i in range(1, 17):
        tag, s, e = comps[i]
        if tag != _TAG_INTEGER:
            raise _fail(f"SGX extension: TCB component {i} is not an INTEGER")
        v = _der_uint(raw, s, e, f"TCB component {i}")
        if v > 255:
            raise _fail(f"SGX extension: TCB component {i} out of range")
        svns.append(v)
    tag, s, e = comps[17]
    if tag != _TAG_INTEGER:
        raise _fail("SGX extension: PCESVN is not an INTEGER")
    pce_svn = _der_uint(raw, s, e, "PCESVN")
    if pce_svn > 0xFFFF:
        raise _fail("SGX extension: PCESVN out of range")
    tag, s, e = comps[18]
    if tag != _TAG_OCTETS or e - s != 16:
        raise _fail("SGX extension: CPUSVN is not a 16-byte OCTET STRING")
    return PckExtension(
        ppid=ppid, tcb_comp_svns=tuple(svns), pce_svn=pce_svn, cpu_svn=raw[s:e], pce_id=pce_id, fmspc=fmspc
    )


# --------------------------------------------------------------------------- collateral helpers
def read_collateral_file(path: str | os.PathLike) -> dict:
    """Load a collateral JSON file (dcap-qvl layout). Unreadable: BranchyError; not JSON: AttestationError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BranchyError(f"cannot read collateral {path}: {e.strerror or e}") from None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise _fail(f"collateral {path} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _fail(f"collateral {path} is not a JSON object")
    return obj


def _hex(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise _fail(f"{what} must be a hex string")
    try:
        out = bytes.fromhex(value)
    except ValueError:
        raise _fail(f"{what} is not hex") from None
    if size is not None and len(out) != size:
        raise _fail(f"{what} must be {size} bytes, got {len(out)}")
    return out


def _int(obj: Mapping, key: str, what: str) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _fail(f"{what}: '{key}' missing or not a non-negative integer")
    return v


def _str(obj: Mapping, key: str, what: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise _fail(f"{what}: '{key}' missing or not a string")
    return v


def _list(obj: Mapping, key: str, what: str) -> list:
    v = obj.get(key)
    if not isinstance(v, list):
        raise _fail(f"{what}: '{key}' missing or not a list")
    return v


def _date(obj: Mapping, key: str, what: str) -> datetime:
    text = _str(obj, key, what)
    t = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise _fail(f"{what}: '{key}' is not an ISO 8601 date ({text!r})") from None
    if dt.tzinfo is None:
        raise _fail(f"{what}: '{key}' has no time zone ({text!r})")
    return dt.astimezone(timezone.utc)


def _advisories(level: Mapping, what: str) -> list[str]:
    ids = level.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _fail(f"{what}: 'advisoryIDs' is not a list of strings")
    return list(ids)


def _status(level: Mapping, what: str) -> str:
    s = _str(level, "tcbStatus", what)
    if s not in TCB_STATUSES:
        raise _fail(f"{what}: unknown TCB status {s!r}")
    return s


def _signed_json(collateral: Mapping, key: str, what: str) -> tuple[bytes, dict]:
    text = collateral.get(key)
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
    else:
        raise _fail(f"collateral: '{key}' must be the signed JSON text")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise _fail(f"{what} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _fail(f"{what} is not a JSON object")
    return data, obj


def _load_crl(value: Any, what: str) -> x509.CertificateRevocationList:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-----BEGIN"):
            try:
                data = text.encode("ascii")
            except UnicodeEncodeError:
                raise _fail(f"{what} is not ASCII PEM") from None
        else:
            data = _hex(text, what)
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise _fail(f"{what} must be hex DER, PEM or bytes")

    def parse() -> x509.CertificateRevocationList:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
        crl.issuer, crl.last_update_utc, crl.next_update_utc, list(crl)  # noqa: B018
        return crl

    return _strict_parse(what, parse)


class _Clock:
    """Collects time-window problems; ``settle()`` raises them all at once unless strict_time=False."""

    def __init__(self, now: datetime, strict: bool) -> None:
        self.now = now
        self.strict = strict
        self.warnings: list[str] = []

    def window(self, what: str, start: datetime | None, end: datetime | None) -> None:
        problem = None
        if end is None:
            problem = f"{what} has no next-update time"
        elif self.now > end:
            problem = f"{what} expired at {_iso(end)} (now {_iso(self.now)})"
        elif start is not None and self.now < start:
            problem = f"{what} is not valid before {_iso(start)} (now {_iso(self.now)})"
        if problem:
            self.warnings.append(problem)

    def settle(self) -> None:
        if self.strict and self.warnings:
            raise _fail("collateral outside its validity window: " + "; ".join(self.warnings))


def _check_crl(
    crl: x509.CertificateRevocationList,
    what: str,
    issuer: x509.Certificate,
    covered: Iterable[x509.Certificate],
    clock: _Clock,
) -> None:
    try:
        crl_issuer = crl.issuer
        if crl_issuer != issuer.subject:
            raise _fail(f"{what} is issued by {_cn(crl_issuer)!r}, expected {_cn(issuer.subject)!r}")
        if not crl.is_signature_valid(_require_p256(issuer, f"{what} issuer")):
            raise _fail(f"{what} signature does not verify")
        clock.window(what, crl.last_update_utc, crl.next_update_utc)
        for cert in covered:
            if cert.issuer == issuer.subject and crl.get_revoked_certificate_by_serial_number(cert.serial_number):
                raise _fail(f"certificate {_cn(cert.subject)!r} serial {cert.serial_number:x} is revoked ({what})")
    except _X509_ERRORS as e:  # a malformed field cryptography parses lazily
        raise _fail(f"{what} is malformed ({e})") from None


# --------------------------------------------------------------------------- TCB evaluation
def _component_svns(tcb: Mapping, field: str, what: str) -> list[int]:
    """The 16 ``svn`` values of a TCB level's component list (``sgxtcbcomponents``/``tdxtcbcomponents``)."""
    comps = _list(tcb, field, what)
    if len(comps) != 16:
        raise _fail(f"{what}: '{field}' must have 16 entries")
    out = []
    for c in comps:
        if not isinstance(c, dict):
            raise _fail(f"{what}: '{field}' entry is not an object")
        out.append(_int(c, "svn", what))
    return out


def _level_sgx_svns(tcb: Mapping, version: int, what: str) -> list[int]:
    if version >= 3:
        return _component_svns(tcb, "sgxtcbcomponents", what)
    return [_int(tcb, f"sgxtcbcomp{i:02d}svn", what) for i in range(1, 17)]


def _level_tdx_svns(tcb: Mapping, what: str) -> list[int]:
    return _component_svns(tcb, "tdxtcbcomponents", what)


def _masked_equal(value: bytes, mask: bytes, expected: bytes) -> bool:
    return len(value) == len(mask) == len(expected) and all(
        (v & m) == e for v, m, e in zip(value, mask, expected)
    )


def _converge(platform: str, other: str) -> str:
    """Combine the platform TCB status with a QE or TDX-module status (Intel QVL rules)."""
    if other == "Revoked" or platform == "Revoked":
        return "Revoked"
    if other == "OutOfDate":
        if platform in ("UpToDate", "SWHardeningNeeded", "TDRelaunchAdvised"):
            return "OutOfDate"
        if platform in (
            "ConfigurationNeeded",
            "ConfigurationAndSWHardeningNeeded",
            "TDRelaunchAdvisedConfigurationNeeded",
        ):
            return "OutOfDateConfigurationNeeded"
    return platform


def _union(*lists: Iterable[str]) -> list[str]:
    out: list[str] = []
    for ids in lists:
        for i in ids:
            if i not in out:
                out.append(i)
    return out


@dataclass
class _TcbResult:
    status: str
    advisories: list[str]
    platform: str
    qe: str
    module: str | None
    tcb_date: str | None


def _evaluate_tcb(quote: Quote, pck: PckExtension, tcb_info: dict, qe_identity: dict) -> _TcbResult:
    tdx = isinstance(quote.body, TdReportBody)
    # ---- TCB info identity
    version = _int(tcb_info, "version", "TCB info")
    tcb_id = tcb_info.get("id", "SGX" if version == 2 else None)
    if tdx:
        if tcb_id != "TDX" or version < 3:
            raise _fail(f"TDX quote needs TDX TCB info v3, got id {tcb_id!r} v{version}")
    elif tcb_id != "SGX" or version not in (2, 3):
        raise _fail(f"SGX quote needs SGX TCB info v2/v3, got id {tcb_id!r} v{version}")
    if tcb_info.get("tcbType", 0) != 0:
        raise _fail(f"TCB info: unsupported tcbType {tcb_info.get('tcbType')!r}")
    fmspc = _hex(_str(tcb_info, "fmspc", "TCB info"), "TCB info fmspc", 6)
    if fmspc != pck.fmspc:
        raise _fail(f"FMSPC mismatch: PCK certificate {pck.fmspc.hex()}, TCB info {fmspc.hex()}")
    pce_id = _hex(_str(tcb_info, "pceId", "TCB info"), "TCB info pceId", 2)
    if pce_id != pck.pce_id:
        raise _fail(f"PCE-ID mismatch: PCK certificate {pck.pce_id.hex()}, TCB info {pce_id.hex()}")

    # ---- platform level
    tee_tcb_svn = quote.body.tee_tcb_svn if isinstance(quote.body, TdReportBody) else b""
    module_version = tee_tcb_svn[1] if tdx else 0
    tdx_start = 2 if (tdx and module_version > 0) else 0
    platform_level = None
    for n, level in enumerate(_list(tcb_info, "tcbLevels", "TCB info")):
        what = f"TCB info level {n}"
        if not isinstance(level, dict) or not isinstance(level.get("tcb"), dict):
            raise _fail(f"{what}: not an object with 'tcb'")
        tcb = level["tcb"]
        sgx = _level_sgx_svns(tcb, version, what)
        if any(have < need for have, need in zip(pck.tcb_comp_svns, sgx)):
            continue
        if pck.pce_svn < _int(tcb, "pcesvn", what):
            continue
        if tdx:
            tdxs = _level_tdx_svns(tcb, what)
            if any(tee_tcb_svn[i] < tdxs[i] for i in range(tdx_start, 16)):
                continue
        platform_level = (level, _status(level, what), _advisories(level, what))
        break
    if platform_level is None:
        raise _fail("TCB not supported: no TCB info level matches this platform's TCB")
    level, platform_status, advisories = platform_level
    tcb_date = level.get("tcbDate") if isinstance(level.get("tcbDate"), str) else None

    # ---- TDX module identity
    module_status = None
    module_adv: list[str] = []
    if tdx:
        mr_signer_seam = quote.body.mr_signer_seam  # type: ignore[union-attr]
        seam_attrs = quote.body.seam_attributes  # type: ignore[union-attr]
        if module_version > 0 and "tdxModuleIdentities" in tcb_info:
            want = f"TDX_{module_version:02X}"
            ident = None
            for m in _list(tcb_info, "tdxModuleIdentities", "TCB info"):
                if isinstance(m, dict) and m.get("id") == want:
                    ident = m
                    break
            if ident is None:
                raise _fail(f"TCB info has no TDX module identity {want}")
            what = f"TDX module identity {want}"
            if _hex(_str(ident, "mrsigner", what), f"{what} mrsigner", 48) != mr_signer_seam:
                raise _fail(f"{what}: MRSIGNERSEAM mismatch")
            if not _masked_equal(
                seam_attrs,
                _hex(_str(ident, "attributesMask", what), f"{what} attributesMask", 8),
                _hex(_str(ident, "attributes", what), f"{what} attributes", 8),
            ):
                raise _fail(f"{what}: SEAM attributes mismatch")
            for n, lvl in enumerate(_list(ident, "tcbLevels", what)):
                lw = f"{what} level {n}"
                if not isinstance(lvl, dict) or not isinstance(lvl.get("tcb"), dict):
                    raise _fail(f"{lw}: not an object with 'tcb'")
                if _int(lvl["tcb"], "isvsvn", lw) <= tee_tcb_svn[0]:
                    module_status = _status(lvl, lw)
                    module_adv = _advisories(lvl, lw)
                    break
            if module_status is None:
                raise _fail(f"TCB not supported: no {what} level for TDX module SVN {tee_tcb_svn[0]}")
        elif module_version == 0 and isinstance(tcb_info.get("tdxModule"), dict):
            m = tcb_info["tdxModule"]
            what = "TDX module"
            if _hex(_str(m, "mrsigner", what), f"{what} mrsigner", 48) != mr_signer_seam:
                raise _fail(f"{what}: MRSIGNERSEAM mismatch")
            if not _masked_equal(
                seam_attrs,
                _hex(_str(m, "attributesMask", what), f"{what} attributesMask", 8),
                _hex(_str(m, "attributes", what), f"{what} attributes", 8),
            ):
                raise _fail(f"{what}: SEAM attributes mismatch")

    # ---- QE identity
    qe = quote.signature_data.qe_report
    q_what = "QE identity"
    want_id = "TD_QE" if tdx else "QE"
    if qe_identity.get("id") != want_id or _int(qe_identity, "version", q_what) != 2:
        raise _fail(f"{q_what}: expected id {want_id!r} version 2")
    if _hex(_str(qe_identity, "mrsigner", q_what), "QE identity mrsigner", 32) != qe.mr_signer:
        raise _fail("QE report MRSIGNER does not match the QE identity")
    if _int(qe_identity, "isvprodid", q_what) != qe.isv_prod_id:
        raise _fail("QE report ISVPRODID does not match the QE identity")
    misc = int.from_bytes(_hex(_str(qe_identity, "miscselect", q_what), "QE identity miscselect", 4), "big")
    misc_mask = int.from_bytes(
        _hex(_str(qe_identity, "miscselectMask", q_what), "QE identity miscselectMask", 4), "big"
    )
    if qe.misc_select & misc_mask != misc:
        raise _fail("QE report MISCSELECT does not match the QE identity")
    if not _masked_equal(
        qe.attributes,
        _hex(_str(qe_identity, "attributesMask", q_what), "QE identity attributesMask", 16),
        _hex(_str(qe_identity, "attributes", q_what), "QE identity attributes", 16),
    ):
        raise _fail("QE report ATTRIBUTES do not match the QE identity")
    qe_status = "Revoked"  # Intel: an ISVSVN below every level is treated as revoked
    qe_adv: list[str] = []
    for n, lvl in enumerate(_list(qe_identity, "tcbLevels", q_what)):
        lw = f"QE identity level {n}"
        if not isinstance(lvl, dict) or not isinstance(lvl.get("tcb"), dict):
            raise _fail(f"{lw}: not an object with 'tcb'")
        if _int(lvl["tcb"], "isvsvn", lw) <= qe.isv_svn:
            qe_status = _status(lvl, lw)
            qe_adv = _advisories(lvl, lw)
            break

    status = platform_status
    if module_status is not None:
        status = _converge(status, module_status)
    # Intel QVL: a QE level other than UpToDate counts as "ISVSVN out of date" unless it is Revoked.
    status = _converge(status, qe_status if qe_status in ("UpToDate", "Revoked") else "OutOfDate")
    return _TcbResult(
        status=status,
        advisories=_union(advisories, module_adv, qe_adv),
        platform=platform_status,
        qe=qe_status,
        module=module_status,
        tcb_date=tcb_date,
    )


# --------------------------------------------------------------------------- main entry
def verify_quote(
    quote: bytes | Quote,
    *,
    collateral: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    root_pem: bytes | None = None,
    strict_time: bool = True,
    crls: Sequence[bytes | str] | None = None,
) -> VerifiedQuote:
    """Verify a DCAP quote and return its claims; raise :class:`AttestationError` otherwise.

    ``quote``: raw bytes or a parsed :class:`Quote`. ``collateral``: a dict in the dcap-qvl
    ``QuoteCollateralV3`` JSON layout (see :func:`read_collateral_file`), enables TCB status.
    ``now``: the time to check against (default: the current time; naive means UTC).
    ``root_pem``: the pinned root (PEM or DER; default the bundled Intel SGX Root CA).
    ``strict_time=False``: collateral time problems (TCB info / QE identity / CRL windows) go to
    ``warnings`` instead of raising. ``crls``: extra CRLs (DER, PEM or hex) issued by the root or
    the PCK intermediate CA, checked like the collateral's (useful without full collateral).
    """
    try:
        return _verify(quote, collateral, now, root_pem, strict_time, crls)
    except BranchyError:
        raise
    except Exception as e:  # fail closed: attacker-controlled input must never crash the caller
        raise _fail(f"quote verification failed: {type(e).__name__}: {e}") from e


def _verify(
    quote: bytes | Quote,
    collateral: Mapping[str, Any] | None,
    now: datetime | None,
    root_pem: bytes | None,
    strict_time: bool,
    crls: Sequence[bytes | str] | None,
) -> VerifiedQuote:
    q = quote if isinstance(quote, Quote) else parse_quote(quote)
    when = _utc(now)
    clock = _Clock(when, strict_time)
    root, root_der = _root_from_bytes(bytes(root_pem) if root_pem is not None else _bundled_root_bytes())
    sd = q.signature_data

    if q.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise _fail(f"quote is not from Intel's quoting enclave (QE vendor id {q.header.qe_vendor_id.hex()})")
    if sd.certification_data.cert_type != CERT_TYPE_PCK_CHAIN:
        raise _fail(
            f"certification data type {sd.certification_data.cert_type} is not supported "
            "(need 5: PCK certificate chain in the quote)"
        )

    # 1. PCK chain
    chain = _load_chain(q.pck_chain_pem, "PCK chain")
    _verify_chain(chain, root, root_der, when, "PCK chain", PCK_LEAF_CN, PCK_CA_CNS)
    leaf, pck_ca = chain[0], chain[1]
    pck = parse_pck_extension(leaf)

    # 2. QE report signature by the PCK leaf
    _verify_raw_sig(_require_p256(leaf, "PCK certificate"), sd.qe_report_signature, sd.qe_report_bytes,
                    "QE report signature (PCK key)")
    # 3. QE report data binds the attestation key and the QE auth data
    expected = hashlib.sha256(sd.attestation_key + sd.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(sd.qe_report.report_data, expected):
        raise _fail("QE report data is not SHA-256(attestation key || QE auth data) || 0^32")
    # 4. quote signature by the attestation key over header || body
    _verify_raw_sig(_p256_from_raw(sd.attestation_key, "attestation key"), sd.signature, q.signed_data,
                    "quote signature (attestation key)")

    # extra CRLs (optional)
    for n, value in enumerate(crls or ()):
        crl = _load_crl(value, f"CRL #{n + 1}")
        issuer = root if crl.issuer == root.subject else pck_ca
        _check_crl(crl, f"CRL #{n + 1} ({_cn(crl.issuer)})", issuer, chain, clock)

    result = None
    if collateral is not None:
        if not isinstance(collateral, Mapping):
            raise _fail("collateral must be a JSON object")
        missing = [k for k in _COLLATERAL_KEYS if k not in collateral]
        if missing:
            raise _fail(f"collateral lacks {', '.join(missing)}")
        # 5. TCB signing chains and signatures
        signers: dict[str, x509.Certificate] = {}
        signing_chains: list[tuple[x509.Certificate, ...]] = []
        for key in ("tcb_info_issuer_chain", "qe_identity_issuer_chain"):
            text = collateral[key]
            if not isinstance(text, str):
                raise _fail(f"collateral {key} must be a PEM string")
            if text not in signers:
                certs = _pem_chain_from_text(text, f"collateral {key}")
                _verify_chain(certs, root, root_der, when, f"collateral {key}", TCB_SIGNING_CN, ())
                signers[text] = certs[0]
                signing_chains.append(certs)
        tcb_bytes, tcb_info = _signed_json(collateral, "tcb_info", "TCB info")
        qe_bytes, qe_identity = _signed_json(collateral, "qe_identity", "QE identity")
        _verify_raw_sig(_require_p256(signers[collateral["tcb_info_issuer_chain"]], "TCB signing certificate"),
                        _hex(collateral["tcb_info_signature"], "tcb_info_signature", 64), tcb_bytes,
                        "TCB info signature")
        _verify_raw_sig(_require_p256(signers[collateral["qe_identity_issuer_chain"]], "TCB signing certificate"),
                        _hex(collateral["qe_identity_signature"], "qe_identity_signature", 64), qe_bytes,
                        "QE identity signature")
        # 6. CRLs
        covered = [c for ch in (chain, *signing_chains) for c in ch]
        _check_crl(_load_crl(collateral["root_ca_crl"], "root CA CRL"), "root CA CRL", root, covered, clock)
        # The PCK CRL must be signed by the very CA that issued this quote's PCK certificate (already
        # chained to the pinned root), so the collateral's own pck_crl_issuer_chain adds nothing and
        # is not trusted for this; a CRL from another PCK CA fails here.
        _check_crl(_load_crl(collateral["pck_crl"], "PCK CRL"), "PCK CRL", pck_ca, covered, clock)
        # 7. windows
        clock.window("TCB info", _date(tcb_info, "issueDate", "TCB info"), _date(tcb_info, "nextUpdate", "TCB info"))
        clock.window(
            "QE identity", _date(qe_identity, "issueDate", "QE identity"), _date(qe_identity, "nextUpdate", "QE identity")
        )
        clock.settle()
        # 8-10. FMSPC/PCE-ID, QE identity, TCB status
        result = _evaluate_tcb(q, pck, tcb_info, qe_identity)
    clock.settle()

    return VerifiedQuote(
        version=q.version,
        tee=q.tee,
        mrenclave=q.mrenclave,
        mrsigner=q.mrsigner,
        isv_prod_id=q.isv_prod_id,
        isv_svn=q.isv_svn,
        debug=q.debug,
        report_data=q.report_data,
        tcb_status=result.status if result else None,
        advisories=list(result.advisories) if result else [],
        fmspc=pck.fmspc.hex(),
        pce_id=pck.pce_id.hex(),
        warnings=list(clock.warnings),
        platform_tcb_status=result.platform if result else None,
        qe_tcb_status=result.qe if result else None,
        tdx_module_tcb_status=result.module if result else None,
        tcb_date=result.tcb_date if result else None,
        quote=q,
    )
