"""The package's layout, read from the source: one folder is the enclave, imports run one way and in
no cycle, and modules stay small enough to read."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

from branchy_tee.gramine.env import ENCLAVE_PACKAGES, ENTRY_MODULES, enclave_files
from import_graph import PACKAGE, read_graph

SRC = Path(__file__).resolve().parents[1] / "src"
# What the enclave's environment holds besides the standard library (the `enclave` extra).
ENCLAVE_LIBRARIES = {"onnxruntime", "numpy", "safetensors", "cryptography"}
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 500


def enclave_problems(src: Path) -> list[str]:
    """Why the enclave's folders under ``src`` are not exactly what the entry points run (empty if they are)."""
    g = read_graph(src)
    inside = {m for m in g.files if m == PACKAGE or m.split(".")[1] in ENCLAVE_PACKAGES}
    reached = g.reachable(ENTRY_MODULES)
    problems = [
        f"the entry points import {m}, which is outside {'/, '.join(ENCLAVE_PACKAGES)}/"
        for m in sorted(reached - inside)
    ]
    problems += [f"{m} is in the enclave's folders but no entry point imports it" for m in sorted(inside - reached)]
    for m in sorted(inside):
        for name in sorted(g.external[m] - ENCLAVE_LIBRARIES - set(sys.stdlib_module_names) - {"__future__"}):
            problems.append(f"{m} imports {name}, which the enclave's environment does not hold")
    return problems


def test_the_enclave_folder_is_exactly_what_predict_and_serve_import():
    assert enclave_problems(SRC) == []
    files = enclave_files()
    assert len(files) == len({m for m in read_graph(SRC).files if m == PACKAGE or m.split(".")[1] in ENCLAVE_PACKAGES})
    assert "branchy_tee/tee/predict.py" in files and "branchy_tee/tee/serve/server.py" in files


@pytest.mark.parametrize(
    "module, line, expected",
    [
        ("tee/predict.py", "    from branchy_tee.models import create_model\n", "outside"),  # owner code, in a function
        ("tee/engine.py", "import torch\n", "imports torch"),
        ("tee/serve/https.py", "if False:\n    from branchy_tee.broker.broker import Broker\n", "outside"),
        ("core/errors.py", "from branchy_tee.gramine import build\n", "outside"),
    ],
)
def test_the_enclave_check_fails_when_owner_side_code_joins(tmp_path, module, line, expected):
    shutil.copytree(SRC / PACKAGE, tmp_path / PACKAGE)
    path = tmp_path / PACKAGE / module
    text = path.read_text()
    if line.startswith("    "):  # into the body of the file's first function
        at = text.index(":\n", text.index("\ndef ")) + 2
        text = text[:at] + line + text[at:]
    else:
        text += "\n" + line
    path.write_text(text)
    assert any(expected in p for p in enclave_problems(tmp_path))


def test_a_module_in_the_enclave_folder_that_nothing_runs_is_refused(tmp_path):
    shutil.copytree(SRC / PACKAGE, tmp_path / PACKAGE)
    (tmp_path / PACKAGE / "tee" / "unused.py").write_text('"""Nothing imports me."""\n')
    assert enclave_problems(tmp_path) == [
        "branchy_tee.tee.unused is in the enclave's folders but no entry point imports it"
    ]


def test_the_package_has_no_import_cycle():
    assert read_graph(SRC).cycles() == []


def test_the_cycle_check_finds_a_cycle_through_a_type_checking_import(tmp_path):
    shutil.copytree(SRC / PACKAGE, tmp_path / PACKAGE)
    with open(tmp_path / PACKAGE / "tee" / "criteria.py", "a") as f:
        f.write(
            "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from branchy_tee.tee.engine import Answers\n"
        )
    assert ["branchy_tee.tee.criteria", "branchy_tee.tee.engine"] in read_graph(tmp_path).cycles()


def _sources() -> list[Path]:
    return sorted((SRC / PACKAGE).rglob("*.py"))


def test_no_module_is_over_500_lines():
    long = {
        p.relative_to(SRC).as_posix(): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long == {}


def test_no_function_is_over_60_lines():
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC).as_posix()}:{node.lineno} {node.name}"] = n
    assert long == {}


# A driver run by the enclave environment's interpreter: predict answers a request, then serve answers
# the test's client; then it reports every branchy_tee module that was imported.
ENCLAVE_DRIVER = r"""
import json, sys
from branchy_tee.tee.predict import main as predict
from branchy_tee.tee.serve.server import ArgumentParser, add_arguments, start
argv = json.loads(sys.argv[1])
assert predict(argv["predict"]) == 0
p = ArgumentParser()
add_arguments(p)
server, stop = start(p.parse_args(argv["serve"]))
print(server.server_address[1], flush=True)
sys.stdin.readline()  # the test has its answers
stop()
print(json.dumps(sorted(m for m in sys.modules if m.startswith("branchy_tee"))), flush=True)
"""


def test_predict_and_serve_in_the_enclave_environment_import_only_its_folders(
    enclave_env, sealed, tmp_path, monkeypatch
):
    import json
    import os
    import subprocess

    from branchy_tee.broker.server import start_broker
    from branchy_tee.client import Client
    from branchy_tee.tee.attest.identity import create_identity, identity_hex
    from branchy_tee.tee.attest.providers import code_measurement, simulated_mrenclave
    from enclave_tools import encrypt_sealed_images

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BRANCHY_TEE_"))}
    env.update(PYTHONHOME=enclave_env.dir, XDG_CONFIG_HOME=str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])  # the simulated evidence's dev key
    assert encrypt_sealed_images(sealed, tmp_path / "req.enc") == 0
    mo, do = identity_hex(create_identity(tmp_path / "mo.id")), create_identity(tmp_path / "do.id")
    code = code_measurement(Path(enclave_env.site_packages) / PACKAGE)  # the enclave's code: tee/ and core/
    sim = {"allowed_mrenclave": [simulated_mrenclave({}, code).hex()], "allow_simulation": True}
    keys = sealed / "keys"
    predict = ["--bundle", str(sealed / "model.btee"), "--input", str(tmp_path / "req.enc"), "--quiet"]
    predict += ["--output", str(tmp_path / "res.enc"), "--model-key", str(keys / "model.key")]
    predict += ["--data-key", str(keys / "data.key")]
    policy = {**sim, "allowed_data_owners": [identity_hex(do)]}
    with start_broker(keys / "model.key", policy, identity=tmp_path / "mo.id") as broker:
        serve = ["--bundle", str(sealed / "model.btee"), "--listen", "127.0.0.1:0", "--attest", "simulated"]
        serve += ["--model-broker", broker.url, "--model-broker-identity", mo, "--quiet"]
        argv = json.dumps({"predict": predict, "serve": serve})
        proc = subprocess.Popen(
            [enclave_env.python, "-c", ENCLAVE_DRIVER, argv],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = int(proc.stdout.readline())
            images = __import__("numpy").load(sealed / "images.npy")
            with Client(f"https://127.0.0.1:{port}", policy=sim, identity=tmp_path / "do.id") as client:
                assert len(client.predict(images)) == len(images)
            out, _ = proc.communicate("done\n", timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0 and (tmp_path / "res.enc").is_file()
    modules = json.loads(out.strip().splitlines()[-1])
    assert "branchy_tee.tee.serve.https" in modules and "branchy_tee.tee.engine" in modules
    outside = [m for m in modules if m != PACKAGE and m.split(".")[1] not in ENCLAVE_PACKAGES]
    assert outside == []
