"""reme: training-free open-vocabulary semantic segmentation by retrieval (ReME).

Public API::

    from reme import Segmenter
    result = Segmenter("reference_sets/default").predict("photo.jpg", ["cat", "sofa"])
    result.label_map  # (H, W) int32 indices into result.classes
"""

from reme._version import __version__
from reme.build import CaptionBuildParams, build_caption_reference, build_gt_reference
from reme.classes import parse_classes
from reme.encoders import list_encoders, resolve_encoder
from reme.errors import ImageReadError, MissingWeightsError, ReferenceSetError
from reme.io import load_image
from reme.proposals import FelzenszwalbParams, felzenszwalb_segments
from reme.reference import ReferenceSet, load_reference, read_manifest
from reme.segmenter import Segmenter, SegmentationResult

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
