"""Evidence providers: how the enclave proves what it is, with 64 bytes of its own report data.

``gramine``
    Gramine's ``/dev/attestation`` pseudo-files: ``attestation_type`` must read ``dcap``; writing
    the 64 bytes to ``user_report_data`` and then reading ``quote`` yields an SGX DCAP quote whose
    REPORTDATA is those bytes. The directory is configurable so tests can use a fake one.

``simulated`` (development only)
    No TEE at all: a JSON document ``{mrenclave, mrsigner, isv_prod_id, isv_svn, debug,
    report_data, public_key, ...}`` signed with an Ed25519 dev key file, created on first use in
    ``$XDG_CONFIG_HOME/branchy-tee/dev-attestation-key/ed25519.key`` (default ``~/.config/...``;
    directory 0700, key file 0600) or where ``enclave build --dev-key`` says. ``mrenclave``
    (:func:`simulated_mrenclave`) is a SHA-256 over the
    installed ``branchy_tee`` package files (:func:`code_measurement`) and the enclave's measured
    settings (``branchy_tee.tee.measured``: the manifest's ``loader.env`` values, as a real MRENCLAVE
    covers them), so a policy pins the code and every measured pin; ``mrsigner`` is SHA-256 of the
    dev public key, so pinning MRSIGNER pins the dev key. Brokers refuse it unless their policy
    says ``allow_simulation = true``; both sides announce it once per process, loudly.

Standard library, ``cryptography`` and branchy_tee's errors, fileio, choices, tee.attest.protocol and
tee.attest.quote: this is enclave code.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from branchy_tee.core.choices import EvidenceProvider
from branchy_tee.core.errors import AttestationError, BranchyError
from branchy_tee.core.fileio import read_key_file
from branchy_tee.tee import measured
from branchy_tee.tee.attest.protocol import EvidenceType
from branchy_tee.tee.attest.quote import REPORT_DATA_LEN, peek_sgx_report_data

DEFAULT_ATTESTATION_DIR = "/dev/attestation"
SIMULATED_FORMAT = "branchy-tee/simulated-evidence/v1"
SIMULATED_SIGN_DOMAIN = b"branchy-tee/v1 simulated-evidence\0"
DEV_KEY_FILE = "ed25519.key"
MAX_SIMULATED_EVIDENCE = 16 * 1024

# Writing user_report_data then reading quote is a two-step protocol on shared pseudo-files:
# one exchange at a time per process.
_ATTESTATION_LOCK = threading.Lock()


def default_dev_key_dir() -> Path:
    """$XDG_CONFIG_HOME/branchy-tee/dev-attestation-key (default ``~/.config/...``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "branchy-tee" / "dev-attestation-key"


def default_dev_key() -> Path:
    """The development key file: the measured one of a simulated build, else the default folder's."""
    if os.environ.get(measured.DEV_KEY):
        return Path(os.environ[measured.DEV_KEY])
    return default_dev_key_dir() / DEV_KEY_FILE


_explained = False


def simulated_warning(what: str) -> None:
    """The warning both sides print when simulated evidence is produced, allowed or accepted: a boxed
    explanation once per process (the first time), never more (a demo printed it 22 times); the
    broker's decision lines and audit log still name every simulated grant."""
    global _explained
    if not _explained:
        bar = "!" * 78
        sys.stderr.write(
            f"{bar}\n!! WARNING: SIMULATED ATTESTATION {what}.\n"
            "!! Development only: no TEE protects this process; any key released to it is exposed\n"
            "!! to whoever runs it. Never allow simulation in a production policy.\n"
            f"{bar}\n"
        )
        _explained = True
    sys.stderr.flush()


# --------------------------------------------------------------------------- code measurement
@functools.lru_cache(maxsize=8)
def code_measurement(root: str | os.PathLike[str] | None = None) -> bytes:
    """SHA-256 over the files of the ``branchy_tee`` package (or ``root``), by sorted relative path.

    Byte caches (``__pycache__``, ``*.pyc``) are left out. Computed once per process and root: the
    code that runs is the code that was there when the process started.
    """
    base = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    files = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith((".pyc", ".pyo")):
                continue
            full = Path(dirpath) / name
            files.append((full.relative_to(base).as_posix(), full))
    h = hashlib.sha256(b"branchy-tee/v1 code-measurement\0")
    for rel, full in sorted(files):
        data = full.read_bytes()
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.digest()


def simulated_mrenclave(env: Mapping[str, str] | None = None, code: bytes | None = None) -> bytes:
    """The MRENCLAVE simulated evidence reports: the code measurement together with the measured
    settings in ``env`` (default: this process's environment), so that changing any pin (the model
    broker, its identity, the bundle) changes the measurement, as it would on SGX."""
    code = code_measurement() if code is None else code
    settings = measured.settings_bytes(os.environ if env is None else env)
    return hashlib.sha256(b"branchy-tee/v1 simulated-mrenclave\0" + code + settings).digest()


# --------------------------------------------------------------------------- providers
class EvidenceSource(Protocol):
    """What produces evidence binding 64 bytes of report data (``GramineProvider``, ``SimulatedProvider``)."""

    evidence_type: EvidenceType

    def evidence(self, report_data: bytes) -> bytes: ...


# --------------------------------------------------------------------------- gramine
class GramineProvider:
    """DCAP quotes from Gramine's ``/dev/attestation`` (or a directory laid out like it)."""

    evidence_type = EvidenceType.DCAP

    def __init__(self, attestation_dir: str | os.PathLike[str] = DEFAULT_ATTESTATION_DIR):
        self.dir = Path(attestation_dir)

    def evidence(self, report_data: bytes) -> bytes:
        if len(report_data) != REPORT_DATA_LEN:
            raise ValueError("report data must be 64 bytes")
        d = self.dir
        try:
            att_type = (d / "attestation_type").read_text(errors="replace").strip()
        except FileNotFoundError:
            raise AttestationError(
                f"{d}/attestation_type not found: not running in a Gramine SGX enclave with remote "
                'attestation (the manifest needs sgx.remote_attestation = "dcap")'
            ) from None
        except OSError as e:
            raise AttestationError(f"cannot read {d}/attestation_type: {e.strerror or e}") from None
        if att_type != "dcap":
            raise AttestationError(
                f"{d}/attestation_type is {att_type[:40]!r}, need 'dcap' "
                '(set sgx.remote_attestation = "dcap" in the manifest; EPID is gone since Gramine 1.9)'
            )
        with _ATTESTATION_LOCK:
            try:
                with open(d / "user_report_data", "wb", buffering=0) as f:
                    f.write(report_data)
            except OSError as e:
                raise AttestationError(f"cannot write {d}/user_report_data: {e.strerror or e}") from None
            try:
                quote = (d / "quote").read_bytes()
            except OSError as e:
                raise AttestationError(f"cannot read {d}/quote: {e.strerror or e}") from None
        _check_quote_carries(quote, report_data, d / "quote")
        return quote


def _check_quote_carries(quote: bytes, report_data: bytes, where: Path) -> None:
    """Sanity check (the broker verifies for real): an SGX quote v3/v4 carries our report data."""
    try:
        carried = peek_sgx_report_data(quote)
    except AttestationError as e:
        raise AttestationError(f"{where}: {e}") from None
    if not hmac.compare_digest(carried, report_data):
        raise AttestationError(
            f"{where}: the quote does not carry the report data just written (stale or foreign quote)"
        )


# --------------------------------------------------------------------------- simulated
def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_or_create_dev_key(key_file: str | os.PathLike[str] | None = None) -> Ed25519PrivateKey:
    """The Ed25519 dev key in ``key_file`` (created on first use: its folder 0700 if new, the file 0600).
    Owners who develop together share one such file (``enclave build --dev-key FILE``)."""
    path = Path(key_file) if key_file is not None else default_dev_key()
    if not path.exists() and measured.inside_enclave(os.environ):
        # Inside an enclave the key is a trusted file the build made (Gramine has no hard links).
        raise BranchyError(
            f"the development attestation key {path} is missing: `enclave build --attest simulated` makes it"
        )
    if not path.exists():
        d = path.parent
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=d)  # mode 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(32))
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # atomic create-if-absent: a concurrent first use keeps one key
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise BranchyError(f"cannot create the dev attestation key {path}: {e.strerror or e}") from None
    return Ed25519PrivateKey.from_private_bytes(read_key_file(path))


def dev_public_key(key_file: str | os.PathLike[str]) -> bytes:
    """The raw public key of the development key in ``key_file`` (what policies pin); never creates one."""
    path = Path(key_file)
    if not str(key_file) or not path.is_file():
        raise BranchyError(
            f"the development key {key_file or '(none)'} the build names is not here: copy the shared key "
            "file to that path (`enclave build --dev-key FILE`)"
        )
    return _raw_public(Ed25519PrivateKey.from_private_bytes(read_key_file(path)).public_key())


class SimulatedProvider:
    """Development evidence: a document signed by a local Ed25519 key. Not attestation."""

    evidence_type = EvidenceType.SIMULATED

    def __init__(
        self,
        key_file: str | os.PathLike[str] | None = None,
        *,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
        mrenclave: bytes | None = None,
    ):
        self._key = load_or_create_dev_key(key_file)
        self.public_key = _raw_public(self._key.public_key())
        self.mrsigner = hashlib.sha256(self.public_key).digest()
        self.mrenclave = mrenclave if mrenclave is not None else simulated_mrenclave()
        if len(self.mrenclave) != 32:
            raise ValueError("mrenclave must be 32 bytes")
        self.isv_prod_id, self.isv_svn, self.debug = isv_prod_id, isv_svn, debug

    def identity(self) -> dict[str, str]:
        """What a policy pins for this dev setup (hex)."""
        return {"mrenclave": self.mrenclave.hex(), "mrsigner": self.mrsigner.hex(), "public_key": self.public_key.hex()}

    def evidence(self, report_data: bytes) -> bytes:
        if len(report_data) != REPORT_DATA_LEN:
            raise ValueError("report data must be 64 bytes")
        doc = {
            "format": SIMULATED_FORMAT,
            "warning": "SIMULATED: no TEE; development only",
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "debug": self.debug,
            "report_data": report_data.hex(),
            "public_key": self.public_key.hex(),
            "produced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        text = json.dumps(doc, sort_keys=True)
        sig = self._key.sign(SIMULATED_SIGN_DOMAIN + text.encode())
        simulated_warning("EVIDENCE PRODUCED")
        return json.dumps({"document": text, "signature": sig.hex()}).encode()


# --------------------------------------------------------------------------- factory
def make_provider(
    name: EvidenceProvider | str,
    *,
    attestation_dir: str | os.PathLike[str] = DEFAULT_ATTESTATION_DIR,
    dev_key: str | os.PathLike[str] | None = None,
) -> GramineProvider | SimulatedProvider:
    """The evidence provider for ``--attest NAME``."""
    if name == EvidenceProvider.GRAMINE:
        return GramineProvider(attestation_dir)
    if name == EvidenceProvider.SIMULATED:
        return SimulatedProvider(dev_key)
    names = ", ".join(EvidenceProvider.names())
    raise BranchyError(f"unknown evidence provider {ascii(str(name))} (choose from {names})")
