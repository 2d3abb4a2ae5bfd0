"""Label embeddings by prompt-template ensembling (docs/method.md step 5)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: The four templates of the paper (docs/method.md step 5).
TEMPLATES: tuple[str, ...] = (
    "A photo of {}",
    "This is a photo of {}",
    "There is {} in the scene",
    "A photo of {} in the scene",
)


def embed_labels(text_encoder, labels: Sequence[str], templates: Sequence[str] = TEMPLATES,
                 batch_size: int = 1024) -> np.ndarray:
    """Template-ensembled, L2-normalised label embeddings.

    Each label's embedding is the mean of the text-encoder embeddings of ``template.format(label)``
    over all templates, then L2-normalised (docs/method.md step 5).

    Args:
        text_encoder: a `reme.encoders.TextEncoder`.
        labels: n label strings.
        templates: format strings with one ``{}``; ``("{}",)`` embeds labels bare.
        batch_size: labels per encoder call.

    Returns:
        (n, d) float32, unit rows; (0, d) for no labels.

    Raises:
        ValueError: a template has no ``{}`` placeholder.
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs one '{{}}' placeholder, got {list(templates)}")
    labels = list(labels)
    out = np.zeros((len(labels), text_encoder.dim), np.float32)
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        texts = [t.format(lab) for lab in chunk for t in templates]
        emb = text_encoder.encode(texts).reshape(len(chunk), len(templates), -1).mean(axis=1)
        out[start:start + len(chunk)] = emb
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)
