"""Build the Gramine enclave for a sealed bundle: manifest, entry script, Makefile and signature.

What the enclave trusts is measured (``branchy_tee.tee.measured``, the manifest's ``loader.env``): the
model broker's URL and Ed25519 identity, and the bundle it serves (bundle id, model key id, minimum
model version), read from the bundle's plaintext header (no key needed). So an MRENCLAVE names
exactly one model and one model owner's broker. The model owner reproduces this build and signs a
release statement (``gramine.release``) from which data owners write their brokers' policies.

How the manifest is rendered
----------------------------
``templates/branchy-tee.manifest.template`` is an ordinary gramine-manifest template. All of our
values reach it as ``-D name=value`` strings (lists joined with ``:``; broker URLs with ``,``), the
same way the Gramine examples pass theirs. The build directory's Makefile carries exactly these
defines, and ``enclave build`` runs exactly the commands that the Makefile runs. So
``branchy-tee enclave build --sgx`` and ``make SGX=1`` give the same manifest, hence the same
MRENCLAVE. Without Gramine we render the same template with the same defines ourselves (Jinja2 with
StrictUndefined, as gramine-manifest does). The only value we then have to guess is Gramine's own
runtime directory, ``gramine.runtimedir()``; we use the Debian/Ubuntu package's path. That manifest is
for inspection: its mtime is set to 0 so that ``make`` on a machine with Gramine renders it again.

The Python side (``env``)
------------------------
The enclave runs the system's interpreter with ``PYTHONHOME`` set to its own environment (see
``env``): a copy of the standard library without test suites and the like, and only the packages
the enclave-side code imports. Trusted files are that environment's library folder, the interpreter,
the shared libraries ``ldd`` finds for them (except glibc's, which Gramine brings), the entry script
and the broker CA: about 5,000 files, a hashed manifest of about 1 MB.

Reproducible measurement
------------------------
Nothing in the manifest depends on modification times, the time of the build or the checkout's
history: the environment holds no ``.pyc`` (Python compiles the trusted sources at start and writes
none: PYTHONDONTWRITEBYTECODE), every value comes from the build's options, the bundle's header and
the files' contents. Two builds with the same options, paths, bundle, interpreter and packages
render the same hashed manifest; ``enclave build`` prints its SHA-256 so an owner can compare.

Enclave size (``sgx.enclave_size``)
----------------------------------
Measured, not estimated: see ``measure``.

Gramine releases
----------------
Gramine 1.8 or later: from 1.8 on, gramine-manifest adds ``loader.entrypoint`` (Gramine's LibOS and
its hash) and hashes every trusted file; 1.7 and older do neither, and the build refuses their
gramine-manifest in one line.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tomllib

from branchy_tee.core.choices import EvidenceProvider
from branchy_tee.core.errors import BranchyError, UsageError
from branchy_tee.gramine import MANIFEST_NAME, measure
from branchy_tee.gramine import env as enclave_env
from branchy_tee.gramine.config import CONFIG, ENTRIES, EnclaveConfig, load_config, manifest_defines, manifest_env  # noqa: F401 (re-exported)
from branchy_tee.gramine.libraries import system_libraries
from branchy_tee.gramine.paths import BAD_PATH, abs_path, check_data_dir, overlaps
from branchy_tee.gramine.render import DEBIAN_GRAMINE_RUNTIME, TEMPLATES, jinja_environment, render_manifest  # noqa: F401 (re-exported)
from branchy_tee.gramine.sizing import sized
from branchy_tee.gramine.tools import (
    INSTALL_HINT,
    MANIFEST,
    MANIFEST_TEMPLATE,
    SGX_MANIFEST,
    SIGSTRUCT,
    SUPPORTED_GRAMINE,
    gramine_manifest_argv,
    manifest_figures,
    read_sigstruct,
    run_tool,
    sign_argv,
    which,
)
from branchy_tee.tee import measured
from branchy_tee.tee.sealed.aead import MAX_DECRYPT_WORKERS

if TYPE_CHECKING:
    from branchy_tee.tee.sealed.header import BundleHeader

MIB = 1 << 20

SHEBANG_LIMIT = 256  # bytes of a script's first line that Gramine (like Linux) reads: INTERP_PATH_SIZE
GRAMINE_HELPER_THREADS = 8  # Gramine's IPC/async/TLS helpers, Python's main thread, the memory sampler, headroom
SERVER_THREADS = 2  # serve's batcher and key renewal (plus one per connection: --max-connections)


@dataclass
class BuildOptions:
    bundle: str
    out: str
    sgx: bool = False
    debug: bool = False
    edmm: bool = False
    model_broker: str | None = None
    model_broker_identity: str | None = None
    data_brokers: list[str] = field(default_factory=list)
    attest: str = EvidenceProvider.GRAMINE
    threads: int = 4
    allow_plaintext_result: bool = False
    allow_full_model: bool = False  # the host may run --full-model, ignoring the model owner's thresholds
    min_model_version: int | None = None  # default: the bundle's model version
    signing_key: str | None = None
    io_dirs: list[str] = field(default_factory=list)  # default: OUT/io
    stats_dirs: list[str] = field(default_factory=list)
    broker_ca: str | None = None
    isv_prod_id: int = 0
    isv_svn: int = 0
    batch_size: int = 64
    max_samples: int = 4096
    accepted_tcb_statuses: list[str] = field(default_factory=lambda: ["UpToDate"])
    env: str = enclave_env.DEFAULT_ENV_DIR  # the enclave's Python environment (made when missing)
    enclave_size: str | None = None  # given instead of measured (e.g. to reproduce a build)
    dev_key: str | None = None  # simulated builds: the shared development key file (default: this user's)
    serve: bool = False  # the entry point is `serve` (online) instead of `predict`
    max_connections: int = 64  # serve: concurrent connections (one thread each) the enclave has threads for
    max_inflight_mib: int = 256  # serve: request bytes being read or waiting (counted twice), sized for
    max_queue: int = 256  # serve: waiting requests


def _render(name: str, **values) -> str:
    return jinja_environment().get_template(name).render(**values)


def entry_script(python: str, entry: str = "predict") -> str:
    """The entry script: its first line names the interpreter, and must fit Gramine's limit."""
    text = _render("branchy-tee-entry.template", python=python, module=ENTRIES[entry], command=entry)
    first_line = len(text.encode().split(b"\n", 1)[0]) + 1
    if first_line > SHEBANG_LIMIT:
        raise UsageError(
            f"the interpreter's path {python} is too long for a script's first line "
            f"({first_line} bytes with '#!' and the newline; Gramine reads {SHEBANG_LIMIT})"
        )
    return text


# --------------------------------------------------------------------------- values
def _check_url(url: str, what: str) -> str:
    problem = measured.broker_url_problem(url)
    if problem:
        raise UsageError(f"{what} {url!r} {problem}")
    return url


def default_signing_key() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "gramine", "enclave-key.pem")


def _multiarch() -> str:
    import sysconfig

    return sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"


def _check_options(opts: BuildOptions, header: BundleHeader) -> tuple[str, str, list[str], int]:
    """The options that need no files: (model broker, its identity, data brokers, minimum version)."""
    from branchy_tee.verifier.dcap import TCB_STATUSES

    if not 1 <= opts.threads <= 256:
        raise UsageError("--threads must be between 1 and 256")
    if min(opts.batch_size, opts.max_samples, opts.max_connections, opts.max_inflight_mib, opts.max_queue) < 1:
        raise UsageError(
            "--batch-size, --max-samples, --max-connections, --max-inflight-mib and --max-queue must be at least 1"
        )
    if not (0 <= opts.isv_prod_id < 1 << 16 and 0 <= opts.isv_svn < 1 << 16):
        raise UsageError("--isv-prod-id and --isv-svn are 16-bit numbers (0..65535)")
    if opts.attest not in EvidenceProvider.names():
        raise UsageError(f"--attest is one of {', '.join(EvidenceProvider.names())}")
    if not opts.accepted_tcb_statuses or any(
        s not in TCB_STATUSES or s == "Revoked" for s in opts.accepted_tcb_statuses
    ):
        raise UsageError(f"--accept-tcb takes one of {', '.join(sorted(TCB_STATUSES - {'Revoked'}))}")
    min_version = header.model_version if opts.min_model_version is None else opts.min_model_version
    if min_version < 0:
        raise UsageError("--min-model-version must not be negative")
    model_broker = _check_url(opts.model_broker, "--model-broker") if opts.model_broker else ""
    identity = opts.model_broker_identity or ""
    if model_broker and not identity:
        raise UsageError(
            "--model-broker needs --model-broker-identity HEX (the broker's identity, as `branchy-tee keygen "
            "--identity` printed it): the enclave accepts only key releases signed by it"
        )
    if identity and not model_broker:
        raise UsageError("--model-broker-identity needs --model-broker URL")
    problem = measured.identity_problem(identity) if identity else None
    if problem:
        raise UsageError(f"--model-broker-identity {identity!r} {problem}")
    return model_broker, identity, [_check_url(u, "--data-broker") for u in opts.data_brokers], min_version


def _paths(opts: BuildOptions, out: str, bundle: str) -> tuple[list[str], str, str | None, str]:
    """(data directories, the enclave environment, the broker CA, the signing key), checked."""
    io_dirs = [abs_path(d, "--io-dir") for d in opts.io_dirs] or [os.path.join(out, "io")]
    io_dirs = list(dict.fromkeys(io_dirs + [abs_path(d, "--stats-dir") for d in opts.stats_dirs]))
    broker_ca = None
    if opts.broker_ca:
        broker_ca = abs_path(opts.broker_ca, "--broker-ca")
        if not Path(broker_ca).is_file():
            raise BranchyError(f"--broker-ca {broker_ca}: no such file")
    for d in [bundle, *io_dirs]:
        check_data_dir(d)
    env_dir = abs_path(opts.env, "--env")
    launcher = os.path.join(out, f"{MANIFEST_NAME}-{'serve' if opts.serve else 'predict'}")
    for d in [bundle, *io_dirs]:
        for t in [env_dir, launcher] + ([broker_ca] if broker_ca else []):
            if overlaps(d, t):
                raise UsageError(
                    f"data directory {d} overlaps the trusted code/configuration path {t}; "
                    "keep bundles, requests and results apart from the enclave environment "
                    "and the build directory's files"
                )
    signing_key = abs_path(opts.signing_key, "--signing-key") if opts.signing_key else default_signing_key()
    if BAD_PATH.search(signing_key) or " " in signing_key:
        raise UsageError(f"--signing-key {signing_key!r}: spaces, quotes, '$' and ':' are not supported")
    return io_dirs, env_dir, broker_ca, signing_key


def build_config(opts: BuildOptions, log=lambda msg: None) -> EnclaveConfig:
    """Check the options, make or reuse the enclave environment, measure the runtime's memory and
    work out every value of the build (written to OUT/enclave.json)."""
    from branchy_tee.tee.sealed.bundle import HEADER_FILE, read_header_unverified

    out = abs_path(opts.out, "--out")
    bundle = abs_path(opts.bundle, "--bundle")
    header = read_header_unverified(bundle)
    model_broker, identity, data_brokers, min_version = _check_options(opts, header)
    given_size = measure.parse_size(opts.enclave_size) if opts.enclave_size else None
    io_dirs, env_dir, broker_ca, signing_key = _paths(opts, out, bundle)
    env = enclave_env.ensure_env(env_dir, log=log)
    arch = f"/lib/{_multiarch()}"
    libs, search = system_libraries(env.python, env.dir, [arch, f"/usr{arch}"])
    for p in [env.python, env.home_lib, *libs]:
        abs_path(p, "Python path")
    entry = "serve" if opts.serve else "predict"
    entry_script(env.python, entry)  # the interpreter's path must fit the entry script's first line
    cfg = EnclaveConfig(
        dir=out,
        entry=entry,
        bundle=bundle,
        bundle_files=tuple([os.path.join(bundle, HEADER_FILE)] + [os.path.join(bundle, s.file) for s in header.stages]),
        bundle_id=header.bundle_id,
        model_key_id=header.key_id,
        model_version=header.model_version,
        arch=header.arch,
        io_dirs=tuple(io_dirs),
        interpreter=env.python,
        env_dir=env.dir,
        env_lib=env.home_lib,
        package_dir=env.site_packages,
        env_requirements=tuple(env.requirements),
        env_packages=dict(env.packages),
        libs=tuple(libs),
        arch_libdir=arch,
        ld_library_path=":".join(["/lib", *search]),
        launcher=os.path.join(out, f"{MANIFEST_NAME}-{entry}"),
        threads=opts.threads,
        max_threads=_max_threads(opts, len(header.stages)),
        batch_size=opts.batch_size,
        max_samples=opts.max_samples,
        debug=opts.debug,
        edmm=opts.edmm,
        isv_prod_id=opts.isv_prod_id,
        isv_svn=opts.isv_svn,
        attest=EvidenceProvider(opts.attest),
        model_broker=model_broker,
        model_broker_identity=identity,
        data_brokers=tuple(data_brokers),
        allow_plaintext=opts.allow_plaintext_result,
        allow_full_model=opts.allow_full_model,
        min_model_version=min_version,
        broker_ca=broker_ca,
        accepted_tcb_statuses=tuple(dict.fromkeys(opts.accepted_tcb_statuses)),
        signing_key=signing_key,
        serve_caps={n: getattr(opts, n) for n in measured.CAP_NAMES} if opts.serve else {},
        dev_key=_dev_key(opts, io_dirs),
    )
    return sized(cfg, header, given_size, entry_script(env.python, "predict"), log)


def _dev_key(opts: BuildOptions, io_dirs: list[str]) -> str:
    """Simulated builds: the development attestation key file (``--dev-key``, else this user's), made
    here if absent, outside the enclave, so that the enclave only reads it (a trusted file); "" for a
    DCAP build, which never sees it. Owners who develop together share one such file."""
    if opts.attest != EvidenceProvider.SIMULATED:
        if opts.dev_key:
            raise UsageError("--dev-key is for --attest simulated builds only (a DCAP build never sees it)")
        return ""
    from branchy_tee.tee.attest.providers import DEV_KEY_FILE, default_dev_key_dir, load_or_create_dev_key

    f = os.path.abspath(opts.dev_key) if opts.dev_key else str((default_dev_key_dir() / DEV_KEY_FILE).absolute())
    if BAD_PATH.search(f) or " " in f:
        raise UsageError(f"the development key {f!r}: spaces, quotes, '$' and ':' are not supported")
    if any(overlaps(os.path.dirname(f), io) for io in io_dirs):
        raise UsageError(f"the development key's folder {os.path.dirname(f)} overlaps a data directory; move one")
    check_data_dir(os.path.dirname(f))
    load_or_create_dev_key(f)
    return f


def _max_threads(opts: BuildOptions, num_stages: int) -> int:
    """The compute threads, Gramine's and Python's own, the stage decryption workers (tee.sealed.aead), and
    for serve one thread per connection plus the batcher and the key renewal. predict spends its
    compute threads on whole batches at once over single-threaded stage sessions; serve runs one
    batch at a time on ``threads`` intra-op threads per stage session, and every session has its
    own pool of ``threads - 1`` (ONNX Runtime's shared pool cannot be kept from spinning)."""
    threads = opts.threads + GRAMINE_HELPER_THREADS + MAX_DECRYPT_WORKERS - 1
    if not opts.serve:
        return threads
    return threads + (opts.threads - 1) * num_stages + opts.max_connections + SERVER_THREADS


def count_trusted(defines: dict[str, str], runtimedir: str = DEBIAN_GRAMINE_RUNTIME) -> int:
    """The trusted files a rendering would list, counted without Gramine (for the build's report)."""
    entries = tomllib.loads(render_manifest(defines, runtimedir))["sgx"]["trusted_files"]
    paths = [e[len("file:") :] for e in entries]
    return sum(enclave_env.count_files(p) if p.endswith("/") else 1 for p in paths)


def read_measurements(directory: str | os.PathLike[str]) -> dict:
    """MRENCLAVE, MRSIGNER, ISV ids and the debug flag of the signed enclave in ``directory``."""
    d = Path(directory)
    load_config(d)
    return read_sigstruct(d)


# --------------------------------------------------------------------------- build
def build(opts: BuildOptions, log=lambda msg: None) -> dict:
    """Write OUT/: the manifest template and its rendering, the entry script, the Makefile and
    enclave.json; with ``opts.sgx`` also sign and read the measurements. Returns a summary."""
    from branchy_tee.core.fileio import atomic_write_text

    cfg = build_config(opts, log)
    out = Path(cfg.dir)
    out.mkdir(parents=True, exist_ok=True)
    for d in cfg.io_dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, SGX_MANIFEST, SIGSTRUCT):  # never leave a signature of an older build
        (out / stale).unlink(missing_ok=True)
    shutil.copyfile(TEMPLATES / MANIFEST_TEMPLATE, out / MANIFEST_TEMPLATE)
    atomic_write_text(cfg.launcher, entry_script(cfg.interpreter, cfg.entry), mode=0o755)
    defines = [f"{k}={v}" for k, v in cfg.defines.items()]
    atomic_write_text(out / "Makefile", _render("Makefile.template", defines=defines, signing_key=cfg.signing_key))
    atomic_write_text(out / CONFIG, json.dumps(cfg.to_json(), indent=1) + "\n")
    warnings = _warnings(cfg)
    summary = {
        "dir": str(out),
        "entry": cfg.entry,
        "manifest": str(out / MANIFEST),
        "makefile": str(out / "Makefile"),
        "env": cfg.env_dir,
        "env_requirements": list(cfg.env_requirements),
        "enclave_size": cfg.enclave_size,
        "enclave_size_detail": cfg.enclave_size_detail,
        "max_threads": cfg.max_threads,
        "debug": cfg.debug,
        "edmm": cfg.edmm,
        "trusted_files": None,
        "manifest_bytes": None,
        "manifest_sha256": None,
        "signed": False,
        "mrenclave": None,
        "mrsigner": None,
        "warnings": warnings,
        "bundle_id": cfg.bundle_id,
        "model_key_id": cfg.model_key_id,
        "min_model_version": cfg.min_model_version,
        "model_broker": cfg.model_broker,
        "model_broker_identity": cfg.model_broker_identity,
    }
    summary.update(_render_manifest_file(cfg, out, warnings))
    if opts.sgx:
        summary.update(_sign(cfg, out))
    return summary


def _warnings(cfg: EnclaveConfig) -> list[str]:
    warnings = []
    if not cfg.model_broker:
        warnings.append(
            "no --model-broker: inside the enclave keys come only from attested key release, so this enclave "
            "can never get the model key (fine for --backend native with key files)"
        )
    elif cfg.model_broker.startswith("http://"):
        warnings.append(
            "plain-http model broker: key releases are signed by its measured identity and keys are "
            "HPKE-sealed, but the network sees nonces and evidence"
        )
    if cfg.debug:
        warnings.append("--debug: a debug enclave's memory can be read by the host; policies keep allow_debug = false")
    if cfg.attest == EvidenceProvider.SIMULATED:
        warnings.append("--attest simulated: development only; brokers must set allow_simulation = true to accept it")
    if cfg.allow_plaintext:
        warnings.append("--allow-plaintext-result: the host may ask for results it can read; owners must consent")
    if cfg.allow_full_model:
        warnings.append("--allow-full-model: the host may ignore the model owner's thresholds; owners must consent")
    return warnings


def _render_manifest_file(cfg: EnclaveConfig, out: Path, warnings: list[str]) -> dict:
    """Render OUT/branchy-tee.manifest with gramine-manifest (hashed), or without Gramine for inspection."""
    from branchy_tee.core.fileio import atomic_write_text

    if which("gramine-manifest"):
        proc = run_tool(gramine_manifest_argv(cfg.defines), cwd=str(out))
        try:
            figures = manifest_figures(out / MANIFEST)
        except BranchyError:
            (out / MANIFEST).unlink(missing_ok=True)
            raise
        warnings += [f"gramine-manifest: {line}" for line in proc.stderr.splitlines() if line.strip()]
        return {**figures, "rendered_by": "gramine-manifest"}
    atomic_write_text(out / MANIFEST, render_manifest(cfg.defines))
    os.utime(out / MANIFEST, (0, 0))  # older than the template: `make` re-renders it with gramine-manifest
    warnings.append(
        "gramine-manifest is not installed: the manifest was rendered by branchy-tee for inspection, "
        f"without hashes (Gramine's runtime directory assumed at {DEBIAN_GRAMINE_RUNTIME}); `make` "
        f"re-renders it with Gramine {SUPPORTED_GRAMINE}, which hashes it"
    )
    return {"rendered_by": "branchy-tee", "trusted_files": count_trusted(cfg.defines)}


def _sign(cfg: EnclaveConfig, out: Path) -> dict:
    missing = [t for t in ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx-sigstruct-view") if not which(t)]
    if missing:
        raise BranchyError(
            f"--sgx: {', '.join(missing)} not installed, so nothing was signed "
            f"(the manifest and Makefile are in {out}); {INSTALL_HINT}"
        )
    if not Path(cfg.signing_key).is_file():
        raise BranchyError(
            f"--sgx: no signing key at {cfg.signing_key}, so nothing was signed; "
            "create one with `gramine-sgx-gen-private-key` or pass --signing-key PEM (RSA-3072, exponent 3)"
        )
    run_tool(sign_argv(cfg.signing_key), cwd=str(out))
    if not (out / SGX_MANIFEST).is_file() or not (out / SIGSTRUCT).is_file():
        raise BranchyError(f"gramine-sgx-sign did not write {SGX_MANIFEST} and {SIGSTRUCT} in {out}")
    sig = read_measurements(out)
    return {
        "signed": True,
        "sgx_manifest": str(out / SGX_MANIFEST),
        "sigstruct": str(out / SIGSTRUCT),
        "mrenclave": sig["mrenclave"],
        "mrsigner": sig["mrsigner"],
    }
