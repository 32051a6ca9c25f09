"""How predict and serve start: whom the enclave trusts, decided once, before anything is read.

Inside an enclave (the manifest's ``loader.env`` sets ``BRANCHY_TEE_ENCLAVE=1``, so it is part of
MRENCLAVE) the measured settings decide: the host may repeat them on the command line, never change
them, and keys come only from attested key release. Outside (development, the native backend) the
command line decides. Either way the result is one frozen :class:`Trust`; nothing rewrites ``args``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

from branchy_tee.core.choices import EvidenceProvider
from branchy_tee.core.errors import IntegrityError, UsageError, shown
from branchy_tee.tee import measured

if TYPE_CHECKING:
    from branchy_tee.tee.attest.client import AttestedKeys
    from branchy_tee.tee.keysource import KeySource
    from branchy_tee.tee.sealed.header import BundleHeader

Log = Callable[[str], None]

ATTESTATION_DIR = "/dev/attestation"  # Gramine's pseudo-files


def _no_log(msg: str) -> None:
    pass


def _log_to_stderr(msg: str) -> None:
    print(f"[enclave] {msg}", file=sys.stderr, flush=True)


def make_log(quiet: bool) -> Log:
    """The enclave's progress messages: to stderr, or nowhere with --quiet."""
    return _no_log if quiet else _log_to_stderr


def compute_threads(requested: int | None, env: Mapping[str, str] = os.environ) -> int:
    """--threads, else OMP_NUM_THREADS (measured inside an enclave), else 1."""
    return requested or int(env.get("OMP_NUM_THREADS", "0") or 0) or 1


def add_trust_arguments(p: argparse.ArgumentParser, *, data_brokers: bool, build: bool = False) -> None:
    """The attestation options, the same for predict, serve and ``enclave build`` (where they are
    measured, and ``--attest`` defaults to DCAP)."""
    where = "measured" if build else "inside an enclave: measured"
    g = p.add_argument_group("keys by remote attestation")
    g.add_argument(
        "--attest",
        choices=EvidenceProvider.names(),
        default=EvidenceProvider.GRAMINE.value if build else None,
        help=f"evidence provider ({where}; "
        + ("default gramine: DCAP)" if build else "default: none, keys from files or the measured setting)"),
    )
    g.add_argument("--model-broker", metavar="URL", help=f"the model owner's key broker ({where})")
    g.add_argument(
        "--model-broker-identity",
        metavar="HEX",
        help=f"its identity, 64 hex as `keygen --identity` prints ({where}): only releases it signed are accepted",
    )
    if data_brokers:
        g.add_argument(
            "--data-broker",
            action="append",
            default=[],
            metavar="URL",
            help="a data owner's key broker (repeatable"
            + ("; measured)" if build else "; its identity must be on the model owner's signed allow-list)"),
        )
    g.add_argument("--broker-ca", metavar="PEM", help=f"CA certificate of brokers served over HTTPS ({where})")
    if not build:
        g.add_argument("--attestation-dir", default=ATTESTATION_DIR, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class Trust:
    """Whom this run trusts for its keys and which bundle it may serve (``None``: not pinned)."""

    attest: str | None
    model_broker: str | None
    model_broker_identity: str | None
    data_brokers: tuple[str, ...]
    broker_ca: str | None
    attestation_dir: str
    min_version: int
    bundle_id: str | None
    model_key_id: str | None
    model_key_file: str | None = None
    data_key_files: tuple[str, ...] = ()

    def check_pins(self, header: BundleHeader, what: str) -> None:
        """The bundle must be the one the enclave was built for (measured bundle id and model key id)."""
        for value, pinned, name in (
            (header.bundle_id, self.bundle_id, "bundle"),
            (header.key_id, self.model_key_id, "model key id"),
        ):
            if pinned is not None and value != pinned:
                raise IntegrityError(
                    f"{what}: {name} {shown(value, 40)} is not the measured {name} {pinned} "
                    "this enclave serves (another model is refused)"
                )

    def attested_keys(self, data_brokers: bool = True) -> AttestedKeys:
        from branchy_tee.tee.attest.client import AttestedKeys
        from branchy_tee.tee.attest.identity import parse_identity

        assert self.attest and self.model_broker and self.model_broker_identity  # checked by the caller
        return AttestedKeys(
            self.attest,
            self.model_broker,
            parse_identity(self.model_broker_identity, "--model-broker-identity"),
            list(self.data_brokers) if data_brokers else [],
            attestation_dir=self.attestation_dir,
            ca_file=self.broker_ca,
            min_version=self.min_version,
            settings=measured.settings_binding(os.environ),
        )

    def key_source(self) -> KeySource:
        """predict's keys: from the brokers after attestation, or (development only) from files."""
        if self.attest:
            if self.model_key_file or self.data_key_files:
                raise UsageError("use either key files (--model-key/--data-key) or --attest, not both")
            if not self.model_broker or not self.model_broker_identity or not self.data_brokers:
                raise UsageError(
                    "--attest needs --model-broker URL, --model-broker-identity HEX and at least one --data-broker URL"
                )
            return self.attested_keys()
        if not self.model_key_file or not self.data_key_files:
            raise UsageError("give --model-key and --data-key files, or --attest with key brokers")
        from branchy_tee.tee.keysource import FileKeys

        return FileKeys(self.model_key_file, list(self.data_key_files), self.min_version)

    def model_keys(self) -> AttestedKeys:
        """serve's keys: the model key (and the allow-list) from the model broker, always attested."""
        if not self.attest or not self.model_broker or not self.model_broker_identity:
            raise UsageError(
                "serve needs --attest, --model-broker URL and --model-broker-identity HEX "
                "(inside an enclave they are measured)"
            )
        return self.attested_keys(data_brokers=False)


def _measured_only(given: str | None, value: str, option: str, what: str) -> str | None:
    """Inside the enclave ``value`` (measured) decides; the host may repeat it, never change it."""
    if given and given != value:
        raise UsageError(
            f"inside the enclave {what} comes only from its measured settings; {option} {shown(given)} "
            f"is refused (measured: {shown(value) if value else 'none'})"
        )
    return value or None


def _from_command_line(args: argparse.Namespace) -> Trust:
    return Trust(
        attest=args.attest,
        model_broker=args.model_broker,
        model_broker_identity=args.model_broker_identity,
        data_brokers=tuple(getattr(args, "data_broker", ())),
        broker_ca=args.broker_ca,
        attestation_dir=args.attestation_dir,
        min_version=args.min_version,
        bundle_id=None,
        model_key_id=None,
        model_key_file=getattr(args, "model_key", None),
        data_key_files=tuple(getattr(args, "data_key", ())),
    )


def _from_measured(args: argparse.Namespace, env: Mapping[str, str], command: str) -> Trust:
    """Keys only from attested key release: the model key from the measured model broker, signed by
    its measured identity, for the measured bundle and model key id. Data-broker URLs may come from
    the command line (their identities are checked against the model owner's signed allow-list)."""
    if getattr(args, "model_key", None) or getattr(args, "data_key", None):
        raise UsageError(
            "inside the enclave keys come only from attested key release; --model-key/--data-key are refused"
        )
    if getattr(args, "plaintext_result", None) and env.get(measured.ALLOW_PLAINTEXT) != "1":
        raise UsageError("this enclave was built without plaintext results; --plaintext-result is refused")
    if getattr(args, "full_model", None) and env.get(measured.ALLOW_FULL_MODEL) != "1":
        raise UsageError(
            "this enclave was built without --allow-full-model: --full-model (ignoring the model owner's "
            "thresholds) is refused"
        )
    entry = env.get(measured.ENTRY, "")
    if entry and entry != command:
        raise UsageError(f"this enclave was built to run {entry}, not {command}")
    attest = env.get(measured.ATTEST) or EvidenceProvider.GRAMINE.value
    if args.attest and args.attest != attest:
        raise UsageError(f"--attest {args.attest} differs from the enclave's measured setting {attest}")
    broker = _measured_only(args.model_broker, env.get(measured.MODEL_BROKER, ""), "--model-broker", "the model broker")
    identity = _measured_only(
        args.model_broker_identity,
        env.get(measured.MODEL_BROKER_IDENTITY, ""),
        "--model-broker-identity",
        "the model broker's identity",
    )
    if not broker or not identity:
        raise UsageError(
            "this enclave was built without a model broker and its identity (measured "
            f"{measured.MODEL_BROKER} is empty), so it can never get the model key; rebuild it with "
            "`enclave build --model-broker URL --model-broker-identity HEX`"
        )
    bundle_id, model_key_id = env.get(measured.BUNDLE_ID) or None, env.get(measured.MODEL_KEY_ID) or None
    if not bundle_id or not model_key_id:
        raise UsageError(
            f"this enclave was built without a measured bundle ({measured.BUNDLE_ID}, {measured.MODEL_KEY_ID} "
            "are empty); rebuild it with `enclave build --bundle B`"
        )
    data_brokers = getattr(args, "data_broker", None) or [u for u in env.get(measured.DATA_BROKERS, "").split(",") if u]
    return Trust(
        attest=attest,
        model_broker=broker,
        model_broker_identity=identity,
        data_brokers=tuple(data_brokers),
        broker_ca=env.get(measured.BROKER_CA) or None,
        attestation_dir=ATTESTATION_DIR,  # never a host-chosen directory
        min_version=max(args.min_version, int(env.get(measured.MIN_MODEL_VERSION, "0") or 0)),
        bundle_id=bundle_id,
        model_key_id=model_key_id,
    )


def trust(args: argparse.Namespace, command: str, env: Mapping[str, str] = os.environ) -> Trust:
    """The run's :class:`Trust`: from the measured settings inside an enclave, else the command line.

    ``args`` holds :func:`add_trust_arguments`' options and ``--min-version``; predict's also holds
    key files and ``--plaintext-result`` (serve has neither)."""
    return _from_measured(args, env, command) if measured.inside_enclave(env) else _from_command_line(args)
