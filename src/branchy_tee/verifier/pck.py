"""The PCK certificate: its chain to the pinned Intel root, and its SGX extension.

The quote carries the platform's PCK certificate chain (leaf "Intel SGX PCK Certificate", a
"PCK Processor/Platform CA", the root). The leaf's SGX extension (OID 1.2.840.113741.1.13.1)
names the platform: FMSPC and PCE-ID select the TCB info, and the 16 TCB component SVNs, PCESVN
and CPUSVN are what the TCB levels are compared with. The extension is read with a small strict
DER reader (every length checked, duplicates and missing entries refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterator, Sequence

from cryptography import x509

from branchy_tee.verifier.chain import PinnedRoot, load_chain, verify_chain
from branchy_tee.verifier.pki import der_items, fail

PCK_LEAF_CN = "Intel SGX PCK Certificate"
PCK_CA_CNS = ("Intel SGX PCK Processor CA", "Intel SGX PCK Platform CA")
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_TAG_INTEGER, _TAG_OCTETS, _TAG_OID, _TAG_SEQUENCE = 0x02, 0x04, 0x06, 0x30  # DER universal tags


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
class PckChain:
    """A PCK chain that verified to the pinned root, and the leaf's SGX extension."""

    certs: tuple[x509.Certificate, ...]  # leaf, PCK CA, root
    extension: PckExtension

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def ca(self) -> x509.Certificate:
        """The PCK Processor/Platform CA that issued the leaf (and signs the PCK CRL)."""
        return self.certs[1]


def verify_pck_chain(pem_blocks: Sequence[bytes], root: PinnedRoot, now: datetime) -> PckChain:
    """Parse and verify the quote's PCK chain at ``now``, then read the leaf's SGX extension."""
    certs = load_chain(pem_blocks, "PCK chain")
    verify_chain(certs, root, now, "PCK chain", PCK_LEAF_CN, PCK_CA_CNS)
    return PckChain(certs, parse_pck_extension(certs[0]))


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


_SGX_OID_PREFIX = SGX_EXTENSION_OID.dotted_string
_OID_PPID = _oid_bytes(_SGX_OID_PREFIX + ".1")
_OID_TCB = _oid_bytes(_SGX_OID_PREFIX + ".2")
_OID_TCB_COMP = {_oid_bytes(f"{_SGX_OID_PREFIX}.2.{i}"): i for i in range(1, 19)}
_OID_PCEID = _oid_bytes(_SGX_OID_PREFIX + ".3")
_OID_FMSPC = _oid_bytes(_SGX_OID_PREFIX + ".4")

_Item = tuple[int, int, int]  # (tag, content start, content end) in the extension bytes


def _der_uint(buf: bytes, s: int, e: int, what: str) -> int:
    if e <= s or e - s > 4:
        raise fail(f"SGX extension: {what} is not a small INTEGER")
    if buf[s] & 0x80:
        raise fail(f"SGX extension: {what} is negative")
    if e - s > 1 and buf[s] == 0 and not buf[s + 1] & 0x80:
        raise fail(f"SGX extension: {what} is not minimally encoded")
    return int.from_bytes(buf[s:e], "big")


def _oid_value_pairs(raw: bytes, start: int, end: int, what: str) -> Iterator[tuple[bytes, _Item]]:
    """A SEQUENCE's content that is a list of SEQUENCE { OID, value }: (OID bytes, value item) each,
    one at a time (so the caller's checks run in entry order)."""
    for tag, s, e in der_items(raw, start, end):
        if tag != _TAG_SEQUENCE:
            raise fail(f"SGX extension: {what} is not a SEQUENCE")
        pair = der_items(raw, s, e)
        if len(pair) != 2 or pair[0][0] != _TAG_OID:
            raise fail(f"SGX extension: {what} is not (OID, value)")
        yield raw[pair[0][1] : pair[0][2]], pair[1]


def _extension_bytes(cert: x509.Certificate) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID)
    except x509.ExtensionNotFound:
        raise fail("PCK certificate has no SGX extension (1.2.840.113741.1.13.1)") from None
    raw = getattr(ext.value, "value", None)
    if not isinstance(raw, bytes):
        raise fail("PCK certificate: SGX extension is not opaque DER")
    return raw


def _tcb_entries(raw: bytes, fields: dict[bytes, _Item]) -> dict[int, _Item]:
    """The TCB entry's 18 known parts by index (1-16 component SVNs, 17 PCESVN, 18 CPUSVN)."""
    if _OID_TCB not in fields or fields[_OID_TCB][0] != _TAG_SEQUENCE:
        raise fail("SGX extension: TCB missing")
    _, ts, te = fields[_OID_TCB]
    comps: dict[int, _Item] = {}
    for oid, item in _oid_value_pairs(raw, ts, te, "TCB entry"):
        idx = _OID_TCB_COMP.get(oid)
        if idx is None:
            continue  # unknown TCB entries are ignored
        if idx in comps:
            raise fail("SGX extension: duplicate TCB entry")
        comps[idx] = item
    if set(comps) != set(range(1, 19)):
        raise fail("SGX extension: TCB lacks some of the 16 component SVNs, PCESVN or CPUSVN")
    return comps


def _tcb_svn(raw: bytes, item: _Item, what: str, limit: int) -> int:
    tag, s, e = item
    if tag != _TAG_INTEGER:
        raise fail(f"SGX extension: {what} is not an INTEGER")
    v = _der_uint(raw, s, e, what)
    if v > limit:
        raise fail(f"SGX extension: {what} out of range")
    return v


def parse_pck_extension(cert: x509.Certificate) -> PckExtension:
    """Read PPID, TCB (16 component SVNs, PCESVN, CPUSVN), PCE-ID and FMSPC from a PCK certificate."""
    raw = _extension_bytes(cert)
    top = der_items(raw, 0, len(raw))
    if len(top) != 1 or top[0][0] != _TAG_SEQUENCE:
        raise fail("SGX extension: expected one SEQUENCE")
    fields: dict[bytes, _Item] = {}
    for oid, item in _oid_value_pairs(raw, top[0][1], top[0][2], "entry"):
        if oid in fields:
            raise fail("SGX extension: duplicate entry")
        fields[oid] = item

    def octets(oid: bytes, what: str, size: int) -> bytes:
        if oid not in fields:
            raise fail(f"SGX extension: {what} missing")
        tag, s, e = fields[oid]
        if tag != _TAG_OCTETS or e - s != size:
            raise fail(f"SGX extension: {what} is not a {size}-byte OCTET STRING")
        return raw[s:e]

    ppid = octets(_OID_PPID, "PPID", 16)
    pce_id = octets(_OID_PCEID, "PCE-ID", 2)
    fmspc = octets(_OID_FMSPC, "FMSPC", 6)
    comps = _tcb_entries(raw, fields)
    svns = tuple(_tcb_svn(raw, comps[i], f"TCB component {i}", 255) for i in range(1, 17))
    pce_svn = _tcb_svn(raw, comps[17], "PCESVN", 0xFFFF)
    tag, s, e = comps[18]
    if tag != _TAG_OCTETS or e - s != 16:
        raise fail("SGX extension: CPUSVN is not a 16-byte OCTET STRING")
    return PckExtension(ppid=ppid, tcb_comp_svns=svns, pce_svn=pce_svn, cpu_svn=raw[s:e], pce_id=pce_id, fmspc=fmspc)
