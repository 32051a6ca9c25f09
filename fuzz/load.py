"""Key broker under load: a ``branchy-tee key-broker`` process on loopback (simulated evidence, audit
log) and C concurrent enclave clients, each doing whole attested key fetches back to back
(GET /v1/nonce, simulated evidence, POST /v1/keys, HPKE open, key id check) for S seconds.

    python fuzz/load.py --concurrency 200 --seconds 30     # what `make fuzz` runs

Clients run in several worker processes (threads inside each), so the client side is not one
interpreter lock. Reports requests, errors, throughput and latency percentiles; then checks that
the broker still answers /v1/health and that its audit log has one whole ``granted`` line per
grant, with no nonce used twice. Exit code 1 on any error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "security")]  # world, runs: the tests' helpers


def start_broker_process(
    work: Path,
    keys: dict[str, bytes],
    policy_toml: str,
    port: int = 0,
    audit: Path | None = None,
    stderr_path: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """``branchy-tee key-broker`` in a subprocess; (process, URL) once it listens."""
    from branchy_tee.core.fileio import write_key_file

    ks = work / "keystore"
    if not ks.exists():
        ks.mkdir()
        for name, k in keys.items():
            write_key_file(ks / f"{name}.key", k)
    policy = work / "policy.toml"
    policy.write_text(policy_toml)
    identity = work / "broker.id"
    if not identity.exists():  # one identity for the broker's whole life, restarts included
        from branchy_tee.tee.attest.identity import create_identity

        create_identity(identity)
    cmd = [
        sys.executable,
        "-m",
        "branchy_tee.cli",
        "key-broker",
        "--keys",
        str(ks),
        "--policy",
        str(policy),
        "--identity",
        str(identity),
        "--listen",
        f"127.0.0.1:{port}",
        "--quiet",
    ]
    if audit is not None:
        cmd += ["--audit-log", str(audit)]
    err = open(stderr_path or os.devnull, "ab")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    err.close()
    line = proc.stdout.readline()
    if not line.startswith("key broker listening on "):
        proc.kill()
        raise RuntimeError(f"key broker did not start: {line!r}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
    return proc, line.split()[-1]


def broker_identity(work: Path) -> bytes:
    """The identity (raw public key) of the broker ``start_broker_process`` runs for ``work``."""
    from branchy_tee.tee.attest.identity import load_identity, public_bytes

    return public_bytes(load_identity(work / "broker.id"))


def sim_policy_toml(mrenclave_hex: str) -> str:
    return f'allowed_mrenclave = ["{mrenclave_hex}"]\nallow_simulation = true\nmin_model_version = 1\n'


class _Null:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


def worker(
    url: str, identity_hex: str, kid: str, key_hex: str, devkey: str, threads: int, seconds: float, start_at: float
) -> dict:
    """Run ``threads`` clients until ``start_at + seconds``; latencies of successful fetches, errors."""
    from branchy_tee.tee.attest.client import AttestedKeys
    from branchy_tee.tee.attest.providers import SimulatedProvider

    sys.stderr = _Null()  # the simulated provider prints its warning banner on every evidence
    sim = SimulatedProvider(devkey)
    key = bytes.fromhex(key_hex)
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    end = start_at + seconds

    def loop():
        while time.time() < start_at:
            time.sleep(0.005)
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                got = AttestedKeys(
                    "simulated", url, bytes.fromhex(identity_hex), [url], provider=sim, timeout=120
                ).model_key(kid)
                ok = got == key
            except Exception as e:  # noqa: BLE001 -- counted
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    lat.append(dt)
                else:
                    errors.append("wrong key")

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"latencies": lat, "errors": errors, "finished_at": time.time()}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def run_load(work: Path, concurrency: int = 200, seconds: float = 30.0, processes: int = 4) -> dict:
    from branchy_tee.core.keys import generate_key, key_id
    from branchy_tee.tee.attest.providers import SimulatedProvider
    from world import quiet_call

    key = generate_key()
    sim, _, _ = quiet_call(SimulatedProvider, work / "devkey")
    audit = work / "audit.jsonl"
    proc, url = start_broker_process(
        work, {"k": key}, sim_policy_toml(sim.mrenclave.hex()), audit=audit, stderr_path=work / "broker.stderr"
    )
    try:
        per = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
        start_at = time.time() + 3.0  # every worker has imported and built its clients by then
        cmds = [
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                url,
                broker_identity(work).hex(),
                key_id(key),
                key.hex(),
                str(work / "devkey"),
                str(n),
                str(seconds),
                repr(start_at),
            ]
            for n in per
            if n
        ]
        ps = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True, cwd=REPO) for c in cmds]
        outs = [json.loads(p.communicate()[0]) for p in ps]
        wall = max(o["finished_at"] for o in outs) - start_at  # the last fetches end a little after the window
        lat = sorted(x for o in outs for x in o["latencies"])
        errors = [e for o in outs for e in o["errors"]]
        from campaign import http_call

        health = http_call(url + "/v1/health")[0]
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    lines = audit.read_text().splitlines()
    try:
        decisions = [json.loads(x) for x in lines]
        torn = 0
    except ValueError:
        decisions, torn = [], 1
    granted = [d for d in decisions if d.get("decision") == "granted"]
    nonces = [d.get("nonce") for d in decisions]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "concurrency": concurrency,
        "client_processes": len(per),
        "seconds": round(wall, 1),
        "requests": len(lat) + len(errors),
        "ok": len(lat),
        "errors": len(errors),
        "error_samples": errors[:5],
        "throughput_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(1000 * _percentile(lat, 0.50), 1),
        "p90_ms": round(1000 * _percentile(lat, 0.90), 1),
        "p99_ms": round(1000 * _percentile(lat, 0.99), 1),
        "max_ms": round(1000 * lat[-1], 1) if lat else None,
        "health_after": health,
        "broker_alive": alive,
        "audit_lines": len(lines),
        "audit_torn": torn,
        "audit_granted": len(granted),
        "audit_matches_grants": len(granted) == len(lat) and len(decisions) == len(lat) + len(errors),
        "nonces_unique": len(set(nonces)) == len(nonces),
    }


def format_load(r: dict) -> str:
    return (
        f"key broker load ({r['date']}): {r['concurrency']} concurrent clients ({r['client_processes']} processes) for "
        f"{r['seconds']:.0f} s on loopback, simulated evidence, audit log fsynced per decision\n"
        f"  requests {r['requests']}, errors {r['errors']}, throughput {r['throughput_per_s']} key releases/s\n"
        f"  latency of a whole key fetch (nonce + evidence + POST + HPKE open): p50 {r['p50_ms']} ms, "
        f"p90 {r['p90_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms\n"
        f"  afterwards: /v1/health {r['health_after']}, audit lines {r['audit_lines']} "
        f"(granted {r['audit_granted']}, torn {r['audit_torn']}), one line per grant: {r['audit_matches_grants']}, "
        f"nonces unique: {r['nonces_unique']}"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        url, identity_hex, kid, key_hex, devkey, threads, seconds, start_at = argv[1:9]
        out = worker(url, identity_hex, kid, key_hex, devkey, int(threads), float(seconds), float(start_at))
        sys.__stdout__.write(json.dumps(out))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--processes", type=int, default=4, help="client worker processes (default 4)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="btee-load-") as d:
        r = run_load(Path(d), args.concurrency, args.seconds, args.processes)
    print(format_load(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    ok = (
        r["errors"] == 0
        and r["health_after"] == 200
        and r["broker_alive"]
        and r["audit_matches_grants"]
        and r["nonces_unique"]
        and not r["audit_torn"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
