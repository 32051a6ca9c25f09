"""Every registered model exports to one ONNX graph per stage, and those graphs, sealed and run one
after another by the enclave's own path (sealed bundle, stage store, engine on ONNX Runtime), give the
PyTorch model's outputs.

Tolerance: every exit's log-probabilities within 1e-4 + 1e-4 x |value| of PyTorch's (float32; the
largest difference measured over all twelve models here was 4e-6). Narrow configurations keep the
exports quick; exporting is the slow part (about 1-2 s of CPU per stage graph), so each model is
exported once for the whole test session (``runs.export_cached``).
"""

import json

import numpy as np
import pytest
import torch

from branchy_tee.cli import main
from branchy_tee.core.fileio import read_key_file
from branchy_tee.models import list_models
from branchy_tee.tee.budget import run_size
from branchy_tee.tee.criteria import ENTROPY
from branchy_tee.tee.engine import early_exit
from branchy_tee.tee.sealed.bundle import open_bundle
from branchy_tee.tee.stages import StageStore
from runs import keygen, make_random_run

# (in_channels, image size, config): the narrowest configuration each family offers; a model not
# listed here is tested at its defaults on 3x32x32 inputs.
CONFIGS = {
    "lenet5": (1, 28, {}),
    "alexnet": (3, 32, {"head_width": 16}),
    "vgg16": (3, 32, {"head_width": 16}),
    "vgg19": (1, 28, {"head_width": 16}),
    "resnet18": (3, 32, {"width": 8}),
    "resnet34": (3, 32, {"width": 8}),
    "resnet50": (3, 32, {"width": 8}),
    "resnet101": (1, 28, {"width": 8}),
    "resnet152": (3, 32, {"width": 8}),
    "densenet121": (1, 28, {"growth": 8}),
    "mobilenetv1": (3, 32, {"width_mult": 0.25}),
    "mobilenetv2": (3, 32, {}),
}
HEAVY = {"resnet101", "resnet152", "densenet121"}  # the deepest graphs: the longest exports


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in list_models()])
def test_sealed_stage_graphs_give_the_pytorch_models_outputs(tmp_path, name):
    channels, size, config = CONFIGS.get(name, (3, 32, {}))
    model, _ = make_random_run(tmp_path / "run", name, channels, size, **config)
    torch.manual_seed(1)
    x = torch.randn(5, channels, size, size)
    with torch.no_grad():
        expected = [torch.log_softmax(o, dim=1).numpy() for o in model(x)]

    export = json.loads((tmp_path / "run" / "onnx" / "export.json").read_text())
    assert [e["file"] for e in export["stages"]] == [f"stage-{k:02d}.onnx" for k in range(model.num_exits)]
    assert (
        main(
            [
                "seal",
                str(tmp_path / "run"),
                "--key",
                str(keygen(tmp_path / "mo.key")),
                "--out",
                str(tmp_path / "m.btee"),
                "--json",
            ]
        )
        == 0
    )
    store = StageStore(open_bundle(tmp_path / "m.btee", read_key_file(tmp_path / "mo.key")))
    got = [np.full_like(e, np.nan) for e in expected]
    header = store.bundle.header
    assert [store.get(k).run_size for k in range(model.num_exits)] == [
        run_size(s.activation_elems) for s in header.stages
    ]

    def observe(k, pos, log_probs):
        got[k][pos] = log_probs

    never = [ENTROPY.never] * (model.num_exits - 1)
    # batches of 2: full batches and a part batch of 1, through the dynamic batch dimension
    early_exit(store.get, model.num_exits, x.numpy(), ENTROPY, never, batch_size=2, observe=observe)
    assert store.loaded_ever == list(range(model.num_exits))
    for k in range(model.num_exits):
        assert np.allclose(got[k], expected[k], rtol=1e-4, atol=1e-4), (k, float(np.abs(got[k] - expected[k]).max()))


def test_a_graph_changed_after_export_is_refused_and_export_redoes_it(tmp_path, capsys):
    make_random_run(tmp_path / "run", "lenet5", 1, 28)
    graph = tmp_path / "run" / "onnx" / "stage-01.onnx"
    original = graph.read_bytes()
    graph.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    mo = keygen(tmp_path / "mo.key")
    capsys.readouterr()
    assert main(["seal", str(tmp_path / "run"), "--key", str(mo), "--out", str(tmp_path / "m.btee")]) == 1
    err = capsys.readouterr().err
    assert "stage-01.onnx: does not match export.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.btee").exists()
    assert main(["export", str(tmp_path / "run"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert graph.read_bytes() == original  # the export is deterministic
    assert [e["file"] for e in doc["stages"]] == ["stage-00.onnx", "stage-01.onnx", "stage-02.onnx"]
    assert all(e["weight_bytes"] > 0 and e["activation_elems"] > 0 for e in doc["stages"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.json", "model.safetensors", "onnx"]


def test_a_cheap_first_stage_passes_its_input_on_and_the_next_graph_computes_it_again(tmp_path, capsys):
    """MobileNet V1's first stage computes about 50 FLOPs per element of its output, 32 times the
    image: its graph hands the image itself on (features == input, bit for bit) and graph 1 computes
    stages 0 and 1 from it. The sealed chain of graphs giving PyTorch's outputs is the test above; this
    one pins the shape of the export and the memory figure the enclave budgets with."""
    import onnxruntime as ort

    make_random_run(tmp_path / "run", "mobilenetv1", 3, 32, width_mult=0.25)
    doc = json.loads((tmp_path / "run" / "onnx" / "export.json").read_text())
    assert [e["passes_input"] for e in doc["stages"]] == [True, False, False, False, False]
    assert [e["computes"] for e in doc["stages"]] == [[0], [0, 1], [2], [3], [4]]
    image, stage0_out, stage1_out = 3 * 32 * 32, 16 * 32 * 32, 32 * 16 * 16
    # graph 0: the image, stage 0's output (for its exit head) and the image's copy as features;
    # graph 1: the image and both stages' outputs, stage 0's held in passing
    assert doc["stages"][0]["activation_elems"] == image + stage0_out + image
    assert doc["stages"][1]["activation_elems"] == image + stage0_out + stage1_out
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("passes its input on (the next graph computes this stage again)")
    assert lines[1].endswith("computes stages 0-1") and lines[2].endswith(" MiB")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    graph0 = ort.InferenceSession(str(tmp_path / "run" / "onnx" / "stage-00.onnx"), providers=["CPUExecutionProvider"])
    features, log_probs = graph0.run(None, {"input": x})
    assert np.array_equal(features, x) and log_probs.shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet18", "lenet5", "densenet121"])
def test_other_models_pass_their_features_on(tmp_path, name):
    channels, size, config = CONFIGS[name]
    make_random_run(tmp_path / "run", name, channels, size, **config)
    doc = json.loads((tmp_path / "run" / "onnx" / "export.json").read_text())
    assert not any(e["passes_input"] for e in doc["stages"])
    assert [e["computes"] for e in doc["stages"]] == [[k] for k in range(len(doc["stages"]))]


@pytest.mark.parametrize("size", [(4, 4), (7, 7), (14, 14), (28, 28), (5, 9), (3, 2), (1, 1)])
@pytest.mark.parametrize("out", [4, 1, 3, (2, 5)])
def test_exported_adaptive_pooling_is_pytorchs(size, out):
    from torch import nn

    from branchy_tee.export.onnx import _AdaptiveAvgPool

    x = torch.randn(2, 3, *size)
    assert torch.allclose(_AdaptiveAvgPool(out)(x), nn.AdaptiveAvgPool2d(out)(x), atol=1e-6)


def test_a_run_exported_by_an_older_branchy_tee_is_exported_again(tmp_path, capsys):
    from branchy_tee.export.onnx import EXPORT_FORMAT, OLDER_FORMATS, exported_graphs

    make_random_run(tmp_path / "run", "lenet5", 1, 28)
    path = tmp_path / "run" / "onnx" / "export.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "format": sorted(OLDER_FORMATS)[0]}))
    _, again = exported_graphs(tmp_path / "run", show=True)
    assert again["format"] == EXPORT_FORMAT and json.loads(path.read_text())["format"] == EXPORT_FORMAT
    assert "(exported by an older branchy-tee)" in capsys.readouterr().out


def test_a_malformed_export_json_is_refused_in_one_line(tmp_path, capsys):
    make_random_run(tmp_path / "run", "lenet5", 1, 28)
    path = tmp_path / "run" / "onnx" / "export.json"
    doc = json.loads(path.read_text())
    doc["stages"][0]["activation_elems"] = "lots"
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert (
        main(["seal", str(tmp_path / "run"), "--key", str(keygen(tmp_path / "mo.key")), "--out", str(tmp_path / "m")])
        == 1
    )
    err = capsys.readouterr().err
    assert "export.json: field 'stages[0].activation_elems' must be an integer >= 0" in err
    assert "run 'branchy-tee export" in err and len(err.strip().splitlines()) == 1
