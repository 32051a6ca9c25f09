"""`enclave` subcommands: the Gramine package (env, build, run) and the owners' release and policy."""

from __future__ import annotations

import argparse
import sys

from branchy_tee.cli.common import ENCLAVE_ENV, PROG, emit_json, progress, warn
from branchy_tee.core.commandline import ArgumentParser
from branchy_tee.gramine.launch import LaunchBackend
from branchy_tee.gramine.statement import DANGEROUS
from branchy_tee.gramine.tools import use_gramine
from branchy_tee.tee.startup import add_trust_arguments

GRAMINE_HELP = "a Gramine installation (its prefix or bin/ folder) to use before the one on PATH"


def add_enclave(sub) -> None:
    p = sub.add_parser("enclave", help="build, sign and run the Gramine SGX enclave")
    esub = p.add_subparsers(dest="enclave_command", metavar="SUBCOMMAND", parser_class=ArgumentParser)
    esub.required = True
    _add_build(esub)
    _add_env(esub)
    _add_run(esub)
    _add_release(esub)
    _add_policy(esub)


def _add_build(esub) -> None:
    b = esub.add_parser(
        "build",
        help="render the Gramine manifest for a bundle, write a Makefile, sign with --sgx",
        description="Write DIR/: the Gramine manifest (rendered with gramine-manifest when installed, else by "
        "branchy-tee for inspection), the enclave's entry script, a Makefile (`make SGX=1` builds and "
        "signs, `make` builds for gramine-direct) and enclave.json. The model broker's URL and identity "
        "and the bundle (id, model key id, minimum version) are measured. With --sgx also sign with "
        "gramine-sgx-sign and print MRENCLAVE. Owners do not pin what the host prints: the model owner "
        "reproduces the build and signs a release statement (`enclave release`).",
    )
    b.add_argument(
        "--bundle", required=True, help="the sealed bundle the enclave serves (its architecture sets sgx.enclave_size)"
    )
    b.add_argument("--out", required=True, metavar="DIR", help="build directory")
    b.add_argument("--sgx", action="store_true", help="sign for SGX (needs Gramine and a signing key)")
    b.add_argument("--debug", action="store_true", help="debug enclave (sgx.debug = true; never for production)")
    b.add_argument("--edmm", action="store_true", help="sgx.edmm_enable = true (SGX2 CPUs, Linux >= 6.0)")
    add_trust_arguments(b, data_brokers=True, build=True)
    _add_build_runtime(b)
    _add_build_signing(b)
    _add_build_sizing(b)
    b.add_argument("--gramine", metavar="DIR", help=GRAMINE_HELP)
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    b.set_defaults(func=cmd_enclave_build)


def _add_build_runtime(b: argparse.ArgumentParser) -> None:
    """What the enclave may do: threads, plaintext results, bundle versions, the directories it may open."""
    b.add_argument(
        "--threads",
        type=int,
        default=4,
        help="compute threads in the enclave (OMP_NUM_THREADS; default 4): predict runs that many batches at once, "
        "serve that many threads inside each stage; sgx.max_threads counts them",
    )
    b.add_argument(
        "--allow-plaintext-result", action="store_true", help="let predict --plaintext-result work in the enclave"
    )
    b.add_argument(
        "--allow-full-model",
        action="store_true",
        help="let the host run --full-model (every sample through every stage, the thresholds ignored: for "
        "comparisons); measured, and each owner's policy must consent",
    )
    b.add_argument(
        "--min-model-version",
        type=int,
        default=None,
        metavar="N",
        help="refuse older bundles (measured; default: the bundle's model version)",
    )
    b.add_argument(
        "--io-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of requests and results, the only data the enclave may open besides the bundle "
        "(repeatable; default DIR/io)",
    )
    b.add_argument(
        "--stats-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory for --stats-json/--mprofile output (repeatable)",
    )


def _add_build_signing(b: argparse.ArgumentParser) -> None:
    """How the enclave is signed, and the TCB statuses the printed policy snippet accepts."""
    b.add_argument(
        "--signing-key",
        metavar="PEM",
        help="gramine-sgx-sign --key (default ~/.config/gramine/enclave-key.pem; "
        "create one with gramine-sgx-gen-private-key)",
    )
    b.add_argument(
        "--dev-key",
        metavar="FILE",
        help="--attest simulated: the development attestation key the owners share (made if absent; "
        "default ~/.config/branchy-tee/dev-attestation-key/ed25519.key); the release statement carries "
        "its public key and policies pin it",
    )
    b.add_argument("--isv-prod-id", type=int, default=0, help="sgx.isvprodid (default 0)")
    b.add_argument("--isv-svn", type=int, default=0, help="sgx.isvsvn, raise it with every security fix (default 0)")
    b.add_argument(
        "--accept-tcb",
        action="append",
        default=None,
        metavar="STATUS",
        help="TCB status the policy snippet accepts (repeatable; default UpToDate)",
    )


def _add_build_sizing(b: argparse.ArgumentParser) -> None:
    """What the enclave is sized for (sgx.enclave_size, sgx.max_threads) and its environment."""
    b.add_argument(
        "--batch-size", type=int, default=64, help="largest predict --batch-size to size the enclave for (default 64)"
    )
    b.add_argument(
        "--max-samples", type=int, default=4096, help="most samples per run to size the enclave for (default 4096)"
    )
    b.add_argument(
        "--env",
        default=ENCLAVE_ENV,
        metavar="DIR",
        help=f"the enclave's Python environment, made when missing (default {ENCLAVE_ENV}; see `enclave env`)",
    )
    b.add_argument(
        "--enclave-size",
        metavar="SIZE",
        help="sgx.enclave_size (e.g. 1G) instead of measuring the runtime: to reproduce a build (its "
        "enclave.json has the size)",
    )
    b.add_argument(
        "--serve", action="store_true", help="the enclave runs `serve` (online, attested TLS) instead of `predict`"
    )
    b.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="serve: concurrent connections to have threads for (sgx.max_threads; default 64); measured: "
        "serve --max-connections may only be lower",
    )
    b.add_argument(
        "--max-inflight-mib",
        type=int,
        default=256,
        help="serve: request bytes being read or waiting, counted twice, that sgx.enclave_size holds "
        "(default 256); measured: serve may only lower it",
    )
    b.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="serve: waiting requests (default 256); measured, may only be lowered",
    )


def _add_env(esub) -> None:
    e = esub.add_parser(
        "env",
        help="make (or check and reuse) the enclave's own Python environment",
        description="Make DIR: the standard library without test suites and the like, and only the packages the "
        "enclave-side code imports (the `enclave` extra of pyproject.toml, pinned; constraints.txt pins "
        "what they pull in), without .pyc, headers, stubs and tests. "
        "`enclave build` does this too.",
    )
    e.add_argument("--env", default=ENCLAVE_ENV, metavar="DIR", help=f"default {ENCLAVE_ENV}")
    e.add_argument("--json", action="store_true", help="print a JSON summary")
    e.set_defaults(func=cmd_enclave_env)


def _add_run(esub) -> None:
    r = esub.add_parser(
        "run",
        help="run predict (or serve) in the enclave: gramine-sgx, gramine-direct or natively",
        usage="branchy-tee enclave run [-h] [--backend {sgx,direct,native}] DIR -- {predict,serve} ARGS...",
        description="Launch the enclave built in DIR: `gramine-sgx ./branchy-tee ARGS` (sgx), `gramine-direct "
        "./branchy-tee ARGS` (direct), or `python -m branchy_tee.tee.predict ARGS` (`.server` for "
        "serve) from the enclave environment with the manifest's environment (native). The command must "
        "be the one the enclave was built for (serve: `enclave build --serve`). "
        "Exits with its exit code.",
    )
    r.add_argument("--backend", choices=LaunchBackend.names(), default=LaunchBackend.SGX.value, help="default sgx")
    r.add_argument("--gramine", metavar="DIR", help=GRAMINE_HELP)
    r.add_argument("dir", metavar="DIR", help="the build directory of `enclave build`")
    r.add_argument("predict_args", nargs=argparse.REMAINDER, metavar="-- {predict,serve} ARGS", help="its arguments")
    r.set_defaults(func=cmd_enclave_run)


def _add_release(esub) -> None:
    rel = esub.add_parser(
        "release",
        help="(model owner) sign a release statement for the enclave you built (reproduced) in DIR",
        description="Sign, with the model owner's identity, what the enclave built in DIR is: its measurement "
        "(MRENCLAVE, MRSIGNER; the simulated measurement for --attest simulated) and what it pins (bundle "
        "id, model version, model key id, minimum version, model broker and its identity). Build it "
        "yourself from the same commit and bundle first: "
        "never sign a measurement the host printed.",
    )
    rel.add_argument("dir", metavar="DIR")
    rel.add_argument(
        "--identity", required=True, metavar="FILE", help="the model owner's identity (`keygen --identity`)"
    )
    rel.add_argument(
        "--model-key",
        required=True,
        metavar="FILE",
        help="your model key: the enclave must pin your bundle, sealed under it",
    )
    rel.add_argument(
        "--model-broker-identity", metavar="HEX", help="your key broker's identity, if it is not the --identity itself"
    )
    rel.add_argument("--out", required=True, metavar="release.json", help="the statement to write")
    rel.add_argument("--json", action="store_true", help="print the statement as JSON")
    rel.set_defaults(func=cmd_enclave_release)


def _add_policy(esub) -> None:
    pol = esub.add_parser(
        "policy",
        help="(owners) verify a model owner's release statement and write a key-broker policy from it",
        description="Verify release.json under the model owner's identity and write a key-broker policy that "
        "releases keys only to the enclave it names "
        "(MRENCLAVE pinned, no debug, minimum model version).",
    )
    pol.add_argument(
        "--release", required=True, metavar="release.json", help="the model owner's signed release statement"
    )
    pol.add_argument(
        "--model-owner", required=True, metavar="HEX", help="the model owner's identity, known out of band"
    )
    pol.add_argument("--out", required=True, metavar="POLICY.toml", help="the broker policy to write")
    pol.add_argument(
        "--accept-tcb",
        action="append",
        default=None,
        metavar="STATUS",
        help="TCB status to accept (repeatable; default UpToDate)",
    )
    pol.add_argument("--collateral", metavar="FILE", help="collateral file for DCAP quotes (dcap-qvl layout)")
    pol.add_argument(
        "--allowed-data-owner",
        action="append",
        default=None,
        metavar="HEX",
        help="(model owner's own policy) a data owner's identity that may use the model (repeatable)",
    )
    for name, (_, what) in DANGEROUS.items():  # one consent flag per dangerous setting a release may name
        pol.add_argument(f"--allow-{name}", action="store_true", help=f"consent to {what}")
    pol.add_argument("--json", action="store_true", help="print a JSON summary")
    pol.set_defaults(func=cmd_enclave_policy)


def cmd_enclave_env(args) -> int:
    from branchy_tee.gramine.env import count_files, ensure_env

    e = ensure_env(args.env, log=progress)
    summary = {
        "env": e.dir,
        "python": e.python,
        "requirements": e.requirements,
        "packages": e.packages,
        "unpinned": e.unpinned,
        "files": count_files(e.home_lib),
        "status": e.status,
    }
    if args.json:
        emit_json(summary)
        return 0
    print(
        f"{e.status} {e.dir}: Python {e.python}, {summary['files']} files; "
        + " ".join(f"{n}=={v}" for n, v in sorted(e.packages.items()))
    )
    if e.unpinned:
        warn(f"not pinned by the enclave extra or constraints.txt: {', '.join(e.unpinned)}")
    return 0


def cmd_enclave_build(args) -> int:
    from branchy_tee.gramine.build import build

    use_gramine(args.gramine)
    s = build(_build_options(args), log=progress)
    for w in s["warnings"]:
        warn(w)
    if args.json:
        emit_json(s)
    else:
        _print_build(s, args.sgx)
    return 0


def _build_options(args):
    from branchy_tee.gramine.build import BuildOptions

    return BuildOptions(
        bundle=args.bundle,
        out=args.out,
        sgx=args.sgx,
        debug=args.debug,
        edmm=args.edmm,
        model_broker=args.model_broker,
        model_broker_identity=args.model_broker_identity,
        data_brokers=args.data_broker,
        attest=args.attest,
        threads=args.threads,
        allow_plaintext_result=args.allow_plaintext_result,
        allow_full_model=args.allow_full_model,
        min_model_version=args.min_model_version,
        signing_key=args.signing_key,
        io_dirs=args.io_dir,
        stats_dirs=args.stats_dir,
        broker_ca=args.broker_ca,
        isv_prod_id=args.isv_prod_id,
        isv_svn=args.isv_svn,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        accepted_tcb_statuses=args.accept_tcb or ["UpToDate"],
        env=args.env,
        enclave_size=args.enclave_size,
        dev_key=args.dev_key,
        serve=args.serve,
        max_connections=args.max_connections,
        max_inflight_mib=args.max_inflight_mib,
        max_queue=args.max_queue,
    )


def _print_build(s: dict, sgx: bool) -> None:
    print(f"wrote {s['manifest']} (rendered by {s['rendered_by']})")
    if s["manifest_sha256"]:
        print(
            f"  trusted files {s['trusted_files']:,}; hashed manifest {s['manifest_bytes'] / 1e6:.2f} MB, "
            f"SHA-256 {s['manifest_sha256']}"
        )
    else:
        print(
            f"  trusted files {s['trusted_files']:,} (counted by branchy-tee); the hashed manifest, its size and its "
            "SHA-256 come from gramine-manifest (`make` in the build directory)"
        )
    print(f"  enclave environment {s['env']}: {' '.join(s['env_requirements'])}")
    _print_enclave_size(s)
    print(
        f"  sgx.max_threads {s['max_threads']}, debug {'yes' if s['debug'] else 'no'}, "
        f"EDMM {'yes' if s['edmm'] else 'no'}"
    )
    print(
        f"wrote {s['makefile']}: `make SGX=1` in {s['dir']} builds and signs for gramine-sgx, "
        "`make` builds for gramine-direct"
    )
    print(
        f"  measured: bundle {s['bundle_id']} (model key id {s['model_key_id']}, minimum model version "
        f"{s['min_model_version']}); model broker {s['model_broker'] or 'none'}"
        + (f" (identity {s['model_broker_identity']})" if s["model_broker_identity"] else "")
    )
    if s["signed"]:
        print(f"signed: {s['sgx_manifest']}, {s['sigstruct']}")
        print(f"MRENCLAVE {s['mrenclave']}")
        print(f"MRSIGNER  {s['mrsigner']}")
    else:
        print(
            f"NOT SIGNED: nothing was signed ({'no --sgx' if not sgx else 'Gramine missing'}); on an SGX machine "
            f"with Gramine run `make SGX=1` in {s['dir']}"
        )
    print(
        f"the model owner reproduces this build and signs it: `branchy-tee enclave release {s['dir']} --identity "
        "mo.id --model-key mo.key --out release.json`"
    )


def _print_enclave_size(s: dict) -> None:
    """sgx.enclave_size: given, or measured and how (peak, margin and its terms, spare)."""
    mib = 2**20
    d = s["enclave_size_detail"]
    if d["given"]:
        print(f"  sgx.enclave_size {s['enclave_size']} (given with --enclave-size, not measured)")
        return
    t = {k: v / mib for k, v in d["terms"].items()}
    print(
        f"  sgx.enclave_size {s['enclave_size']}: measured peak {t['measured_peak']:.0f} MiB "
        f"(VmPeak, {d['samples']} samples at batch size {d['batch_size']}"
        f"{', measured earlier' if d['cached'] else ''}) + margin "
        f"{d['margin'] / mib:.0f} MiB (inputs of a full run {t['inputs_not_run']:.0f}, waiting samples "
        f"{t['parked_samples']:.0f}, Gramine {t['gramine']:.0f}"
        + (f", serve's in-flight requests {t['inflight_requests']:.0f}" if t.get("inflight_requests") else "")
        + f") = {d['need'] / mib:.0f} MiB, {d['spare'] / mib:.0f} MiB spare"
    )
    if t.get("inflight_requests"):
        print(
            f"  serve: in-flight {t['inflight_requests']:.0f} MiB (the queue's waiting requests counted in it) + "
            f"peak {t['measured_peak']:.0f} + waiting samples {t['parked_samples']:.0f} + Gramine's share "
            f"{t['gramine']:.0f} MiB = {d['need'] / mib:.0f} MiB <= sgx.enclave_size {s['enclave_size']}; "
            "the measured caps (--max-connections, --max-inflight-mib, --max-queue) may only be lowered by the host"
        )
    g = d.get("gramine_direct")
    if g is None:
        print("  (gramine-direct not installed: sized from the native run only)")
        return
    print(
        f"  under gramine-direct: VmPeak {g['vm_peak'] / mib:.0f} MiB{' (measured earlier)' if g['cached'] else ''} "
        f"+ margin {g['margin'] / mib:.0f} MiB (inputs {g['terms']['inputs_not_run'] / mib:.0f}, waiting samples "
        f"{g['terms']['parked_samples'] / mib:.0f}, SGX-only {g['terms']['gramine'] / mib:.0f}) = "
        f"{g['need'] / mib:.0f} MiB -> {g['enclave_size_str']}; the larger of the two is used"
    )


def cmd_enclave_run(args) -> int:
    from branchy_tee.gramine.launch import run_enclave, split_run_arguments

    head, command, command_args = split_run_arguments(args.predict_args)
    if head:  # run options given after DIR: `enclave run DIR --backend native -- predict ...`
        p = ArgumentParser(prog=f"{PROG} enclave run")
        p.add_argument("--backend", choices=LaunchBackend.names(), default=args.backend)
        p.add_argument("--gramine", default=args.gramine)
        late = p.parse_args(head)
        args.backend, args.gramine = late.backend, late.gramine
    use_gramine(args.gramine)
    return run_enclave(args.dir, args.backend, command_args, command)


def cmd_enclave_release(args) -> int:
    from branchy_tee.core.fileio import read_key_file
    from branchy_tee.gramine.release import write_release
    from branchy_tee.tee.attest.identity import load_identity

    s, signature = write_release(
        args.dir, load_identity(args.identity), args.out, read_key_file(args.model_key), args.model_broker_identity
    )
    if args.json:
        emit_json(s.signed_json(signature))
        return 0
    for name in s.dangerous:
        print(f"branchy-tee: warning: {DANGEROUS[name][1]}: each owner's policy needs --allow-{name}", file=sys.stderr)
    print(f"wrote {args.out}: release statement signed by {s.model_owner}")
    print(f"  MRENCLAVE {s.mrenclave} ({s.attest})")
    print(f"  bundle {s.bundle_id} (model version {s.model_version}), model broker identity {s.model_broker_identity}")
    return 0


def cmd_enclave_policy(args) -> int:
    from branchy_tee.gramine.release import write_policy_from_release

    statement = write_policy_from_release(
        args.release,
        args.model_owner,
        args.out,
        accepted_tcb_statuses=args.accept_tcb or ["UpToDate"],
        collateral=args.collateral,
        allowed_data_owners=args.allowed_data_owner,
        consent=[n for n in DANGEROUS if getattr(args, f"allow_{n.replace('-', '_')}")],
    )
    if args.json:
        emit_json({"policy": args.out, "release": statement.to_json()})
        return 0
    print(f"release statement verified (signed by the model owner {args.model_owner})")
    print(
        f"wrote {args.out}: releases keys only to MRENCLAVE {statement.mrenclave} "
        f"(bundle {statement.bundle_id}, model version >= {statement.min_model_version})"
    )
    return 0
