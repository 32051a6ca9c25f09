"""Atomic file writes and key-file handling. Standard library and core.keys (enclave side uses it)."""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterable

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.keys import KEY_BYTES

STALE_TEMPORARY_SECONDS = 60.0


def _remove_stale_temporaries(path: Path, older_than: float = STALE_TEMPORARY_SECONDS) -> None:
    """Remove ``.NAME.XXXXXXXX.tmp`` files of earlier writes to ``path`` that were killed before the
    rename (SIGKILL, power loss). Only old ones: a younger one may belong to a write in progress."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    now = time.time()
    try:
        with os.scandir(path.parent) as entries:
            for e in entries:
                if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                    if now - e.stat(follow_symlinks=False).st_mtime > older_than:
                        os.unlink(e.path)
    except OSError:  # best effort: never a reason to fail the write itself
        pass


def check_output(
    path: str | os.PathLike[str],
    option: str,
    inputs: Iterable[str | os.PathLike[str]] = (),
    *,
    replace: bool = False,
    keep_magic: bytes | None = None,
) -> None:
    """Refuse, in one line, an output that would destroy work: a directory, one of ``inputs``, an existing
    file unless ``replace``, or (``keep_magic``) an existing file that starts with those bytes whatever
    ``replace`` says (e.g. a request, which its result would orphan)."""
    from branchy_tee.core.errors import UsageError

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path} is a directory: give a file name")
    real = os.path.realpath(p)
    if any(real == os.path.realpath(i) for i in inputs):
        raise UsageError(f"{option} {path} is also an input: writing it would replace that input")
    if not p.exists():
        return
    if keep_magic is not None:
        try:
            with open(p, "rb") as f:
                kept = f.read(len(keep_magic)) == keep_magic
        except OSError:
            kept = False
        if kept:
            raise UsageError(f"{option} {path} is an existing request: give another file name for the result")
    if not replace:
        raise UsageError(f"{option} {path} exists: give another name, or --force to replace it")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    The bytes go to a temporary file in the same directory (created with mode 0600, so a secret is
    never readable by others while it is written), are fsynced, then renamed over ``path``. A crash
    at any point leaves no partial ``path`` behind; a temporary left by a killed writer is removed
    by a later write to the same path once it is a minute old. With ``overwrite=False`` an existing
    ``path`` is never replaced, not even one created by someone else during the write: the temporary
    is hard-linked into place, which fails if the name is taken (FileExistsError).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_exclusively(tmp, path, data, mode)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


class TargetExists(FileExistsError):
    """``atomic_write_bytes(..., overwrite=False)`` found its target path taken."""


def _link_exclusively(tmp: str, path: Path, data: bytes, mode: int) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise TargetExists(f"{path} already exists") from None
    except OSError:
        # No hard links here (FAT, some network and FUSE file systems): create the name exclusively,
        # never through a link, and write it there. Not atomic, but never a replacement; a torn
        # key file is refused later by its length.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        except FileExistsError:
            raise TargetExists(f"{path} already exists") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(path)
            raise
    try:
        os.unlink(tmp)
    except OSError:  # the data is in place; a stale temporary is removed by a later write
        pass


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def write_key_file(path: str | os.PathLike[str], key: bytes) -> Path:
    if len(key) != KEY_BYTES:
        raise ValueError("keys are 32 bytes")
    path = Path(path)
    try:
        return atomic_write_bytes(path, key, mode=0o600, overwrite=False)
    except TargetExists:
        raise BranchyError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename and str(e.filename) != str(path) else ""
        raise BranchyError(f"cannot write key file {path}: {where}{e.strerror or e}") from None


def read_private_file(path: str | os.PathLike[str], what: str = "key file", limit: int = 64 * 1024) -> bytes:
    """Read a secret file; refuse (like ssh) one that others can read or write, and anything that is
    not a regular file of at most ``limit`` bytes."""
    return _read_checked(path, what, limit, private=True)


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a 256-bit key (a private file of exactly 32 bytes)."""
    data = read_private_file(path)
    if len(data) != KEY_BYTES:
        raise BranchyError(f"key file {path} holds {len(data)} bytes, expected a {KEY_BYTES}-byte key")
    return data


def read_regular_file(path: str | os.PathLike[str], what: str, limit: int) -> bytes:
    """A host-supplied file's bytes: a regular file of at most ``limit`` bytes, checked before reading,
    so that a link to /dev/zero, a FIFO or a huge file is refused instead of read."""
    return _read_checked(path, what, limit, private=False)


def _read_checked(path: str | os.PathLike[str], what: str, limit: int, private: bool) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore the flag)
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BranchyError(f"cannot read {what} {path}: not a regular file")
            if st.st_size > limit:
                raise BranchyError(f"{what} {path}: {st.st_size} bytes, over the {limit}-byte limit")
            if private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise BranchyError(
                    f"{what} {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                    f"run 'chmod 600 {path}'"
                )
            data = f.read(st.st_size + 1)  # not read(limit): that would allocate the limit up front
    except FileNotFoundError:
        raise BranchyError(f"{what} {path}: file not found") from None
    except OSError as e:
        raise BranchyError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > st.st_size:
        raise BranchyError(f"{what} {path}: the file grew while it was read")
    return data
