"""The README's walkthrough is scripts/walkthrough.sh, run here as written with only its sizes (and
ports and folder) overridden: every party, batch and online, simulated attestation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from branchy_tee.demo.common import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "walkthrough.sh"


def test_the_readme_shows_exactly_the_script():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough: scripts/walkthrough.sh -->\n```sh\n(.*?)```\n", readme, re.S)
    assert block, "README.md lost its walkthrough block"
    assert block.group(1) == SCRIPT.read_text(), "README.md's walkthrough differs from scripts/walkthrough.sh"


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path):
    if not (ROOT / ".enclave-env").is_dir():
        pytest.skip("no .enclave-env (made by `make test`'s set-up)")
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        NET="lenet5",
        EPOCHS="1",
        MAX_BATCHES="3",
        IMAGES="4",
        MO_PORT=str(free_port()),
        DO_PORT=str(free_port()),
        SERVE_PORT=str(free_port()),
        WORK=str(tmp_path / "walk"),
        ENCLAVE_ENV=str(ROOT / ".enclave-env"),
    )
    ran = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = ran.stdout
    assert "result for request" in out and "4 samples" in out  # the batch answer, decrypted by the data owner
    assert "attestation SIMULATED" in out and len(re.findall(r"confidence \d\.\d+ +exit \d", out)) == 8
