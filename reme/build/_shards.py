"""Shards of a streaming reference build: the per-image stages' output on disk.

A build splits its image list into shards of ``shard_size`` consecutive images. Each shard's
per-image output (docs/method.md steps 1-6: segments with their visual embeddings, and the
segment-label pairs) is written to a *work folder*::

    WORK/
      plan.json                       settings fingerprint of the build (see ShardStore.open)
      shards/000000.segments.parquet  one row per kept segment: image, bbox (x, y, w, h),
                                      area, source, embedding (fixed-size list float32)
      shards/000000.pairs.parquet     one row per (segment, label) pair: segment (row in the
                                      segments file), label, root, head, score (CLIP pairing)
      shards/000000.json              completion marker, written last: counts, skipped
                                      images, sha256 of the two Parquet files

Every file is written atomically (temp file + fsync + rename), so after ``kill -9``, a full
disk or a power cut a shard is either complete (marker present, checksums match) or redone.
Parquet bytes depend only on the shard's contents (no timestamps; the writer's version
string is the only metadata), so a shard computed twice is byte-identical.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reme.io import write_bytes_atomic, sha256_file

logger = logging.getLogger(__name__)

#: Version of the shard layout; part of the plan fingerprint.
SHARD_FORMAT = 1
PLAN_FILE = "plan.json"


class ShardWriteError(OSError):
    """Writing to the work or output folder failed (disk full, permission denied, ...).

    Shards written before the failure stay valid; re-running the same command resumes.
    """


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_sha256_file = sha256_file


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise a table to Parquet (zstd) in memory; the same table gives the same bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def segments_table(image: list[str], bbox: np.ndarray, area: np.ndarray, source: list[str],
                   embedding: np.ndarray) -> pa.Table:
    """Segments of a shard as an Arrow table.

    Args:
        image: m image keys; bbox: (m, 4) int XYWH in source-image pixels; area: (m,) int
            pixels; source: m provenance strings; embedding: (m, d) float32, L2-normalised.
    """
    emb = np.ascontiguousarray(embedding, np.float32)
    bbox = np.ascontiguousarray(bbox, np.int32).reshape(-1, 4)
    return pa.table({
        "image": pa.array(image, pa.string()),
        "bbox": pa.FixedSizeListArray.from_arrays(pa.array(bbox.ravel(), pa.int32()), 4),
        "area": pa.array(np.asarray(area, np.int64), pa.int64()),
        "source": pa.array(source, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), emb.shape[1]),
    })


def pairs_table(segment: list[int] | np.ndarray, label: list[str], root: list[str], head: list[str],
                score: list[float] | np.ndarray | None = None) -> pa.Table:
    """Pairs of a shard: ``segment`` is the row in the shard's segments table; ``score`` the
    CLIP pairing cosine of step 4 (NaN in GT mode), kept for score-based filter variants."""
    score = np.full(len(label), np.nan, np.float32) if score is None else np.asarray(score, np.float32)
    return pa.table({
        "segment": pa.array(np.asarray(segment, np.int64), pa.int64()),
        "label": pa.array(label, pa.string()),
        "root": pa.array(root, pa.string()),
        "head": pa.array(head, pa.string()),
        "score": pa.array(score, pa.float32()),
    })


def encode_shard(segments: pa.Table, pairs: pa.Table, meta: dict[str, Any]) -> tuple[bytes, bytes, dict[str, Any]]:
    """Parquet bytes of both tables and the marker dict (with sha256s and row counts)."""
    seg_b, pair_b = parquet_bytes(segments), parquet_bytes(pairs)
    meta = dict(meta)
    meta.update({"format": SHARD_FORMAT, "segments": segments.num_rows, "pairs": pairs.num_rows,
                 "sha256": {"segments": _sha256_bytes(seg_b), "pairs": _sha256_bytes(pair_b)}})
    return seg_b, pair_b, meta


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


class ShardStore:
    """The work folder of one build (module docstring).

    Args:
        root: the work folder (created by `open`).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.shard_dir = self.root / "shards"

    def _path(self, index: int, kind: str) -> Path:
        return self.shard_dir / f"{index:06d}.{kind}"

    def segments_path(self, index: int) -> Path:
        return self._path(index, "segments.parquet")

    def pairs_path(self, index: int) -> Path:
        return self._path(index, "pairs.parquet")

    def marker_path(self, index: int) -> Path:
        return self._path(index, "json")

    def open(self, fingerprint: dict[str, Any], *, resume: bool = True) -> None:
        """Create the folder or check that an existing one belongs to the same build.

        Args:
            fingerprint: JSON-able settings that determine every shard's contents (encoders,
                per-image parameters, image list, shard and batch size).
            resume: keep finished shards of an earlier run with the same fingerprint; False
                deletes them first.

        Raises:
            ValueError: the folder holds shards of a build with a different fingerprint
                (the message names the differing settings and the fix).
            ShardWriteError: the folder cannot be created or written.
        """
        plan = {"shard_format": SHARD_FORMAT, **fingerprint}
        plan = json.loads(json.dumps(plan))  # normalise tuples etc.
        path = self.root / PLAN_FILE
        if path.is_file() and resume:
            try:
                old = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if old == plan:
                return
            if old is not None:
                diff = _diff_keys(old, plan)
                raise ValueError(
                    f"work folder {self.root} holds shards of a build with different settings "
                    f"(differs in: {', '.join(diff[:8])}). Re-run with the original settings to resume, "
                    "pass resume=False (CLI: --no-resume) to start over, or choose another --work-dir"
                )
        try:
            if self.shard_dir.exists():
                shutil.rmtree(self.shard_dir)
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, json.dumps(plan, indent=1, sort_keys=True).encode())
        except OSError as exc:
            raise ShardWriteError(exc.errno or errno.EIO,
                                  f"cannot write the work folder {self.root}: {exc.strerror or exc}; "
                                  "choose a writable --work-dir with free space") from exc

    def is_done(self, index: int, *, verify: bool = True) -> bool:
        """True when shard ``index`` is complete: marker present and, with ``verify``, both
        Parquet files match the marker's sha256."""
        meta = self.read_meta(index)
        if meta is None or meta.get("format") != SHARD_FORMAT:
            return False
        for kind, path in (("segments", self.segments_path(index)), ("pairs", self.pairs_path(index))):
            if not path.is_file():
                return False
            if verify and _sha256_file(path) != meta["sha256"][kind]:
                logger.warning("shard %s does not match its checksum; recomputing it", path)
                return False
        return True

    def read_meta(self, index: int) -> dict[str, Any] | None:
        """The marker dict of a shard, or None when it is absent or unreadable."""
        path = self.marker_path(index)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None

    def write(self, index: int, segments_bytes: bytes, pairs_bytes: bytes, meta: dict[str, Any]) -> None:
        """Write a shard atomically: both Parquet files, then the marker.

        Raises:
            ShardWriteError: a write failed (the message names the file, the cause and that
                earlier shards are intact).
        """
        for path, data in ((self.segments_path(index), segments_bytes), (self.pairs_path(index), pairs_bytes),
                           (self.marker_path(index), json.dumps(meta, indent=1, sort_keys=True).encode())):
            try:
                write_bytes_atomic(path, data)
            except OSError as exc:
                raise ShardWriteError(
                    exc.errno or errno.EIO,
                    f"cannot write shard file {path}: {exc.strerror or exc}. Shards written before it are "
                    "intact: free disk space or fix the permissions, then re-run the same command to resume",
                ) from exc

    def read_table(self, index: int, kind: str, columns: list[str] | None = None) -> pa.Table:
        """Read the ``"segments"`` or ``"pairs"`` table of a shard (only ``columns``)."""
        path = self.segments_path(index) if kind == "segments" else self.pairs_path(index)
        return pq.read_table(path, columns=columns)
