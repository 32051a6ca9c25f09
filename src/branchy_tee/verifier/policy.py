"""Key-release policy (owner side): which enclaves get which keys. A TOML file, e.g.::

    allowed_mrenclave = ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]
    allowed_mrsigner  = []            # may add to allowed_mrenclave; alone only with own_signing_key
    own_signing_key = false           # true: you sign your enclaves yourself, so MRSIGNER alone pins them
    allowed_settings = ["<64 hex>"]   # measured settings digests you accepted (needed with MRSIGNER alone)
    isv_prod_id = 0                   # optional: require this product id
    min_isv_svn = 0
    allow_debug = false               # a DEBUG enclave's memory is readable by the host
    accepted_tcb_statuses = ["UpToDate"]   # "Revoked" can never be accepted
    min_model_version = 1             # sent to the enclave with the keys; older bundles are refused
    allow_simulation = false          # development only
    simulation_public_keys = []       # optional: pin the dev keys simulated evidence may be signed with
    collateral = "collateral.json"    # dcap-qvl layout; relative to this file
    accept_client_collateral = false  # true: use collateral the enclave sends (needs the minimum below)
    min_tcb_evaluation_data_number = 17   # refuse collateral from before this TCB recovery
    require_collateral = true         # a real quote needs a TCB status
    stale_collateral = "reject"       # or "warn": expired collateral only adds a warning
    key_ids = ["0123456789abcdef"]    # keys this policy releases (default: every key in the keystore)
    allowed_data_owners = ["<64 hex>"]   # model owner: the data owners' identities that may use the model
    allow_plaintext_results = false   # data owner: the enclave may write your requests' results in plain text

The host builds and signs the enclave, so a policy must pin ``allowed_mrenclave`` (reproduce the
build, or take it from the model owner's signed release statement); ``allowed_mrsigner`` alone pins
the host's signing key unless ``own_signing_key = true`` says the policy's owner signs its enclaves.
Even then one signer signs many builds, some with settings an owner never accepted (plaintext
results, a debug enclave): the enclave puts its measured settings digest in REPORTDATA's second half
(``measured.settings_binding``, SHA-256 of the measured settings it runs with), and such a policy
must pin it (``allowed_settings``: ``ReleaseStatement.settings_sha256``, computed from the statement).

Unknown settings are errors (a typo must not silently weaken a policy). :meth:`Policy.evaluate`
accepts verified :class:`Claims` or raises :class:`~branchy_tee.core.errors.PolicyError` naming the
field, what the policy expects and what the evidence shows.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, overload

import tomllib

from branchy_tee.core.errors import BranchyError, PolicyError, shown
from branchy_tee.core.keys import KEY_ID_RE
from branchy_tee.tee.attest.protocol import MAX_ALLOWED_DATA_OWNERS, EvidenceType
from branchy_tee.tee.attest.quote import EnclaveClaims
from branchy_tee.tee.measured import identity_problem
from branchy_tee.verifier.dcap import TCB_STATUSES, read_collateral_file

__all__ = ["Claims", "Decision", "Policy", "load_policy", "parse_policy"]

SETTINGS = (
    "allowed_mrenclave",
    "allowed_mrsigner",
    "isv_prod_id",
    "min_isv_svn",
    "allow_debug",
    "accepted_tcb_statuses",
    "min_model_version",
    "allow_simulation",
    "simulation_public_keys",
    "collateral",
    "require_collateral",
    "stale_collateral",
    "key_ids",
    "own_signing_key",
    "allowed_data_owners",
    "accept_client_collateral",
    "min_tcb_evaluation_data_number",
    "allowed_settings",
    "allow_plaintext_results",
)
STALE_CHOICES = ("reject", "warn")


# --------------------------------------------------------------------------- claims / decision
def _enclave_fields(claims: EnclaveClaims) -> dict[str, Any]:
    return {f.name: getattr(claims, f.name) for f in dataclasses.fields(EnclaveClaims)}


@dataclass(frozen=True, kw_only=True)
class Claims(EnclaveClaims):
    """What verified evidence says about the enclave (untrusted until the evidence verified)."""

    evidence_type: EvidenceType
    tee: str  # "sgx" | "tdx" | "simulated"
    tcb_status: str | None = None
    advisories: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    signer_key: bytes | None = None  # simulated: the dev public key that signed the document
    tcb_evaluation_data_number: int | None = None  # of the collateral the TCB status came from

    @property
    def simulated(self) -> bool:
        return self.evidence_type == EvidenceType.SIMULATED

    @classmethod
    def from_quote(cls, vq, tcb_evaluation_data_number: int | None = None) -> "Claims":
        """From a :class:`~branchy_tee.verifier.dcap.VerifiedQuote` (and the collateral's TCB evaluation
        data number, when the TCB status came from collateral)."""
        return cls(
            **_enclave_fields(vq),
            evidence_type=EvidenceType.DCAP,
            tee=vq.tee,
            tcb_status=vq.tcb_status,
            advisories=tuple(vq.advisories),
            warnings=tuple(vq.warnings),
            tcb_evaluation_data_number=tcb_evaluation_data_number,
        )

    @classmethod
    def from_simulated(cls, doc) -> "Claims":
        """From a :class:`~branchy_tee.verifier.evidence.SimulatedDocument`."""
        return cls(
            **_enclave_fields(doc), evidence_type=EvidenceType.SIMULATED, tee="simulated", signer_key=doc.public_key
        )

    def summary(self) -> dict[str, Any]:
        """For the audit log and error reports (no secrets in claims)."""
        out = {
            "evidence_type": self.evidence_type,
            "tee": self.tee,
            **self.report_fields(),
            "tcb_status": self.tcb_status,
            "advisories": list(self.advisories),
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
        }
        if self.signer_key is not None:
            out["dev_public_key"] = self.signer_key.hex()
        return out


@dataclass(frozen=True)
class Decision:
    """A grant: the minimum model version and the allowed data owners to hand to the enclave, and
    anything worth a warning."""

    min_model_version: int
    warnings: tuple[str, ...] = ()
    allowed_data_owners: tuple[bytes, ...] | None = None
    plaintext_results: bool = False  # signed into the release: this owner consents to plaintext results


# --------------------------------------------------------------------------- policy
def _short(values, limit: int = 3) -> str:
    items = sorted(values)
    text = ", ".join(items[:limit])
    return f"[{text}{', ...' if len(items) > limit else ''}]"


@dataclass
class Policy:
    allowed_mrenclave: frozenset[bytes] = frozenset()
    allowed_mrsigner: frozenset[bytes] = frozenset()
    isv_prod_id: int | None = None
    min_isv_svn: int = 0
    allow_debug: bool = False
    accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    min_model_version: int = 0
    allow_simulation: bool = False
    simulation_public_keys: frozenset[bytes] = frozenset()
    collateral_path: Path | None = None
    require_collateral: bool = True
    stale_collateral: str = "reject"
    key_ids: tuple[str, ...] | None = None
    own_signing_key: bool = False
    allowed_data_owners: tuple[bytes, ...] | None = None
    accept_client_collateral: bool = False
    min_tcb_evaluation_data_number: int | None = None
    allowed_settings: frozenset[bytes] = frozenset()
    allow_plaintext_results: bool = False
    source: str = "<policy>"
    _collateral_cache: tuple | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.allowed_mrenclave and not self.allowed_mrsigner:
            raise BranchyError(
                f"policy {self.source}: set allowed_mrenclave (a policy that names no enclave would accept any)"
            )
        if not self.allowed_mrenclave and not self.own_signing_key:
            raise BranchyError(
                f"policy {self.source}: pins only allowed_mrsigner, but the host builds and signs the "
                "enclave, so MRSIGNER alone pins the host's own key; pin allowed_mrenclave (from the "
                "model owner's release statement), or set own_signing_key = true if you sign your "
                "enclaves yourself"
            )
        if not self.allowed_mrenclave and not self.allowed_settings:
            raise BranchyError(
                f"policy {self.source}: pins only allowed_mrsigner, which every build you sign shares, "
                "whatever its settings; pin allowed_settings too (write the policy with `enclave policy` "
                "from the release statement of each build you accept)"
            )
        if self.accept_client_collateral and self.min_tcb_evaluation_data_number is None:
            raise BranchyError(
                f"policy {self.source}: accept_client_collateral = true needs "
                "min_tcb_evaluation_data_number (else the host may send old, Intel-signed collateral "
                "from before a TCB recovery)"
            )
        if "Revoked" in self.accepted_tcb_statuses:
            raise BranchyError(f"policy {self.source}: TCB status 'Revoked' can never be accepted")
        if self.stale_collateral not in STALE_CHOICES:
            raise BranchyError(f"policy {self.source}: stale_collateral must be 'reject' or 'warn'")

    # ---- collateral
    def collateral(self) -> dict | None:
        """The policy's collateral file, re-read when it changes on disk (owners refresh it monthly)."""
        if self.collateral_path is None:
            return None
        try:
            st = os.stat(self.collateral_path)
        except OSError as e:
            raise BranchyError(
                f"policy {self.source}: cannot read collateral {self.collateral_path}: {e.strerror or e}"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if self._collateral_cache is None or self._collateral_cache[0] != stamp:
                self._collateral_cache = (stamp, read_collateral_file(self.collateral_path))
            return self._collateral_cache[1]

    @property
    def strict_time(self) -> bool:
        return self.stale_collateral == "reject"

    def releases(self, kid: str) -> bool:
        return self.key_ids is None or kid in self.key_ids

    # ---- evaluation
    def evaluate(self, claims: Claims) -> Decision:
        """Accept ``claims`` (from evidence that verified) or raise PolicyError with the precise reason."""
        warnings: list[str] = list(claims.warnings)
        self._check_evidence_kind(claims, warnings)
        self._check_enclave(claims)
        if not claims.simulated:
            self._check_tcb(claims, warnings)
        return Decision(self.min_model_version, tuple(warnings), self.allowed_data_owners, self.allow_plaintext_results)

    def _check_evidence_kind(self, claims: Claims, warnings: list[str]) -> None:
        """Simulated evidence only where allowed (and from a pinned dev key); otherwise SGX DCAP quotes."""
        if claims.simulated:
            if not self.allow_simulation:
                raise PolicyError("simulated evidence refused: the policy has allow_simulation = false")
            if self.simulation_public_keys and claims.signer_key not in self.simulation_public_keys:
                raise PolicyError(
                    "simulation_public_keys: simulated evidence is signed by dev key "
                    f"{(claims.signer_key or b'').hex()}, "
                    f"policy pins {_short(k.hex() for k in self.simulation_public_keys)}"
                )
            warnings.append("simulated evidence (no TEE) accepted: allow_simulation = true")
        elif claims.evidence_type != EvidenceType.DCAP:
            raise PolicyError(f"evidence type {ascii(str(claims.evidence_type))} is not supported")
        elif claims.tee != "sgx":
            raise PolicyError(
                f"tee: the evidence is a {claims.tee.upper()} quote; this policy accepts SGX enclaves only"
            )

    def _check_enclave(self, claims: Claims) -> None:
        """What the enclave is: its measurements, product id, security version and debug mode."""
        if self.allowed_mrenclave and claims.mrenclave not in self.allowed_mrenclave:
            raise PolicyError(
                f"allowed_mrenclave: MRENCLAVE {claims.mrenclave.hex()} is not allowed "
                f"(policy allows {_short(m.hex() for m in self.allowed_mrenclave)})"
            )
        if self.allowed_mrsigner and claims.mrsigner not in self.allowed_mrsigner:
            raise PolicyError(
                f"allowed_mrsigner: MRSIGNER {claims.mrsigner.hex()} is not allowed "
                f"(policy allows {_short(m.hex() for m in self.allowed_mrsigner)})"
            )
        if self.isv_prod_id is not None and claims.isv_prod_id != self.isv_prod_id:
            raise PolicyError(
                f"isv_prod_id: the enclave's ISVPRODID is {claims.isv_prod_id}, policy requires {self.isv_prod_id}"
            )
        if claims.isv_svn < self.min_isv_svn:
            raise PolicyError(
                f"min_isv_svn: the enclave's ISVSVN {claims.isv_svn} is below the policy minimum {self.min_isv_svn}"
            )
        if self.allowed_settings and claims.report_data[32:] not in self.allowed_settings:
            raise PolicyError(
                f"allowed_settings: the enclave runs with measured settings {claims.report_data[32:].hex()}, "
                f"which this policy did not accept (policy allows {_short(m.hex() for m in self.allowed_settings)})"
            )
        if claims.debug and not self.allow_debug:
            raise PolicyError(
                "allow_debug: the enclave runs in DEBUG mode (the host can read its memory); "
                "policy has allow_debug = false"
            )

    def _check_tcb(self, claims: Claims, warnings: list[str]) -> None:
        """The platform's TCB status (from collateral) and how recent its evaluation data is."""
        status = claims.tcb_status
        if status is None and self.min_tcb_evaluation_data_number is not None:
            raise PolicyError(
                "min_tcb_evaluation_data_number: the quote's TCB status is unknown (no collateral), "
                "so the minimum cannot be checked"
            )
        if status is None:
            if self.require_collateral:
                raise PolicyError(
                    "require_collateral: the quote's TCB status is unknown (no collateral); give the "
                    "policy a collateral file or set require_collateral = false"
                )
            warnings.append("TCB status not checked (no collateral; require_collateral = false)")
        elif status == "Revoked" or status not in self.accepted_tcb_statuses:
            adv = f" (advisories {', '.join(claims.advisories)})" if claims.advisories else ""
            raise PolicyError(
                f"accepted_tcb_statuses: the platform's TCB status is {status}{adv}; "
                f"policy accepts {_short(self.accepted_tcb_statuses, 10)}"
            )
        minimum = self.min_tcb_evaluation_data_number
        if status is not None and minimum is not None:
            number = claims.tcb_evaluation_data_number
            if number is None or number < minimum:
                raise PolicyError(
                    f"min_tcb_evaluation_data_number: the collateral's TCB evaluation data number is "
                    f"{number}, below the policy minimum {minimum} (collateral from before a TCB recovery)"
                )

    def describe(self) -> dict[str, Any]:
        """Every setting by its name in the file, as JSON values (hex for measurements and identities)."""

        def value(v: Any) -> Any:
            if isinstance(v, (frozenset, tuple)):
                items = [x.hex() if isinstance(x, bytes) else x for x in v]
                return sorted(items) if isinstance(v, frozenset) or isinstance(next(iter(v), ""), bytes) else items
            return str(v) if isinstance(v, Path) else v

        return {name: value(getattr(self, "collateral_path" if name == "collateral" else name)) for name in SETTINGS}


# --------------------------------------------------------------------------- parsing
class _Reader:
    def __init__(self, data: Mapping[str, Any], source: str):
        self.data, self.source = data, source

    def fail(self, name: str, msg: str) -> BranchyError:
        return BranchyError(f"policy {self.source}: {name} {msg}")

    def bool(self, name: str, default: bool) -> bool:
        v = self.data.get(name, default)
        if not isinstance(v, bool):
            raise self.fail(name, f"must be true or false, not {v!r}")
        return v

    @overload
    def int(self, name: str, default: int, hi: int) -> int: ...

    @overload
    def int(self, name: str, default: None, hi: int) -> int | None: ...

    def int(self, name: str, default: int | None, hi: int) -> int | None:
        v = self.data.get(name, default)
        if v is None and default is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
            raise self.fail(name, f"must be an integer in 0..{hi}, not {v!r}")
        return v

    def strings(self, name: str) -> list[str] | None:
        if name not in self.data:
            return None
        v = self.data[name]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise self.fail(name, f"must be a list of strings, not {v!r}")
        return v

    def identities(self, name: str) -> tuple[bytes, ...] | None:
        values = self.strings(name)
        if values is None:
            return None
        if len(values) > MAX_ALLOWED_DATA_OWNERS:
            raise self.fail(
                name, f"lists {len(values)} identities; at most {MAX_ALLOWED_DATA_OWNERS} fit in a key release"
            )
        for s in values:
            problem = identity_problem(s)
            if problem:
                raise self.fail(name, f"entry {shown(s)} {problem}")
        return tuple(sorted({bytes.fromhex(s) for s in values}))

    def measurements(self, name: str) -> frozenset[bytes]:
        out = set()
        for s in self.strings(name) or []:
            try:
                b = bytes.fromhex(s)
            except ValueError:
                raise self.fail(name, f"entry {s!r} is not hex") from None
            if len(b) != 32:
                raise self.fail(name, f"entry {s!r} must be 32 bytes (64 hex digits), got {len(b)}")
            out.add(b)
        return frozenset(out)


def _check_known(data: Mapping[str, Any], source: str) -> None:
    unknown = [k for k in data if k not in SETTINGS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), SETTINGS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise BranchyError(
            f"policy {source}: unknown setting {', '.join(hints)}; known settings: {', '.join(SETTINGS)}"
        )


def _statuses(r: "_Reader") -> frozenset[str]:
    statuses = r.strings("accepted_tcb_statuses")
    for s in statuses or []:
        if s == "Revoked":
            raise r.fail("accepted_tcb_statuses", "lists 'Revoked', which can never be accepted")
        if s not in TCB_STATUSES:
            close = difflib.get_close_matches(s, sorted(TCB_STATUSES), n=1)
            raise r.fail(
                "accepted_tcb_statuses",
                f"lists unknown status {s!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            )
    return frozenset(["UpToDate"] if statuses is None else statuses)


def _key_ids(r: "_Reader") -> tuple[str, ...] | None:
    kids = r.strings("key_ids")
    if kids is None:
        return None
    if not kids:
        raise r.fail("key_ids", "is empty (leave it out to release every key in the keystore)")
    for k in kids:
        if not KEY_ID_RE.fullmatch(k):
            raise r.fail("key_ids", f"entry {k!r} is not a key id (16 lower-case hex digits)")
    return tuple(dict.fromkeys(kids))


def _collateral_path(r: "_Reader", base_dir) -> Path | None:
    collateral = r.data.get("collateral")
    if collateral is None:
        return None
    if not isinstance(collateral, str) or not collateral:
        raise r.fail("collateral", "must be a file name")
    path = Path(collateral)
    return Path(base_dir) / path if not path.is_absolute() and base_dir is not None else path


def parse_policy(
    data: Mapping[str, Any], source: str = "<policy>", base_dir: str | os.PathLike[str] | None = None
) -> Policy:
    """A :class:`Policy` from a mapping (the parsed TOML). Relative paths resolve against ``base_dir``."""
    if not isinstance(data, Mapping):
        raise BranchyError(f"policy {source}: must be a table of settings")
    _check_known(data, source)
    r = _Reader(data, source)
    stale = data.get("stale_collateral", "reject")
    if stale not in STALE_CHOICES:
        raise r.fail("stale_collateral", f"must be 'reject' or 'warn', not {stale!r}")
    sim_keys = r.measurements("simulation_public_keys")
    policy = Policy(
        allowed_mrenclave=r.measurements("allowed_mrenclave"),
        allowed_mrsigner=r.measurements("allowed_mrsigner"),
        isv_prod_id=r.int("isv_prod_id", None, 0xFFFF),
        min_isv_svn=r.int("min_isv_svn", 0, 0xFFFF),
        allow_debug=r.bool("allow_debug", False),
        accepted_tcb_statuses=_statuses(r),
        min_model_version=r.int("min_model_version", 0, 2**63 - 1),
        allow_simulation=r.bool("allow_simulation", False),
        simulation_public_keys=sim_keys,
        collateral_path=_collateral_path(r, base_dir),
        require_collateral=r.bool("require_collateral", True),
        stale_collateral=stale,
        key_ids=_key_ids(r),
        own_signing_key=r.bool("own_signing_key", False),
        allowed_data_owners=r.identities("allowed_data_owners"),
        accept_client_collateral=r.bool("accept_client_collateral", False),
        min_tcb_evaluation_data_number=r.int("min_tcb_evaluation_data_number", None, 2**32 - 1),
        allowed_settings=r.measurements("allowed_settings"),
        allow_plaintext_results=r.bool("allow_plaintext_results", False),
        source=source,
    )
    if sim_keys and not policy.allow_simulation:
        raise r.fail("simulation_public_keys", "is set but allow_simulation = false")
    policy.collateral()  # fail now, not at the first request, when the file is unreadable
    return policy


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and check a TOML policy file."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise BranchyError(f"cannot read policy {path}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, UnicodeDecodeError, nesting, huge integers
        raise BranchyError(f"policy {path} is not valid TOML: {e}") from None
    return parse_policy(data, str(path), path.parent)
