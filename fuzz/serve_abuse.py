"""serve's front door under abuse, with the server's memory and threads measured throughout: a native
``branchy-tee serve`` process (simulated attestation, a model broker on loopback, the stack size of
Gramine's manifest) and three cases run one after the other against it:

- ``unauthenticated-body``: connections without a client certificate each announce a 64 MiB body
  and send 1 MiB of it, then stall (they must be refused before the body is read);
- ``slow-drip``: connections without a certificate drip a request one byte every few seconds
  (at most UNAUTHENTICATED_CONNECTIONS hold a thread, each until the request deadline);
- ``connection-flood``: plain TCP connections opened as fast as possible and held (no TLS at all).

    python fuzz/serve_abuse.py --json fuzz/out/serve-abuse.json     # what `make fuzz` runs

The server's VmPeak, VmRSS and thread count (``/proc/PID/status``, sampled every 50 ms) are
compared with what ``enclave build --serve`` gives the same bundle and options: ``sgx.max_threads``
and ``sgx.enclave_size`` (measured by the build).
After each case a data owner's real request must still be answered. Exit code 1 if any bound is
broken or the server stops answering.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]  # runs: the tests' random-model helper

MIB = 1 << 20
STACK = 2 * MIB  # sys.stack.size in the manifest: each thread's stack under Gramine
THREADS, CONNECTIONS = 4, 64  # the build's defaults (--threads, --max-connections)


def set_up(work: Path):
    """A random LeNet-5 sealed, the owners' identities, the model broker's policy."""
    from branchy_tee.core.keys import generate_key
    from branchy_tee.seal.bundle import seal_model
    from branchy_tee.tee.attest.identity import create_identity, identity_hex
    from branchy_tee.tee.attest.providers import simulated_mrenclave
    from runs import make_random_run

    model, card = make_random_run(work / "run", "lenet5")
    key = generate_key()
    seal_model(model, card, key, work / "model.btee")
    mo, do = create_identity(work / "mo.id"), create_identity(work / "do.id")
    sim = simulated_mrenclave({})  # the server runs natively, with no measured settings
    (work / "policy.toml").write_text(f'allowed_mrenclave = ["{sim.hex()}"]\nallow_simulation = true\n')
    policy = {"allowed_mrenclave": [sim.hex()], "allow_simulation": True, "allowed_data_owners": [identity_hex(do)]}
    return key, mo, policy


def start_server(work: Path, broker_url: str, mo_hex: str, env: dict) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "branchy_tee.cli", "serve", "--bundle", str(work / "model.btee")]
    cmd += ["--listen", "127.0.0.1:0", "--attest", "simulated", "--model-broker", broker_url]
    cmd += ["--model-broker-identity", mo_hex, "--threads", str(THREADS), "--timeout", str(TIMEOUT)]
    cmd += ["--max-connections", str(CONNECTIONS)]

    def gramine_stacks() -> None:  # glibc sizes thread stacks from RLIMIT_STACK, as Gramine from the manifest
        resource.setrlimit(resource.RLIMIT_STACK, (STACK, STACK))

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, preexec_fn=gramine_stacks
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(line.split("https://127.0.0.1:")[1].split()[0])


class Sampler:
    """Peak VmPeak, VmRSS and Threads of one process, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, {"vm_peak": 0, "vm_rss": 0, "threads": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            for name, key, scale in (("vm_peak", "VmPeak", 1024), ("vm_rss", "VmRSS", 1024), ("threads", "Threads", 1)):
                value = int(fields[key].split()[0]) * scale
                self.peak[name] = max(self.peak[name], value)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _anonymous(port: int) -> ssl.SSLSocket:
    """A TLS connection without a client certificate (the client's own first handshake)."""
    from branchy_tee.client.tls import anonymous_context

    return anonymous_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30))


def unauthenticated_body(port: int, connections: int = 8) -> dict:
    """Each connection announces 64 MiB - 1, sends 1 MiB and waits for the answer."""
    refused, started = 0, time.monotonic()

    def one() -> None:
        nonlocal refused
        try:
            with _anonymous(port) as tls:
                tls.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 67108863\r\n\r\n")
                try:
                    tls.sendall(b"\0" * MIB)
                except OSError:
                    pass  # closed while sending: refused before the body was read
                if tls.recv(4096).startswith(b"HTTP/1.1 403 "):
                    refused += 1
        except OSError:
            pass  # not an answer: counted as not refused

    _together(one, connections)
    return {"connections": connections, "refused": refused, "seconds": round(time.monotonic() - started, 2)}


def slow_drip(port: int, connections: int = 150, seconds: float = 20.0, interval: float = 2.0) -> dict:
    """Each connection sends a request line one byte every ``interval`` s for up to ``seconds``."""
    cut: list[float] = []
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 64

    def one() -> None:
        t0 = time.monotonic()
        try:
            with _anonymous(port) as tls:
                for b in request:
                    if time.monotonic() - t0 > seconds:
                        return
                    tls.sendall(bytes([b]))
                    time.sleep(interval)
        except OSError:
            pass
        cut.append(time.monotonic() - t0)

    _together(one, connections)
    return {"connections": connections, "cut_off": len(cut), "longest_held_s": round(max(cut, default=0), 1)}


def connection_flood(port: int, connections: int = 1000, hold: float = 5.0) -> dict:
    """Open plain TCP connections as fast as possible, hold them, close them."""
    socks, failed = [], 0
    for _ in range(connections):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            failed += 1
    time.sleep(hold)
    for s in socks:
        s.close()
    return {"connections": connections, "opened": len(socks), "failed": failed}


def _together(fn, n: int) -> None:
    threads = [threading.Thread(target=fn, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def still_answers(port: int, work: Path) -> bool:
    import numpy as np

    from branchy_tee.client.online import Client
    from branchy_tee.verifier.policy import load_policy

    with Client(f"https://127.0.0.1:{port}", load_policy(work / "policy.toml"), work / "do.id") as c:
        return len(c.predict(np.zeros((2, 1, 28, 28), np.float32))) == 2


def enclave_limits(work: Path, broker_url: str, mo_hex: str) -> dict:
    """sgx.max_threads and sgx.enclave_size of `enclave build --serve` for this bundle and these options
    (the size measured as the build measures it: the runtime's VmPeak, the in-flight cap, Gramine's share)."""
    from branchy_tee.cli import main as cli
    from branchy_tee.gramine.config import load_config
    from branchy_tee.gramine.measure import parse_size

    (work / "io").mkdir()
    argv = ["enclave", "build", "--bundle", str(work / "model.btee"), "--out", str(work / "enc"), "--serve"]
    argv += ["--env", str(REPO / ".enclave-env"), "--attest", "simulated", "--io-dir", str(work / "io")]
    argv += ["--model-broker", broker_url, "--model-broker-identity", mo_hex, "--threads", str(THREADS)]
    if cli([*argv, "--max-connections", str(CONNECTIONS), "--dev-key", str(work / "devkey" / "dev.key")]) != 0:
        raise RuntimeError("enclave build failed")
    cfg = load_config(work / "enc")
    return {"sgx_max_threads": cfg.max_threads, "sgx_enclave_size": parse_size(cfg.enclave_size)}


TIMEOUT = 10.0  # serve --timeout here: the whole request's deadline
EXPECTED = {  # what each case must end in, beyond the limits
    "unauthenticated-body": lambda f: f["refused"] == f["connections"] and f["seconds"] < 5,
    # the client sees the close at its next byte or the one after (2 s apart)
    "slow-drip": lambda f: f["cut_off"] == f["connections"] and f["longest_held_s"] <= TIMEOUT + 5,
    "connection-flood": lambda f: f["opened"] + f["failed"] == f["connections"],
}
OUTCOME = {
    "unauthenticated-body": lambda f: f"{f['refused']} got 403 before the body, in {f['seconds']} s",
    "slow-drip": lambda f: f"{f['cut_off']} cut off, the longest held {f['longest_held_s']} s",
    "connection-flood": lambda f: f"{f['opened']} opened and held 5 s",
}


def run(work: Path) -> dict:
    from branchy_tee.broker.server import start_broker
    from branchy_tee.core.keys import key_id
    from branchy_tee.tee.attest.identity import identity_hex

    # the manifest's allocator settings (one malloc arena: VmPeak is what the build sizes)
    env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"), OMP_NUM_THREADS=str(THREADS), MALLOC_ARENA_MAX="1")
    os.environ["XDG_CONFIG_HOME"] = env["XDG_CONFIG_HOME"]  # the broker's and this client's dev key
    key, mo, policy = set_up(work)
    cases: dict[str, dict] = {}
    with start_broker({key_id(key): key}, policy, identity=mo) as broker:
        limits = enclave_limits(work, broker.url, identity_hex(mo))
        proc, port = start_server(work, broker.url, identity_hex(mo), env)
        try:
            for name, case in (
                ("unauthenticated-body", unauthenticated_body),
                ("slow-drip", slow_drip),
                ("connection-flood", connection_flood),
            ):
                with Sampler(proc.pid) as s:
                    figures = case(port)
                    time.sleep(0.5)
                ok = still_answers(port, work)
                within = (
                    s.peak["threads"] <= limits["sgx_max_threads"] and s.peak["vm_peak"] <= limits["sgx_enclave_size"]
                )
                cases[name] = {**figures, **{f"server_{k}": v for k, v in s.peak.items()}, "answers_after": ok}
                cases[name]["within_limits"] = within and ok and EXPECTED[name](figures)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    date = time.strftime("%Y-%m-%d", time.gmtime())
    return {"date": date, "limits": limits, "cases": cases, "ok": all(c["within_limits"] for c in cases.values())}


def format_report(r: dict) -> str:
    lim = r["limits"]
    lines = [
        f"serve under abuse (limits of its enclave: sgx.max_threads {lim['sgx_max_threads']}, "
        f"sgx.enclave_size {lim['sgx_enclave_size'] // MIB} MiB)",
        f"{'case':<22}{'connections':>12}{'VmPeak MiB':>12}{'VmRSS MiB':>11}{'threads':>9}  answers after  outcome",
    ]
    for name, c in r["cases"].items():
        lines.append(
            f"{name:<22}{c['connections']:>12}{c['server_vm_peak'] / MIB:>12.0f}{c['server_vm_rss'] / MIB:>11.0f}"
            f"{c['server_threads']:>9}  {'yes' if c['answers_after'] else 'NO':<13}  {OUTCOME[name](c)}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve-abuse-") as work:
        r = run(Path(work))
    print(format_report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
