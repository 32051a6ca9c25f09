"""Keys, sealing and encrypted data: keygen, seal, encrypt-input, decrypt-result, key-broker, quote."""

from __future__ import annotations

import json
import re
import sys

from branchy_tee.cli.common import emit_json, iso8601_utc, read_input, warn
from branchy_tee.core.commandline import ArgumentParser
from branchy_tee.core.errors import BranchyError, UsageError, shown


def add_quote(sub) -> None:
    p = sub.add_parser("quote", help="SGX/TDX DCAP quotes")
    qsub = p.add_subparsers(dest="quote_command", metavar="SUBCOMMAND", parser_class=ArgumentParser)
    qsub.required = True
    v = qsub.add_parser(
        "verify",
        help="verify a DCAP quote (PCK chain to the Intel root, signatures; TCB status with --collateral)",
    )
    v.add_argument("quote", metavar="QUOTE", help="raw quote file (e.g. Gramine's /dev/attestation/quote)")
    v.add_argument("--collateral", metavar="FILE", help="collateral JSON (dcap-qvl layout) for the TCB status")
    v.add_argument("--now", metavar="ISO8601", type=iso8601_utc, help="verification time (default: now)")
    v.add_argument("--root", metavar="PEM", help="pinned root CA (default: the bundled Intel SGX Root CA)")
    v.add_argument("--json", action="store_true", help="print the claims as a JSON object")
    v.set_defaults(func=cmd_quote_verify)


def cmd_quote_verify(args) -> int:
    from branchy_tee.verifier.dcap import read_collateral_file, verify_quote

    data = read_input(args.quote, "quote")
    root = read_input(args.root, "root CA") if args.root else None
    collateral = read_collateral_file(args.collateral) if args.collateral else None
    vq = verify_quote(data, collateral=collateral, now=args.now, root_pem=root)
    for w in vq.warnings:
        warn(w)
    if args.json:
        emit_json(vq.to_json())
        return 0
    tee = "TDX" if vq.tee == "tdx" else "SGX"
    if vq.tcb_status is None:
        tcb = "not checked (no --collateral)"
    else:
        tcb = vq.tcb_status + (f" ({', '.join(vq.advisories)})" if vq.advisories else "")
    names = ("MRTD", "MRSIGNERSEAM") if vq.tee == "tdx" else ("MRENCLAVE", "MRSIGNER")
    print(f"quote OK: {tee} quote v{vq.version}, PCK chain and signatures verify")
    print(f"  {names[0]:<12} {vq.mrenclave.hex()}")
    print(f"  {names[1]:<12} {vq.mrsigner.hex()}")
    if vq.tee == "sgx":
        print(f"  {'ISVPRODID':<12} {vq.isv_prod_id}   ISVSVN {vq.isv_svn}")
    print(f"  {'DEBUG':<12} {'yes' if vq.debug else 'no'}")
    print(f"  {'REPORTDATA':<12} {vq.report_data.hex()}")
    print(f"  {'FMSPC':<12} {vq.fmspc}   PCE-ID {vq.pce_id}")
    print(f"  {'TCB status':<12} {tcb}")
    return 0


def add_keygen(sub) -> None:
    p = sub.add_parser(
        "keygen", help="create a random 256-bit key, or with --identity a party's Ed25519 identity (mode 0600)"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", metavar="FILE", help="file to create (never overwritten)")
    g.add_argument(
        "--show", metavar="FILE", help="print the identity (or key id) of an existing file again; writes nothing"
    )
    p.add_argument(
        "--identity",
        action="store_true",
        help="an Ed25519 identity (PEM) for a key broker, the model owner or a data owner; prints "
        "`identity: <64 hex>`, the public part others pin",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_keygen)


def _show_key(path: str, as_json: bool) -> int:
    """An identity file's identity, or a key file's key id (read, checked, nothing written)."""
    from branchy_tee.core.fileio import read_key_file
    from branchy_tee.core.keys import key_id
    from branchy_tee.tee.attest.identity import identity_hex, load_identity

    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise BranchyError(f"{path}: {e.strerror or e}") from None
    if head.startswith(b"-----BEGIN"):
        doc = {"identity_file": path, "identity": identity_hex(load_identity(path))}
    else:
        doc = {"key_file": path, "key_id": key_id(read_key_file(path))}
    if as_json:
        emit_json(doc)
    else:
        print(f"identity: {doc['identity']}" if "identity" in doc else f"key id: {doc['key_id']}")
    return 0


def cmd_keygen(args) -> int:
    from branchy_tee.core.fileio import write_key_file
    from branchy_tee.core.keys import generate_key, key_id

    if args.show:
        return _show_key(args.show, args.json)
    if args.identity:
        from branchy_tee.tee.attest.identity import create_identity, identity_hex

        public = identity_hex(create_identity(args.out))
        if args.json:
            emit_json({"identity_file": args.out, "identity": public})
        else:
            print(f"wrote {args.out} (Ed25519 identity, mode 0600)")
            print(f"identity: {public}")
        return 0
    key = generate_key()
    write_key_file(args.out, key)
    if args.json:
        emit_json({"key_file": args.out, "key_id": key_id(key)})
    else:
        print(f"wrote {args.out} (key id {key_id(key)})")
    return 0


def add_seal(sub) -> None:
    p = sub.add_parser(
        "seal",
        help="seal a trained run into an encrypted, authenticated model bundle",
        description="Encrypt the run's exported stage graphs (exported first if missing or stale), one "
        "AES-256-GCM file per stage, under an authenticated header.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--key", required=True, metavar="MODEL_KEY", help="the model owner's key file")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to create, e.g. model.btee")
    p.add_argument("--version", type=int, default=1, help="model version (brokers can refuse older ones)")
    p.add_argument("--chunk-size", type=int, help="AEAD chunk size in bytes (default 1 MiB)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_seal)


def cmd_seal(args) -> int:
    from branchy_tee.core.fileio import read_key_file
    from branchy_tee.seal.bundle import seal_run
    from branchy_tee.tee.sealed.aead import DEFAULT_CHUNK

    key = read_key_file(args.key)
    chunk_size = DEFAULT_CHUNK if args.chunk_size is None else args.chunk_size
    header = seal_run(args.run_dir, key, args.out, version=args.version, chunk_size=chunk_size, show=not args.json)
    summary = {
        "bundle": args.out,
        "bundle_id": header.bundle_id,
        "model_version": header.model_version,
        "key_id": header.key_id,
        "stages": [s.sealed_size for s in header.stages],
    }
    if args.json:
        emit_json(summary)
    else:
        sizes = ", ".join(f"{s / 2**20:.2f}" for s in summary["stages"])
        print(
            f"sealed {header.arch} v{args.version} into {args.out} (bundle {header.bundle_id}, "
            f"model key id {header.key_id}); "
            f"stage files (MiB): {sizes}"
        )
    return 0


def add_encrypt_input(sub) -> None:
    p = sub.add_parser(
        "encrypt-input", help="(data owner) preprocess images or a tensor file and encrypt them as a request"
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG images, or a .safetensors/.npy/.pt tensor file")
    p.add_argument("--bundle", required=True, help="the sealed bundle (only its plaintext header is read)")
    p.add_argument("--key", required=True, metavar="DATA_KEY", help="the data owner's key file")
    p.add_argument("--out", required=True, metavar="REQUEST", help="the request file to create (never overwritten)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (its result then answers nothing)")
    p.add_argument("--request-id", help="default: a random id")
    p.add_argument("--resize", action="store_true", help="resize images of any size to the model's input")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_encrypt_input)


def cmd_encrypt_input(args) -> int:
    from branchy_tee.client.envelopes import new_request_id, seal_request
    from branchy_tee.core.fileio import atomic_write_bytes, check_output, read_key_file
    from branchy_tee.data.preprocess import load_inputs
    from branchy_tee.tee.sealed.bundle import read_header_unverified
    from branchy_tee.tee.sealed.envelope import check_request_id, request_digest

    check_output(args.out, "--out", [*args.inputs, args.key], replace=args.force)
    request_id = check_request_id(args.request_id) if args.request_id is not None else new_request_id()
    key = read_key_file(args.key)
    notes: list[str] = []
    x = load_inputs(args.inputs, read_header_unverified(args.bundle).preprocessing, args.resize, notes)
    for note in notes:
        print(note, file=sys.stderr)
    sealed = seal_request(x, key, request_id)
    atomic_write_bytes(args.out, sealed, mode=0o644)
    digest = request_digest(sealed)
    if args.json:
        emit_json({"request": args.out, "request_id": request_id, "samples": len(x), "request_sha256": digest})
    else:
        print(f"wrote {args.out}: {len(x)} samples, request id {request_id}")
        print(f"request digest (SHA-256; its result binds it): {digest}")
    return 0


def add_decrypt_result(sub) -> None:
    p = sub.add_parser(
        "decrypt-result",
        help="(data owner) verify and decrypt the result of one of your requests",
        description="Open a result only as the answer to the request it answers: give that request "
        "file (--request) or its digest (--request-digest, printed by encrypt-input). A "
        "result for any other request, e.g. an old one replayed for a reused request id, is "
        "refused. Prints which sealed model answered.",
    )
    p.add_argument("result", metavar="RESULT")
    p.add_argument("--key", required=True, metavar="DATA_KEY", help="the data owner's key file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--request", metavar="REQUEST", help="the request file this result answers")
    which.add_argument("--request-digest", metavar="HEX", help="that request's SHA-256 (encrypt-input prints it)")
    p.add_argument("--expect-bundle", metavar="ID", help="refuse a result answered by any other sealed bundle")
    p.add_argument("--out", metavar="FILE", help="also write the records as JSON to FILE")
    p.add_argument(
        "--json",
        action="store_true",
        help="print {request_id, request_sha256, bundle_id, model_version, model_key_id, records: "
        "[{index, label, class_name, confidence, exit}]}",
    )
    p.set_defaults(func=cmd_decrypt_result)


def cmd_decrypt_result(args) -> int:
    from branchy_tee.client.envelopes import open_result
    from branchy_tee.core.fileio import atomic_write_text, read_key_file
    from branchy_tee.tee.sealed.envelope import read_file, request_digest

    if args.request is not None:
        digest = request_digest(read_file(args.request, "request"))
    else:
        digest = args.request_digest.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise UsageError("--request-digest is a SHA-256: 64 hex characters")
    key = read_key_file(args.key)
    header, records = open_result(read_file(args.result, "result"), key, args.result, digest)
    model = header.model
    if args.expect_bundle is not None and model.bundle_id != args.expect_bundle:
        raise BranchyError(
            f"{args.result} was answered by bundle {shown(model.bundle_id, 40)}, not the expected "
            f"{shown(args.expect_bundle, 40)}"
        )
    if args.out:
        atomic_write_text(args.out, json.dumps(records, indent=1) + "\n", mode=0o600)
    if args.json:
        emit_json(
            {
                "request_id": header.request_id,
                "request_sha256": header.request_sha256,
                **model.to_json(),
                "records": records,
            }
        )
        return 0
    print(f"result for request {header.request_id}: {len(records)} samples")
    print(
        f"answered by bundle {shown(model.bundle_id, 40)}, model version {shown(model.model_version)}, "
        f"model key id {shown(model.model_key_id, 20)}"
    )
    for r in records:
        print(f"{r['index']:>6}  {r['class_name']:<16} confidence {r['confidence']:.3f}  exit {r['exit']}")
    return 0


def add_key_broker(sub) -> None:
    p = sub.add_parser(
        "key-broker",
        help="(owner) release keys to attested enclaves that match a policy",
        description="Serve a key broker: enclaves attest (DCAP quote, or simulated evidence when the "
        "policy allows it) and get the keys the policy releases, HPKE-sealed to them. "
        "Stops on SIGINT/SIGTERM.",
    )
    p.add_argument(
        "--keys", required=True, metavar="KEYSTORE", help="directory of *.key files (mode 0600), or one key file"
    )
    p.add_argument(
        "--identity",
        required=True,
        metavar="FILE",
        help="the broker's Ed25519 identity (`keygen --identity`); it signs every key release",
    )
    p.add_argument("--policy", required=True, metavar="POLICY.toml", help="key-release policy (TOML)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on (port 0: any free port)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--audit-log", metavar="FILE", help="append one JSON line per decision (fsynced; never a key)")
    p.add_argument("--nonce-ttl", type=float, default=60.0, metavar="SECONDS", help="nonce lifetime (default 60)")
    p.add_argument("--quiet", action="store_true", help="no per-decision lines on stderr")
    p.set_defaults(func=cmd_key_broker)


def cmd_key_broker(args) -> int:
    from branchy_tee.broker.server import serve

    return serve(
        args.keys,
        args.policy,
        args.listen,
        identity=args.identity,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        audit_log=args.audit_log,
        nonce_ttl=args.nonce_ttl,
        quiet=args.quiet,
    )
