"""The TCB status of a verified quote against typed collateral, as in Intel's QVL.

One evaluation for SGX and TDX:

1. the TCB info must be for this TEE and this platform (FMSPC and PCE-ID of the PCK certificate);
2. the platform level is the first TCB info level whose SGX components and PCESVN are all <= the
   PCK certificate's, and, for TDX, whose TDX components are <= the quote's TEE_TCB_SVN;
3. TDX only: the TDX module must match its identity in the TCB info (MRSIGNERSEAM, masked SEAM
   attributes), and the module identity's level is the first one at or below the module's SVN;
4. the QE report must match the QE identity (MRSIGNER, ISVPRODID, masked MISCSELECT and
   ATTRIBUTES); its level is the first one at or below the QE's ISVSVN (none: Revoked);
5. the statuses converge into one, and the advisory ids are the union of the matched levels'
   (platform first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from branchy_tee.tee.attest.quote import Quote, SgxReportBody, TdReportBody
from branchy_tee.verifier.collateral import IsvLevel, QeIdentity, TcbInfo, TcbLevel, TdxModule
from branchy_tee.verifier.pck import PckExtension
from branchy_tee.verifier.pki import fail


@dataclass(frozen=True)
class TcbResult:
    status: str  # the converged status
    advisories: tuple[str, ...]
    platform: str  # the platform level's status
    qe: str  # the QE identity level's status
    module: str | None  # the TDX module identity level's status (TDX with module identities only)
    tcb_date: str | None  # the platform level's tcbDate


def evaluate_tcb(quote: Quote, pck: PckExtension, tcb_info: TcbInfo, qe_identity: QeIdentity) -> TcbResult:
    """Steps 1-5 above; raise AttestationError when the collateral does not fit the quote."""
    td = quote.body if isinstance(quote.body, TdReportBody) else None
    _check_applies(tcb_info, pck, tdx=td is not None)
    # TEE_TCB_SVN[1] is the TDX module's major version; from version 1 on, the first two bytes
    # belong to the module identity's level, not to the platform level.
    module_version = td.tee_tcb_svn[1] if td else 0
    tee_tcb = (td.tee_tcb_svn, 2 if module_version > 0 else 0) if td else None
    platform = _platform_level(tcb_info.levels, pck, tee_tcb)
    module = _tdx_module_level(td, module_version, tcb_info) if td else None
    qe = _qe_level(quote.signature_data.qe_report, qe_identity, tdx=td is not None)

    status = platform.status
    if module is not None:
        status = _converge(status, module.status)
    # Intel QVL: a QE ISVSVN below every level is treated as revoked, and a QE level other than
    # UpToDate counts as "ISVSVN out of date" unless it is Revoked.
    qe_status = qe.status if qe else "Revoked"
    status = _converge(status, qe_status if qe_status in ("UpToDate", "Revoked") else "OutOfDate")
    return TcbResult(
        status=status,
        advisories=_union(platform.advisories, module.advisories if module else (), qe.advisories if qe else ()),
        platform=platform.status,
        qe=qe_status,
        module=module.status if module else None,
        tcb_date=platform.tcb_date,
    )


def _check_applies(tcb_info: TcbInfo, pck: PckExtension, tdx: bool) -> None:
    tcb_id, version = tcb_info.id, tcb_info.version
    if tdx:
        if tcb_id != "TDX" or version < 3:
            raise fail(f"TDX quote needs TDX TCB info v3, got id {tcb_id!r} v{version}")
    elif tcb_id != "SGX" or version not in (2, 3):
        raise fail(f"SGX quote needs SGX TCB info v2/v3, got id {tcb_id!r} v{version}")
    if tcb_info.fmspc != pck.fmspc:
        raise fail(f"FMSPC mismatch: PCK certificate {pck.fmspc.hex()}, TCB info {tcb_info.fmspc.hex()}")
    if tcb_info.pce_id != pck.pce_id:
        raise fail(f"PCE-ID mismatch: PCK certificate {pck.pce_id.hex()}, TCB info {tcb_info.pce_id.hex()}")


def _at_least(have: Sequence[int], need: Sequence[int]) -> bool:
    return all(h >= n for h, n in zip(have, need, strict=True))


def _platform_level(levels: Sequence[TcbLevel], pck: PckExtension, tdx: tuple[bytes, int] | None) -> TcbLevel:
    """The first level the platform meets. ``tdx``: (TEE_TCB_SVN, first TDX component compared)."""
    for level in levels:
        if not _at_least(pck.tcb_comp_svns, level.sgx_svns) or pck.pce_svn < level.pce_svn:
            continue
        if tdx is not None:
            tee_tcb_svn, start = tdx
            if level.tdx_svns is None:  # not reached: TcbLevel.parse gives every TDX TCB info level them
                raise fail("TCB info level has no TDX components")
            if not _at_least(tee_tcb_svn[start:], level.tdx_svns[start:]):
                continue
        return level
    raise fail("TCB not supported: no TCB info level matches this platform's TCB")


def _isv_level(levels: Iterable[IsvLevel], svn: int) -> IsvLevel | None:
    """The first (highest) level whose ISVSVN the given SVN reaches."""
    return next((lvl for lvl in levels if lvl.isv_svn <= svn), None)


def _masked_equal(value: bytes, mask: bytes, expected: bytes) -> bool:
    return len(value) == len(mask) == len(expected) and all(
        (v & m) == e for v, m, e in zip(value, mask, expected, strict=True)
    )


def _check_module(td: TdReportBody, module: TdxModule, what: str) -> None:
    if module.mrsigner != td.mr_signer_seam:
        raise fail(f"{what}: MRSIGNERSEAM mismatch")
    if not _masked_equal(td.seam_attributes, module.attributes_mask, module.attributes):
        raise fail(f"{what}: SEAM attributes mismatch")


def _tdx_module_level(td: TdReportBody, module_version: int, tcb_info: TcbInfo) -> IsvLevel | None:
    """The TDX module identity's level (module major version >= 1), else None after checking the
    version-0 ``tdxModule`` identity when the TCB info has one."""
    if module_version > 0 and tcb_info.tdx_module_identities is not None:
        want = f"TDX_{module_version:02X}"
        ident = next((m for m in tcb_info.tdx_module_identities if m.id == want), None)
        if ident is None:
            raise fail(f"TCB info has no TDX module identity {want}")
        what = f"TDX module identity {want}"
        _check_module(td, ident, what)
        level = _isv_level(ident.levels, td.tee_tcb_svn[0])
        if level is None:
            raise fail(f"TCB not supported: no {what} level for TDX module SVN {td.tee_tcb_svn[0]}")
        return level
    if module_version == 0 and tcb_info.tdx_module is not None:
        _check_module(td, tcb_info.tdx_module, "TDX module")
    return None


def _qe_level(qe: SgxReportBody, identity: QeIdentity, tdx: bool) -> IsvLevel | None:
    """The QE identity level of the quoting enclave that signed the quote (None: below every level)."""
    want_id = "TD_QE" if tdx else "QE"
    if identity.id != want_id or identity.version != 2:
        raise fail(f"QE identity: expected id {want_id!r} version 2")
    if identity.mrsigner != qe.mr_signer:
        raise fail("QE report MRSIGNER does not match the QE identity")
    if identity.isv_prod_id != qe.isv_prod_id:
        raise fail("QE report ISVPRODID does not match the QE identity")
    if qe.misc_select & identity.miscselect_mask != identity.miscselect:
        raise fail("QE report MISCSELECT does not match the QE identity")
    if not _masked_equal(qe.attributes, identity.attributes_mask, identity.attributes):
        raise fail("QE report ATTRIBUTES do not match the QE identity")
    return _isv_level(identity.levels, qe.isv_svn)


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


def _union(*lists: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for ids in lists:
        for i in ids:
            if i not in out:
                out.append(i)
    return tuple(out)
