"""Crash tests with SIGKILL (nothing can be cleaned up by the killed process):

1. ``python -m branchy_tee.tee.predict`` on two requests of a few thousand samples, killed after
   random delays (a quarter of them close to the end, and a quarter the moment the first output file
   or its temporary appears, i.e. inside the write phase). Afterwards each
   result file must be absent or complete and authentic (decrypts to the reference answers); no
   other file may exist except the atomic-write temporaries ``.NAME.*.tmp``, which are counted and
   must hold only a prefix of a sealed result (never plaintext).
2. A ``branchy-tee key-broker`` under load (client threads doing whole key fetches), killed with
   SIGKILL and restarted on the same port and audit log, several times. Every grant a client saw
   has its ``granted`` audit line; no audit line is torn; no nonce is issued or granted twice; a
   request granted before a restart, replayed afterwards, is refused (``nonce_unknown``).

    python fuzz/crashes.py --kills 20 --restarts 3      # what `make fuzz` runs
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "security")]  # world, runs: the tests' helpers

from world import World, build_world, quiet_call  # noqa: E402

RESULT_MAGIC = b"BTEERES1"


# --------------------------------------------------------------------------- predict killed
def build_crash_world(d: Path, samples: int = 3000) -> World:
    w, _, _ = quiet_call(build_world, d, {"do1": samples, "do2": samples // 3})
    return w


def _predict_cmd(world: World, out: Path) -> list[str]:
    argv = world.predict_argv(("do1", "do2"), out, "--stats-json", str(out / "stats.json"))
    return [sys.executable, "-m", "branchy_tee.tee.predict", *argv]


def _check_after_kill(world: World, out: Path) -> tuple[str, int, list[str]]:
    """(what was left: none|some|all, temporaries left, problems)."""
    from branchy_tee.client.envelopes import open_result
    from branchy_tee.core.errors import BranchyError

    problems, complete, temps = [], 0, 0
    expected = {f"{o}.res" for o in ("do1", "do2")} | {"stats.json"}
    for f in sorted(out.iterdir()) if out.exists() else []:
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            temps += 1
            data = f.read_bytes()
            is_result_tmp = any(f.name.startswith(f".{o}.res.") for o in ("do1", "do2"))
            if is_result_tmp and not RESULT_MAGIC.startswith(data[:8]):
                problems.append(f"temporary {f.name} does not hold a sealed result")
            if b"class_name" in data and is_result_tmp:
                problems.append(f"temporary {f.name} holds plaintext")
            continue
        if f.name not in expected:
            problems.append(f"unexpected file {f.name}")
            continue
        if f.name == "stats.json":
            try:
                json.loads(f.read_text())
            except ValueError:
                problems.append("partial stats.json")
            continue
        o = f.name[:-4]
        try:
            recs = open_result(f.read_bytes(), world.key(o), f.name, world.digest(o))[1]
        except BranchyError as e:
            problems.append(f"{f.name} is there but not authentic/complete: {e}")
            continue
        if recs != world.records[o]:
            problems.append(f"{f.name} decrypts to different answers")
        complete += 1
    left = "none" if complete == 0 else ("all" if complete == 2 else "some")
    return left, temps, problems


def kill_predict(world: World, work: Path, kills: int = 20, seed: int = 2026) -> dict:
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    clean = work / "clean"
    t0 = time.perf_counter()
    p = subprocess.run(_predict_cmd(world, clean), env=env, capture_output=True, text=True, cwd=REPO)
    total = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    left, temps, problems = _check_after_kill(world, clean)
    assert left == "all" and not temps and not problems, (left, temps, problems)
    outcomes = {"none": 0, "some": 0, "all": 0}
    temps_left, all_problems, delays = 0, [], []
    for i in range(kills):
        out = work / f"kill-{i:03d}"
        proc = subprocess.Popen(
            _predict_cmd(world, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
        )
        if i % 4 == 3:  # the moment the first output (or its temporary) appears: inside the write phase
            t0 = time.perf_counter()
            while (
                proc.poll() is None and not (out.exists() and os.listdir(out)) and time.perf_counter() - t0 < 10 * total
            ):
                time.sleep(0.0005)
            delays.append(f"at the first write, {time.perf_counter() - t0:.2f} s")
        else:
            near_end = i % 4 == 1
            delay = total * (rng.uniform(0.85, 1.02) if near_end else rng.uniform(0.05, 0.95))
            delays.append(round(delay, 2))
            time.sleep(delay)
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        left, temps, problems = _check_after_kill(world, out)
        outcomes[left] += 1
        temps_left += temps
        all_problems += [f"kill {i} ({delays[-1]}): {pr}" for pr in problems]
    return {
        "clean_run_seconds": round(total, 2),
        "samples": sum(len(r) for r in world.records.values()),
        "kills": kills,
        "left_nothing": outcomes["none"],
        "left_some_results": outcomes["some"],
        "left_all_results": outcomes["all"],
        "temporaries_left": temps_left,
        "problems": all_problems,
        "delays_s": delays,
    }


# --------------------------------------------------------------------------- key broker killed under load
def broker_restarts(work: Path, restarts: int = 3, seconds_between: float = 3.0, threads: int = 32) -> dict:
    from branchy_tee.core.errors import AttestationError, BranchyError
    from branchy_tee.core.keys import generate_key, key_id
    from branchy_tee.tee.attest.client import AttestedKeys
    from branchy_tee.tee.attest.protocol import report_data
    from branchy_tee.tee.attest.providers import SimulatedProvider
    from campaign import _x25519, http_call
    from load import broker_identity, sim_policy_toml, start_broker_process

    key = generate_key()
    kid = key_id(key)
    sim, _, _ = quiet_call(SimulatedProvider, work / "devkey")
    policy = sim_policy_toml(sim.mrenclave.hex())
    audit = work / "audit.jsonl"
    proc, url = start_broker_process(work, {"k": key}, policy, audit=audit, stderr_path=work / "broker.stderr")
    identity = broker_identity(work)
    port = int(url.rsplit(":", 1)[1])
    issued, seen, refused_old, unreachable, other, client_grants = [], [], [0], [0], [], [0]
    lock = threading.Lock()
    stop = threading.Event()

    def client():
        try:
            fetch_until_stopped()
        except BaseException as e:  # noqa: BLE001 -- a client that dies is a finding, not silence
            with lock:
                other.append(f"client thread died: {type(e).__name__}: {e}"[:200])

    def fetch_until_stopped():
        while not stop.is_set():
            ak = AttestedKeys("simulated", url, identity, [url], provider=sim, timeout=10)
            try:
                offer = ak.offer(url)
            except BranchyError:
                with lock:
                    unreachable[0] += 1
                time.sleep(0.02)
                continue
            with lock:
                issued.append(offer.nonce.hex())
            try:
                got = ak.exchange(offer, [kid], identity)[0]
            except AttestationError as e:
                with lock:
                    if "nonce_unknown" in str(e) or "before a restart" in str(e):
                        refused_old[0] += 1  # issued by the killed broker, presented to its successor
                    else:
                        other.append(str(e)[:200])
                continue
            except BranchyError:
                with lock:
                    unreachable[0] += 1
                continue
            with lock:
                if got[kid] == key:
                    seen.append(offer.nonce.hex())
                    client_grants[0] += 1
                else:
                    other.append("wrong key")

    def granted_body() -> bytes:
        """A key request, sent now and granted: replayed after the restart it must be refused."""
        nonce = bytes.fromhex(json.loads(http_call(url + "/v1/nonce")[1])["nonce"])
        _, pk = _x25519()
        ev, _, _ = quiet_call(sim.evidence, report_data(pk, nonce))
        body = json.dumps(
            {
                "evidence_type": "simulated",
                "evidence": base64.b64encode(ev).decode(),
                "public_key": pk.hex(),
                "nonce": nonce.hex(),
                "key_ids": [kid],
            }
        ).encode()
        assert http_call(url + "/v1/keys", "POST", body)[0] == 200
        with lock:
            issued.append(nonce.hex())
            seen.append(nonce.hex())
        return body

    old_stderr = sys.stderr
    sys.stderr = open(os.devnull, "w")  # the simulated provider's banner, once per evidence
    ts = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    replays = []
    try:
        for t in ts:
            t.start()
        for _ in range(restarts):
            time.sleep(seconds_between)
            before = granted_body()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for _attempt in range(50):  # same port, same audit log
                try:
                    proc, url2 = start_broker_process(
                        work, {"k": key}, policy, port=port, audit=audit, stderr_path=work / "broker.stderr"
                    )
                    break
                except RuntimeError:
                    time.sleep(0.1)
            else:
                raise RuntimeError(f"could not restart the broker on port {port}")
            assert url2 == url
            st, raw = http_call(url + "/v1/keys", "POST", before)
            replays.append((st, json.loads(raw).get("code")))
        time.sleep(seconds_between)
    finally:
        stop.set()
        for t in ts:
            t.join(30)
        sys.stderr.close()
        sys.stderr = old_stderr
        health = http_call(url + "/v1/health")[0]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    lines = audit.read_bytes().split(b"\n")
    torn, decisions = 0, []
    for ln in lines:
        if not ln:
            continue
        try:
            decisions.append(json.loads(ln))
        except ValueError:
            torn += 1
    granted = [d["nonce"] for d in decisions if d.get("decision") == "granted"]
    missing = sorted(set(seen) - set(granted))
    return {
        "restarts": restarts,
        "client_threads": threads,
        "grants_seen_by_clients": len(seen),
        "grants_to_client_threads": client_grants[0],
        "audit_lines": len(decisions),
        "audit_torn_lines": torn,
        "audit_granted": len(granted),
        "grants_without_audit_line": len(missing),
        "granted_but_not_delivered": len(set(granted) - set(seen)),
        "nonces_issued": len(issued),
        "nonces_issued_twice": len(issued) - len(set(issued)),
        "nonces_granted_twice": len(granted) - len(set(granted)),
        "old_nonces_refused_after_restart": refused_old[0],
        "unreachable_during_restart": unreachable[0],
        "replayed_after_restart": replays,
        "other_refusals": other[:5],
        "health_after": health,
    }


def broker_ok(r: dict) -> bool:
    return (
        r["grants_without_audit_line"] == 0
        and r["audit_torn_lines"] == 0
        and r["nonces_issued_twice"] == 0
        and r["nonces_granted_twice"] == 0
        and not r["other_refusals"]
        and r["health_after"] == 200
        and all(rep == (403, "nonce_unknown") for rep in r["replayed_after_restart"])
        and r["grants_to_client_threads"] > 0
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--samples", type=int, default=3000, help="samples of data owner 1 (data owner 2: a third)")
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--seconds-between", type=float, default=4.0)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="btee-crash-") as d:
        d = Path(d)
        world = build_crash_world(d / "world", args.samples)
        k = kill_predict(world, d / "kills", args.kills)
        print(
            f"predict killed with SIGKILL {k['kills']} times (clean run {k['clean_run_seconds']} s, {k['samples']} "
            "samples, "
            f"two requests): left nothing {k['left_nothing']}, some results {k['left_some_results']}, all results "
            f"{k['left_all_results']}; partial or wrong results 0 expected, problems {len(k['problems'])}; "
            f"atomic-write temporaries left {k['temporaries_left']}"
        )
        for pr in k["problems"]:
            print(f"  PROBLEM {pr}")
        b = broker_restarts(d / "broker", args.restarts, args.seconds_between)
        print(
            f"key broker killed with SIGKILL and restarted {b['restarts']} times under {b['client_threads']} client "
            "threads: "
            f"grants seen {b['grants_seen_by_clients']}, audit lines {b['audit_lines']} (torn "
            f"{b['audit_torn_lines']}), "
            f"grants without an audit line {b['grants_without_audit_line']}, granted but undelivered "
            f"{b['granted_but_not_delivered']}, nonces issued {b['nonces_issued']} (twice: "
            f"{b['nonces_issued_twice']}), "
            f"granted twice {b['nonces_granted_twice']}, old nonces refused after restart "
            f"{b['old_nonces_refused_after_restart']}, replays after restart {b['replayed_after_restart']}, "
            f"health {b['health_after']}"
        )
        for o in b["other_refusals"]:
            print(f"  PROBLEM unexpected refusal: {o}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"date": time.strftime("%Y-%m-%d"), "predict": k, "broker": b}, indent=1) + "\n"
        )
    return 0 if not k["problems"] and broker_ok(b) else 1


if __name__ == "__main__":
    raise SystemExit(main())
