"""A small, complete branchy-tee world for the security suite, the tamper campaign and the fuzzers.

One tiny LeNet-5 (random weights, no training) sealed with 4 KiB AEAD chunks, so every stage file
has several chunks; no exit thresholds, so every sample goes through every stage and every stage
file is read. A model owner key, two data owners' keys (mode 0600), one request per data owner
and the authentic results of one predict run with key files.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
SGX_QUOTES = REPO.parent / "shared" / "testdata" / "sgx-quotes"
for p in (str(TESTS), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


@dataclass
class World:
    dir: Path
    bundle: Path
    mo_key: Path
    do_keys: dict[str, Path]  # "do1"/"do2" -> key file
    requests: dict[str, Path]  # "do1"/"do2" -> request file
    request_ids: dict[str, str]
    results: dict[str, Path]  # authentic result files of one clean run
    records: dict[str, list[dict]]  # the decrypted records of those results
    inputs: dict[str, "object"] = field(default_factory=dict)  # plaintext input tensors

    def digest(self, owner: str) -> str:
        """SHA-256 of the owner's request file: what its result binds."""
        from branchy_tee.tee.sealed.envelope import request_digest

        return request_digest(self.requests[owner].read_bytes())

    def key(self, name: str) -> bytes:
        from branchy_tee.core.fileio import read_key_file

        return read_key_file(self.mo_key if name == "mo" else self.do_keys[name])

    def predict_argv(self, owners=("do1",), out_dir: Path | None = None, *extra: str) -> list[str]:
        """predict's arguments (key files) for the given data owners' requests."""
        out_dir = out_dir or self.dir / "out"
        argv = ["--bundle", str(self.bundle), "--model-key", str(self.mo_key), "--quiet", "--threads", "1"]
        for o in owners:
            argv += ["--input", str(self.requests[o]), "--output", str(out_dir / f"{o}.res")]
        for o in sorted(set(owners)):
            argv += ["--data-key", str(self.do_keys[o])]
        return argv + list(extra)


def quiet_call(fn, *args, **kw):
    """Run ``fn`` with stdout/stderr captured: (return value, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rv = fn(*args, **kw)
    return rv, out.getvalue(), err.getvalue()


def build_world(d: str | Path, samples: dict[str, int] | None = None, chunk: int = 4096, seed: int = 0) -> World:
    import torch

    from branchy_tee.client.envelopes import open_result, seal_request
    from branchy_tee.core.fileio import write_key_file
    from branchy_tee.core.keys import generate_key
    from branchy_tee.seal.bundle import seal_run
    from branchy_tee.tee import predict
    from runs import make_random_run

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    samples = samples or {"do1": 6, "do2": 4}
    model, meta = make_random_run(d / "run", "lenet5", seed=seed)  # thresholds None: every stage runs
    keys = {"mo": generate_key(), **{o: generate_key() for o in samples}}
    for name, k in keys.items():
        write_key_file(d / f"{name}.key", k)
    seal_run(d / "run", keys["mo"], d / "model.btee", chunk_size=chunk)
    g = torch.Generator().manual_seed(seed + 1)
    w = World(
        dir=d,
        bundle=d / "model.btee",
        mo_key=d / "mo.key",
        do_keys={o: d / f"{o}.key" for o in samples},
        requests={},
        request_ids={},
        results={},
        records={},
    )
    for o, n in samples.items():
        x = (torch.rand(n, 1, 28, 28, generator=g) - 0.5) / 0.25
        w.inputs[o] = x
        w.request_ids[o] = f"req-{o}"
        w.requests[o] = d / f"{o}.req"
        w.requests[o].write_bytes(seal_request(x, keys[o], w.request_ids[o]))
    ref = d / "reference"
    rc, _, err = quiet_call(predict.main, w.predict_argv(tuple(samples), ref))
    assert rc == 0, err
    for o in samples:
        w.results[o] = ref / f"{o}.res"
        w.records[o] = open_result(w.results[o].read_bytes(), keys[o], o, w.digest(o))[1]
    return w
