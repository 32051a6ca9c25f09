"""Data-owner side: turn images or a tensor file into the model's input tensor, using the
preprocessing recorded in the bundle header (input shape, 0..1 scaling, per-channel mean/std),
applied by the very transform training and evaluation use (``data.transforms.eval_transform``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from branchy_tee.core.errors import BranchyError
from branchy_tee.data.transforms import Normalize, eval_transform
from branchy_tee.tee.sealed.preprocessing import Preprocessing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TENSOR_SUFFIXES = {".safetensors", ".npy", ".pt"}


MAX_RESIZE = 2.0  # an image side may differ from the model's input by this factor; beyond it, --resize


def image_to_pixels(im, shape, where: str = "image", resize: bool = False, notes: list[str] | None = None):
    """A PIL image as uint8 (C, H, W): converted to grey or RGB as the model expects, and resized to
    the model's input when its sides are within MAX_RESIZE of it (any size with ``resize``); each
    resize is noted in ``notes``. BranchyError otherwise."""
    from PIL import Image

    c, h, w = shape
    if im.size != (w, h):
        factor = max(im.size[0] / w, w / im.size[0], im.size[1] / h, h / im.size[1])
        if factor > MAX_RESIZE and not resize:
            raise BranchyError(
                f"{where}: a {im.size[0]}x{im.size[1]} image, the model takes {w}x{h} (more than {MAX_RESIZE:g}x "
                "apart); give --resize to resize it anyway"
            )
        if notes is not None:
            notes.append(f"{where}: resized {im.size[0]}x{im.size[1]} to {w}x{h}")
    im = im.convert("L" if c == 1 else "RGB")
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).view(h, w, c).permute(2, 0, 1)


def load_image(path: Path, shape, resize: bool = False, notes: list[str] | None = None) -> torch.Tensor:
    """One image file as uint8 (C, H, W) (see :func:`image_to_pixels`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return image_to_pixels(im, shape, str(path), resize, notes)
    except FileNotFoundError:
        raise BranchyError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BranchyError(f"{path}: unreadable image ({e.__class__.__name__})") from None


def load_tensor_file(path: Path) -> torch.Tensor:
    """A tensor of images: .safetensors (one tensor), .npy (no pickle) or .pt (weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise BranchyError(f"{path}: expected exactly one tensor, found {len(tensors)}")
            return next(iter(tensors.values()))
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, torch.Tensor):
            raise BranchyError(f"{path}: holds a {type(obj).__name__}, expected a tensor")
        return obj
    except BranchyError:
        raise
    except FileNotFoundError:
        raise BranchyError(f"{path}: file not found") from None
    except Exception as e:
        raise BranchyError(f"{path}: unreadable tensor file ({e.__class__.__name__})") from None


def tensor_to_inputs(t: torch.Tensor, pre: Preprocessing, where: str) -> torch.Tensor:
    """uint8 pixels (0..255) or floats on the 0..1 scale, shaped (N, C, H, W), (C, H, W) or, for one
    channel, (N, H, W) -> normalised float32 (N, C, H, W)."""
    c, h, w = pre.input_shape
    if t.dim() == 3 and c == 1 and list(t.shape[1:]) == [h, w]:
        t = t.unsqueeze(1)
    elif t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or list(t.shape[1:]) != [c, h, w]:
        raise BranchyError(
            f"{where}: tensor shape {tuple(t.shape)} does not match the model's input (N, {c}, {h}, {w})"
        )
    if t.dtype == torch.uint8:
        return eval_transform(pre)(t)
    if t.dtype in (torch.float32, torch.float64, torch.float16):
        x = t.float()
        if not torch.isfinite(x).all():
            raise BranchyError(f"{where}: tensor contains NaN or infinite values")
        return Normalize(pre)(x)
    dtype = str(t.dtype).replace("torch.", "")
    raise BranchyError(f"{where}: tensor dtype {dtype} is not supported (uint8 pixels or float 0..1)")


def load_inputs(
    paths: list[str], pre: Preprocessing, resize: bool = False, notes: list[str] | None = None
) -> torch.Tensor:
    """All inputs, in order, as one normalised float32 batch (``resize``, ``notes``: :func:`image_to_pixels`)."""
    if not paths:
        raise BranchyError("no inputs given")
    images: list[torch.Tensor] = []
    batches: list[torch.Tensor] = []
    for p in map(Path, paths):
        if p.suffix.lower() in TENSOR_SUFFIXES:
            if images:
                batches.append(eval_transform(pre)(torch.stack(images)))
                images = []
            batches.append(tensor_to_inputs(load_tensor_file(p), pre, str(p)))
        else:
            images.append(load_image(p, pre.input_shape, resize, notes))
    if images:
        batches.append(eval_transform(pre)(torch.stack(images)))
    x = torch.cat(batches)
    if len(x) == 0:
        raise BranchyError("the inputs hold no samples")
    return x.contiguous()
