"""The enclave build's configuration (``DIR/enclave.json``): one typed record that the build writes
and the launcher and the model owner's release statement read, and the two things derived from it
that are measured: the manifest's ``loader.env`` (:func:`manifest_env`) and the template's values
(:func:`manifest_defines`).

``gramine.json`` also stores ``env`` and ``defines`` so that people can read them; :meth:`EnclaveConfig.parse`
recomputes both from the settings and refuses a file whose stored values differ (edited after the
build, so it no longer describes what is measured). Unknown or missing members are refused too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchy_tee.core.choices import EvidenceProvider
from branchy_tee.core.errors import BranchyError
from branchy_tee.tee import measured

CONFIG = "enclave.json"
CONFIG_FORMAT = "branchy-tee/enclave/v6"
ENTRIES = {"predict": "branchy_tee.tee.predict", "serve": "branchy_tee.tee.serve.server"}


@dataclass(frozen=True)
class EnclaveConfig:
    dir: str
    entry: str  # "predict" or "serve": what the entry script runs
    bundle: str
    bundle_files: tuple[str, ...]
    bundle_id: str
    model_key_id: str
    model_version: int
    arch: str
    io_dirs: tuple[str, ...]
    interpreter: str
    env_dir: str
    env_lib: str
    package_dir: str  # where the enclave's branchy_tee is (what simulated evidence measures)
    env_requirements: tuple[str, ...]
    env_packages: dict[str, str]
    libs: tuple[str, ...]
    arch_libdir: str
    ld_library_path: str
    launcher: str
    threads: int
    max_threads: int
    batch_size: int
    max_samples: int
    debug: bool
    edmm: bool
    isv_prod_id: int
    isv_svn: int
    attest: EvidenceProvider
    model_broker: str
    model_broker_identity: str
    data_brokers: tuple[str, ...]
    allow_plaintext: bool
    allow_full_model: bool
    min_model_version: int
    broker_ca: str | None
    accepted_tcb_statuses: tuple[str, ...]
    signing_key: str
    serve_caps: dict[str, int] = field(default_factory=dict)  # serve builds: measured.CAP_NAMES' caps
    dev_key: str = ""  # simulated builds: the development attestation key file (--dev-key; made by the build)
    enclave_size: str = ""
    enclave_size_detail: dict[str, Any] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return manifest_env(self)

    @property
    def defines(self) -> dict[str, str]:
        return manifest_defines(self)

    def replace(self, **changes) -> "EnclaveConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": CONFIG_FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            doc[f.name] = list(v) if isinstance(v, tuple) else v
        return {**doc, "env": self.env, "defines": self.defines}

    @classmethod
    def parse(cls, doc: object, where: str) -> "EnclaveConfig":
        if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT:
            old = isinstance(doc, dict) and str(doc.get("format", "")).startswith("branchy-tee/enclave/")
            raise BranchyError(
                f"{where}: "
                + (
                    "written by another branchy-tee; rebuild with `branchy-tee enclave build`"
                    if old
                    else "not a branchy-tee enclave configuration"
                )
            )
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(doc) != sorted(["format", *names, "env", "defines"]):
            raise BranchyError(f"{where}: not exactly the members an enclave configuration has")
        try:
            values: dict[str, Any] = {
                f.name: tuple(doc[f.name]) if "tuple" in str(f.type) and doc[f.name] is not None else doc[f.name]
                for f in dataclasses.fields(cls)
            }
            cfg = cls(**values)
        except TypeError as e:
            raise BranchyError(f"{where}: unusable ({e})") from None
        if cfg.entry not in ENTRIES:
            raise BranchyError(f"{where}: unknown entry {cfg.entry!r}")
        if cfg.attest not in EvidenceProvider.names():
            raise BranchyError(f"{where}: unknown evidence provider {ascii(str(cfg.attest))[:40]}")
        cfg = cfg.replace(attest=EvidenceProvider(cfg.attest))
        if doc["env"] != cfg.env or doc["defines"] != cfg.defines:
            raise BranchyError(
                f"{where} contradicts itself (its measured environment or manifest values differ from its "
                "settings): edited after the build; rebuild it"
            )
        return cfg


def manifest_env(cfg: EnclaveConfig) -> dict[str, str]:
    """The environment the manifest sets (loader.env), from the build configuration."""
    env = _env_but_digest(cfg)
    env[measured.SETTINGS_DIGEST] = settings_digest(cfg)
    if cfg.dev_key:
        env[measured.DEV_KEY] = cfg.dev_key
    return env


def _env_but_digest(cfg: EnclaveConfig) -> dict[str, str]:
    env = {
        "LD_LIBRARY_PATH": cfg.ld_library_path,
        "OMP_NUM_THREADS": str(cfg.threads),
        # one malloc arena: no 64 MiB reservation per thread (virtual memory is enclave memory)
        "MALLOC_ARENA_MAX": "1",
        "PYTHONHOME": cfg.env_dir,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONSAFEPATH": "1",
        # ONNX Runtime 1.32 starts Microsoft's 1DS telemetry at import on Linux: a device id and an event
        # database under $HOME/.cache, and HTTPS uploads. Never from an enclave.
        "ORT_DISABLE_TELEMETRY": "1",
        measured.ENCLAVE: "1",
        measured.ATTEST: str(cfg.attest),
        measured.MODEL_BROKER: cfg.model_broker,
        measured.MODEL_BROKER_IDENTITY: cfg.model_broker_identity,
        measured.DATA_BROKERS: ",".join(cfg.data_brokers),
        measured.BUNDLE_ID: cfg.bundle_id,
        measured.MODEL_KEY_ID: cfg.model_key_id,
        measured.MIN_MODEL_VERSION: str(cfg.min_model_version),
        measured.ALLOW_PLAINTEXT: "1" if cfg.allow_plaintext else "0",
        measured.ALLOW_FULL_MODEL: "1" if cfg.allow_full_model else "0",
        measured.ENTRY: cfg.entry,
    }
    if cfg.serve_caps:
        env[measured.SERVE_CAPS] = measured.serve_caps_text(cfg.serve_caps)
    if cfg.broker_ca:
        env[measured.BROKER_CA] = cfg.broker_ca
    return env


def loader_env_toml(env: dict[str, str]) -> str:
    """loader.env as a TOML inline table: every value is a checked path, URL, hex or number (no quotes)."""
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items()) + " }"


def manifest_defines(cfg: EnclaveConfig) -> dict[str, str]:
    """The template's values, as the strings gramine-manifest's -D options carry."""
    return {"loader_env": loader_env_toml(manifest_env(cfg)), **_defines_but_env(cfg)}


def _defines_but_env(cfg: EnclaveConfig) -> dict[str, str]:
    return {
        "log_level": "warning" if cfg.debug else "error",
        "launcher": cfg.launcher,
        "python": cfg.interpreter,
        "python_home": cfg.env_dir,
        "python_lib": cfg.env_lib,
        "libs": ":".join(cfg.libs),
        "arch_libdir": cfg.arch_libdir,
        "max_threads": str(cfg.max_threads),
        "enclave_size": cfg.enclave_size,
        "debug": "true" if cfg.debug else "false",
        "edmm": "true" if cfg.edmm else "false",
        "isvprodid": str(cfg.isv_prod_id),
        "isvsvn": str(cfg.isv_svn),
        "broker_ca": cfg.broker_ca or "",
        "dev_key": cfg.dev_key,
        "dev_key_dir": os.path.dirname(cfg.dev_key),
        "bundle_dir": cfg.bundle,
        "bundle_files": ":".join(cfg.bundle_files),
        "io_dirs": ":".join(cfg.io_dirs),
        "secrets_dir": measured.SECRETS_DIR,
    }


def settings_digest(cfg: EnclaveConfig) -> str:
    """SHA-256 of every manifest value, loader.env included, but this digest itself and the development
    key's place (its variable, mount and file), as branchy-tee renders the template. A measured setting
    itself: simulated evidence (which measures the code and the measured settings) covers what MRENCLAVE
    covers under SGX (threads, enclave size, debug, mounts, allowed files, ...), and the enclave puts it
    in REPORTDATA for policies that pin only MRSIGNER. Owners who share one development key share it."""
    defines = {
        **_defines_but_env(cfg),
        "loader_env": loader_env_toml(_env_but_digest(cfg)),
        "dev_key": "",
        "dev_key_dir": "",
    }
    return _digest_of_rendering(json.dumps(defines, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _digest_of_rendering(defines_json: str) -> str:
    """(Cached: ``env`` is read often and rendering takes a few milliseconds.)"""
    import hashlib

    import tomllib

    from branchy_tee.core.strict import canonical_json
    from branchy_tee.gramine.render import render_manifest

    doc = tomllib.loads(render_manifest(json.loads(defines_json)))
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def load_config(directory: str | os.PathLike[str]) -> EnclaveConfig:
    path = Path(directory) / CONFIG
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BranchyError(
            f"{directory} is not an enclave build directory (no {CONFIG}); run `branchy-tee enclave build` first"
        ) from None
    except (OSError, ValueError) as e:
        raise BranchyError(f"{path}: unreadable ({e})") from None
    return EnclaveConfig.parse(doc, str(path))
