"""reme: training-free open-vocabulary semantic segmentation by retrieval (ReME).

Public API::

    from reme import Segmenter
    result = Segmenter("reference_sets/default").predict("photo.jpg", ["cat", "sofa"])
    result.label_map  # (H, W) int32 indices into result.classes
"""

from typing import TYPE_CHECKING

from reme._version import __version__

# Public names load on first use (PEP 562), so that ``import reme`` and ``reme --help`` do not
# import torch, transformers or faiss. The TYPE_CHECKING imports give type checkers and the API
# docs the same names.
if TYPE_CHECKING:
    from reme.build.pipeline import CaptionBuildParams, build_caption_reference, build_gt_reference
    from reme.classes import parse_classes
    from reme.encoders import list_encoders, resolve_encoder
    from reme.errors import ImageReadError, MissingWeightsError, ReferenceSetError
    from reme.io import load_image
    from reme.proposals import FelzenszwalbParams, felzenszwalb_segments
    from reme.reference import ReferenceSet, load_reference, read_manifest
    from reme.inference.segmenter import SegmentationResult, Segmenter

_LAZY = {
    "CaptionBuildParams": "reme.build.pipeline",
    "build_caption_reference": "reme.build.pipeline",
    "build_gt_reference": "reme.build.pipeline",
    "parse_classes": "reme.classes",
    "list_encoders": "reme.encoders",
    "resolve_encoder": "reme.encoders",
    "ImageReadError": "reme.errors",
    "MissingWeightsError": "reme.errors",
    "ReferenceSetError": "reme.errors",
    "load_image": "reme.io",
    "FelzenszwalbParams": "reme.proposals",
    "felzenszwalb_segments": "reme.proposals",
    "ReferenceSet": "reme.reference",
    "load_reference": "reme.reference",
    "read_manifest": "reme.reference",
    "SegmentationResult": "reme.inference.segmenter",
    "Segmenter": "reme.inference.segmenter",
}


def __getattr__(name: str):
    """Import a public name (or a submodule, ``reme.inference.segmenter``) on first access."""
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"reme.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"reme.{name}":
            raise
    raise AttributeError(f"module 'reme' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "CaptionBuildParams",
    "FelzenszwalbParams",
    "ImageReadError",
    "MissingWeightsError",
    "ReferenceSet",
    "ReferenceSetError",
    "SegmentationResult",
    "Segmenter",
    "build_caption_reference",
    "build_gt_reference",
    "felzenszwalb_segments",
    "list_encoders",
    "load_image",
    "load_reference",
    "parse_classes",
    "read_manifest",
    "resolve_encoder",
]
