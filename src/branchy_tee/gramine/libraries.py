"""What the enclave environment needs from the system: the shared libraries outside it that the
interpreter and its extension modules load (found with ``ldd``), and the search path the enclave's
loader needs for them. glibc is Gramine's own and never taken from the host."""

from __future__ import annotations

import os
import subprocess

from branchy_tee.core.errors import BranchyError

# glibc's libraries: inside the enclave they come from Gramine's runtime folder (mounted at /lib),
# never from the host (Gramine's subprojects/packagefiles/glibc-*/meson.build).
GRAMINE_GLIBC = frozenset(
    {
        "ld-linux-x86-64.so.2",
        "libc.so.6",
        "libdl.so.2",
        "libm.so.6",
        "libmvec.so.1",
        "libpthread.so.0",
        "librt.so.1",
        "libutil.so.1",
        "libresolv.so.2",
        "libanl.so.1",
        "libnsl.so.1",
        "libnss_compat.so.2",
        "libnss_db.so.2",
        "libnss_dns.so.2",
        "libnss_files.so.2",
        "libthread_db.so.1",
    }
)


def shared_objects(directory: str | os.PathLike[str]) -> list[str]:
    """Every ELF shared object under ``directory`` (extension modules and the libraries they bundle)."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for f in files:
            if f.endswith(".so") or ".so." in f:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    if fh.read(4) == b"\x7fELF":
                        found.append(p)
    return sorted(found)


def parse_ldd(output: str) -> set[str]:
    """Absolute library paths in ``ldd`` output (several files' sections; no vdso, no 'not found'),
    normalised: a RUNPATH of ``$ORIGIN/../../x.libs`` shows up with its ``..`` parts."""
    libs = set()
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
            libs.add(os.path.normpath(parts[2]))
        elif len(parts) >= 2 and parts[0].startswith("/") and parts[1].startswith("("):
            libs.add(os.path.normpath(parts[0]))
    return libs


def _ldd(objects: list[str], search: list[str]) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LD_")}
    if search:
        env["LD_LIBRARY_PATH"] = ":".join(search)
    out = []
    for i in range(0, len(objects), 200):  # keep each command line short
        proc = subprocess.run(["ldd", *objects[i : i + 200]], capture_output=True, text=True, env=env)
        if proc.returncode not in (0, 1):  # 1: some file is not dynamic (e.g. a static helper)
            raise BranchyError(f"ldd failed on the enclave environment: {proc.stderr.strip()[:200]}")
        out.append(proc.stdout)
    return parse_ldd("\n".join(out))


def system_libraries(
    python: str, env_dir: str | os.PathLike[str], system_dirs: list[str]
) -> tuple[list[str], list[str]]:
    """The shared libraries outside the environment that the interpreter and every shared object in
    the environment load (``ldd``), except glibc's: Gramine brings its own, mounted at /lib. Returns
    (libraries, the enclave's library search path after /lib).

    Inside the enclave there is no ld.so.cache, so the loader needs LD_LIBRARY_PATH, and
    LD_LIBRARY_PATH comes before a library's own RUNPATH. The search path therefore starts with the
    folders where the host's loader found libraries outside ``system_dirs``: those a package
    bundles (torch's own libgomp.so.1) and those an interpreter finds through its RUNPATH (its own
    libpython, never the distribution's). ldd then runs again with that search path, so the list is
    what the enclave's loader opens."""
    env_dir = os.path.realpath(env_dir)
    objects = [python, *shared_objects(env_dir)]
    first = _ldd(objects, [])
    search = [*sorted({os.path.dirname(p) for p in first} - set(system_dirs) - {"/lib64"}), *system_dirs]
    libs = sorted(
        p
        for p in _ldd(objects, search)
        if os.path.basename(p) not in GRAMINE_GLIBC and not os.path.realpath(p).startswith(env_dir + os.sep)
    )
    return libs, search
