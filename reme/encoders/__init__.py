"""Frozen encoders and captioners behind one resolver
([`resolve_encoder`][reme.encoders.factory.resolve_encoder])."""

from reme.encoders.base import Captioner, CLIPModel, TextEncoder, VisualEncoder
from reme.encoders.factory import (
    ENCODER_ALIASES,
    list_encoders,
    resolve_device,
    resolve_encoder,
    split_spec,
)

__all__ = [
    "Captioner",
    "CLIPModel",
    "TextEncoder",
    "VisualEncoder",
    "ENCODER_ALIASES",
    "list_encoders",
    "resolve_device",
    "resolve_encoder",
    "split_spec",
]
