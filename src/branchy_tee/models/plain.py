"""Plain single-exit weights: which of their names go where in a multi-exit model.

A model owner who already has a trained single-exit network attaches exits to it
(``branchy-tee train --backbone-weights FILE``). Its weights become the backbone (``stages``) and the
final classifier (the last exit) of the multi-exit model of the same architecture; the early-exit
heads are new. Two namings are accepted (the one that matches more names is used, and a mismatch is
reported in its terms):

- every family: branchy-tee's own names, i.e. the multi-exit state dict without its early exits
  (``stages.S.I.…`` and ``exits.LAST.…``);
- ``resnet*``, ``mobilenetv1``, ``mobilenetv2``, ``densenet121``: the names of kuangliu/pytorch-cifar,
  whose shapes these backbones follow (see ``kuangliu_prefixes``; docs/training.md has the table).
  Its VGG has convolution biases that ours folds away, and it has no AlexNet or LeNet-5 of our shape,
  so those families take our names only.

A ``module.`` prefix (DataParallel) is dropped, and a checkpoint dict holding the state dict under
``state_dict``, ``model`` or ``net`` is unwrapped.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from branchy_tee.core.errors import BranchyError

_WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``weights_only`` torch checkpoint (never unpickled
    beyond tensors and plain containers)."""
    from safetensors.torch import load as st_load

    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BranchyError(f"{p}: not found") from None
    except OSError as e:
        raise BranchyError(f"{p}: cannot read ({e.strerror or e})") from None
    obj = None
    try:
        obj = st_load(raw)
    except Exception:  # not safetensors (safetensors raises its own error types)
        try:
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BranchyError(
                f"{p}: neither a safetensors file nor a weights-only torch checkpoint ({e.__class__.__name__})"
            ) from None
    state = _unwrap(obj)
    if state is None:
        raise BranchyError(
            f"{p}: holds no state dict (expected a mapping of parameter names to tensors, "
            f"at the top or under one of {', '.join(_WRAPPER_KEYS)})"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap(obj):
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
    return None


def backbone_keys(model) -> list[str]:
    """The state-dict names of the backbone and the final classifier (everything but the early exits)."""
    last = f"exits.{model.num_exits - 1}."
    return [k for k in model.state_dict() if k.startswith("stages.") or k.startswith(last)]


# --------------------------------------------------------------------------- kuangliu/pytorch-cifar
def kuangliu_prefixes(model) -> dict[str, str] | None:
    """Module prefix in our model -> module prefix in kuangliu/pytorch-cifar's, or None when that
    repository has no network of this family with our shapes.

    resnet*:     conv1, bn1 -> stem of stage 0; layerN.J -> block J of stage N-1; linear -> final exit
    mobilenetv1: conv1, bn1 -> stem; layers.J -> the J-th depthwise-separable block (counted over all
                 stages); linear -> final exit
    mobilenetv2: conv1, bn1 -> stem; layers.J -> the J-th inverted-residual block; conv2, bn2 -> the
                 1x1 convolution to 1280 channels at the end of the last stage; linear -> final exit
    densenet121: conv1 -> stem; denseN.J -> dense layer J of stage N-1; transN -> its transition;
                 bn, linear -> the final classifier
    """
    from branchy_tee.models.densenet import DenseLayer, FinalClassifier, Transition
    from branchy_tee.models.mobilenet import DepthwiseSeparable, InvertedResidual
    from branchy_tee.models.resnet import BasicBlock, Bottleneck

    arch, last = model.arch, model.num_exits - 1
    out: dict[str, str] = {}
    blocks = 0  # counted over the whole network (mobilenets)
    convs = bns = 0
    for s, stage in enumerate(model.stages):
        in_stage = 0
        for i, child in enumerate(stage):
            ours = f"stages.{s}.{i}"
            if isinstance(child, nn.Conv2d):
                convs += 1
                out[ours] = f"conv{convs}"
            elif isinstance(child, nn.BatchNorm2d):
                bns += 1
                out[ours] = f"bn{bns}"
            elif arch.startswith("resnet") and isinstance(child, (BasicBlock, Bottleneck)):
                out[ours] = f"layer{s + 1}.{in_stage}"
                in_stage += 1
            elif isinstance(child, (DepthwiseSeparable, InvertedResidual)):
                out[ours] = f"layers.{blocks}"
                blocks += 1
            elif isinstance(child, DenseLayer):
                out[ours] = f"dense{s + 1}.{in_stage}"
                in_stage += 1
            elif isinstance(child, Transition):
                out[ours] = f"trans{s + 1}"
    final = model.exits[last]
    if arch.startswith("resnet") or arch in ("mobilenetv1", "mobilenetv2"):
        out[f"exits.{last}.2"] = "linear"  # PoolLinearHead: pool, flatten, linear
    elif arch == "densenet121" and isinstance(final, FinalClassifier):
        out[f"exits.{last}.bn"] = "bn"
        out[f"exits.{last}.linear"] = "linear"
    else:
        return None
    return out


def _rename(key: str, prefixes: dict[str, str]) -> str:
    module, _, leaf = key.rpartition(".")
    while module:
        if module in prefixes:
            return f"{prefixes[module]}{key[len(module) :]}"
        module = module.rpartition(".")[0]
    return key


def _listing(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_plain_weights(model, state: dict[str, torch.Tensor], source: str) -> str:
    """Copy a plain single-exit state dict into ``model``'s backbone and final exit (the early exits
    are left as they are). Returns the naming that matched ('branchy-tee' or 'pytorch-cifar');
    a mismatch raises one line listing the missing and the unexpected names."""
    ours = backbone_keys(model)
    namings = {"branchy-tee": {k: k for k in ours}}
    prefixes = kuangliu_prefixes(model)
    if prefixes is not None:
        namings["pytorch-cifar"] = {k: _rename(k, prefixes) for k in ours}
    naming = max(namings, key=lambda n: len(set(namings[n].values()) & state.keys()))
    to_plain = namings[naming]
    expected = set(to_plain.values())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise BranchyError(
            f"{source}: not a plain {model.arch} state dict ({naming} names): "
            f"missing {len(missing)}: {_listing(missing)}; unexpected {len(unexpected)}: {_listing(unexpected)}"
        )
    current = model.state_dict()
    wrong = [
        f"{to_plain[k]} is {tuple(state[to_plain[k]].shape)}, expected {tuple(current[k].shape)}"
        for k in ours
        if state[to_plain[k]].shape != current[k].shape
    ]
    if wrong:
        raise BranchyError(f"{source}: shapes do not fit {model.arch} {model.config}: {_listing(wrong, 4)}")
    with torch.no_grad():
        for k in ours:
            current[k].copy_(state[to_plain[k]])
    return naming
