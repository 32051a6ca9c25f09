"""Attaching early exits to a trained model: frozen backbone and final exit, trained heads."""

import json

import pytest
import torch
from safetensors.torch import save_file

from branchy_tee.cli import main
from branchy_tee.core.errors import BranchyError
from branchy_tee.models import create_model
from branchy_tee.models.layout import channels_last
from branchy_tee.models.plain import backbone_keys, kuangliu_prefixes, load_plain_weights
from branchy_tee.models.rundir import load_run, read_model_card
from branchy_tee.train.trainer import TrainConfig, fit

SYN = {"channels": 1, "size": 28, "n": 400}
SYN_CLI = ["--dataset", "synthetic", "--synthetic-channels", "1", "--synthetic-size", "28", "--num-workers", "0"]


def tiny(out, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", synthetic=dict(SYN), epochs=1, lr=3e-3, batch_size=50, num_workers=0)
    base.update(out=str(out), quiet=True, seed=1)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def outputs(run_dir, x):
    model, _ = load_run(run_dir)
    return model(x)


def test_attach_exits_keeps_the_final_exit_bit_identical_and_trains_the_heads(tmp_path):
    # MobileNetV1 has BatchNorm in its backbone: its running statistics must not move either.
    src = tmp_path / "src"
    fit(tiny(src, net="mobilenetv1", model_config={"width_mult": 0.25}, max_batches=3))
    source_model, _ = load_run(src)
    fit(tiny(tmp_path / "att", attach_exits=str(src), epochs=2, max_batches=4, lr=1e-2, seed=7, distill="final"))
    model, card = load_run(tmp_path / "att")

    before, after = source_model.state_dict(), model.state_dict()
    for k in backbone_keys(model):
        assert torch.equal(before[k], after[k]), k  # weights and BatchNorm statistics
    changed = [k for k in after if k.startswith("exits.0.") and not torch.equal(before[k], after[k])]
    assert any(k.endswith("weight") for k in changed) and any("running_mean" in k for k in changed)

    x = torch.randn(32, 1, 28, 28)
    src_out, new_out = outputs(src, x), outputs(tmp_path / "att", x)
    assert torch.equal(src_out[-1], new_out[-1])  # the final exit, bit for bit
    assert not torch.equal(src_out[0], new_out[0])

    # The run records where its backbone came from and reuses the source's data and split.
    assert card.arch == "mobilenetv1" and card.config["width_mult"] == 0.25
    assert card.training is not None and card.training["attached_to"]["run"] == str(src)
    assert card.data == read_model_card(src).data
    assert card.thresholds is not None  # calibrated like any run


def test_attached_heads_learn(tmp_path):
    src = tmp_path / "src"
    fit(tiny(src, net="lenet5", epochs=3, exit_weights=[0.0, 0.0, 1.0]))  # the early exits never trained
    fit(tiny(tmp_path / "att", attach_exits=str(src), epochs=3, lr=1e-2))
    before = json.loads((src / "metrics.jsonl").read_text().splitlines()[-1])["val_exit_accuracy"]
    after = [
        json.loads(line)["val_exit_accuracy"] for line in (tmp_path / "att" / "metrics.jsonl").read_text().splitlines()
    ]
    assert after[-1][-1] == before[-1]  # same final exit
    assert after[-1][0] > before[0] + 0.1 and after[-1][1] > before[1] + 0.1


def _plain_state(model, naming=lambda k: k) -> dict:
    state = model.state_dict()
    return {naming(k): state[k].clone() for k in backbone_keys(model)}


def test_backbone_weights_in_pytorch_cifar_names(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=10, in_channels=1, width=4).eval()
    for m in source.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    prefixes = kuangliu_prefixes(source)
    # Spot checks against kuangliu/pytorch-cifar's ResNet-18.
    assert prefixes["stages.0.0"] == "conv1" and prefixes["stages.0.1"] == "bn1"
    assert prefixes["stages.0.4"] == "layer1.1" and prefixes["stages.2.1"] == "layer3.1"
    assert prefixes["exits.3.2"] == "linear"
    from branchy_tee.models.plain import _rename

    plain = {"module." + k: v for k, v in _plain_state(source, lambda k: _rename(k, prefixes)).items()}
    assert "module.layer2.0.shortcut.1.running_var" in plain and "module.linear.weight" in plain
    path = tmp_path / "ckpt.pth"
    torch.save({"net": plain, "acc": 91.0, "epoch": 3}, path)  # the layout pytorch-cifar saves

    out = tmp_path / "att"
    net = ["--net", "resnet18", "--model-config", "width=4", "--backbone-weights", str(path)]
    rc = main(
        [
            "train",
            *net,
            *SYN_CLI,
            "--synthetic-samples",
            "200",
            "--epochs",
            "1",
            "--max-batches",
            "2",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert rc == 0
    model, card = load_run(out)
    assert all(torch.equal(source.state_dict()[k], model.state_dict()[k]) for k in backbone_keys(model))
    # Bit for bit when computed the same way (load_run uses channels-last weights, as the runtime does).
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(channels_last(source)(x)[-1], model(x)[-1])
    assert card.training is not None and card.training["attached_to"]["naming"] == "pytorch-cifar"


def test_mobilenet_and_densenet_names():
    v1 = kuangliu_prefixes(create_model("mobilenetv1", width_mult=0.25))
    assert v1["stages.0.3"] == "layers.0" and v1["stages.2.0"] == "layers.3" and v1["stages.4.3"] == "layers.12"
    v2 = kuangliu_prefixes(create_model("mobilenetv2"))
    assert v2["stages.4.3"] == "layers.16" and v2["stages.4.4"] == "conv2" and v2["stages.4.5"] == "bn2"
    d = kuangliu_prefixes(create_model("densenet121", growth=4))
    assert d["stages.0.0"] == "conv1" and d["stages.0.1"] == "dense1.0" and d["stages.0.7"] == "trans1"
    assert d["stages.3.15"] == "dense4.15" and d["exits.3.bn"] == "bn"
    assert kuangliu_prefixes(create_model("lenet5")) is None and kuangliu_prefixes(create_model("vgg16")) is None


def test_a_wrong_state_dict_is_one_line_naming_the_keys(tmp_path, capsys):
    model = create_model("lenet5", num_classes=10, in_channels=1)
    state = _plain_state(model)
    del state["stages.1.0.bias"]
    state["stages.1.0.extra"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    args = ["train", "--net", "lenet5", *SYN_CLI, "--synthetic-samples", "100", "--epochs", "1"]
    args += ["--out", str(tmp_path / "run")]
    assert main([*args, "--backbone-weights", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "missing 1: stages.1.0.bias" in err and "unexpected 1: stages.1.0.extra" in err
    assert not (tmp_path / "run").exists()  # nothing written

    # Right names, wrong shapes (a 3-channel network for 1-channel data).
    save_file(_plain_state(create_model("lenet5", num_classes=10, in_channels=3)), path)
    assert main([*args, "--backbone-weights", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stages.0.0.weight is (6, 3, 5, 5), expected (6, 1, 5, 5)" in err

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([*args, "--backbone-weights", str(tmp_path / "junk.pt")]) == 1
    assert "neither a safetensors file nor a weights-only torch checkpoint" in capsys.readouterr().err
    torch.save({"acc": 1.0}, tmp_path / "nostate.pt")
    assert main([*args, "--backbone-weights", str(tmp_path / "nostate.pt")]) == 1
    assert "holds no state dict" in capsys.readouterr().err


def test_conflicting_attach_options(tmp_path):
    src = tmp_path / "src"
    fit(tiny(src, net="lenet5", max_batches=2))
    with pytest.raises(BranchyError, match="is a lenet5, not alexnet"):
        fit(tiny(tmp_path / "a", attach_exits=str(src), net="alexnet"))
    with pytest.raises(BranchyError, match="trained on synthetic, not fashion-mnist"):
        fit(tiny(tmp_path / "b", attach_exits=str(src), dataset="fashion-mnist"))
    with pytest.raises(BranchyError, match="give one"):
        fit(tiny(tmp_path / "c", attach_exits=str(src), backbone_weights="x.safetensors"))


def test_load_plain_weights_copies_into_backbone_only():
    torch.manual_seed(0)
    a, b = create_model("lenet5"), create_model("lenet5")
    heads_before = {k: v.clone() for k, v in b.state_dict().items() if k.startswith(("exits.0.", "exits.1."))}
    assert load_plain_weights(b, _plain_state(a), "test") == "branchy-tee"
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in backbone_keys(a))
    assert all(torch.equal(heads_before[k], sb[k]) for k in heads_before)
