"""Run every atheris harness in fuzz/ for a share of a time budget and report executions and crashes.

    python fuzz/run.py                       # FUZZ_SECONDS (default 600) in total
    python fuzz/run.py --seconds 60 --only quote,bundle

Builds the world the harnesses fuzz against (fuzz/out/world: a sealed LeNet-5, keys, a request, a
result, a recorded broker exchange) and seed corpora (fuzz/out/corpus/<harness>/: the real SGX
quotes, the sealed header, the request and result, a stage's ONNX graph, policies, broker
messages) the first time; later runs reuse and extend the corpora. A harness that crashes is
restarted for the rest of its time; crash inputs land in fuzz/out/artifacts/. Exit code 1 if any
harness crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
REPO = FUZZ.parent
OUT = FUZZ / "out"
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "security")]

# name: (share of the time budget, -max_len)
HARNESSES = {
    "quote": (2.0, 6000),
    "verify": (1.5, 6000),
    "pck_extension": (1.0, 1024),
    "bundle": (1.5, 4096),
    "envelope": (1.5, 8192),
    "stage_graph": (1.0, 65536),
    "policy": (1.0, 2048),
    "broker": (1.0, 4096),
    "client": (0.5, 4096),
}


# Written into the world when it is built: a world sealed in an older stage format is built again
# (its stage 0 would not be a payload the harnesses can take apart).
WORLD_FORMAT = "stage payload: graph + weight blob\n"


def build_world(world: Path) -> None:
    """The world and the recorded broker exchange (once; the corpora depend on its keys)."""
    marker = world / "format"
    if (world / "client-exchange.json").is_file() and marker.is_file() and marker.read_text() == WORLD_FORMAT:
        return
    import shutil

    from branchy_tee.core.keys import generate_key
    from campaign import record_exchange
    from world import build_world as build
    from world import quiet_call

    shutil.rmtree(world, ignore_errors=True)
    quiet_call(build, world)
    keys = [generate_key(), generate_key()]
    rec = record_exchange(world, keys)
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    sk = rec["sk"].private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    (world / "client-exchange.json").write_text(
        json.dumps(
            {
                "sk": sk.hex(),
                "pk": rec["pk"].hex(),
                "kid": rec["kid"],
                "key": keys[0].hex(),
                "identity": rec["identity"].hex(),
                "nonce_body": rec["nonce_body"].decode(),
                "keys_body": rec["keys_body"].decode(),
            }
        )
    )
    marker.write_text(WORLD_FORMAT)  # last: a world interrupted while being built is built again


def seeds(world: Path) -> dict[str, list[bytes]]:
    import base64

    import torch
    from safetensors.torch import save

    from branchy_tee.tee.attest.protocol import report_data
    from branchy_tee.tee.attest.providers import SimulatedProvider
    from branchy_tee.tee.graphs import unpack
    from branchy_tee.tee.sealed.bundle import open_bundle
    from campaign import SGX_QUOTES
    from world import quiet_call

    quotes = [p.read_bytes() for p in sorted(SGX_QUOTES.glob("*.quote.bin"))]
    ext = []
    for q in quotes:
        try:
            from cryptography import x509

            from branchy_tee.tee.attest.quote import parse_quote
            from branchy_tee.verifier.pck import SGX_EXTENSION_OID

            leaf = x509.load_pem_x509_certificate(parse_quote(q).pck_chain_pem[0])
            ext.append(leaf.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value.value)
        except Exception:  # noqa: BLE001 -- a seed less
            pass
    header = (world / "model.btee" / "header.json").read_bytes()
    request, result = (world / "do1.req").read_bytes(), (world / "reference" / "do1.res").read_bytes()
    payload = open_bundle(world / "model.btee", (world / "mo.key").read_bytes()).decrypt_stage(0)
    stage0 = unpack(payload, "stage-00.bin")[0]  # the graph: the harness adds the genuine weight blob
    policies = [
        b'allowed_mrenclave = ["' + b"ab" * 32 + b'"]\nallow_simulation = true\nmin_model_version = 2\n',
        b'allowed_mrsigner = ["' + b"cd" * 32 + b'"]\nisv_prod_id = 1\nmin_isv_svn = 3\nallow_debug = false\n'
        b'accepted_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]\nrequire_collateral = false\n'
        b'stale_collateral = "warn"\nkey_ids = ["0123456789abcdef"]\n',
        b'allowed_mrenclave = []\nallowed_mrsigner = ["' + b"00" * 32 + b'"]\nallow_simulation = true\n'
        b'simulation_public_keys = ["' + b"11" * 32 + b'"]\n[extra]\nx = 1\n',
    ]
    sim, _, _ = quiet_call(SimulatedProvider, world / "devkey")
    pk = bytes(range(32))
    nonce = bytes(40)  # the broker harness swaps 80 '0' digits for a nonce it just issued
    evidence, _, _ = quiet_call(sim.evidence, report_data(pk, nonce))
    body = json.dumps(
        {
            "protocol": "branchy-tee/v1",
            "evidence_type": "simulated",
            "evidence": base64.b64encode(evidence).decode(),
            "public_key": pk.hex(),
            "nonce": nonce.hex(),
            "key_ids": ["0123456789abcdef"],
        }
    ).encode()
    rec = json.loads((world / "client-exchange.json").read_text())
    return {
        "quote": quotes,
        "verify": quotes,
        "pck_extension": ext,
        "bundle": [b"\0" + header, b"\1" + header],
        "envelope": [
            b"\0" + result,
            b"\1" + request,
            b"\4" + b"\3\0\0\0" + save({"inputs": torch.zeros(1, 1, 28, 28)}),
            b"\5" + b"\1\0\0\0" + b'[{"index": 0, "label": 1, "class_name": "c1", "confidence": 0.5, "exit": 0}]',
        ],
        "stage_graph": [stage0],
        "policy": policies,
        "broker": [body, body.replace(b'"simulated"', b'"dcap"', 1)],
        "client": [rec["nonce_body"].encode() + b"\0" + rec["keys_body"].encode()],
    }


def parse_log(text: str) -> dict:
    def last(pattern, default=0):
        m = re.findall(pattern, text)
        return int(m[-1]) if m else default

    return {
        "execs": sum(int(x) for x in re.findall(r"stat::number_of_executed_units: (\d+)", text))
        or last(r"Done (\d+) runs"),
        "cov": last(r"cov: (\d+)"),
        "ft": last(r"ft: (\d+)"),
        "corpus": last(r"corp: (\d+)/"),
        "peak_rss_mb": last(r"stat::peak_rss_mb: (\d+)"),
    }


def run_harness(name: str, seconds: float, max_len: int, env: dict) -> dict:
    corpus = OUT / "corpus" / name
    logs, arts = OUT / "logs", OUT / "artifacts"
    logs.mkdir(parents=True, exist_ok=True)
    arts.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    deadline = time.monotonic() + seconds
    crashes, execs, stats, runs, text_all = 0, 0, {}, 0, ""
    crash_lines = []
    with open(log_path, "w") as log:
        while True:
            left = deadline - time.monotonic()
            if left < 5 and runs:
                break
            runs += 1
            cmd = [
                sys.executable,
                str(FUZZ / f"fuzz_{name}.py"),
                str(corpus),
                f"-max_total_time={max(int(left), 5)}",
                "-print_final_stats=1",
                f"-artifact_prefix={arts}/{name}-",
                "-timeout=30",
                "-rss_limit_mb=4096",
                f"-max_len={max_len}",
            ]
            p = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
            )
            log.write(p.stdout)
            text_all += p.stdout
            st = parse_log(p.stdout)
            execs += st["execs"]
            stats = st
            if p.returncode != 0:
                crashes += 1
                tail = [ln for ln in p.stdout.splitlines() if "Finding" in ln or "Error" in ln or "Exception" in ln]
                crash_lines.append(tail[-1] if tail else f"exit code {p.returncode}")
                if runs > 20:
                    break
            else:
                break
    return {
        "harness": name,
        "seconds": round(seconds),
        "execs": execs,
        "execs_per_s": round(execs / max(seconds, 1)),
        "cov": stats.get("cov", 0),
        "ft": stats.get("ft", 0),
        "corpus": len(list(corpus.iterdir())),
        "crashes": crashes,
        "crash_lines": crash_lines[:5],
        "log": str(log_path.relative_to(REPO)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("FUZZ_SECONDS", "600")),
        help="total time for all harnesses (default $FUZZ_SECONDS or 600)",
    )
    p.add_argument("--only", help="comma-separated harness names")
    p.add_argument("--json", default=str(OUT / "fuzz-report.json"))
    args = p.parse_args(argv)
    names = [n for n in HARNESSES if not args.only or n in args.only.split(",")]
    world = OUT / "world"
    build_world(world)
    for name, data in seeds(world).items():
        d = OUT / "corpus" / name
        d.mkdir(parents=True, exist_ok=True)
        for i, blob in enumerate(data):
            (d / f"seed-{i}").write_bytes(blob)
    env = {**os.environ, "FUZZ_WORLD": str(world), "PYTHONHASHSEED": "0"}
    total = sum(HARNESSES[n][0] for n in names)
    print(f"atheris: {len(names)} harnesses, {args.seconds:.0f} s in total", flush=True)
    rows = []
    for n in names:
        share = args.seconds * HARNESSES[n][0] / total
        r = run_harness(n, share, HARNESSES[n][1], env)
        rows.append(r)
        print(
            f"  {n}: {r['execs']} executions in {r['seconds']} s, coverage {r['cov']}, corpus {r['corpus']}, "
            f"crashes {r['crashes']}" + (f" ({r['crash_lines'][0]})" if r["crash_lines"] else ""),
            flush=True,
        )
    print()
    print(
        f"{'harness':<14} {'seconds':>7} {'executions':>11} {'exec/s':>7} {'coverage':>8} {'corpus':>6} {'crashes':>7}"
    )
    for r in rows:
        print(
            f"{r['harness']:<14} {r['seconds']:>7} {r['execs']:>11} {r['execs_per_s']:>7} {r['cov']:>8} "
            f"{r['corpus']:>6} {r['crashes']:>7}"
        )
    tot_e, tot_s, tot_c = (
        sum(r["execs"] for r in rows),
        sum(r["seconds"] for r in rows),
        sum(r["crashes"] for r in rows),
    )
    print(f"{'total':<14} {tot_s:>7} {tot_e:>11} {round(tot_e / max(tot_s, 1)):>7} {'':>8} {'':>6} {tot_c:>7}")
    print(f"measured {time.strftime('%Y-%m-%d')}; logs in fuzz/out/logs, crash inputs in fuzz/out/artifacts")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "seconds": args.seconds, "rows": rows}, indent=1) + "\n"
    )
    return 1 if tot_c else 0


if __name__ == "__main__":
    raise SystemExit(main())
