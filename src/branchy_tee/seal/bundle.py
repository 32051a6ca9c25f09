"""The model owner's side of the sealed bundle: stage graphs exported into a run directory, each
packed into its payload and sealed into ``model.btee`` (its format: ``tee.sealed.bundle``)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.keys import key_id
from branchy_tee.tee.sealed import aead
from branchy_tee.tee.sealed.bundle import HEADER_FILE, header_file_bytes, header_mac, stage_context, stage_key
from branchy_tee.tee.sealed.facts import ModelFacts
from branchy_tee.tee.sealed.header import BundleHeader, StageEntry, stage_file

if TYPE_CHECKING:
    import torch


def seal_model(
    model: torch.nn.Module,
    card: ModelFacts,
    model_key: bytes,
    out: str | os.PathLike[str],
    version: int = 1,
    chunk_size: int = aead.DEFAULT_CHUNK,
) -> BundleHeader:
    """Export a model (eval mode; ``card``: its model card, or any header of its architecture) to stage
    graphs and seal them into ``out``."""
    from branchy_tee.export.onnx import export_stages

    graphs, facts = export_stages(model, card.preprocessing.input_shape)
    return seal_graphs(graphs, facts, card, model_key, out, version, chunk_size)


def seal_run(
    run_dir: str | os.PathLike[str],
    model_key: bytes,
    out: str | os.PathLike[str],
    version: int = 1,
    chunk_size: int = aead.DEFAULT_CHUNK,
    show: bool = False,
) -> BundleHeader:
    """Seal a run directory's exported stage graphs (exported first if they are missing or stale)."""
    from branchy_tee.export.onnx import exported_graphs
    from branchy_tee.models.rundir import read_model_card

    run_dir = Path(run_dir)
    card = read_model_card(run_dir)
    graphs, doc = exported_graphs(run_dir, show=show)
    return seal_graphs(graphs, doc["stages"], card, model_key, out, version, chunk_size)


def seal_graphs(
    graphs: list[bytes],
    facts: list[dict[str, Any]],
    card: ModelFacts,
    model_key: bytes,
    out: str | os.PathLike[str],
    version: int = 1,
    chunk_size: int = aead.DEFAULT_CHUNK,
) -> BundleHeader:
    """Seal stage graphs (ONNX bytes, one per stage; ``facts`` per stage: weight_bytes and
    activation_elems) into the bundle directory ``out``, each as its stage payload
    (``export.payload``: the graph, then its weights in one aligned blob).

    The bundle is built in a temporary directory beside ``out`` and renamed into place, so ``out``
    either does not exist or is complete.
    """
    from branchy_tee.export.payload import pack

    out = Path(out)
    if out.exists():
        raise BranchyError(f"{out} already exists; choose another --out or remove it")
    if version < 1:
        raise BranchyError("--version must be at least 1")
    if chunk_size < 4096:
        raise BranchyError("--chunk-size must be at least 4096 bytes")
    bundle_id = secrets.token_hex(16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    try:
        stages = [
            _seal_stage(tmp, k, pack(graph), fact, model_key, bundle_id, version, chunk_size)
            for k, (graph, fact) in enumerate(zip(graphs, facts, strict=True))
        ]
        header = BundleHeader(
            bundle_id=bundle_id,
            model_version=version,
            key_id=key_id(model_key),
            chunk_size=chunk_size,
            stages=tuple(stages),
            **card.facts(),
        )
        header.check(f"{out}/{HEADER_FILE}", BranchyError)
        header_doc = header.to_json()
        doc = {"header": header_doc, "mac": header_mac(model_key, header_doc)}
        (tmp / HEADER_FILE).write_bytes(header_file_bytes(doc))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the bundle is ciphertext and may be shared
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


def _seal_stage(
    tmp: Path,
    k: int,
    plain: bytes,
    fact: dict[str, Any],
    model_key: bytes,
    bundle_id: str,
    version: int,
    chunk_size: int,
) -> StageEntry:
    """Write stage k's sealed file into ``tmp`` (fsynced); its header entry."""
    key = stage_key(model_key, bundle_id, version, k)
    with open(tmp / stage_file(k), "wb") as f:
        for chunk in seal_chunks(key, plain, stage_context(bundle_id, version, k), chunk_size):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return StageEntry(
        k,
        stage_file(k),
        len(plain),
        int(fact["weight_bytes"]),
        int(fact["activation_elems"]),
        aead.sealed_size(len(plain), chunk_size),
    )


def seal_chunks(
    key: bytes, plaintext: bytes | memoryview, context: bytes, chunk_size: int = aead.DEFAULT_CHUNK
) -> Iterator[bytes]:
    """Yield the sealed chunks of ``plaintext`` (an empty plaintext gives one empty last chunk)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    cipher = AESGCM(key)
    view = memoryview(plaintext)
    n = aead.num_chunks(len(view), chunk_size)
    for i in range(n):
        nonce, aad = aead.nonce_and_aad(context, i, i == n - 1)
        yield cipher.encrypt(nonce, bytes(view[i * chunk_size : (i + 1) * chunk_size]), aad)
