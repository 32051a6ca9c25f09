"""Build the Gramine enclave for a sealed bundle: manifest, entry script, Makefile and signature.

What the enclave trusts is measured (``branchy_tee.measured``, the manifest's ``loader.env``): the
model broker's URL and Ed25519 identity, and the bundle it serves (bundle id, model key id, minimum
model version), read from the bundle's plaintext header (no key needed). So an MRENCLAVE names
exactly one model and one model owner's broker. The model owner reproduces this build and signs a
release statement (``enclave.release``) from which data owners write their brokers' policies.

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

Enclave size rule (``sgx.enclave_size``)
----------------------------------------
    need = base + weights + loading + activations + inputs
    base        = the shared libraries the runtime maps. This is measured: all ``*.so*`` files of
                  torch, numpy(.libs), cryptography and safetensors in the venv. Under SGX, Gramine
                  copies mapped files into enclave memory.
                  + 192 MiB for Gramine's LibOS/PAL and the Python heap after importing torch & co.
                  (about 140 MiB measured natively on x86-64 with torch 2.x).
                  + sys.stack.size (2 MiB) for every thread slot (sgx.max_threads).
    weights     = the sum of plaintext_size over all stages (each stage's safetensors bytes: its
                  weight_bytes plus a small header). predict's --memory-budget is a host argument,
                  not a measured one, so any stage ever needed may stay resident.
    loading     = the largest plaintext_size + (MAX_DECRYPT_WORKERS + 1) AEAD chunks: the stage being
                  loaded. Its decrypted buffer is counted once more here in case the tensors are
                  copied out of it and not viewed in place. The ciphertext is read one chunk at a
                  time into a ring of buffers, one per chunk being decrypted (``seal.aead``).
    activations = 4 x batch x the runtime's own activation bound per sample (``runtime.budget``: the
                  hungriest stage's input + output, plus the samples queued before later stages),
                  times 4 for the temporaries inside a stage.
    inputs      = 3 x max_samples x input bytes per sample: the sealed request, its decrypted
                  payload and the batched tensor.
    sgx.enclave_size = the smallest power of two >= need, and at least 256 MiB. SGX enclave sizes
                  are powers of two.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from .. import measured
from ..errors import BranchyError, UsageError
from ..runtime.budget import activation_bytes_per_sample
from ..seal.aead import MAX_DECRYPT_WORKERS
from . import MANIFEST_NAME

MIB = 1 << 20
TEMPLATES = Path(__file__).resolve().parent / "templates"
MANIFEST_TEMPLATE = f"{MANIFEST_NAME}.manifest.template"
MANIFEST = f"{MANIFEST_NAME}.manifest"
SGX_MANIFEST = f"{MANIFEST_NAME}.manifest.sgx"
SIGSTRUCT = f"{MANIFEST_NAME}.sig"
LAUNCHER = f"{MANIFEST_NAME}-predict"
CONFIG = "enclave.json"
CONFIG_FORMAT = "branchy-tee/enclave/v1"

# gramine.runtimedir() of Gramine's Debian/Ubuntu packages: used only when gramine-manifest is absent.
DEBIAN_GRAMINE_RUNTIME = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"

BASE_HEAP_MIB = 192
STACK_MIB = 2  # sys.stack.size in the template
ACTIVATION_FACTOR = 4
INPUT_COPIES = 3
MIN_ENCLAVE = 256 * MIB
GRAMINE_HELPER_THREADS = 8  # Gramine's IPC/async/TLS helpers, Python's main thread, the memory sampler, headroom
RUNTIME_LIBRARIES = ("torch", "numpy", "numpy.libs", "cryptography", "safetensors")

INSTALL_HINT = ("install Gramine from its apt repository (https://gramine.readthedocs.io/en/stable/installation.html; "
                "on Ubuntu: add packages.gramineproject.io, then `sudo apt install gramine`)")  # fmt: skip


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
    attest: str = "gramine"
    threads: int = 4
    allow_plaintext_result: bool = False
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


# --------------------------------------------------------------------------- rendering
def jinja_environment() -> jinja2.Environment:
    """Like gramine-manifest's: StrictUndefined, so a missing value is an error, not an empty string."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)  # fmt: skip


def render_manifest(defines: dict[str, str], runtimedir: str = DEBIAN_GRAMINE_RUNTIME,
                    template: str | os.PathLike | None = None) -> str:
    """Render the manifest template as gramine-manifest would, ``gramine.runtimedir()`` being
    ``runtimedir``. Raises ``jinja2.UndefinedError`` when a value is missing."""
    env = jinja_environment()
    env.globals["gramine"] = {"runtimedir": lambda libc="glibc": runtimedir}
    env.globals["env"] = dict(os.environ)
    if template is None:
        tpl = env.get_template(MANIFEST_TEMPLATE)
    else:
        tpl = env.from_string(Path(template).read_text())
    return tpl.render(**defines)


def _render(name: str, **values) -> str:
    return jinja_environment().get_template(name).render(**values)


# --------------------------------------------------------------------------- the Python side
@dataclass
class PythonLayout:
    python: str  # the venv's interpreter as installed (often a symlink)
    interpreter: str  # its real path: Gramine does not follow host symlinks everywhere
    dirs: list[str]  # directories to mount and trust: stdlib, venv site-packages, our package
    site_dirs: list[str]  # the venv's site directories (added by the entry script)
    package_dir: str  # the directory holding branchy_tee/
    libs: list[str]  # libpython when the interpreter links it from outside the system libdirs
    arch_libdir: str  # e.g. /lib/x86_64-linux-gnu

    @property
    def ld_library_path(self) -> str:
        dirs = ["/lib", self.arch_libdir, f"/usr{self.arch_libdir}"] + [str(Path(p).parent) for p in self.libs]
        return ":".join(dict.fromkeys(dirs))


_PROBE = r"""
import json, os, site, sys, sysconfig
import branchy_tee
libdir, soname = sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or ""
print(json.dumps({
    "executable": sys.executable,
    "realpath": os.path.realpath(sys.executable),
    "sys_path": [p for p in sys.path if p],
    "site_dirs": site.getsitepackages(),
    "package_dir": os.path.dirname(os.path.dirname(os.path.abspath(branchy_tee.__file__))),
    "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
    "libpython": os.path.realpath(os.path.join(libdir, soname)) if libdir and soname else "",
    "multiarch": sysconfig.get_config_var("MULTIARCH") or "",
}))
"""


def _outermost(paths: list[str]) -> list[str]:
    """Existing directories, without those inside another one of them, in first-seen order."""
    seen: list[Path] = []
    for p in (Path(os.path.realpath(p)) for p in paths):
        if p.is_dir() and p not in seen:
            seen.append(p)
    return [str(p) for p in seen if not any(q != p and q in p.parents for q in seen)]


def python_layout(python: str | None = None) -> PythonLayout:
    """What the enclave needs of the Python installation, asked of the interpreter itself (a clean
    ``sys.path``: no script directory, no PYTHONPATH, no user site)."""
    python = python or sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONNOUSERSITE="1", PYTHONSAFEPATH="1")
    try:
        out = subprocess.run([python, "-c", _PROBE], env=env, cwd="/", capture_output=True, text=True, check=True).stdout
        info = json.loads(out)
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError) as e:
        raise BranchyError(f"cannot inspect the Python installation {python}: {e}") from None
    arch = f"/lib/{info['multiarch']}" if info["multiarch"] else "/lib/x86_64-linux-gnu"
    site_dirs = _outermost(info["site_dirs"])
    dirs = _outermost(info["sys_path"] + site_dirs + [info["package_dir"]])
    system = (arch, f"/usr{arch}")
    libs = []
    if info["shared"] and info["libpython"] and Path(info["libpython"]).is_file():
        if not any(info["libpython"].startswith(d + "/") for d in system):
            libs.append(info["libpython"])
    return PythonLayout(python=info["executable"], interpreter=info["realpath"], dirs=dirs, site_dirs=site_dirs,
                        package_dir=info["package_dir"], libs=libs, arch_libdir=arch)  # fmt: skip


def runtime_library_bytes(site_dirs: list[str]) -> int:
    """Total size of the shared libraries of torch, numpy, cryptography and safetensors."""
    total = 0
    for site_dir in site_dirs:
        for name in RUNTIME_LIBRARIES:
            for root, _dirs, files in os.walk(Path(site_dir) / name):
                for f in files:
                    if f.endswith(".so") or ".so." in f:
                        try:
                            total += os.stat(os.path.join(root, f)).st_size
                        except OSError:
                            pass
    return total


# --------------------------------------------------------------------------- enclave size
def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def size_string(n: int) -> str:
    """Gramine's size syntax: "512M", "2G"."""
    return f"{n // (1 << 30)}G" if n % (1 << 30) == 0 else f"{n // MIB}M"


def enclave_size_rule(header: dict, batch_size: int, max_samples: int, max_threads: int, library_bytes: int) -> dict:
    """The documented rule (module docstring): every term in bytes, the total and the size to use."""
    stages = header["stages"]
    input_bytes = 4 * math.prod(header["preprocessing"]["input_shape"])
    terms = {
        "libraries": library_bytes,
        "runtime_heap": BASE_HEAP_MIB * MIB,
        "stacks": STACK_MIB * MIB * max_threads,
        "weights": sum(int(s["plaintext_size"]) for s in stages),
        "loading": max(int(s["plaintext_size"]) for s in stages) + (MAX_DECRYPT_WORKERS + 1) * int(header["chunk_size"]),
        "activations": ACTIVATION_FACTOR * batch_size * activation_bytes_per_sample(header),
        "inputs": INPUT_COPIES * max_samples * input_bytes,
    }
    need = sum(terms.values())
    size = max(MIN_ENCLAVE, next_power_of_two(need))
    return {"terms": terms, "need": need, "enclave_size": size, "enclave_size_str": size_string(size)}


# --------------------------------------------------------------------------- values
_BAD_PATH = re.compile(r"[\"'\\$:\x00-\x1f\x7f]")


def _abs_path(path: str, what: str) -> str:
    p = os.path.abspath(os.path.expanduser(path))
    if _BAD_PATH.search(p):
        raise UsageError(f"{what} {p!r}: quotes, backslashes, '$', ':' and control characters are not supported in enclave paths")
    return p


def _check_url(url: str, what: str) -> str:
    problem = measured.broker_url_problem(url)
    if problem:
        raise UsageError(f"{what} {url!r} {problem}")
    return url


def manifest_env(cfg: dict) -> dict[str, str]:
    """The environment the manifest sets (loader.env), from the build configuration."""
    env = {
        "LD_LIBRARY_PATH": cfg["ld_library_path"],
        "OMP_NUM_THREADS": str(cfg["threads"]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONSAFEPATH": "1",
        measured.ENCLAVE: "1",
        measured.ATTEST: cfg["attest"],
        measured.MODEL_BROKER: cfg["model_broker"],
        measured.MODEL_BROKER_IDENTITY: cfg["model_broker_identity"],
        measured.DATA_BROKERS: ",".join(cfg["data_brokers"]),
        measured.BUNDLE_ID: cfg["bundle_id"],
        measured.MODEL_KEY_ID: cfg["model_key_id"],
        measured.MIN_MODEL_VERSION: str(cfg["min_model_version"]),
        measured.ALLOW_PLAINTEXT: "1" if cfg["allow_plaintext"] else "0",
    }
    if cfg.get("broker_ca"):
        env[measured.BROKER_CA] = cfg["broker_ca"]
    return env


def manifest_defines(cfg: dict) -> dict[str, str]:
    """The template's values, as the strings gramine-manifest's -D options carry."""
    return {
        "log_level": "warning" if cfg["debug"] else "error",
        "launcher": cfg["launcher"],
        "python": cfg["interpreter"],
        "python_dirs": ":".join(cfg["python_dirs"]),
        "python_libs": ":".join(cfg["python_libs"]),
        "arch_libdir": cfg["arch_libdir"],
        "ld_library_path": cfg["ld_library_path"],
        "threads": str(cfg["threads"]),
        "max_threads": str(cfg["max_threads"]),
        "enclave_size": cfg["enclave_size"],
        "debug": "true" if cfg["debug"] else "false",
        "edmm": "true" if cfg["edmm"] else "false",
        "isvprodid": str(cfg["isv_prod_id"]),
        "isvsvn": str(cfg["isv_svn"]),
        "attest": cfg["attest"],
        "model_broker": cfg["model_broker"],
        "model_broker_identity": cfg["model_broker_identity"],
        "bundle_id": cfg["bundle_id"],
        "model_key_id": cfg["model_key_id"],
        "data_brokers": ",".join(cfg["data_brokers"]),
        "allow_plaintext": "1" if cfg["allow_plaintext"] else "0",
        "min_model_version": str(cfg["min_model_version"]),
        "broker_ca": cfg.get("broker_ca") or "",
        "bundle_dir": cfg["bundle"],
        "bundle_files": ":".join(cfg["bundle_files"]),
        "io_dirs": ":".join(cfg["io_dirs"]),
    }


def _overlaps(a: str, b: str) -> bool:
    pa, pb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return pa == pb or pa in pb.parents or pb in pa.parents


def default_signing_key() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "gramine", "enclave-key.pem")


def build_config(opts: BuildOptions, layout: PythonLayout | None = None) -> dict:
    """Check the options and work out every value of the build (written to OUT/enclave.json)."""
    from ..seal.bundle import HEADER_FILE, read_header_unverified

    out = _abs_path(opts.out, "--out")
    bundle = _abs_path(opts.bundle, "--bundle")
    header = read_header_unverified(bundle)["header"]
    if not 1 <= opts.threads <= 256:
        raise UsageError("--threads must be between 1 and 256")
    if opts.batch_size < 1 or opts.max_samples < 1:
        raise UsageError("--batch-size and --max-samples must be at least 1")
    if not (0 <= opts.isv_prod_id < 1 << 16 and 0 <= opts.isv_svn < 1 << 16):
        raise UsageError("--isv-prod-id and --isv-svn are 16-bit numbers (0..65535)")
    if opts.attest not in ("gramine", "simulated"):
        raise UsageError("--attest is gramine or simulated")
    from ..attest.verify import TCB_STATUSES

    if not opts.accepted_tcb_statuses or any(s not in TCB_STATUSES or s == "Revoked" for s in opts.accepted_tcb_statuses):
        raise UsageError(f"--accept-tcb takes one of {', '.join(sorted(TCB_STATUSES - {'Revoked'}))}")
    min_version = header["model_version"] if opts.min_model_version is None else opts.min_model_version
    if min_version < 0:
        raise UsageError("--min-model-version must not be negative")
    model_broker = _check_url(opts.model_broker, "--model-broker") if opts.model_broker else ""
    identity = opts.model_broker_identity or ""
    if model_broker and not identity:
        raise UsageError("--model-broker needs --model-broker-identity HEX (the broker's identity, as `branchy-tee keygen "
                         "--identity` printed it): the enclave accepts only key releases signed by it")
    if identity and not model_broker:
        raise UsageError("--model-broker-identity needs --model-broker URL")
    problem = measured.identity_problem(identity) if identity else None
    if problem:
        raise UsageError(f"--model-broker-identity {identity!r} {problem}")
    data_brokers = [_check_url(u, "--data-broker") for u in opts.data_brokers]
    broker_ca = None
    if opts.broker_ca:
        broker_ca = _abs_path(opts.broker_ca, "--broker-ca")
        if not Path(broker_ca).is_file():
            raise BranchyError(f"--broker-ca {broker_ca}: no such file")

    layout = layout or python_layout()
    for p in [layout.interpreter, *layout.dirs, *layout.libs]:
        _abs_path(p, "Python path")
    launcher = os.path.join(out, LAUNCHER)
    bundle_files = [os.path.join(bundle, HEADER_FILE)] + [os.path.join(bundle, s["file"]) for s in header["stages"]]
    io_dirs = [_abs_path(d, "--io-dir") for d in opts.io_dirs] or [os.path.join(out, "io")]
    io_dirs += [_abs_path(d, "--stats-dir") for d in opts.stats_dirs]
    io_dirs = list(dict.fromkeys(io_dirs))
    trusted = [*layout.dirs, layout.interpreter, *layout.libs, launcher] + ([broker_ca] if broker_ca else [])
    for d in [bundle, *io_dirs]:
        for t in trusted:
            if _overlaps(d, t):
                raise UsageError(f"data directory {d} overlaps the trusted code/configuration path {t}; "
                                 "keep bundles, requests and results apart from Python, the venv and the build directory's files")

    # the compute threads, Gramine's and Python's own, and the stage decryption workers (seal.aead)
    max_threads = opts.threads + GRAMINE_HELPER_THREADS + MAX_DECRYPT_WORKERS - 1
    rule = enclave_size_rule(header, opts.batch_size, opts.max_samples, max_threads,
                             runtime_library_bytes(layout.site_dirs))  # fmt: skip
    signing_key = _abs_path(opts.signing_key, "--signing-key") if opts.signing_key else default_signing_key()
    if _BAD_PATH.search(signing_key) or " " in signing_key:
        raise UsageError(f"--signing-key {signing_key!r}: spaces, quotes, '$' and ':' are not supported")
    cfg = {
        "format": CONFIG_FORMAT,
        "dir": out,
        "bundle": bundle,
        "bundle_files": bundle_files,
        "bundle_id": header["bundle_id"],
        "model_key_id": header["key_id"],
        "model_version": header["model_version"],
        "arch": header["arch"],
        "io_dirs": io_dirs,
        "python": layout.python,
        "interpreter": layout.interpreter,
        "python_dirs": layout.dirs,
        "python_libs": layout.libs,
        "site_dirs": layout.site_dirs,
        "package_dir": layout.package_dir,
        "arch_libdir": layout.arch_libdir,
        "ld_library_path": layout.ld_library_path,
        "launcher": launcher,
        "threads": opts.threads,
        "max_threads": max_threads,
        "enclave_size": rule["enclave_size_str"],
        "enclave_size_rule": rule,
        "batch_size": opts.batch_size,
        "max_samples": opts.max_samples,
        "debug": opts.debug,
        "edmm": opts.edmm,
        "isv_prod_id": opts.isv_prod_id,
        "isv_svn": opts.isv_svn,
        "attest": opts.attest,
        "model_broker": model_broker,
        "model_broker_identity": identity,
        "data_brokers": data_brokers,
        "allow_plaintext": opts.allow_plaintext_result,
        "min_model_version": min_version,
        "broker_ca": broker_ca,
        "accepted_tcb_statuses": list(dict.fromkeys(opts.accepted_tcb_statuses)),
        "signing_key": signing_key,
    }
    cfg["env"] = manifest_env(cfg)
    cfg["defines"] = manifest_defines(cfg)
    return cfg


# --------------------------------------------------------------------------- Gramine tools
def which(tool: str) -> str | None:
    return shutil.which(tool)


def run_tool(argv: list[str], cwd: str) -> str:
    """Run a Gramine tool; its failure becomes one line."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise BranchyError(f"cannot run {argv[0]}: {e.strerror or e}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BranchyError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    return proc.stdout


def gramine_manifest_argv(defines: dict[str, str]) -> list[str]:
    """gramine-manifest's command line, exactly as the Makefile runs it (in the build directory)."""
    return ["gramine-manifest", *(f"-D{k}={v}" for k, v in defines.items()), MANIFEST_TEMPLATE, MANIFEST]


def sign_argv(signing_key: str) -> list[str]:
    return ["gramine-sgx-sign", "--key", signing_key, "--manifest", MANIFEST, "--output", SGX_MANIFEST]


_SIG_FIELD = re.compile(r"^\s*(mr_enclave|mr_signer|isv_prod_id|isv_svn|debug_enclave)\s*[:=]\s*\"?([^\"\s]+)\"?\s*$",
                        re.MULTILINE | re.IGNORECASE)  # fmt: skip


def parse_sigstruct_view(text: str) -> dict:
    """MRENCLAVE, MRSIGNER, ISV ids and the debug flag from gramine-sgx-sigstruct-view's output
    (the plain ``key: value`` layout and the TOML ``key = "value"`` layout)."""
    fields = {m.group(1).lower(): m.group(2) for m in _SIG_FIELD.finditer(text)}
    try:
        mrenclave, mrsigner = fields["mr_enclave"].lower(), fields["mr_signer"].lower()
        if not (re.fullmatch(r"[0-9a-f]{64}", mrenclave) and re.fullmatch(r"[0-9a-f]{64}", mrsigner)):
            raise ValueError
        return {
            "mrenclave": mrenclave,
            "mrsigner": mrsigner,
            "isv_prod_id": int(fields.get("isv_prod_id", "0"), 0),
            "isv_svn": int(fields.get("isv_svn", "0"), 0),
            "debug": fields.get("debug_enclave", "false").lower() in ("true", "1", "yes"),
        }
    except (KeyError, ValueError):
        raise BranchyError("cannot read MRENCLAVE/MRSIGNER from gramine-sgx-sigstruct-view's output") from None


def load_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise BranchyError(f"{directory} is not an enclave build directory (no {CONFIG}); run `branchy-tee enclave build` first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BranchyError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != CONFIG_FORMAT:
        raise BranchyError(f"{path}: not a branchy-tee enclave configuration")
    return cfg


def read_measurements(directory: str | os.PathLike) -> dict:
    """MRENCLAVE, MRSIGNER, ISV ids and the debug flag of the signed enclave in ``directory``."""
    d = Path(directory)
    load_config(d)
    if not (d / SIGSTRUCT).is_file():
        raise BranchyError(f"{d / SIGSTRUCT} does not exist: nothing was signed; run `make SGX=1` in {d} first")
    if not which("gramine-sgx-sigstruct-view"):
        raise BranchyError(f"gramine-sgx-sigstruct-view is not installed: {INSTALL_HINT}")
    return parse_sigstruct_view(run_tool(["gramine-sgx-sigstruct-view", SIGSTRUCT], cwd=str(d)))


# --------------------------------------------------------------------------- build
def build(opts: BuildOptions, layout: PythonLayout | None = None) -> dict:
    """Write OUT/: the manifest template and its rendering, the entry script, the Makefile and
    enclave.json; with ``opts.sgx`` also sign and read the measurements. Returns a summary."""
    from ..fileio import atomic_write_text

    cfg = build_config(opts, layout)
    out = Path(cfg["dir"])
    out.mkdir(parents=True, exist_ok=True)
    for d in cfg["io_dirs"]:
        Path(d).mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, SGX_MANIFEST, SIGSTRUCT):  # never leave a signature of an older build
        (out / stale).unlink(missing_ok=True)
    shutil.copyfile(TEMPLATES / MANIFEST_TEMPLATE, out / MANIFEST_TEMPLATE)
    launcher = _render("branchy-tee-predict.template", python=cfg["interpreter"], site_dirs=repr(cfg["site_dirs"]),
                       package_dir=repr(cfg["package_dir"]))  # fmt: skip
    atomic_write_text(cfg["launcher"], launcher, mode=0o755)
    defines = [f"{k}={v}" for k, v in cfg["defines"].items()]
    atomic_write_text(out / "Makefile", _render("Makefile.template", defines=defines, signing_key=cfg["signing_key"]))
    atomic_write_text(out / CONFIG, json.dumps(cfg, indent=1) + "\n")

    summary = {"dir": str(out), "manifest": str(out / MANIFEST), "makefile": str(out / "Makefile"),
               "enclave_size": cfg["enclave_size"], "enclave_size_rule": cfg["enclave_size_rule"],
               "max_threads": cfg["max_threads"], "debug": cfg["debug"], "edmm": cfg["edmm"],
               "signed": False, "mrenclave": None, "mrsigner": None, "warnings": [],
               "bundle_id": cfg["bundle_id"], "model_key_id": cfg["model_key_id"],
               "min_model_version": cfg["min_model_version"], "model_broker": cfg["model_broker"],
               "model_broker_identity": cfg["model_broker_identity"]}  # fmt: skip
    warnings = summary["warnings"]
    if not cfg["model_broker"]:
        warnings.append("no --model-broker: inside the enclave keys come only from attested key release, so this enclave "
                        "can never get the model key (fine for --backend native with key files)")
    elif cfg["model_broker"].startswith("http://"):
        warnings.append("plain-http model broker: key releases are signed by its measured identity and keys are "
                        "HPKE-sealed, but the network sees nonces and evidence")
    if cfg["debug"]:
        warnings.append("--debug: a debug enclave's memory can be read by the host; policies keep allow_debug = false")
    if cfg["attest"] == "simulated":
        warnings.append("--attest simulated: development only; brokers must set allow_simulation = true to accept it")

    if which("gramine-manifest"):
        run_tool(gramine_manifest_argv(cfg["defines"]), cwd=str(out))
        summary["rendered_by"] = "gramine-manifest"
    else:
        text = render_manifest(cfg["defines"])
        atomic_write_text(out / MANIFEST, text)
        os.utime(out / MANIFEST, (0, 0))  # older than the template: `make` re-renders it with gramine-manifest
        summary["rendered_by"] = "branchy-tee"
        warnings.append("gramine-manifest is not installed: the manifest was rendered by branchy-tee for inspection "
                        f"(Gramine's runtime directory assumed at {DEBIAN_GRAMINE_RUNTIME}); `make` re-renders it")

    if opts.sgx:
        missing = [t for t in ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx-sigstruct-view") if not which(t)]
        if missing:
            raise BranchyError(f"--sgx: {', '.join(missing)} not installed, so nothing was signed "
                               f"(the manifest and Makefile are in {out}); {INSTALL_HINT}")
        if not Path(cfg["signing_key"]).is_file():
            raise BranchyError(f"--sgx: no signing key at {cfg['signing_key']}, so nothing was signed; "
                               "create one with `gramine-sgx-gen-private-key` or pass --signing-key PEM (RSA-3072, exponent 3)")
        run_tool(sign_argv(cfg["signing_key"]), cwd=str(out))
        if not (out / SGX_MANIFEST).is_file() or not (out / SIGSTRUCT).is_file():
            raise BranchyError(f"gramine-sgx-sign did not write {SGX_MANIFEST} and {SIGSTRUCT} in {out}")
        sig = read_measurements(out)
        summary.update(signed=True, sgx_manifest=str(out / SGX_MANIFEST), sigstruct=str(out / SIGSTRUCT),
                       mrenclave=sig["mrenclave"], mrsigner=sig["mrsigner"])  # fmt: skip
    return summary
