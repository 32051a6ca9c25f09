from itertools import pairwise

import pytest
import torch

from branchy_tee.core.errors import UsageError
from branchy_tee.models import MultiExitNet, create_model, list_models, resolve_name
from branchy_tee.models.cost import exit_flops, param_counts

MISSION = [
    "lenet5",
    "alexnet",
    "vgg16",
    "vgg19",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "densenet121",
    "mobilenetv1",
    "mobilenetv2",
]
EXPECTED_EXITS = {"lenet5": 3, "alexnet": 4, "vgg16": 5, "vgg19": 5, "mobilenetv1": 5, "mobilenetv2": 5}


def test_registry_has_every_model_of_the_mission():
    assert set(MISSION) <= set(list_models())


@pytest.mark.parametrize(
    "spelling,name",
    [
        ("MobileNetv1", "mobilenetv1"),
        ("ResNet18", "resnet18"),
        ("VGG16", "vgg16"),
        ("resnet-152", "resnet152"),
        ("DenseNet121", "densenet121"),
        ("MobileNetV2", "mobilenetv2"),
        ("LeNet5", "lenet5"),
        ("AlexNet", "alexnet"),
    ],
)
def test_seed_spellings_resolve(spelling, name):
    assert resolve_name(spelling) == name


def test_unknown_model_lists_valid_names():
    with pytest.raises(UsageError) as e:
        create_model("resnet19")
    assert "resnet19" in str(e.value) and "mobilenetv2" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name, in_channels):
        if (name, in_channels) not in cache:
            torch.manual_seed(0)
            cache[(name, in_channels)] = create_model(name, num_classes=10, in_channels=in_channels)
        return cache[(name, in_channels)]

    return get


@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 28)])
@pytest.mark.parametrize("name", list_models())
def test_shapes_backward_and_staged_equivalence(built, name, in_channels, size):
    model = built(name, in_channels)
    assert isinstance(model, MultiExitNet)
    assert model.num_exits == len(model.stages) == len(model.exits)
    assert model.num_exits >= EXPECTED_EXITS.get(name, 2)
    x = torch.randn(2, in_channels, size, size)

    model.train()
    outs = model(x)
    assert len(outs) == model.num_exits
    for out in outs:
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()
    sum(o.sum() for o in outs).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        full = model(x)
        h = x
        for k in range(model.num_exits):
            h, logits = model.run_stage(k, h)
            assert torch.equal(logits, full[k]), f"exit {k} differs when stages run one by one"


def test_resnet152_backbone_size_matches_reference():
    with torch.device("meta"):
        model = create_model("resnet152")
    backbone, heads = param_counts(model)
    assert abs(backbone - 58.2e6) / 58.2e6 < 0.01
    assert heads > 0


@pytest.mark.parametrize("name", list_models())
def test_exit_flops_increase_to_the_full_model(name):
    with torch.device("meta"):
        model = create_model(name)
    flops = exit_flops(model)
    assert len(flops) == model.num_exits
    assert all(a < b for a, b in pairwise(flops))
    assert flops[0] < flops[-1]
    # Reaching the first exit must be much cheaper than the whole network: that is the point.
    assert flops[0] < 0.6 * flops[-1]


def test_config_rebuilds_the_same_architecture():
    model = create_model("resnet18", num_classes=7, in_channels=1, width=16)
    assert model.arch == "resnet18"
    again = create_model(model.arch, **model.config)
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]
