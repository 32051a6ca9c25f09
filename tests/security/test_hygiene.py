"""Hygiene: key files must be private (refused like ssh does, by every command that reads one);
MAC/tag/digest comparisons in constant time; keys and plaintext never in logs, audit logs, stats
or temporary files; atomic writes create their temporary file private from the first byte."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from branchy_tee.broker.server import start_broker
from branchy_tee.cli import main
from branchy_tee.core import fileio
from branchy_tee.core.errors import BranchyError
from branchy_tee.core.fileio import atomic_write_bytes, read_key_file, write_key_file
from branchy_tee.tee.attest.providers import SimulatedProvider, simulated_mrenclave
from runs import make_random_run
from world import quiet_call

SRC = Path(fileio.__file__).resolve().parents[1]


def key_forms(k: bytes) -> list[bytes]:
    b64 = base64.b64encode(k)
    return [
        k,
        k.hex().encode(),
        k.hex().upper().encode(),
        b64,
        b64.rstrip(b"="),
        base64.urlsafe_b64encode(k),
        base64.urlsafe_b64encode(k).rstrip(b"="),
    ]


def _main(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# --------------------------------------------------------------------------- key file permissions
@pytest.fixture
def w(world, tmp_path):
    for name in ("mo.key", "do1.key", "do1.req"):
        shutil.copy2(world.dir / name, tmp_path / name)
    shutil.copy2(world.results["do1"], tmp_path / "do1.res")
    shutil.copytree(world.bundle, tmp_path / "m.btee")
    shutil.copytree(world.dir / "run", tmp_path / "run")
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 28, 28), dtype=np.float32))
    (tmp_path / "policy.toml").write_text('allowed_mrenclave = ["' + "00" * 32 + '"]\n')
    (tmp_path / "out").mkdir()
    from branchy_tee.tee.attest.identity import create_identity

    create_identity(tmp_path / "broker.id")
    return tmp_path


def _commands(d: Path, key: Path) -> dict[str, list[str]]:
    out = d / "out"
    mo, do = (key if key.name == "mo.key" else d / "mo.key"), (key if key.name == "do1.key" else d / "do1.key")
    return {
        "predict": [
            "predict",
            "--bundle",
            str(d / "m.btee"),
            "--input",
            str(d / "do1.req"),
            "--output",
            str(out / "r.res"),
            "--model-key",
            str(mo),
            "--data-key",
            str(do),
            "--quiet",
        ],
        "seal": ["seal", str(d / "run"), "--key", str(mo), "--out", str(out / "s.btee")],
        "encrypt-input": [
            "encrypt-input",
            str(d / "x.npy"),
            "--bundle",
            str(d / "m.btee"),
            "--key",
            str(do),
            "--out",
            str(out / "q.req"),
        ],
        "decrypt-result": [
            "decrypt-result",
            str(d / "do1.res"),
            "--key",
            str(do),
            "--request",
            str(d / "do1.req"),
            "--out",
            str(out / "r.json"),
        ],
        "key-broker (file)": [
            "key-broker",
            "--keys",
            str(key),
            "--policy",
            str(d / "policy.toml"),
            "--identity",
            str(d / "broker.id"),
            "--listen",
            "127.0.0.1:0",
        ],
        "key-broker (keystore)": [
            "key-broker",
            "--keys",
            str(key.parent / "ks"),
            "--policy",
            str(d / "policy.toml"),
            "--identity",
            str(d / "broker.id"),
            "--listen",
            "127.0.0.1:0",
        ],
    }


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o700 | 0o044, 0o610])
@pytest.mark.parametrize("which", ["mo.key", "do1.key"])
def test_every_command_refuses_a_key_file_others_can_access(w, mode, which):
    key = w / which
    (w / "ks").mkdir()
    shutil.copy2(key, w / "ks" / which)
    os.chmod(key, mode)
    os.chmod(w / "ks" / which, mode)
    for name, argv in _commands(w, key).items():
        if (which == "do1.key" and name == "seal") or (
            which == "mo.key" and name in ("encrypt-input", "decrypt-result")
        ):
            continue
        rc, out, err = quiet_call(_main, argv)
        assert rc == 1, (name, rc, err)
        assert (
            f"is accessible by others (mode {mode:04o}); run 'chmod 600" in err and len(err.strip().splitlines()) == 1
        ), (name, err)
        assert os.listdir(w / "out") == [], name
    os.chmod(key, 0o600)
    os.chmod(w / "ks" / which, 0o600)
    rc, _, err = quiet_call(_main, _commands(w, key)["predict"])
    assert rc == 0, err


def test_dev_attestation_key_must_be_private(tmp_path):
    d = tmp_path / "devkey"
    quiet_call(SimulatedProvider, d / "ed25519.key")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE((d / "ed25519.key").stat().st_mode) == 0o600
    os.chmod(d / "ed25519.key", 0o644)
    with pytest.raises(BranchyError, match="accessible by others"):
        SimulatedProvider(d / "ed25519.key")


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_atomic_write_temporary_is_private_from_the_first_byte(tmp_path, monkeypatch, umask, mode):
    """The temporary is created 0600 (mkstemp), whatever the umask, *before* any byte is written; the
    final mode is applied just before the rename."""
    seen = []
    real_fdopen = os.fdopen

    def spying_fdopen(fd, *a, **kw):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))  # the file exists and is still empty here
        assert os.fstat(fd).st_size == 0
        return real_fdopen(fd, *a, **kw)

    monkeypatch.setattr(fileio.os, "fdopen", spying_fdopen)
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f", b"secret", mode=mode)
        write_key_file(tmp_path / "k.key", bytes(32))
    finally:
        os.umask(old)
    assert seen == [0o600, 0o600]
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["f", "k.key"]


def test_keygen_and_decrypted_records_are_private(tmp_path, world):
    assert quiet_call(main, ["keygen", "--out", str(tmp_path / "a.key")])[0] == 0
    assert stat.S_IMODE((tmp_path / "a.key").stat().st_mode) == 0o600
    assert (
        quiet_call(
            main,
            [
                "decrypt-result",
                str(world.results["do1"]),
                "--key",
                str(world.do_keys["do1"]),
                "--request",
                str(world.requests["do1"]),
                "--out",
                str(tmp_path / "r.json"),
            ],
        )[0]
        == 0
    )
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o600  # plaintext answers


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o602])
def test_identity_files_are_private_and_refused_when_others_can_access_them(tmp_path, mode):
    from branchy_tee.tee.attest.identity import load_identity

    code, out, _ = quiet_call(main, ["keygen", "--identity", "--out", str(tmp_path / "a.id")])
    assert code == 0 and out.splitlines()[-1].startswith("identity: ")
    assert stat.S_IMODE((tmp_path / "a.id").stat().st_mode) == 0o600
    os.chmod(tmp_path / "a.id", mode)
    with pytest.raises(BranchyError, match=f"identity file .* is accessible by others \\(mode {mode:04o}\\)"):
        load_identity(tmp_path / "a.id")


def test_keygen_never_replaces_an_existing_key_or_follows_a_planted_link(tmp_path):
    first = tmp_path / "a.key"
    assert quiet_call(main, ["keygen", "--out", str(first)])[0] == 0
    before = first.read_bytes()
    code, _, err = quiet_call(main, ["keygen", "--out", str(first)])
    assert code == 1 and "already exists; refusing to overwrite a key" in err
    assert first.read_bytes() == before
    # A link planted where the key is to go (say by another user of a shared directory) is not
    # followed: the key is not written through it.
    target = tmp_path / "elsewhere"
    (tmp_path / "b.key").symlink_to(target)
    code, _, err = quiet_call(main, ["keygen", "--out", str(tmp_path / "b.key")])
    assert code == 1 and "already exists" in err and not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "b.key"]  # no temporary left


def test_keygen_without_hard_links_still_never_replaces_a_key(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # what FAT and some FUSE mounts say

    monkeypatch.setattr(os, "link", no_links)
    key = tmp_path / "a.key"
    assert quiet_call(main, ["keygen", "--out", str(key)])[0] == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(read_key_file(key)) == 32
    before = key.read_bytes()
    code, _, err = quiet_call(main, ["keygen", "--out", str(key)])
    assert code == 1 and "already exists" in err and key.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key"]
    # a parent that is a file is reported as what it is, not as an existing key
    (tmp_path / "plain").write_text("x")
    code, _, err = quiet_call(main, ["keygen", "--out", str(tmp_path / "plain" / "k.key")])
    assert code != 0 and "already exists; refusing to overwrite a key" not in err


# --------------------------------------------------------------------------- constant-time comparisons
_SECRETISH = re.compile(r"(^|_)(mac|macs|tag|tags|digest|hmac|report_data|expected)(_|$)", re.I)
_DIGEST_CALLS = {"digest", "hexdigest", "_tag", "header_mac", "report_data", "new"}


def _name(n) -> str | None:
    if isinstance(n, ast.Name):
        return n.id
    if isinstance(n, ast.Attribute):
        return n.attr
    if isinstance(n, ast.Subscript):
        return _name(n.value)
    if isinstance(n, ast.Call):
        inner = _name(n.func)
        return None if inner is None else inner + "()"
    return None


def _secretish(n) -> bool:
    nm = _name(n)
    if nm is None:
        return False
    return nm[:-2] in _DIGEST_CALLS if nm.endswith("()") else bool(_SECRETISH.search(nm))


def _harmless(n) -> bool:
    """Constants, DER tag numbers, lengths."""
    return (
        isinstance(n, ast.Constant)
        or (isinstance(n, ast.Name) and n.id.startswith("_TAG_"))
        or (isinstance(n, ast.Call) and _name(n) == "len()")
    )


def test_macs_tags_and_digests_are_compared_in_constant_time():
    """No ``==``/``!=`` on anything named like a MAC, tag, digest or report data (use hmac.compare_digest)."""
    offenders = []
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq)) for o in node.ops):
                ops = [node.left, *node.comparators]
                if any(_secretish(o) for o in ops) and not any(_harmless(o) for o in ops):
                    offenders.append(f"{f.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)
    uses = {f.relative_to(SRC).as_posix(): f.read_text().count("hmac.compare_digest(") for f in SRC.rglob("*.py")}
    assert (
        uses["tee/sealed/bundle.py"] >= 1 and uses["broker/broker.py"] >= 2
    )  # header MAC; nonce tag and REPORTDATA binding


def test_the_lint_catches_a_plain_comparison():
    tree = ast.parse(
        "if doc['mac'] != expected_mac: pass\nif tag == self._tag(body): pass\nif tag != _TAG_SEQUENCE: pass"
    )
    flagged = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare)
        and any(_secretish(o) for o in [n.left, *n.comparators])
        and not any(_harmless(o) for o in [n.left, *n.comparators])
    ]
    assert len(flagged) == 2


# ----------------------------------------------------------------------- nothing secret in logs, audit logs, temp files
def test_keys_and_plaintext_never_reach_logs_or_temporary_files(tmp_path, xdg, monkeypatch, capfd):
    """The demo flow with every log on: owners' commands, three brokers (audit logs, per-decision log
    lines), predict (not quiet, stats, memory profile) with attested key release. Nothing the host can
    see holds a key (raw, hex, base64) or plaintext (input bytes, answers); the temporary directory
    stays empty; no stray files."""
    import torch

    from branchy_tee.client.envelopes import open_result
    from branchy_tee.tee.attest.identity import create_identity, identity_hex
    from branchy_tee.tee.sealed.envelope import request_digest

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    mo_dir, do_dir, host = tmp_path / "mo", tmp_path / "do", tmp_path / "host"
    for d in (mo_dir, do_dir, host):
        d.mkdir()
    make_random_run(mo_dir / "run", "lenet5")
    for argv in (
        ["keygen", "--out", str(mo_dir / "mo.key")],
        ["keygen", "--out", str(do_dir / "do.key")],
        [
            "seal",
            str(mo_dir / "run"),
            "--key",
            str(mo_dir / "mo.key"),
            "--out",
            str(host / "model.btee"),
            "--chunk-size",
            "4096",
        ],
    ):
        assert main(argv) == 0
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    np.save(do_dir / "x.npy", x.numpy())
    assert (
        main(
            [
                "encrypt-input",
                str(do_dir / "x.npy"),
                "--bundle",
                str(host / "model.btee"),
                "--key",
                str(do_dir / "do.key"),
                "--out",
                str(host / "req.enc"),
                "--request-id",
                "hyg-1",
            ]
        )
        == 0
    )
    keys = {"mo": read_key_file(mo_dir / "mo.key"), "do": read_key_file(do_dir / "do.key")}
    policy = {"allowed_mrenclave": [simulated_mrenclave().hex()], "allow_simulation": True}
    ids = {n: create_identity(d / f"{n}.id") for n, d in (("mo", mo_dir), ("do", do_dir))}
    log = lambda m: sys.stderr.write(f"key-broker: {m}\n")  # noqa: E731 -- what `key-broker` without --quiet prints
    audits = {n: tmp_path / f"{n}.audit.jsonl" for n in ("mo", "do")}
    with (
        start_broker(
            mo_dir / "mo.key",
            {**policy, "allowed_data_owners": [identity_hex(ids["do"])]},
            audit_log=audits["mo"],
            log=log,
            identity=ids["mo"],
        ) as mo,
        start_broker(do_dir / "do.key", policy, audit_log=audits["do"], log=log, identity=ids["do"]) as do,
    ):
        rc = main(
            [
                "predict",
                "--bundle",
                str(host / "model.btee"),
                "--input",
                str(host / "req.enc"),
                "--output",
                str(host / "res.enc"),
                "--attest",
                "simulated",
                "--model-broker",
                mo.url,
                "--model-broker-identity",
                identity_hex(ids["mo"]),
                "--data-broker",
                do.url,
                "--stats-json",
                str(host / "stats.json"),
                "--mprofile",
                str(host / "prof"),
                "--json",
            ]
        )
        assert rc == 0
    host_visible = capfd.readouterr()
    assert "[enclave] bundle lenet5" in host_visible.err and "key-broker: granted" in host_visible.err  # logs were on
    assert (
        main(
            [
                "decrypt-result",
                str(host / "res.enc"),
                "--key",
                str(do_dir / "do.key"),
                "--request",
                str(host / "req.enc"),
            ]
        )
        == 0
    )
    do_terminal = capfd.readouterr()
    records = open_result(
        (host / "res.enc").read_bytes(), keys["do"], "res", request_digest((host / "req.enc").read_bytes())
    )[1]

    texts = {
        "host stdout": host_visible.out.encode(),
        "host stderr": host_visible.err.encode(),
        "data owner terminal": (do_terminal.out + do_terminal.err).encode(),
    }
    # torch may create its own (empty) compile cache directory in $TMPDIR; we must create nothing there
    temp_files = [p for p in tmpdir.rglob("*") if p.is_file()]
    assert [p for p in temp_files if not p.relative_to(tmpdir).parts[0].startswith("torchinductor_")] == []
    for f in [*audits.values(), *[p for p in host.rglob("*") if p.is_file()], *temp_files]:
        texts[str(f.relative_to(tmp_path))] = f.read_bytes()
    raw_input = x.numpy().tobytes()
    windows = [raw_input[i : i + 16] for i in range(0, len(raw_input) - 16, 997)]
    for where, data in texts.items():
        for name, k in keys.items():
            for form in key_forms(k):
                assert form not in data, f"{name} key ({form[:8]!r}...) in {where}"
        assert not any(wnd in data for wnd in windows), f"plaintext input bytes in {where}"
        if where != "data owner terminal":
            for r in records:
                assert json.dumps(r).encode() not in data, f"a plaintext answer in {where}"
                assert f"\t{r['class_name']}\t{r['confidence']:.4f}\t".encode() not in data
    assert "the host can read" not in host_visible.err  # no plaintext result without --plaintext-result
    assert [n for n in os.listdir(tmpdir) if not n.startswith("torchinductor_")] == []
    stray = [
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name == "result.txt"
    ]
    assert not stray, stray
