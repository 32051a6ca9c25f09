"""SIGKILL at random points (short versions; ``make fuzz`` runs fuzz/crashes.py with more):
predict leaves only complete, authentic results or nothing; a key broker killed under load and
restarted loses no audit line and never accepts a nonce twice; temporaries of killed writes go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from branchy_tee.core.fileio import atomic_write_bytes
from crashes import broker_ok, broker_restarts, build_crash_world, kill_predict


def test_predict_killed_at_random_points(tmp_path):
    world = build_crash_world(tmp_path / "world", samples=600)
    r = kill_predict(world, tmp_path / "kills", kills=2, seed=7)
    assert not r["problems"], r["problems"]
    assert r["left_nothing"] + r["left_some_results"] + r["left_all_results"] == 2


def test_broker_killed_under_load_and_restarted(tmp_path, xdg):
    r = broker_restarts(tmp_path, restarts=1, seconds_between=1.0, threads=16)
    assert broker_ok(r), r
    assert r["replayed_after_restart"] == [(403, "nonce_unknown")]


def test_temporary_of_a_killed_write_is_removed_by_the_next_write(tmp_path):
    """SIGKILL between writing the temporary and renaming it: the temporary stays (nothing can remove it
    in the killed process); a later write to the same path removes it once it is a minute old."""
    target = tmp_path / "k.key"
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[2]); from branchy_tee.core import fileio; "
        "os.replace = os.link = lambda a, b: os.kill(os.getpid(), signal.SIGKILL); "
        "fileio.write_key_file(sys.argv[1], bytes(range(32)))"
    )
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    p = subprocess.run([sys.executable, "-c", code, str(target), src])
    assert p.returncode == -signal.SIGKILL
    temps = [f for f in tmp_path.iterdir() if f.name.startswith(".k.key.") and f.name.endswith(".tmp")]
    assert not target.exists() and len(temps) == 1
    assert temps[0].stat().st_mode & 0o777 == 0o600  # the key never sat in a file others could read
    atomic_write_bytes(target, b"new")  # young: may belong to a write in progress, kept
    assert temps[0].exists()
    old = time.time() - 120
    os.utime(temps[0], (old, old))
    atomic_write_bytes(tmp_path / "other", b"x")  # another name: not touched
    assert temps[0].exists()
    atomic_write_bytes(target, b"newer")
    assert not temps[0].exists() and target.read_bytes() == b"newer"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["k.key", "other"]
