"""Label embeddings by prompt-template ensembling (docs/method.md step 5), cached on disk per text
encoder, templates and label ([`reme.encoders.text_cache`][reme.encoders.text_cache])."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from reme.encoders import text_cache

#: The four templates of the paper (docs/method.md step 5).
TEMPLATES: tuple[str, ...] = (
    "A photo of {}",
    "This is a photo of {}",
    "There is {} in the scene",
    "A photo of {} in the scene",
)


def embed_labels(text_encoder, labels: Sequence[str], templates: Sequence[str] = TEMPLATES,
                 batch_size: int = 1024, cache: bool | None = None) -> np.ndarray:
    """Template-ensembled, L2-normalised label embeddings.

    Each label's embedding is the mean of the text-encoder embeddings of ``template.format(label)``
    over all templates, then L2-normalised (docs/method.md step 5).

    Args:
        text_encoder: a `reme.encoders.TextEncoder`.
        labels: n label strings.
        templates: format strings with one ``{}``; ``("{}",)`` embeds labels bare.
        batch_size: labels per encoder call (all templates of these labels in one call).
        cache: read and write the on-disk cache (`reme.encoders.text_cache`); None = on unless
            ``$REME_TEXT_CACHE=0``. Only encoders with a ``cache_id`` attribute are cached.

    Returns:
        (n, d) float32, unit rows; (0, d) for no labels.

    Raises:
        ValueError: a template has no ``{}`` placeholder.
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs one '{{}}' placeholder, got {list(templates)}")
    labels = list(labels)
    encoder_id = getattr(text_encoder, "cache_id", None)
    if cache is None:
        cache = text_cache.cache_enabled()
    store = text_cache.TextEmbeddingCache(encoder_id, templates, text_encoder.dim) if cache and encoder_id else None
    known = store.get(labels) if store is not None else {}
    todo = [lab for lab in dict.fromkeys(labels) if lab not in known]
    fresh = _embed(text_encoder, todo, templates, batch_size)
    if store is not None and todo:
        store.put(dict(zip(todo, fresh)))
    rows = {**known, **dict(zip(todo, fresh))}
    out = np.zeros((len(labels), text_encoder.dim), np.float32)
    for i, lab in enumerate(labels):
        out[i] = rows[lab]
    return out


def _embed(text_encoder, labels: list[str], templates: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Unit template-mean rows of ``labels``, all templates of ``batch_size`` labels per call."""
    out = np.zeros((len(labels), text_encoder.dim), np.float32)
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        texts = [t.format(lab) for lab in chunk for t in templates]
        emb = text_encoder.encode(texts).reshape(len(chunk), len(templates), -1).mean(axis=1)
        out[start:start + len(chunk)] = emb
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return list(out / np.maximum(norms, 1e-12))
