"""The demo's online act: the enclave serves over attested TLS (RA-TLS) and both data owners query it
at once through the client, which checks the enclave's attestation first; early exit, then the
full model, one single-image request at a time."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import TYPE_CHECKING

from branchy_tee.core.errors import BranchyError
from branchy_tee.demo.common import OWNERS, enclave_run, free_port, say, step

if TYPE_CHECKING:
    from branchy_tee.demo.batch import Demo


def online(demo: Demo) -> None:
    step(
        8,
        "online",
        "the enclave serves over attested TLS; both data owners query it at once (early exit, then full model)",
    )
    demo._build_and_release("enclave-serve", serve=True, enclave_size=demo.enclave_size)
    handles = demo.start_brokers("enclave-serve")
    try:
        demo.summary["online"] = {
            name: _serve_and_query(demo, full) for name, full in (("early_exit", False), ("full_model", True))
        }
    finally:
        for h in handles:
            h.stop()
    o = demo.summary["online"]
    say(
        f"    one request of one image at a time per data owner: p50 {o['early_exit']['p50_ms']:.2f} ms early exit vs "
        f"{o['full_model']['p50_ms']:.2f} ms full model (attestation checked at every connection: "
        f"{o['early_exit']['attest_ms']:.1f} ms each)"
    )


def _serve_and_query(demo: Demo, full: bool) -> dict:
    port = free_port()
    serve = ["serve", "--bundle", str(demo.d / "model.btee"), "--listen", f"127.0.0.1:{port}", "--quiet"]
    cmd = enclave_run(demo.d / "enclave-serve", *serve, *(["--full-model"] if full else []))
    proc = subprocess.Popen(cmd, env=demo.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        if not proc.stdout.readline().startswith("serving"):
            raise BranchyError("the enclave's server did not start")
        latencies, attest = _query_concurrently(demo, port, 20 if demo.quick else 200)
    finally:
        proc.terminate()
        proc.wait(60)
    latencies.sort()
    return {
        "requests": len(latencies),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "attest_ms": 1000 * sorted(attest)[len(attest) // 2],
    }


def _query_concurrently(demo: Demo, port: int, n: int) -> tuple[list[float], list[float]]:
    """Both data owners at once, ``n`` single-image requests each: (request latencies, attestation
    checks), in seconds."""
    from branchy_tee.client.online import Client

    latencies: list[float] = []
    attest: list[float] = []
    errors: list[str] = []

    def owner(who: str) -> None:
        x = demo.test.images[demo.halves[who]][:n]
        try:
            with Client(
                f"https://127.0.0.1:{port}",
                policy=demo.d / who / "policy-enclave-serve.toml",
                identity=demo.d / who / "identity.pem",
            ) as c:
                c.model_info()
                for i in range(len(x)):
                    t0 = time.perf_counter()
                    c.predict(x[i : i + 1])
                    latencies.append(time.perf_counter() - t0)
                attest.extend(c.attest_seconds)
        except BranchyError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=owner, args=(who,)) for who in OWNERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise BranchyError(f"a data owner's query failed: {errors[0]}")
    return latencies, attest
