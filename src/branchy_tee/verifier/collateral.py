"""Typed DCAP collateral: TCB info with its TCB levels, QE identity, and the checks that make it
trustworthy (TCB signing chains, signatures, CRLs, validity windows).

The input is the dcap-qvl ``QuoteCollateralV3`` JSON layout: PEM issuer chains, ``tcb_info`` and
``qe_identity`` as the exact signed JSON strings, hex raw r||s signatures, hex DER CRLs.
:func:`verify_collateral` checks, in this order:

5. the TCB info and QE identity issuer chains ("Intel SGX TCB Signing" + root) verify to the
   pinned root, both texts are JSON objects, and both signatures verify with that leaf;
6. the root CA CRL (issuer: root) and the PCK CRL (issuer: the quote's PCK CA) have valid
   signatures, and no certificate of the PCK or signing chains is revoked;
7. the signed texts are parsed into :class:`TcbInfo` and :class:`QeIdentity` (every field the
   TCB evaluation reads, in every level, is checked here; each text is parsed once per process).

Validity windows (CRLs: thisUpdate..nextUpdate; TCB info, QE identity: issueDate..nextUpdate) go
to the :class:`~.crl.Clock`, which raises or collects them as warnings.

Matching the quote against the collateral is :mod:`branchy_tee.verifier.tcb`'s job.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, TypeVar

from cryptography import x509

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.strict import iso8601
from branchy_tee.verifier.chain import PinnedRoot, chain_from_pem_text, verify_chain
from branchy_tee.verifier.crl import Clock, check_crl, load_crl
from branchy_tee.verifier.pck import PckChain
from branchy_tee.verifier.pki import fail, hex_bytes, require_p256, verify_raw_sig

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

TCB_SIGNING_CN = "Intel SGX TCB Signing"

COLLATERAL_KEYS = (
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


# --------------------------------------------------------------------------- JSON field readers
def _int(obj: Mapping, key: str, what: str) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise fail(f"{what}: '{key}' missing or not a non-negative integer")
    return v


def _str(obj: Mapping, key: str, what: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise fail(f"{what}: '{key}' missing or not a string")
    return v


def _list(obj: Mapping, key: str, what: str) -> list:
    v = obj.get(key)
    if not isinstance(v, list):
        raise fail(f"{what}: '{key}' missing or not a list")
    return v


def _optional_str(obj: Mapping, key: str, what: str, default: str | None = None) -> str | None:
    if key not in obj:
        return default
    return _str(obj, key, what)


def _hex_field(obj: Mapping, key: str, what: str, size: int) -> bytes:
    return hex_bytes(_str(obj, key, what), f"{what} {key}", size)


def _date(obj: Mapping, key: str, what: str) -> datetime:
    text = _str(obj, key, what)
    try:
        dt = iso8601(text)
    except ValueError:
        raise fail(f"{what}: '{key}' is not an ISO 8601 date ({text!r})") from None
    if dt.tzinfo is None:
        raise fail(f"{what}: '{key}' has no time zone ({text!r})")
    return dt.astimezone(timezone.utc)


def _evaluation_data_number(obj: Mapping, what: str) -> int | None:
    return _int(obj, "tcbEvaluationDataNumber", what) if "tcbEvaluationDataNumber" in obj else None


def _tcb_of(level: Any, what: str) -> Mapping:
    if not isinstance(level, dict) or not isinstance(level.get("tcb"), dict):
        raise fail(f"{what}: not an object with 'tcb'")
    return level["tcb"]


def _status(level: Mapping, what: str) -> str:
    s = _str(level, "tcbStatus", what)
    if s not in TCB_STATUSES:
        raise fail(f"{what}: unknown TCB status {s!r}")
    return s


def _advisories(level: Mapping, what: str) -> tuple[str, ...]:
    ids = level.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise fail(f"{what}: 'advisoryIDs' is not a list of strings")
    return tuple(ids)


def _component_svns(tcb: Mapping, key: str, what: str) -> tuple[int, ...]:
    """The 16 ``svn`` values of a TCB level's component list (``sgxtcbcomponents``/``tdxtcbcomponents``)."""
    comps = _list(tcb, key, what)
    if len(comps) != 16:
        raise fail(f"{what}: '{key}' must have 16 entries")
    out = []
    for c in comps:
        if not isinstance(c, dict):
            raise fail(f"{what}: '{key}' entry is not an object")
        out.append(_int(c, "svn", what))
    return tuple(out)


# --------------------------------------------------------------------------- typed collateral
@dataclass(frozen=True)
class TcbLevel:
    """A platform TCB level of TCB info: the SVNs a platform needs at least, and their status."""

    sgx_svns: tuple[int, ...]  # 16 SGX TCB component SVNs
    pce_svn: int
    tdx_svns: tuple[int, ...] | None  # 16 TDX TCB component SVNs (TDX TCB info only)
    status: str
    advisories: tuple[str, ...]
    tcb_date: str | None

    @classmethod
    def parse(cls, level: Any, what: str, version: int, tdx: bool) -> "TcbLevel":
        tcb = _tcb_of(level, what)
        if version >= 3:
            sgx = _component_svns(tcb, "sgxtcbcomponents", what)
        else:  # TCB info v2 names each component (TcbInfo.parse refuses versions below 2)
            sgx = tuple(_int(tcb, f"sgxtcbcomp{i:02d}svn", what) for i in range(1, 17))
        pce_svn = _int(tcb, "pcesvn", what)
        tdx_svns = _component_svns(tcb, "tdxtcbcomponents", what) if tdx else None
        date = level.get("tcbDate")
        return cls(
            sgx_svns=sgx,
            pce_svn=pce_svn,
            tdx_svns=tdx_svns,
            status=_status(level, what),
            advisories=_advisories(level, what),
            tcb_date=date if isinstance(date, str) else None,
        )


@dataclass(frozen=True)
class IsvLevel:
    """A level of the QE identity or of a TDX module identity: one ISVSVN and its status."""

    isv_svn: int
    status: str
    advisories: tuple[str, ...]

    @classmethod
    def parse(cls, level: Any, what: str) -> "IsvLevel":
        tcb = _tcb_of(level, what)
        return cls(isv_svn=_int(tcb, "isvsvn", what), status=_status(level, what), advisories=_advisories(level, what))


def _isv_levels(obj: Mapping, what: str) -> tuple[IsvLevel, ...]:
    return tuple(IsvLevel.parse(lvl, f"{what} level {n}") for n, lvl in enumerate(_list(obj, "tcbLevels", what)))


@dataclass(frozen=True)
class TdxModule:
    """A TDX module identity of TCB info: ``tdxModule`` (no id, no levels) or one entry of
    ``tdxModuleIdentities`` (id ``TDX_<major version>``, levels by module SVN)."""

    id: str | None
    mrsigner: bytes  # 48
    attributes_mask: bytes  # 8
    attributes: bytes  # 8
    levels: tuple[IsvLevel, ...]

    @classmethod
    def parse(cls, obj: Mapping, what: str, module_id: str | None = None) -> "TdxModule":
        mrsigner = _hex_field(obj, "mrsigner", what, 48)
        mask = _hex_field(obj, "attributesMask", what, 8)
        attributes = _hex_field(obj, "attributes", what, 8)
        levels: tuple[IsvLevel, ...] = ()
        if module_id is not None:
            levels = _isv_levels(obj, what)
        return cls(id=module_id, mrsigner=mrsigner, attributes_mask=mask, attributes=attributes, levels=levels)


def _module_identities(tcb_info: Mapping) -> tuple[TdxModule, ...] | None:
    if "tdxModuleIdentities" not in tcb_info:
        return None
    out = []
    for n, m in enumerate(_list(tcb_info, "tdxModuleIdentities", "TCB info")):
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            raise fail(f"TCB info: tdxModuleIdentities entry {n} is not an object with a string 'id'")
        out.append(TdxModule.parse(m, f"TDX module identity {m['id']}", m["id"]))
    return tuple(out)


@dataclass(frozen=True)
class TcbInfo:
    """Intel's TCB info for one FMSPC (SGX v2/v3 or TDX v3), tcbType 0."""

    id: str | None  # "SGX" (v2 may omit it) or "TDX"
    version: int
    fmspc: bytes  # 6
    pce_id: bytes  # 2
    issue_date: datetime
    next_update: datetime
    evaluation_data_number: int | None  # tcbEvaluationDataNumber
    levels: tuple[TcbLevel, ...]  # in Intel's order: the first one a platform meets is its level
    tdx_module: TdxModule | None  # TDX: identity of the module for major version 0
    tdx_module_identities: tuple[TdxModule, ...] | None  # TDX: identities by major version

    @classmethod
    def parse(cls, obj: Mapping) -> "TcbInfo":
        what = "TCB info"
        version = _int(obj, "version", what)
        tcb_id = _optional_str(obj, "id", what, "SGX" if version == 2 else None)
        if version < 2:
            raise fail(f"TCB info: unsupported version {version}")
        if obj.get("tcbType", 0) != 0:
            raise fail(f"TCB info: unsupported tcbType {obj.get('tcbType')!r}")
        fmspc = _hex_field(obj, "fmspc", what, 6)
        pce_id = _hex_field(obj, "pceId", what, 2)
        issue, next_update = _date(obj, "issueDate", what), _date(obj, "nextUpdate", what)
        number = _evaluation_data_number(obj, what)
        tdx = tcb_id == "TDX"
        levels = tuple(
            TcbLevel.parse(level, f"TCB info level {n}", version, tdx)
            for n, level in enumerate(_list(obj, "tcbLevels", what))
        )
        module = obj.get("tdxModule")
        return cls(
            id=tcb_id,
            version=version,
            fmspc=fmspc,
            pce_id=pce_id,
            issue_date=issue,
            next_update=next_update,
            evaluation_data_number=number,
            levels=levels,
            tdx_module=TdxModule.parse(module, "TDX module") if isinstance(module, dict) else None,
            tdx_module_identities=_module_identities(obj),
        )


@dataclass(frozen=True)
class QeIdentity:
    """Intel's identity of its quoting enclave ("QE" for SGX, "TD_QE" for TDX), version 2."""

    id: str | None
    version: int
    mrsigner: bytes  # 32
    isv_prod_id: int
    miscselect: int
    miscselect_mask: int
    attributes_mask: bytes  # 16
    attributes: bytes  # 16
    issue_date: datetime
    next_update: datetime
    evaluation_data_number: int | None  # tcbEvaluationDataNumber
    levels: tuple[IsvLevel, ...]  # by QE ISVSVN, highest first

    @classmethod
    def parse(cls, obj: Mapping) -> "QeIdentity":
        what = "QE identity"
        qe_id = _optional_str(obj, "id", what)
        version = _int(obj, "version", what)
        mrsigner = _hex_field(obj, "mrsigner", what, 32)
        isv_prod_id = _int(obj, "isvprodid", what)
        misc = int.from_bytes(_hex_field(obj, "miscselect", what, 4), "big")
        misc_mask = int.from_bytes(_hex_field(obj, "miscselectMask", what, 4), "big")
        attributes_mask = _hex_field(obj, "attributesMask", what, 16)
        attributes = _hex_field(obj, "attributes", what, 16)
        issue, next_update = _date(obj, "issueDate", what), _date(obj, "nextUpdate", what)
        number = _evaluation_data_number(obj, what)
        levels = _isv_levels(obj, what)
        return cls(
            id=qe_id,
            version=version,
            mrsigner=mrsigner,
            isv_prod_id=isv_prod_id,
            miscselect=misc,
            miscselect_mask=misc_mask,
            attributes_mask=attributes_mask,
            attributes=attributes,
            issue_date=issue,
            next_update=next_update,
            evaluation_data_number=number,
            levels=levels,
        )


@dataclass(frozen=True)
class Collateral:
    """Collateral whose chains, signatures and CRLs verified (windows: see the Clock's warnings)."""

    tcb_info: TcbInfo
    qe_identity: QeIdentity

    @property
    def tcb_evaluation_data_number(self) -> int | None:
        """The lower of the TCB info's and the QE identity's ``tcbEvaluationDataNumber`` (what
        Intel's QVL reports as ``tcb_eval_ref_num``); None when either lacks one. Intel raises it
        with each TCB recovery, so a policy can require a minimum to refuse older collateral."""
        a, b = self.tcb_info.evaluation_data_number, self.qe_identity.evaluation_data_number
        return None if a is None or b is None else min(a, b)


# --------------------------------------------------------------------------- reading and checking
def read_collateral_file(path: str | os.PathLike[str]) -> dict:
    """Load a collateral JSON file (dcap-qvl layout). Unreadable: BranchyError; not JSON: AttestationError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BranchyError(f"cannot read collateral {path}: {e.strerror or e}") from None
    return _json_object(data, f"collateral {path}")


def _json_object(data: bytes, what: str) -> dict:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise fail(f"{what} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise fail(f"{what} is not a JSON object")
    return obj


def _signed_json(collateral: Mapping, key: str, what: str) -> bytes:
    """The exact signed bytes of a JSON document in the collateral (which must be a JSON object)."""
    text = collateral.get(key)
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
    else:
        raise fail(f"collateral: '{key}' must be the signed JSON text")
    _json_object(data, what)  # malformed JSON is reported before the signature is checked
    return data


_Document = TypeVar("_Document", TcbInfo, QeIdentity)


@functools.lru_cache(maxsize=32)
def _typed(kind: type[_Document], data: bytes) -> _Document:
    """``kind.parse`` of a signed document (text already read as a JSON object), once per text: one
    TCB info serves every quote of its FMSPC for weeks, so a key broker would otherwise parse the
    same levels again for every request. The typed documents are frozen, so sharing them is safe."""
    return kind.parse(json.loads(data))


def _signing_chains(collateral: Mapping, root: PinnedRoot, now: datetime) -> dict[str, tuple[x509.Certificate, ...]]:
    """The verified TCB signing chain of each distinct issuer chain text (usually one for both)."""
    chains: dict[str, tuple[x509.Certificate, ...]] = {}
    for key in ("tcb_info_issuer_chain", "qe_identity_issuer_chain"):
        text = collateral[key]
        if not isinstance(text, str):
            raise fail(f"collateral {key} must be a PEM string")
        if text not in chains:
            certs = chain_from_pem_text(text, f"collateral {key}")
            verify_chain(certs, root, now, f"collateral {key}", TCB_SIGNING_CN, ())
            chains[text] = certs
    return chains


def _check_signed(
    collateral: Mapping, chains: Mapping[str, tuple[x509.Certificate, ...]], name: str, data: bytes, what: str
) -> None:
    key = require_p256(chains[collateral[f"{name}_issuer_chain"]][0], "TCB signing certificate")
    signature = hex_bytes(collateral[f"{name}_signature"], f"{name}_signature", 64)
    verify_raw_sig(key, signature, data, f"{what} signature")


def verify_collateral(collateral: Mapping[str, Any], root: PinnedRoot, pck: PckChain, clock: Clock) -> Collateral:
    """Steps 5-7 above for the quote whose verified PCK chain is ``pck``; window problems go to ``clock``."""
    if not isinstance(collateral, Mapping):
        raise fail("collateral must be a JSON object")
    missing = [k for k in COLLATERAL_KEYS if k not in collateral]
    if missing:
        raise fail(f"collateral lacks {', '.join(missing)}")
    # 5. TCB signing chains and signatures
    chains = _signing_chains(collateral, root, clock.now)
    tcb_bytes = _signed_json(collateral, "tcb_info", "TCB info")
    qe_bytes = _signed_json(collateral, "qe_identity", "QE identity")
    _check_signed(collateral, chains, "tcb_info", tcb_bytes, "TCB info")
    _check_signed(collateral, chains, "qe_identity", qe_bytes, "QE identity")
    # 6. CRLs
    covered = [c for ch in (pck.certs, *chains.values()) for c in ch]
    check_crl(load_crl(collateral["root_ca_crl"], "root CA CRL"), "root CA CRL", root.cert, covered, clock)
    # The PCK CRL must be signed by the very CA that issued this quote's PCK certificate (already
    # chained to the pinned root), so the collateral's own pck_crl_issuer_chain adds nothing and
    # is not trusted for this; a CRL from another PCK CA fails here.
    check_crl(load_crl(collateral["pck_crl"], "PCK CRL"), "PCK CRL", pck.ca, covered, clock)
    # 7. the signed documents, typed, and their windows
    tcb_info, qe_identity = _typed(TcbInfo, tcb_bytes), _typed(QeIdentity, qe_bytes)
    clock.window("TCB info", tcb_info.issue_date, tcb_info.next_update)
    clock.window("QE identity", qe_identity.issue_date, qe_identity.next_update)
    return Collateral(tcb_info, qe_identity)
