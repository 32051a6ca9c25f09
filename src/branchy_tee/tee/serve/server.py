"""``branchy-tee serve``: the enclave answers data owners online, over attested TLS.

At start the server gets the model key exactly as predict does (attestation to the model owner's
broker, with the measured pins inside an enclave), verifies the bundle and loads stage 0. It makes a
fresh key pair and an RA-TLS certificate whose evidence binds it (``tee.attest.ratls``), and serves HTTPS
(standard library ``http.server`` + ``ssl``: nothing joins the enclave for it). Clients verify that
certificate against their own policy before they send anything.

Data owners authenticate with client certificates made from their identity keys; the server trusts
exactly the identities on the model owner's ``allowed_data_owners`` (delivered, signed, with the model
key) and matches the certificate's public key, never a name. It renews the model key and the
allow-list from the model broker every ``--renew`` seconds and stops answering if the broker
refuses, so the model owner can revoke a data owner or the whole deployment.

API (JSON unless said otherwise; errors are ``{"error": "<one line>", "code": "..."}``)::

    GET  /v1/health    anyone           {"status": "ok" | "draining" | "renewing" | "revoked"}
    GET  /v1/model     allowed owners   arch, classes, preprocessing, bundle id, model version, model key id
    POST /v1/predict   allowed owners   body: safetensors with one float32 tensor "inputs" (N, C, H, W)
                                        -> {"model": {...}, "samples": n, "results": [{label,
                                            class_name, confidence, exit}, ...]}
    GET  /v1/metrics   the model owner  Prometheus text: requests, samples per exit, latency percentiles

Requests are gathered into batches across connections and data owners (``tee.serve.batching``): at
most ``--max-batch`` samples or ``--max-wait-ms`` of waiting. Beyond ``--max-queue`` waiting requests
the answer is 503 with Retry-After. The client's certificate is checked before any body byte is
read; bodies over ``--max-body``, or beyond ``--max-inflight-mib`` of bodies in flight, are refused
before they are read; a request must arrive whole within ``--timeout``; at most ``--max-connections``
connections (8 without a certificate, which may only ask /v1/health). SIGTERM/SIGINT finish what
was accepted and refuse new work.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, Mapping

from branchy_tee.core.commandline import ArgumentParser
from branchy_tee.core.errors import BranchyError, UsageError
from branchy_tee.tee import measured
from branchy_tee.tee.serve.model import LoadedModel
from branchy_tee.tee.serve.renewal import Renewal, ServerTls
from branchy_tee.tee.startup import Log, add_trust_arguments, compute_threads, make_log, trust

if TYPE_CHECKING:
    from branchy_tee.tee.attest.client import AttestedKeys
    from branchy_tee.tee.serve.https import Server

PROG = "branchy-tee serve"
DEFAULT_CAPS = {"max_connections": 64, "max_inflight_mib": 256, "max_queue": 256}  # as `enclave build` measures


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="sealed model bundle directory (model.btee)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on (port 0: any free port)")
    add_trust_arguments(p, data_brokers=False)
    p.add_argument(
        "--renew",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="renew the model key, the allow-list and the TLS certificate from the model broker this often "
        "(default and most: 300)",
    )
    p.add_argument("--min-version", type=int, default=0, help="refuse bundles older than this model version")
    b = p.add_argument_group("batching and limits")
    b.add_argument("--batch-size", type=int, default=64, help="the engine's batch size (default 64)")
    b.add_argument(
        "--max-batch", type=int, default=64, help="gather up to this many samples across requests (default 64)"
    )
    b.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="wait at most this long to fill a batch (default 0: batch what is waiting; load forms batches)",
    )
    b.add_argument("--max-request-samples", type=int, default=1024, help="samples per request (default 1024)")
    b.add_argument("--max-body", type=int, default=64 << 20, help="request body limit in bytes (default 64 MiB)")
    b.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a client may take to send a whole request: line, headers and body (default 30)",
    )
    _add_caps(b)
    p.add_argument("--memory-budget", type=float, metavar="MiB", help="limit for resident weights + activations")
    p.add_argument("--full-model", action="store_true", help="ignore the exit thresholds (for comparisons)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads inside each stage session (default: OMP_NUM_THREADS, else 1); batches run one at a time",
    )
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")


def _add_caps(b: argparse._ArgumentGroup) -> None:
    """The limits an enclave build measures as caps (``measured.CAP_NAMES``)."""
    b.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help=f"waiting requests before 503 Retry-After (default {DEFAULT_CAPS['max_queue']}; inside an enclave "
        "its measured cap, and never more)",
    )
    b.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help=f"connections at once, one thread each (default {DEFAULT_CAPS['max_connections']}; inside an "
        "enclave its measured cap, and never more)",
    )
    b.add_argument(
        "--max-inflight-mib",
        type=int,
        default=None,
        help="request bytes being read or waiting, counted twice (body and array), before 503 (default "
        f"{DEFAULT_CAPS['max_inflight_mib']}; inside an enclave its measured cap, and never more)",
    )


# --------------------------------------------------------------------------- running
def _check_port(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            s.bind((host, port))
    except OSError as e:
        raise BranchyError(f"--listen {host}:{port}: cannot listen there ({e.strerror or e})") from None


def _check_limits(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> None:
    """Every limit positive and finite; inside an enclave the measured caps (what sgx.enclave_size and
    sgx.max_threads were sized for) are the defaults, and the host may only lower them."""
    try:
        caps = measured.serve_caps(env) if measured.inside_enclave(env) else {}
    except ValueError as e:
        raise UsageError(str(e)) from None
    if measured.inside_enclave(env) and not caps:
        raise UsageError(
            f"this enclave measures no {measured.SERVE_CAPS}: it was not built with `enclave build --serve`"
        )
    for name in measured.CAP_NAMES:
        given, cap = getattr(args, name), caps.get(name)
        if cap is not None and given is not None and given > cap:
            raise UsageError(
                f"--{name.replace('_', '-')} {given} is above the cap {cap} this enclave was built and sized "
                "for (measured): the host may only lower it"
            )
        setattr(args, name, given if given is not None else cap if cap is not None else DEFAULT_CAPS[name])
    for name in (
        "batch_size",
        "max_batch",
        "max_queue",
        "max_request_samples",
        "max_body",
        "max_connections",
        "max_inflight_mib",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.max_wait_ms >= 0 and 0 < args.timeout < math.inf):
        raise UsageError("--max-wait-ms must not be negative; --timeout must be a positive number of seconds")
    if not 0 < args.renew <= Renewal.MAX_PERIOD:  # (NaN fails too)
        raise UsageError(
            f"--renew {args.renew}: give 0 < SECONDS <= {Renewal.MAX_PERIOD:.0f} (revocation reaches the "
            "enclave within one renewal, so the enclave caps it)"
        )


def _load(args: argparse.Namespace, log: Log) -> tuple[AttestedKeys, str, LoadedModel]:
    """Attest to the model broker, verify the pinned bundle, load stage 0: (keys, model key id, model)."""
    from branchy_tee.tee.sealed.bundle import open_bundle, read_header_unverified

    settings = trust(args, "serve")  # inside an enclave the measured settings decide
    keys = settings.model_keys()
    header = read_header_unverified(args.bundle)
    settings.check_pins(header, args.bundle)
    kid = settings.model_key_id or header.key_id
    model_key = keys.model_key(kid)
    bundle = open_bundle(args.bundle, model_key, min_version=max(settings.min_version, keys.min_model_version()))
    settings.check_pins(bundle.header, args.bundle)  # the header read first may have been swapped since
    model = LoadedModel(bundle, args.memory_budget, args.batch_size, args.full_model, log)
    model.store.get(0)  # stage 0 eagerly: the first request should not pay for it
    return keys, kid, model


def start(args: argparse.Namespace, log: Log | None = None) -> tuple[Server, Callable[[], None]]:
    """Attest, load, and start serving in background threads; returns (server, stop function)."""
    from branchy_tee.core.commandline import parse_listen
    from branchy_tee.tee.graphs import use_threads
    from branchy_tee.tee.serve.batching import Batcher
    from branchy_tee.tee.serve.https import Server
    from branchy_tee.tee.tuning import tune_allocator

    log = log or make_log(quiet=True)
    _check_limits(args)
    host, port = parse_listen(args.listen)
    _check_port(host, port)  # before attesting: a port in use is one line, not a fetched key and a traceback
    tune_allocator()
    use_threads(compute_threads(args.threads))
    keys, kid, model = _load(args, log)
    owner, allowed = keys.model_broker_identity, frozenset(keys.allowed_data_owners or ())
    batcher = Batcher(model.answer, args.max_batch, args.max_wait_ms / 1000.0, args.max_queue)
    tls = ServerTls.fresh(keys.provider, owner, keys.settings)
    server = Server(
        (host, port),
        model,
        batcher,
        tls.context_for(allowed),
        allowed=allowed,
        owner={owner},
        timeout_s=args.timeout,
        max_body=args.max_body,
        max_request_samples=args.max_request_samples,
        max_connections=args.max_connections,
        max_inflight=args.max_inflight_mib << 20,
        log=log,
    )
    renewal = Renewal(server, keys, kid, tls, args.renew, log)
    server.on_answer = renewal.answered
    threading.Thread(target=server.serve_forever, name="serve", daemon=True).start()
    threading.Thread(target=renewal.run, name="renew", daemon=True).start()

    def stop() -> None:
        server.state = "draining"
        renewal.stopping.set()
        renewal.now.set()
        server.shutdown()  # no new connections; requests being read still reach the batcher
        batcher.stop()
        server.server_close()

    return server, stop


def run(args: argparse.Namespace) -> int:
    log = make_log(args.quiet)
    server, stop = start(args, log)
    host, port = server.server_address[:2]
    assert isinstance(host, str)  # a bound TCP socket names its host as a str
    h = server.model.bundle.header
    print(
        f"serving {h.arch} (bundle {h.bundle_id}, model version {h.model_version}) "
        f"on https://{host}:{port} for {len(server.allowed)} allowed data owner(s)",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log("stopping: finishing accepted requests")
    stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BranchyError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
