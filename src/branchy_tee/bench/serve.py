"""``branchy-tee bench --serve``: the online service under a closed-loop load, early exit vs the same
server with ``--full-model``, measured in one run.

Two ``branchy-tee serve`` processes (simulated attestation, a model broker in this process) serve the
benchmark model; client processes (``python -m branchy_tee.bench.serve --worker``) each run some
closed-loop clients: send one request, wait for the answer, send the next. Two load shapes:

- one test image per request, at 1, 8 and 64 concurrent clients: the server batches across requests,
  and its protocol work (TLS, HTTP, one JSON answer) is paid per image;
- ``BATCHED_CLIENTS`` clients whose requests each carry ``BATCHED_IMAGES`` images (a data owner
  classifying a batch): each request is one engine batch (``--max-batch`` 64), the protocol work is
  paid once per 64 images, and the figures show what the model's compute makes of the throughput.

For each: throughput, end-to-end latency p50/p99 as the client sees it, and the server's own compute
time per request (the model owner's metrics: the compute time of the batch that answered each
request, summed, over the requests), plus the cost of attestation per
new connection (TLS handshake + evidence verification + policy). The workers encode their request
bodies once, before the clock starts, so that the load generator's own work takes less of the cores.
Server and clients share this machine's cores: the figures are for comparing the two servers, not a
capacity plan.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from branchy_tee.core.choices import EvidenceProvider

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CONCURRENCY = (1, 8, 64)
# The batched shape: 64 images a request, the server's default --max-batch, so that a request is one
# full engine batch (requests are never split or merged); 8 clients keep a request always waiting
# while another is computed or on the wire (512 images in flight), without hundreds of threads.
BATCHED_CLIENTS, BATCHED_IMAGES = 8, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


# --------------------------------------------------------------------------- the worker (a client process)
def worker(
    url: str,
    policy_path: str,
    identity: str,
    clients: int,
    seconds: float,
    start_at: float,
    images: str,
    per_request: int = 1,
) -> dict:
    """``clients`` closed-loop clients until ``start_at + seconds``, each request carrying ``per_request``
    images; per-request latencies, compute and the size of the batch that answered it."""
    import numpy as np

    from branchy_tee.client.online import Client

    x = np.load(images)
    bodies = [_payload(x[i : i + per_request]) for i in range(0, len(x) - per_request + 1, per_request)]
    lat, errors, attest = [], [], []
    lock = threading.Lock()

    def loop(i: int) -> None:
        with Client(url, policy=policy_path, identity=identity, timeout=120) as c:
            c.model_info()  # connect and verify before the clock starts
            k = i
            while time.time() < start_at:
                time.sleep(0.001)
            while time.time() < start_at + seconds:
                t0 = time.perf_counter()
                try:
                    doc = c._request("POST", "/v1/predict", bodies[k % len(bodies)])[0]
                except Exception as e:  # noqa: BLE001 -- counted
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                dt = time.perf_counter() - t0
                if len(doc["results"]) != doc["samples"]:
                    with lock:
                        errors.append("an answer without one result per image")
                    continue
                with lock:
                    lat.append(dt)
                k += clients
            with lock:
                attest.extend(c.attest_seconds)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": lat, "errors": errors, "attest": attest}


def _payload(x) -> bytes:
    from safetensors.numpy import save

    return save({"inputs": x})


# --------------------------------------------------------------------------- the run
def _start_server(bundle: Path, broker, identity_hex: str, port: int, full: bool, env: dict) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "branchy_tee.cli",
        "serve",
        "--bundle",
        str(bundle),
        "--listen",
        f"127.0.0.1:{port}",
        "--attest",
        EvidenceProvider.SIMULATED,
        "--model-broker",
        broker.url,
        "--model-broker-identity",
        identity_hex,
        "--quiet",
        "--threads",
        "1",
    ] + (["--full-model"] if full else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None  # stdout=PIPE
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc


def _run_clients(url: str, work: Path, clients: int, seconds: float, env: dict, per_request: int = 1) -> dict:
    """Run ``clients`` closed-loop clients in worker processes; their pooled measurements."""
    processes = min(clients, max(1, (os.cpu_count() or 2)))
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    start_at = time.time() + 3.0 + 0.05 * clients  # every client has connected and verified by then
    cmds = [
        [
            sys.executable,
            "-m",
            "branchy_tee.bench.serve",
            "--worker",
            url,
            str(work / "policy.toml"),
            str(work / "do.id"),
            str(n),
            str(seconds),
            repr(start_at),
            str(work / "images.npy"),
            str(per_request),
        ]
        for n in per
        if n
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) for c in cmds]
    outs = [json.loads(p.communicate()[0]) for p in procs]
    return {k: [x for o in outs for x in o[k]] for k in ("latencies", "errors", "attest")}


def _server_figures(url: str, work: Path) -> dict[str, float]:
    """The model owner's metrics that the answers no longer carry (a data owner's answer has only its
    own request's figures): the compute time summed over requests, requests, samples and batches."""
    from branchy_tee.client.online import Client

    with Client(url, policy=work / "policy.toml", identity=work / "mo.id") as c:
        status, data, _ = c._call(c.replicas[0], "GET", "/v1/metrics", None, "")
    if status != 200:
        raise RuntimeError(f"the server's metrics: HTTP {status}")
    want = {
        "branchy_tee_compute_seconds_total": "compute",
        'branchy_tee_requests_total{outcome="ok"}': "requests",
        "branchy_tee_samples_total": "samples",
        "branchy_tee_batches_total": "batches",
    }
    figures = {}
    for line in data.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            figures[want[name]] = float(value)
    return figures


def _during(url: str, work: Path, measure) -> tuple[dict, dict[str, float]]:
    """``measure()``'s result and how the server's figures grew meanwhile."""
    before = _server_figures(url, work)
    m = measure()
    after = _server_figures(url, work)
    return m, {k: after[k] - before[k] for k in before}


def _compute_ms(d: dict[str, float]) -> float | None:
    return round(1000 * d["compute"] / d["requests"], 3) if d["requests"] else None


def _measure(url: str, work: Path, clients: int, seconds: float, env: dict) -> dict:
    """The one-image-per-request shape at ``clients`` clients."""
    m, d = _during(url, work, lambda: _run_clients(url, work, clients, seconds, env))
    lat, errors, attest = m["latencies"], m["errors"], m["attest"]
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "error_examples": errors[:3],
        "throughput_per_s": round(len(lat) / seconds, 1),
        "p50_ms": round(1000 * _percentile(lat, 0.5), 3),
        "p99_ms": round(1000 * _percentile(lat, 0.99), 3),
        "compute_mean_ms": _compute_ms(d),
        "attest_ms_per_connection": round(1000 * statistics.median(attest), 2) if attest else None,
    }


def _measure_batched(url: str, work: Path, clients: int, per_request: int, seconds: float, env: dict) -> dict:
    """The batched shape: ``clients`` clients, ``per_request`` images in every request."""
    m, d = _during(url, work, lambda: _run_clients(url, work, clients, seconds, env, per_request))
    lat, errors = m["latencies"], m["errors"]
    compute_ms = _compute_ms(d)
    return {
        "requests": len(lat),
        "errors": len(errors),
        "error_examples": errors[:3],
        "images_per_s": round(len(lat) * per_request / seconds, 1),
        "requests_per_s": round(len(lat) / seconds, 1),
        "p50_ms": round(1000 * _percentile(lat, 0.5), 3),
        "p99_ms": round(1000 * _percentile(lat, 0.99), 3),
        "compute_mean_ms": compute_ms,
        "compute_mean_us_per_image": round(1000 * compute_ms / per_request, 1) if compute_ms else None,
        "mean_batch_samples": round(d["samples"] / d["batches"], 1) if d["batches"] else None,
    }


def run_serve_bench(run_dir: str | os.PathLike, quick: bool = False, data_dir=None, log=print) -> dict:
    """Seal ``run_dir``'s model, serve it twice (early exit, full model) and load both in turn."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:  # keys and identities: not left behind
        return _serve_bench(Path(work), run_dir, quick, data_dir, log)


def _set_up(work: Path, run_dir: str | os.PathLike, data_dir) -> tuple[bytes, Ed25519PrivateKey, dict]:
    """Seal the run, save 512 test images, make the owners' identities and the data owner's policy;
    returns (the model key, the model owner's identity, the model broker's policy)."""
    import numpy as np

    from branchy_tee.core.fileio import write_key_file
    from branchy_tee.core.keys import generate_key
    from branchy_tee.data.transforms import eval_transform
    from branchy_tee.evaluate.exits import load_split
    from branchy_tee.models.rundir import load_run
    from branchy_tee.seal.bundle import seal_model
    from branchy_tee.tee.attest.identity import create_identity, identity_hex
    from branchy_tee.tee.attest.providers import simulated_mrenclave

    model, card = load_run(Path(run_dir))
    key = generate_key()
    write_key_file(work / "mo.key", key)
    seal_model(model, card, key, work / "model.btee")
    test = load_split(card, "test", data_dir=data_dir)
    np.save(work / "images.npy", eval_transform(card.preprocessing)(test.images[:512]).numpy())
    mo, do = create_identity(work / "mo.id"), create_identity(work / "do.id")
    sim = simulated_mrenclave({})  # the servers run natively, with no measured settings
    (work / "policy.toml").write_text(f'allowed_mrenclave = ["{sim.hex()}"]\nallow_simulation = true\n')
    policy = {"allowed_mrenclave": [sim.hex()], "allow_simulation": True, "allowed_data_owners": [identity_hex(do)]}
    return key, mo, policy


def _serve_bench(work: Path, run_dir: str | os.PathLike, quick: bool, data_dir, log) -> dict:
    from branchy_tee.broker.server import start_broker
    from branchy_tee.core.keys import key_id
    from branchy_tee.tee.attest.identity import identity_hex

    seconds = 2.0 if quick else 8.0
    levels = (1, 4) if quick else CONCURRENCY
    batched_clients, batched_images, batched_seconds = (
        (2, 16, 1.0) if quick else (BATCHED_CLIENTS, BATCHED_IMAGES, seconds)
    )
    env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"), OMP_NUM_THREADS="1")
    key, mo, policy = _set_up(work, run_dir, data_dir)
    out: dict = {"seconds_per_level": seconds, "early_exit": [], "full_model": []}
    batched: dict = {"clients": batched_clients, "images_per_request": batched_images, "seconds": batched_seconds}
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = env["XDG_CONFIG_HOME"]  # the broker's and the workers' dev key location
    try:
        with start_broker({key_id(key): key}, policy, identity=mo) as broker:
            for name, full in (("early_exit", False), ("full_model", True)):
                port = _free_port()
                proc = _start_server(work / "model.btee", broker, identity_hex(mo), port, full, env)
                url = f"https://127.0.0.1:{port}"
                try:
                    for clients in levels:
                        r = _measure(url, work, clients, seconds, env)
                        log(
                            f"  {name}: {clients} client(s): {r['throughput_per_s']}/s, p50 {r['p50_ms']} ms, "
                            f"p99 {r['p99_ms']} ms, compute mean {r['compute_mean_ms']} ms, errors {r['errors']}"
                        )
                        out[name].append(r)
                    b = _measure_batched(url, work, batched_clients, batched_images, batched_seconds, env)
                    log(
                        f"  {name}: {batched_clients} client(s) x {batched_images} images a request: "
                        f"{b['images_per_s']} images/s, p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms, "
                        f"compute mean {b['compute_mean_ms']} ms, errors {b['errors']}"
                    )
                    batched[name] = b
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
    finally:
        if old is None:
            os.environ.pop("XDG_CONFIG_HOME", None)
        else:
            os.environ["XDG_CONFIG_HOME"] = old
    out["summary"] = _summary(out["early_exit"], out["full_model"])
    batched["summary"] = _batched_summary(batched["early_exit"], batched["full_model"])
    out["batched"] = batched
    return out


def _summary(ee: list[dict], full: list[dict]) -> dict:
    """Early exit against the full model: at the most clients (throughput) and at one (latency)."""
    top, one = -1, 0
    return {
        "throughput_speedup_at_max_clients": round(ee[top]["throughput_per_s"] / full[top]["throughput_per_s"], 2),
        "compute_mean_speedup_at_1_client": round(full[one]["compute_mean_ms"] / ee[one]["compute_mean_ms"], 2),
        "protocol_overhead_ms_at_1_client": round(ee[one]["p50_ms"] - ee[one]["compute_mean_ms"], 3),
        "attest_ms_per_connection": ee[one]["attest_ms_per_connection"],
    }


def _batched_summary(ee: dict, full: dict) -> dict:
    """Early exit against the full model when every request carries a batch."""
    return {
        "images_per_s_speedup": round(ee["images_per_s"] / full["images_per_s"], 2),
        "compute_mean_speedup": round(full["compute_mean_ms"] / ee["compute_mean_ms"], 2),
        "p50_speedup": round(full["p50_ms"] / ee["p50_ms"], 2),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        url, policy, identity, clients, seconds, start_at, images, per_request = argv[1:9]
        sys.stderr = open(os.devnull, "w")  # simulated-attestation banners
        out = worker(url, policy, identity, int(clients), float(seconds), float(start_at), images, int(per_request))
        print(json.dumps(out), end="", file=sys.__stdout__)
        return 0
    print(
        "usage: python -m branchy_tee.bench.serve --worker ... (run through `branchy-tee bench --serve`)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
