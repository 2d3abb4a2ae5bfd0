"""On-disk cache of template-ensembled label embeddings (docs/performance.md).

Embedding a class list costs one text-encoder pass per template and label (4,000 MiniLM
sentences for 1,000 classes: tens of seconds on two CPU cores). The result depends only on the
text encoder's weights, the templates and the label, so it is kept in one SQLite file,
``$REME_CACHE_DIR/text_embeddings.sqlite`` (default ``~/.cache/reme``), shared by every process:

* key: sha256 of the encoder's ``cache_id`` (its spec plus a weights identity), the templates
  and the label; value: the (d,) float32 unit vector of
  [`reme.encoders.text.embed_labels`][reme.encoders.text.embed_labels];
* writes are SQLite transactions (atomic; concurrent processes wait on SQLite's lock, WAL
  journal), so a reader never sees half a row;
* bounded: past `DEFAULT_MAX_ROWS` rows the least recently used tenth is dropped;
* off with ``REME_TEXT_CACHE=0`` (or ``embed_labels(..., cache=False)``); a cache folder that
  cannot be written is skipped with one warning, never an error.

Only encoders that define ``cache_id`` are cached (MiniLM, CLIP text towers); their ``encode``
is batch-independent (each sentence's vector does not depend on the others in its batch), so
a cached row is bit-identical to a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Environment switch: "0", "false", "off" or "no" disables the cache.
ENV_SWITCH: str = "REME_TEXT_CACHE"
#: Most rows kept (x d x 4 bytes: 200,000 x 384 x 4 = 307 MB for MiniLM).
DEFAULT_MAX_ROWS: int = 200_000
_FILE = "text_embeddings.sqlite"


def cache_enabled() -> bool:
    """False when ``$REME_TEXT_CACHE`` is 0 / false / off / no."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def default_cache_path() -> Path:
    """``$REME_CACHE_DIR/text_embeddings.sqlite``, else ``~/.cache/reme/text_embeddings.sqlite``."""
    root = os.environ.get("REME_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "reme")
    return Path(root) / _FILE


def weights_identity(path: str | os.PathLike) -> str:
    """Short identity of a weights file or folder: sha256 over the relative names, sizes and
    modification times of its files (cheap; changes when any file is replaced).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _key(encoder_id: str, templates: Sequence[str], label: str) -> str:
    return hashlib.sha256(json.dumps([encoder_id, list(templates), label]).encode()).hexdigest()


class TextEmbeddingCache:
    """Label embeddings of one text encoder and template set, stored in SQLite.

    Args:
        encoder_id: the text encoder's ``cache_id``.
        templates: the prompt templates.
        dim: embedding dimension d.
        path: SQLite file (default `default_cache_path`).
        max_rows: bound on the number of rows (least recently used out).
    """

    def __init__(self, encoder_id: str, templates: Sequence[str], dim: int, *,
                 path: str | os.PathLike | None = None, max_rows: int = DEFAULT_MAX_ROWS):
        self.encoder_id, self.templates, self.dim = str(encoder_id), tuple(templates), int(dim)
        self.path = Path(path) if path is not None else default_cache_path()
        self.max_rows = int(max_rows)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, dim INTEGER, vec BLOB, used REAL)")
        return con

    def get(self, labels: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached rows of ``labels`` (missing ones absent); {} when the file cannot be read."""
        keys = {_key(self.encoder_id, self.templates, lab): lab for lab in dict.fromkeys(labels)}
        out: dict[str, np.ndarray] = {}
        if not keys or not self.path.exists():
            return out
        try:
            con = self._connect()
            try:
                items = list(keys)
                for s in range(0, len(items), 500):
                    part = items[s:s + 500]
                    rows = con.execute(f"SELECT key, dim, vec FROM emb WHERE key IN ({','.join('?' * len(part))})",
                                       part).fetchall()
                    for k, d, v in rows:
                        if d == self.dim and len(v) == 4 * self.dim:
                            out[keys[k]] = np.frombuffer(v, np.float32).copy()
                if out:
                    with con:
                        now = time.time()
                        con.executemany("UPDATE emb SET used=? WHERE key=?",
                                        [(now, _key(self.encoder_id, self.templates, lab)) for lab in out])
            finally:
                con.close()
        except sqlite3.Error as exc:
            logger.warning("text-embedding cache %s not read (%s); embedding afresh", self.path, exc)
            return {}
        return out

    def put(self, rows: dict[str, np.ndarray]) -> None:
        """Store label -> (d,) float32 rows in one transaction, then trim to ``max_rows``."""
        if not rows:
            return
        now = time.time()
        data = [(_key(self.encoder_id, self.templates, lab), self.dim,
                 np.ascontiguousarray(v, np.float32).tobytes(), now) for lab, v in rows.items()]
        try:
            con = self._connect()
            try:
                with con:
                    con.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?, ?, ?)", data)
                    n = con.execute("SELECT COUNT(*) FROM emb").fetchone()[0]
                    if n > self.max_rows:
                        drop = n - self.max_rows + self.max_rows // 10
                        con.execute("DELETE FROM emb WHERE key IN (SELECT key FROM emb ORDER BY used LIMIT ?)",
                                    (drop,))
            finally:
                con.close()
        except (sqlite3.Error, OSError) as exc:
            logger.warning("text-embedding cache %s not written (%s); set REME_CACHE_DIR to a writable "
                           "folder or REME_TEXT_CACHE=0", self.path, exc)
