"""The enclave's own Python environment: the interpreter's standard library and exactly the
packages that the enclave-side code imports. It is the only Python the manifest trusts.

Layout: a Python home, which the system's interpreter uses with ``PYTHONHOME=ENV``::

    ENV/lib/pythonX.Y/                 the standard library, without STDLIB_EXCLUDED (site-packages,
                                       test suites, GUI and installer packages)
    ENV/lib/pythonX.Y/lib-dynload/     its extension modules, without the test and Tk ones
    ENV/lib/pythonX.Y/site-packages/   the pinned requirements of the ``gramine`` extra, installed by
                                       pip without .pyc, then without C/C++ headers, .pyi stubs,
                                       tests and caches; and the enclave-side modules of branchy_tee
    ENV/branchy-tee-env.json           what it was made from (outside lib/: neither trusted nor
                                       part of the enclave)

Why a copy of the standard library: the interpreter's own library folder also holds its
site-packages and test suites, and Gramine trusts a folder only whole. A folder holding just what
the enclave may run can be trusted whole, and so the manifest stays short.

What the environment holds is decided in one place: the ``gramine`` extra of pyproject.toml (exact
pins of the runtime's direct requirements). ``constraints.txt`` beside this file pins whatever
those pull in; a package it does not pin is installed anyway and reported.

No ``.pyc`` anywhere: pip installs without compiling, the standard library is copied without its
``__pycache__``, and the manifest sets PYTHONDONTWRITEBYTECODE. Python compiles the trusted sources
at every start (a few seconds for torch), and nothing in the measurement depends on a file's
modification time or on when the environment was made.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from branchy_tee.core.errors import BranchyError

ENV_FORMAT = "branchy-tee/enclave-env/v1"
RECORD = "branchy-tee-env.json"
DEFAULT_ENV_DIR = ".enclave-env"
DISTRIBUTION = "branchy-tee"
EXTRA = "enclave"
CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"
PACKAGE = "branchy_tee"
# What the enclave runs of this package: these folders, copied whole, and the package's __init__.py.
# The entry script imports one of ENTRY_MODULES (predict, or serve for `enclave build --serve`);
# the tests check that the entry points import nothing outside the folders and every file in them.
ENCLAVE_PACKAGES = ("tee", "core")
ENTRY_MODULES = ("branchy_tee.tee.predict", "branchy_tee.tee.serve.server")

# Top-level names in the standard library folder that the enclave never runs.
STDLIB_EXCLUDED = frozenset(
    {
        "site-packages",
        "dist-packages",  # other environments' packages
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "turtle.py",  # test suites, IDE, GUI
        "ensurepip",
        "venv",
        "lib2to3",
        "pydoc_data",
        "__phello__",
        "__hello__.py",  # installers, tools, demos
    }
)
STDLIB_EXCLUDED_PREFIXES = ("config-",)  # config-3.11-x86_64-linux-gnu: the static library and build files
# Extension modules of lib-dynload that are test helpers or need Tk.
DYNLOAD_EXCLUDED_PREFIXES = ("_test", "_ctypes_test", "_xxtestfuzz", "xxlimited", "xxsubtype", "_tkinter")
# Anywhere: caches and test suites.
EXCLUDED_DIRS = frozenset({"__pycache__", "test", "tests", "idle_test"})
# Installed packages: bytecode, typing stubs, C/C++ headers, build files, Windows launchers.
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".pyi", ".h", ".hh", ".hpp", ".hxx", ".cuh", ".cmake", ".exe")
# What `pip install --target` puts beside the packages: console scripts and data files.
SITE_EXCLUDED = frozenset({"bin", "share"})


@dataclass
class Interpreter:
    """The system interpreter the enclave runs, and where its standard library lies."""

    executable: str  # real path (Gramine starts this file; never a venv's symlink)
    version: str  # "3.11"
    stdlib: str
    dynload: str
    home_lib: str  # the standard library's place in a Python home: "lib/python3.11"


_PROBE = r"""
import json, os, sys, sysconfig
dynload = [p for p in sys.path if p.endswith("lib-dynload")]
home = "/@home@"
stdlib = sysconfig.get_path("stdlib", vars={"installed_base": home, "base": home})
platstdlib = sysconfig.get_path("platstdlib", vars={"installed_platbase": home, "platbase": home})
print(json.dumps({
    "executable": os.path.realpath(sys.executable),
    "version": "%d.%d" % sys.version_info[:2],
    "stdlib": sysconfig.get_path("stdlib"),
    "dynload": dynload[0] if dynload else "",
    "home_lib": os.path.relpath(stdlib, home),
    "home_platlib": os.path.relpath(platstdlib, home),
}))
"""


def interpreter(python: str | None = None) -> Interpreter:
    """Ask the base interpreter behind ``python`` (default: this one) where its parts are."""
    python = os.path.realpath(python or sys.executable)
    try:
        out = subprocess.run([python, "-I", "-c", _PROBE], cwd="/", capture_output=True, text=True, check=True).stdout
        info = json.loads(out)
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError) as e:
        raise BranchyError(f"cannot inspect the Python installation {python}: {e}") from None
    if info["home_platlib"] != info["home_lib"] or not info["dynload"]:
        raise BranchyError(
            f"{python}: a standard library split over two folders is not supported "
            f"({info['home_lib']}, {info['home_platlib']})"
        )
    return Interpreter(info["executable"], info["version"], info["stdlib"], info["dynload"], info["home_lib"])


# --------------------------------------------------------------------------- what goes in
def enclave_requirements() -> list[str]:
    """The ``gramine`` extra of the installed branchy-tee: the runtime's direct requirements, pinned."""
    try:
        reqs = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise BranchyError(
            f"{DISTRIBUTION} is not installed (pip install -e .), so its `{EXTRA}` extra is unknown"
        ) from None
    marker = re.compile(r"""\s*;\s*extra\s*==\s*["']%s["']\s*$""" % EXTRA)
    found = [marker.split(r)[0].strip() for r in reqs if marker.search(r)]
    if not found:
        raise BranchyError(f"the installed {DISTRIBUTION} has no `{EXTRA}` extra; reinstall it (make setup)")
    return found


def enclave_files() -> list[str]:
    """The files of this package the enclave environment holds, relative to the package's parent
    folder: its ``__init__.py`` and every module of ENCLAVE_PACKAGES."""
    src = Path(__file__).resolve().parents[2]
    files = [f"{PACKAGE}/__init__.py"]
    for folder in ENCLAVE_PACKAGES:
        files += [p.relative_to(src).as_posix() for p in (src / PACKAGE / folder).rglob("*.py")]
    return sorted(files)


def _digest(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def package_digest(files: list[str]) -> str:
    src = Path(__file__).resolve().parents[2]
    return _digest(f"{f}\t{hashlib.sha256((src / f).read_bytes()).hexdigest()}" for f in files)


# --------------------------------------------------------------------------- making it
def _excluded(name: str, is_dir: bool) -> bool:
    return (name in EXCLUDED_DIRS) if is_dir else name.endswith(EXCLUDED_SUFFIXES)


def _copy_stdlib(py: Interpreter, dest: Path) -> None:
    """The standard library without STDLIB_EXCLUDED, caches and tests; lib-dynload without test modules."""
    src = Path(py.stdlib)
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        top = rel == Path(".")
        dirs[:] = sorted(
            d
            for d in dirs
            if not _excluded(d, True) and not (top and _skip_top(d)) and Path(root) / d != Path(py.dynload)
        )
        for name in sorted(files):
            if _excluded(name, False) or (top and _skip_top(name)):
                continue
            (dest / rel).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root) / name, dest / rel / name)
    dynload = dest / "lib-dynload"
    dynload.mkdir(exist_ok=True)
    for name in sorted(os.listdir(py.dynload)):
        if not name.startswith(DYNLOAD_EXCLUDED_PREFIXES) and (Path(py.dynload) / name).is_file():
            shutil.copyfile(Path(py.dynload) / name, dynload / name)


def _skip_top(name: str) -> bool:
    return name in STDLIB_EXCLUDED or name.startswith(STDLIB_EXCLUDED_PREFIXES)


def _pip_install(site: Path, requirements: list[str]) -> None:
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
        "--no-warn-script-location",
        "--target",
        str(site),
        "--constraint",
        str(CONSTRAINTS),
        *requirements,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
        raise BranchyError(
            f"pip could not install the enclave environment's requirements ({' '.join(requirements)}): "
            f"{lines[-1] if lines else f'exit {proc.returncode}'}"
        )


def _prune(site: Path) -> None:
    """Remove from installed packages what the enclave never runs (EXCLUDED_*), then empty folders."""
    for name in SITE_EXCLUDED:
        shutil.rmtree(site / name, ignore_errors=True)
    for root, dirs, files in os.walk(site, topdown=False):
        for d in dirs:
            p = Path(root) / d
            if _excluded(d, True):
                shutil.rmtree(p)
            elif p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
        for f in files:
            if _excluded(f, False):
                os.unlink(Path(root) / f)


def _copy_package(site: Path, files: list[str]) -> None:
    src = Path(__file__).resolve().parents[2]
    shutil.rmtree(site / PACKAGE, ignore_errors=True)
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, site / f)


def _installed_versions(site: Path) -> dict[str, str]:
    return {d.metadata["Name"].lower(): d.version for d in metadata.distributions(path=[str(site)])}


def _pinned_names(requirements: list[str]) -> set[str]:
    lines = requirements + CONSTRAINTS.read_text().splitlines()
    return {
        re.split(r"[=<>!~\[; ]", ln.strip(), maxsplit=1)[0].lower().replace("_", "-")
        for ln in lines
        if ln.strip() and not ln.lstrip().startswith("#")
    }


def listing(directory: Path, skip: Path | None = None) -> list[str]:
    """``relative path<TAB>size`` of every file under ``directory`` (except below ``skip``), sorted."""
    out = []
    for root, dirs, files in os.walk(directory):
        if skip is not None:
            dirs[:] = [d for d in dirs if Path(root) / d != skip]
        out += [
            f"{(Path(root) / f).relative_to(directory).as_posix()}\t{os.lstat(Path(root) / f).st_size}" for f in files
        ]
    return sorted(out)


@dataclass
class EnclaveEnv:
    dir: str  # ENV
    python: str  # the interpreter's real path
    home_lib: str  # ENV/lib/pythonX.Y: the trusted folder
    site_packages: str
    requirements: list[str]
    packages: dict[str, str]  # every distribution in it: name -> version
    unpinned: list[str]  # installed but pinned neither by the extra nor by constraints.txt
    status: str  # "made", "updated" (branchy_tee's files renewed) or "reused" by this call


def _spec(py: Interpreter, requirements: list[str]) -> dict:
    return {
        "format": ENV_FORMAT,
        "python": py.executable,
        "python_version": py.version,
        "requirements": requirements,
        "constraints_sha256": hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest(),
        "excluded": sorted(STDLIB_EXCLUDED | EXCLUDED_DIRS | SITE_EXCLUDED)
        + list(EXCLUDED_SUFFIXES)
        + list(DYNLOAD_EXCLUDED_PREFIXES),
    }


def _clear_caches(home: Path) -> None:
    """Bytecode written into the environment by someone running its interpreter by hand is never
    trusted: drop it before anything is measured."""
    for cache in sorted(home.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    for pyc in home.rglob("*.py[co]"):
        pyc.unlink(missing_ok=True)


def ensure_env(env_dir: str | os.PathLike[str] = DEFAULT_ENV_DIR, log=lambda msg: None) -> EnclaveEnv:
    """Create the enclave environment in ``env_dir``, or reuse it when it was made from the same
    interpreter, requirements and constraints and still holds exactly the files it was made with.
    The branchy_tee part is renewed when the package's enclave-side files changed."""
    env = Path(os.path.abspath(env_dir))
    py = interpreter()
    requirements = enclave_requirements()
    spec = _spec(py, requirements)
    files = enclave_files()
    pkg_digest = package_digest(files)
    home = env / py.home_lib
    site = home / "site-packages"
    record = _read_record(env)
    if home.is_dir():
        _clear_caches(home)
    status = "reused"
    if not (
        record
        and record.get("spec") == spec
        and home.is_dir()
        and _same(_digest(listing(env / "lib", skip=site / PACKAGE)), record.get("files_sha256"))
    ):
        _make(env, py, requirements, log)
        record = {"spec": spec, "files_sha256": _digest(listing(env / "lib", skip=site / PACKAGE))}
        status = "made"
    if not _same(record.get("package_sha256"), pkg_digest) or not (site / PACKAGE).is_dir():
        _copy_package(site, files)
        record["package_sha256"] = pkg_digest
        status = "updated" if status == "reused" else status
    versions = _installed_versions(site)
    pinned = _pinned_names(requirements)
    record.update(packages=versions, package_files=files)
    if status != "reused":
        from branchy_tee.core.fileio import atomic_write_text

        atomic_write_text(env / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")
    unpinned = sorted(f"{n}=={v}" for n, v in versions.items() if n.replace("_", "-") not in pinned)
    return EnclaveEnv(
        dir=str(env),
        python=py.executable,
        home_lib=str(home),
        site_packages=str(site),
        requirements=requirements,
        packages=versions,
        unpinned=unpinned,
        status=status,
    )


def _make(env: Path, py: Interpreter, requirements: list[str], log) -> None:
    """The environment made afresh in a temporary folder beside ``env``, then renamed into place."""
    if env.exists() and not (env / RECORD).is_file():
        raise BranchyError(f"{env} exists and is not an enclave environment; remove it or choose another --env")
    log(f"creating the enclave environment {env}: Python {py.version} standard library, {' '.join(requirements)}")
    env.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{env.name}.", dir=env.parent))
    try:
        _copy_stdlib(py, tmp / py.home_lib)
        _pip_install(tmp / py.home_lib / "site-packages", requirements)
        _prune(tmp / py.home_lib / "site-packages")
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if env.exists():
            shutil.rmtree(env)
        os.rename(tmp, env)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _same(a, b) -> bool:
    """Two recorded hashes are equal (in constant time, as every digest comparison in this project)."""
    return isinstance(a, str) and isinstance(b, str) and hmac.compare_digest(a.encode(), b.encode())


def _read_record(env: Path) -> dict | None:
    try:
        record = json.loads((env / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def count_files(directory: str | os.PathLike[str]) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(directory))
