"""Export a multi-exit model as one ONNX graph per stage, the graphs the enclave runs.

Stage k's graph computes stage k and exit head k (``tee.graphs`` names the inputs and outputs):

    input (N, *stage k input)  ->  features (N, *stage k output), log_probs (N, classes)

The last stage's graph has only ``log_probs``. The batch dimension is dynamic; the image size is the
model's input size. The exporter is torch's own (``torch.onnx.export``, the dynamo path: it handles
the exit heads' adaptive pooling). Everything downstream runs these graphs and nothing else:
``eval`` and ``calibrate`` through the enclave's own engine, ``seal`` encrypts their bytes. So the
thresholds are chosen on the very numbers the enclave computes.

Two things are exported otherwise than the PyTorch modules would be, for speed on ONNX Runtime, with
the same arithmetic (the test over every registered model holds them to PyTorch's outputs):
- **A cheap stage that expands its input passes its input on** (``passes_input``): its graph outputs
  the exit's log-probabilities and, as ``features``, its own input unchanged; the next stage's graph
  computes that stage again, then its own. MobileNet V1's first stage turns a 28x28 image into 32
  feature maps of 28x28 with about 50 FLOPs per output element: at batch 128 writing those maps out
  of ONNX Runtime's blocked layout took a third of the stage's time, and stage 1 spent another sixth
  reading them back in, while most samples leave at exit 0 and never need them. Computing the stage
  again for the few that go on is cheaper. No other registered model has a stage that cheap
  (their first stages compute 1,300-23,000 FLOPs per output element).
- **Adaptive average pooling whose windows do not tile the input** (14x14 to 4x4: windows of 4 at
  starts 0, 3, 7, 10) is exported as two matrix products with constant averaging matrices, where the
  exporter writes a gather of every window followed by a mean: that took a third of the benchmark
  model's stage 1, the products a seventh (and they read the NCHW copy of the feature maps that the
  features output needs anyway). Only the exit heads' pooling is rewritten; stages are exported as
  they are.

In a run directory the graphs live in ``onnx/``: ``stage-NN.onnx`` and ``export.json`` (the digest
of the weights they were exported from, and of each graph). Training ends by exporting; ``eval``,
``calibrate`` and ``seal`` export again when the weights have changed since, and refuse graphs that
do not match their digests. Owner side: torch, onnx and onnxscript.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from branchy_tee.core.errors import BranchyError
from branchy_tee.core.strict import Fields
from branchy_tee.tee.graphs import FEATURES, INPUT, LOG_PROBS

EXPORT_DIR = "onnx"
EXPORT_FILE = "export.json"
EXPORT_FORMAT = "branchy-tee/onnx-export/v2"
OLDER_FORMATS = {"branchy-tee/onnx-export/v1"}  # exported again when met (same arithmetic, slower graphs)
EXAMPLE_BATCH = 2  # torch.export specialises a dimension that is 1 in the example input
# A graph passes its input on when its stages compute fewer FLOPs than this per element of their
# output (and the output is larger than the input). Measured on the benchmark model (MobileNet V1
# x0.5 on 28x28, about 50 FLOPs per element): writing and reading back one element costs about what
# 100 FLOPs of its convolutions do, so below this bound computing the stage again for the samples that
# go on (a fifth of them there) is the cheaper side.
RECOMPUTE_BELOW_FLOPS_PER_ELEMENT = 128


class StageWithExit(nn.Module):
    """Stage k followed by exit head k; the head's output as log-probabilities. ``stage`` may be
    several stages (the ones earlier graphs passed their input over); with ``passes_input`` the
    features output is the graph's input, for the next graph to compute from."""

    def __init__(self, stage: nn.Module, head: nn.Module, last: bool, passes_input: bool = False):
        super().__init__()
        self.stage, self.head, self.last, self.passes_input = stage, _exportable_pooling(head), last, passes_input

    def forward(self, x):
        h = self.stage(x)
        log_probs = torch.log_softmax(self.head(h), dim=1)
        if self.last:
            return log_probs
        # clone: an output may not be the graph's input itself (ONNX Runtime copies it out, cheaply:
        # the input is the smaller tensor)
        return (x.clone() if self.passes_input else h), log_probs


class _AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d`` that exports well (see the module's note). Shapes are fixed at export
    (only the batch is dynamic), so the windows are known when the graph is traced."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        size = self.output_size
        out = (size, size) if isinstance(size, int) else tuple(size)
        h, w = x.shape[-2:]
        if None in out or (h % out[0] == 0 and w % out[1] == 0):  # tiling windows: one AveragePool already
            return F.adaptive_avg_pool2d(x, size)
        return torch.matmul(torch.matmul(_pooling_matrix(out[0], h), x), _pooling_matrix(out[1], w).t())


def _pooling_matrix(out: int, n: int) -> torch.Tensor:
    """(out, n): row i averages PyTorch's adaptive-pooling window i, [floor(i n / out), ceil((i + 1) n / out))."""
    m = torch.zeros(out, n)
    for i in range(out):
        start, end = i * n // out, -(-(i + 1) * n // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _exportable_pooling(head: nn.Module) -> nn.Module:
    """A copy of ``head`` with its adaptive average pools as ``_AdaptiveAvgPool`` (the model is untouched)."""
    if not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in head.modules()):
        return head
    head = copy.deepcopy(head)
    for parent in list(head.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d):
                setattr(parent, name, _AdaptiveAvgPool(child.output_size))
    return head


class FullModel(nn.Module):
    """The backbone and the final classifier only (logits): the model a user would export without early exits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        for stage in self.model.stages:
            x = stage(x)
        return self.model.exits[-1](x)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs warnings about optional operator libraries (torchvision) and deprecations
    that say nothing about our graphs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


_registry_cache: dict = {}
_cached_builders: set = set()  # our wrappers: a registry already patched is not patched again


def _cache_operator_registry() -> None:
    """``torch.onnx.export`` rebuilds its operator registry from onnxscript's torchlib on every call
    (about 4 s here, twice as long as exporting a typical stage). Build it once per process. This
    uses a private hook of torch's exporter (torch is pinned); where it is missing, exports are
    merely slower."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return
    registry = getattr(_registration, "ONNXRegistry", None)
    build = getattr(getattr(registry, "from_torchlib", None), "__func__", None)
    if registry is None or build is None or build in _cached_builders:
        return

    def cached(cls, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _registry_cache:
            _registry_cache[key] = build(cls, *args, **kwargs)
        return _registry_cache[key]

    _cached_builders.add(cached)
    registry.from_torchlib = classmethod(cached)


def _export(module: nn.Module, example: torch.Tensor, outputs: list[str]) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    _cache_operator_registry()
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=outputs,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    assert program is not None  # dynamo=True always gives an ONNXProgram
    return program.model_proto.SerializeToString()


def weight_bytes(graph: bytes) -> int:
    """Bytes of a graph's initializers (its weights)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    total = 0
    for init in onnx.load_from_string(graph).graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n * tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def export_stages(model, input_shape, show: bool = False) -> tuple[list[bytes], list[dict]]:
    """(graph bytes per stage, facts per stage: weight_bytes; activation_elems, the elements of one
    sample's graph input plus every output it computes, which the enclave budgets memory with;
    computes, the stages its graph computes; passes_input, see ``StageWithExit``)."""
    from tqdm import tqdm

    from branchy_tee.models.cost import part_flops

    model.eval()
    stage_flops, _ = part_flops(model, tuple(input_shape))
    h = x = torch.zeros(EXAMPLE_BATCH, *input_shape)  # h: stage k's input; x: this graph's input
    first = 0  # the first stage this graph computes (earlier graphs passed their input over it)
    out_elems: list[int] = []  # one sample's output elements, per stage
    graphs, facts = [], []
    final = model.num_exits - 1
    for k in tqdm(range(model.num_exits), desc="export ONNX", leave=False, disable=None if show else True):
        last = k == final
        with torch.no_grad():
            out = model.stages[k](h)
        out_elems.append(out[0].numel())
        computed = range(first, k + 1)
        passes = (
            not last
            and out[0].numel() > x[0].numel()
            and sum(stage_flops[j] for j in computed) < RECOMPUTE_BELOW_FLOPS_PER_ELEMENT * out[0].numel()
        )
        stages = model.stages[k] if first == k else nn.Sequential(*(model.stages[j] for j in computed))
        graphs.append(
            _export(
                StageWithExit(stages, model.exits[k], last, passes), x, [LOG_PROBS] if last else [FEATURES, LOG_PROBS]
            )
        )
        # input + every stage output computed in passing + the input's copy as features, if passed on
        elems = x[0].numel() + sum(out_elems[j] for j in computed) + (x[0].numel() if passes else 0)
        facts.append(
            {
                "weight_bytes": weight_bytes(graphs[-1]),
                "activation_elems": elems,
                "computes": list(computed),
                "passes_input": passes,
            }
        )
        h = out
        if not passes:
            first, x = k + 1, out
    return graphs, facts


def export_full_model(model, input_shape) -> bytes:
    """The whole model without early exits, as one graph: input -> logits of the final exit."""
    return _export(FullModel(model), torch.zeros(EXAMPLE_BATCH, *input_shape), ["logits"])


# --------------------------------------------------------------------------- run directories
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_digest(run_dir: Path) -> str:
    try:
        return _sha256((run_dir / "model.safetensors").read_bytes())
    except FileNotFoundError:
        raise BranchyError(
            f"{run_dir}/model.safetensors: missing (was training interrupted before the first epoch ended?)"
        ) from None


def export_run(run_dir: str | Path, show: bool = True) -> dict:
    """Export a run directory's model into RUN_DIR/onnx (replacing what was there); return export.json."""
    from branchy_tee.models.rundir import load_run

    run_dir = Path(run_dir)
    model, card = load_run(run_dir)
    digest = _weights_digest(run_dir)
    graphs, facts = export_stages(model, card.preprocessing.input_shape, show=show)
    doc: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "weights_sha256": digest,
        "arch": card.arch,
        "torch": torch.__version__,
        "stages": [
            {"file": f"stage-{k:02d}.onnx", "sha256": _sha256(g), "size": len(g), **f}
            for k, (g, f) in enumerate(zip(graphs, facts, strict=True))
        ],
    }
    # Written beside the old export and swapped in, so that onnx/ is always one complete export.
    tmp = Path(tempfile.mkdtemp(prefix=f".{EXPORT_DIR}.", dir=run_dir))
    try:
        for entry, g in zip(doc["stages"], graphs, strict=True):
            (tmp / entry["file"]).write_bytes(g)
        (tmp / EXPORT_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        tmp.chmod(0o755)
        target, old = run_dir / EXPORT_DIR, None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{EXPORT_DIR}-old.", dir=run_dir))
            target.rename(old / EXPORT_DIR)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return doc


def read_export(run_dir: str | Path) -> dict | None:
    """export.json of a run directory, or None when there is none."""
    path = Path(run_dir) / EXPORT_DIR / EXPORT_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BranchyError(f"{path}: unreadable ({e}); run 'branchy-tee export {run_dir}'") from None
    if isinstance(doc, dict) and doc.get("format") in OLDER_FORMATS:
        return None  # exported again, like a run never exported
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise BranchyError(f"{path}: not a branchy-tee export (format is not {EXPORT_FORMAT})")
    f = Fields(doc, str(path), "export")
    try:  # what later steps read from each stage (the rest is for people)
        f.check("stages", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list")
        f.each("stages", _stage_entry)
    except BranchyError as e:
        raise BranchyError(f"{e}; run 'branchy-tee export {run_dir}'") from None
    return doc


def _stage_entry(e: Fields, k: int) -> None:
    e.text("file")
    e.text("sha256")
    e.integer("weight_bytes", 0)
    e.integer("activation_elems", 0)


def _why_export(run_dir: Path, doc: dict | None) -> str:
    if doc is not None:
        return "weights changed"
    return "exported by an older branchy-tee" if (run_dir / EXPORT_DIR / EXPORT_FILE).exists() else "none yet"


def exported_graphs(run_dir: str | Path, show: bool = True) -> tuple[list[bytes], dict]:
    """The run's stage graphs and export.json, exporting first when there are none or the weights
    changed since the last export. A graph that does not match its recorded digest is refused."""
    run_dir = Path(run_dir)
    doc = read_export(run_dir)
    if doc is None or doc.get("weights_sha256") != _weights_digest(run_dir):
        if show:
            print(
                f"exporting the stage graphs of {run_dir} to ONNX ({_why_export(run_dir, doc)})",
                flush=True,
            )
        doc = export_run(run_dir, show=show)
    graphs = []
    for entry in doc["stages"]:
        path = run_dir / EXPORT_DIR / entry["file"]
        try:
            g = path.read_bytes()
        except OSError as e:
            raise BranchyError(f"{path}: cannot read ({e.strerror}); run 'branchy-tee export {run_dir}'") from None
        if _sha256(g) != entry["sha256"]:
            raise BranchyError(
                f"{path}: does not match {EXPORT_FILE} (modified after export); run 'branchy-tee export {run_dir}'"
            )
        graphs.append(g)
    return graphs, doc
