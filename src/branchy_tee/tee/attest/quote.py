"""Parse Intel DCAP ECDSA quotes: SGX quote v3, and v4 with an SGX or a TDX (TD 1.0) report body.

Layout (all integers little-endian)::

    header (48)  version u16 | att_key_type u16 | tee_type u32 | qe_svn u16 | pce_svn u16
                 | qe_vendor_id (16) | user_data (20)
    body         SGX report body (384) when tee_type = 0, TD report body (584) when tee_type = 0x81
    sig_data_len u32, then exactly sig_data_len bytes of signature data:
                 quote signature (64, raw r||s) | attestation key (64, raw x||y)
        v3:      QE report (384) | QE report signature (64) | u16 auth len | QE auth data
                 | certification data
        v4:      certification data of type 6 ("QE report certification data") whose body is
                 the v3 tail above (QE report .. inner certification data)
    certification data = type u16 | size u32 | size bytes (type 5: PEM chain leaf, CA, root)
    trailing bytes after the signature data are tolerated (some producers pad quotes).

``parse_quote`` checks every length before it slices, so for any input it either returns a
:class:`Quote` or raises :class:`~branchy_tee.core.errors.AttestationError` with a one-line reason.
It does *no* cryptography: a parsed quote is untrusted until :func:`branchy_tee.verifier.dcap.verify_quote`
accepts it. The original bytes are kept, and the exact byte ranges that are signed are exposed
(``Quote.signed_data``, ``QuoteSignatureData.qe_report_bytes``) so verification runs over them.
Standard library only.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from branchy_tee.core.errors import AttestationError

HEADER_LEN = 48
SGX_REPORT_LEN = 384
TD10_REPORT_LEN = 584
ECDSA_SIG_LEN = 64
ECDSA_KEY_LEN = 64
SGX_REPORT_DATA_AT = 320  # REPORTDATA (64 bytes) within an SGX report body
REPORT_DATA_LEN = 64

ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081

CERT_TYPE_PCK_CHAIN = 5  # concatenated PCK cert chain, PEM
CERT_TYPE_QE_REPORT = 6  # QE report certification data (quote v4)

#: QE vendor id of Intel's quoting enclaves (header bytes 12..28).
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\r\n\t ]*?-----END CERTIFICATE-----")


# --------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class EnclaveClaims:
    """What any evidence says about an enclave: the report fields a policy judges. Verified quotes
    (``verify.VerifiedQuote``), verified simulated documents (``providers.SimulatedDocument``) and a
    broker's ``policy.Claims`` all carry these; each adds its own, keyword-only."""

    mrenclave: bytes  # 32 (TDX: MRTD, 48)
    mrsigner: bytes  # 32 (TDX: MRSIGNERSEAM, 48)
    isv_prod_id: int
    isv_svn: int
    debug: bool
    report_data: bytes  # 64

    def report_fields(self) -> dict[str, str | int | bool]:
        """The fields a policy judges, as JSON values (byte strings in hex), for reports and logs."""
        return {
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "debug": self.debug,
        }


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes  # 16 bytes
    user_data: bytes  # 20 bytes


@dataclass(frozen=True)
class SgxReportBody:
    """An SGX REPORT body (384 bytes): the enclave's report, or the quoting enclave's."""

    raw: bytes
    cpu_svn: bytes  # 16
    misc_select: int  # u32
    isv_ext_prod_id: bytes  # 16
    attributes: bytes  # 16: flags (8, little-endian) then XFRM (8)
    mr_enclave: bytes  # 32
    mr_signer: bytes  # 32
    config_id: bytes  # 64
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes  # 16
    report_data: bytes  # 64

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.DEBUG: bit 1 of the first attributes byte."""
        return bool(self.attributes[0] & 0x02)


@dataclass(frozen=True)
class TdReportBody:
    """A TDX TD report body, TDX 1.0 layout (584 bytes)."""

    raw: bytes
    tee_tcb_svn: bytes  # 16
    mr_seam: bytes  # 48
    mr_signer_seam: bytes  # 48
    seam_attributes: bytes  # 8
    td_attributes: bytes  # 8
    xfam: bytes  # 8
    mr_td: bytes  # 48
    mr_config_id: bytes  # 48
    mr_owner: bytes  # 48
    mr_owner_config: bytes  # 48
    rtmr: tuple[bytes, bytes, bytes, bytes]  # RTMR0..3, 48 each
    report_data: bytes  # 64

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES.DEBUG (the TUD group): bit 0 of td_attributes."""
        return bool(self.td_attributes[0] & 0x01)


@dataclass(frozen=True)
class CertificationData:
    cert_type: int
    data: bytes


@dataclass(frozen=True)
class QuoteSignatureData:
    signature: bytes  # 64, raw r||s (big-endian), over header || body
    attestation_key: bytes  # 64, raw P-256 point x||y
    qe_report: SgxReportBody
    qe_report_signature: bytes  # 64, raw r||s, by the PCK leaf key over qe_report_bytes
    qe_auth_data: bytes
    certification_data: CertificationData  # the innermost one (type 5 for a verifiable quote)
    outer_cert_type: int  # v3: same as certification_data.cert_type; v4: 6

    @property
    def qe_report_bytes(self) -> bytes:
        """The exact 384 signed bytes of the QE report, as they were in the quote."""
        return self.qe_report.raw


@dataclass(frozen=True)
class Quote:
    """A parsed (not yet verified) DCAP quote.

    Convenience claims (``mrenclave`` etc.) map TDX fields onto the SGX names, see each property.
    ``spans`` gives the byte ranges ``(name, start, end)`` of the main regions in ``raw``
    (used by tests and fuzzers to aim at signed bytes).
    """

    raw: bytes
    header: QuoteHeader
    body: SgxReportBody | TdReportBody
    signature_data: QuoteSignatureData
    pck_chain_pem: tuple[bytes, ...]  # PEM blocks from type-5 certification data, leaf first
    trailing_len: int  # bytes after the signature data (ignored)
    spans: tuple[tuple[str, int, int], ...]

    # ---- the signed ranges
    @property
    def signed_data(self) -> bytes:
        """Header || report body: the bytes the attestation key signs."""
        return self.raw[: HEADER_LEN + len(self.body.raw)]

    def span(self, name: str) -> tuple[int, int]:
        for n, start, end in self.spans:
            if n == name:
                return start, end
        raise KeyError(name)

    # ---- claims
    @property
    def version(self) -> int:
        return self.header.version

    @property
    def tee(self) -> str:
        """``"sgx"`` or ``"tdx"``."""
        return "tdx" if self.header.tee_type == TEE_TYPE_TDX else "sgx"

    @property
    def mrenclave(self) -> bytes:
        """SGX: MRENCLAVE (32 bytes). TDX: MRTD (48 bytes), the measurement of the initial TD."""
        b = self.body
        return b.mr_td if isinstance(b, TdReportBody) else b.mr_enclave

    @property
    def mrsigner(self) -> bytes:
        """SGX: MRSIGNER (32 bytes). TDX: MRSIGNERSEAM (48 bytes), the signer of the TDX module
        (all zeros for Intel's module); a TD has no enclave-signer equivalent, use
        ``body.mr_owner``/``body.mr_config_id`` or the RTMRs for TD-owner policies."""
        b = self.body
        return b.mr_signer_seam if isinstance(b, TdReportBody) else b.mr_signer

    @property
    def isv_prod_id(self) -> int:
        """SGX: ISVPRODID. TDX: 0 (no equivalent)."""
        b = self.body
        return 0 if isinstance(b, TdReportBody) else b.isv_prod_id

    @property
    def isv_svn(self) -> int:
        """SGX: ISVSVN. TDX: 0 (no equivalent)."""
        b = self.body
        return 0 if isinstance(b, TdReportBody) else b.isv_svn

    @property
    def debug(self) -> bool:
        """SGX: ATTRIBUTES.DEBUG. TDX: TD_ATTRIBUTES.DEBUG."""
        return self.body.debug

    @property
    def report_data(self) -> bytes:
        return self.body.report_data

    @property
    def pem_chain(self) -> list[bytes]:
        """The PCK certificate chain as a list of PEM blocks (leaf, intermediate CA, root)."""
        return list(self.pck_chain_pem)


# --------------------------------------------------------------------------- reader
class _Reader:
    """Bounds-checked cursor over ``data[start:end]``; every read names what it reads."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise AttestationError(
                f"quote truncated: {what} needs {n} bytes at offset {self.pos}, {max(self.end - self.pos, 0)} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


def _parse_sgx_report(raw: bytes) -> SgxReportBody:
    # raw is exactly SGX_REPORT_LEN bytes (callers take() it)
    (misc_select,) = struct.unpack_from("<I", raw, 16)
    isv_prod_id, isv_svn, config_svn = struct.unpack_from("<HHH", raw, 256)
    return SgxReportBody(
        raw=raw,
        cpu_svn=raw[0:16],
        misc_select=misc_select,
        isv_ext_prod_id=raw[32:48],
        attributes=raw[48:64],
        mr_enclave=raw[64:96],
        mr_signer=raw[128:160],
        config_id=raw[192:256],
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        config_svn=config_svn,
        isv_family_id=raw[304:SGX_REPORT_DATA_AT],
        report_data=raw[SGX_REPORT_DATA_AT : SGX_REPORT_DATA_AT + REPORT_DATA_LEN],
    )


def _parse_td10_report(raw: bytes) -> TdReportBody:
    def f(off: int, n: int) -> bytes:
        return raw[off : off + n]

    return TdReportBody(
        raw=raw,
        tee_tcb_svn=f(0, 16),
        mr_seam=f(16, 48),
        mr_signer_seam=f(64, 48),
        seam_attributes=f(112, 8),
        td_attributes=f(120, 8),
        xfam=f(128, 8),
        mr_td=f(136, 48),
        mr_config_id=f(184, 48),
        mr_owner=f(232, 48),
        mr_owner_config=f(280, 48),
        rtmr=(f(328, 48), f(376, 48), f(424, 48), f(472, 48)),
        report_data=f(520, 64),
    )


def _cert_data(r: _Reader, what: str, spans: list[tuple[str, int, int]]) -> tuple[CertificationData, int]:
    cert_type = r.u16(f"{what} type")
    size = r.u32(f"{what} size")
    start = r.pos
    data = r.take(size, f"{what} ({size} bytes)")
    spans.append((f"{what}", start, start + size))
    return CertificationData(cert_type, data), start


def _qe_part(r: _Reader, spans: list[tuple[str, int, int]]) -> tuple[SgxReportBody, bytes, bytes, CertificationData]:
    """QE report .. inner certification data (the v3 tail, the body of v4 type-6 data)."""
    start = r.pos
    qe_raw = r.take(SGX_REPORT_LEN, "QE report")
    spans.append(("qe_report", start, start + SGX_REPORT_LEN))
    start = r.pos
    qe_sig = r.take(ECDSA_SIG_LEN, "QE report signature")
    spans.append(("qe_report_signature", start, start + ECDSA_SIG_LEN))
    auth_len = r.u16("QE auth data length")
    start = r.pos
    auth = r.take(auth_len, "QE auth data")
    spans.append(("qe_auth_data", start, start + auth_len))
    cert, _ = _cert_data(r, "certification_data", spans)
    return _parse_sgx_report(qe_raw), qe_sig, auth, cert


def split_pem_chain(data: bytes) -> tuple[bytes, ...]:
    """The ``-----BEGIN CERTIFICATE-----`` blocks in ``data`` (trailing NULs etc. are ignored)."""
    return tuple(m.group(0) for m in _PEM_CERT_RE.finditer(data))


def peek_sgx_report_data(data: bytes) -> bytes:
    """REPORTDATA of an SGX quote (v3/v4), read at its fixed offset without parsing the rest.

    For an enclave's sanity check of the quote it was just handed (did it get its own?); this
    verifies nothing, :func:`branchy_tee.verifier.dcap.verify_quote` does. Raises
    :class:`AttestationError` when ``data`` is too short or not an SGX DCAP quote.
    """
    start = HEADER_LEN + SGX_REPORT_DATA_AT
    if len(data) < HEADER_LEN + SGX_REPORT_LEN:
        raise AttestationError(f"{len(data)} bytes is too short for an SGX quote")
    version, _, tee_type = struct.unpack_from("<HHI", data)  # the header's first three fields
    if version not in (3, 4) or tee_type != TEE_TYPE_SGX:
        raise AttestationError(f"not an SGX DCAP quote (version {version}, TEE type {tee_type:#x})")
    return data[start : start + REPORT_DATA_LEN]


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP ECDSA-P256 quote (v3 SGX; v4 SGX or TDX 1.0).

    Raises :class:`AttestationError` (and nothing else) for anything that is not such a quote.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise AttestationError(f"a quote must be bytes, not {type(data).__name__}")
    if len(data) < HEADER_LEN:
        raise AttestationError(f"quote truncated: {len(data)} bytes, the header alone is {HEADER_LEN}")
    spans: list[tuple[str, int, int]] = []
    r = _Reader(data)
    header = _parse_header(r, spans)
    body_len = TD10_REPORT_LEN if header.tee_type == TEE_TYPE_TDX else SGX_REPORT_LEN
    body_raw = r.take(body_len, "report body")
    spans.append(("body", HEADER_LEN, HEADER_LEN + body_len))
    body: SgxReportBody | TdReportBody = (
        _parse_td10_report(body_raw) if header.tee_type == TEE_TYPE_TDX else _parse_sgx_report(body_raw)
    )
    sig_data, sig_end = _parse_signature_data(r, header.version, spans)
    chain: tuple[bytes, ...] = ()
    if sig_data.certification_data.cert_type == CERT_TYPE_PCK_CHAIN:
        chain = _pck_chain(sig_data.certification_data, spans)
    return Quote(
        raw=data,
        header=header,
        body=body,
        signature_data=sig_data,
        pck_chain_pem=chain,
        trailing_len=len(data) - sig_end,
        spans=tuple(spans),
    )


def _parse_header(r: _Reader, spans: list[tuple[str, int, int]]) -> QuoteHeader:
    """The 48-byte header; only ECDSA-P256 quotes v3 (SGX) and v4 (SGX or TDX) get past it."""
    version = r.u16("version")
    att_key_type = r.u16("attestation key type")
    tee_type = r.u32("tee type")
    qe_svn = r.u16("QE SVN")
    pce_svn = r.u16("PCE SVN")
    qe_vendor_id = r.take(16, "QE vendor id")
    user_data = r.take(20, "user data")
    spans.append(("header", 0, HEADER_LEN))
    if version not in (3, 4):
        if version == 5:
            raise AttestationError("quote version 5 is not supported (only v3 and v4)")
        raise AttestationError(f"unsupported quote version {version} (only v3 and v4)")
    if att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise AttestationError(f"unsupported attestation key type {att_key_type} (only 2 = ECDSA-P256)")
    if version == 3 and tee_type != TEE_TYPE_SGX:
        raise AttestationError(f"quote v3 with non-SGX tee type {tee_type:#x}")
    if tee_type not in (TEE_TYPE_SGX, TEE_TYPE_TDX):
        raise AttestationError(f"unknown tee type {tee_type:#x} (0 = SGX, 0x81 = TDX)")
    return QuoteHeader(version, att_key_type, tee_type, qe_svn, pce_svn, qe_vendor_id, user_data)


def _parse_signature_data(
    r: _Reader, version: int, spans: list[tuple[str, int, int]]
) -> tuple[QuoteSignatureData, int]:
    """The length-prefixed signature data after the body, and the offset where it ends."""
    data = r.data
    sig_len = r.u32("signature data length")
    if sig_len > r.remaining():
        raise AttestationError(
            f"quote truncated: signature data length {sig_len} exceeds the {r.remaining()} bytes left"
        )
    sig_start = r.pos
    sr = _Reader(data, sig_start, sig_start + sig_len)
    signature = sr.take(ECDSA_SIG_LEN, "quote signature")
    spans.append(("signature", sig_start, sig_start + ECDSA_SIG_LEN))
    attestation_key = sr.take(ECDSA_KEY_LEN, "attestation key")
    spans.append(("attestation_key", sig_start + ECDSA_SIG_LEN, sig_start + ECDSA_SIG_LEN + ECDSA_KEY_LEN))
    if version == 3:
        qe_report, qe_sig, auth, cert = _qe_part(sr, spans)
        outer_type = cert.cert_type
    else:
        qe_report, qe_sig, auth, cert = _v4_qe_certification_data(sr, spans)
        outer_type = CERT_TYPE_QE_REPORT
    if sr.remaining():
        raise AttestationError(
            f"signature data length {sig_len} does not match its content ({sig_len - sr.remaining()} bytes)"
        )
    sig_data = QuoteSignatureData(
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_sig,
        qe_auth_data=auth,
        certification_data=cert,
        outer_cert_type=outer_type,
    )
    return sig_data, sig_start + sig_len


def _v4_qe_certification_data(
    sr: _Reader, spans: list[tuple[str, int, int]]
) -> tuple[SgxReportBody, bytes, bytes, CertificationData]:
    """Quote v4: certification data of type 6 whose body is the v3 tail (QE report .. inner data)."""
    outer_type = sr.u16("outer certification data type")
    outer_size = sr.u32("outer certification data size")
    if outer_type != CERT_TYPE_QE_REPORT:
        raise AttestationError(
            f"quote v4: certification data type {outer_type}, expected 6 (QE report certification data)"
        )
    if outer_size != sr.remaining():
        raise AttestationError(
            f"quote v4: QE report certification data size {outer_size} does not match "
            f"the {sr.remaining()} bytes left in the signature data"
        )
    inner = _Reader(sr.data, sr.pos, sr.pos + outer_size)
    part = _qe_part(inner, spans)
    if inner.remaining():
        raise AttestationError(f"quote v4: {inner.remaining()} unexpected bytes after the inner certification data")
    sr.pos = inner.pos
    return part


def _pck_chain(cert: CertificationData, spans: list[tuple[str, int, int]]) -> tuple[bytes, ...]:
    """The PEM blocks of type-5 certification data (leaf first), each recorded as a span."""
    chain = split_pem_chain(cert.data)
    if not chain:
        raise AttestationError("certification data type 5 holds no PEM certificate")
    cert_start = dict((n, s) for n, s, _ in spans)["certification_data"]
    for i, m in enumerate(_PEM_CERT_RE.finditer(cert.data)):
        spans.append((f"pem_cert_{i}", cert_start + m.start(), cert_start + m.end()))
    return chain
