"""The reference set {S_ref, O_ref, L_ref} in memory and on disk (docs/method.md step 10).

On-disk layout of a reference folder (format version 2)::

    REF/
      manifest.json      format version, encoder specs and dims, templates, every build
                         hyper-parameter, counts per stage, sha256 of every file below,
                         ``s_ref_file`` and the FAISS index description (``index``)
      S_ref.npy          S_ref: raw (m, d1) float16 (or float32) NumPy array, L2-normalised
                         rows, row i = segment_id i; loaded as a read-only memory map, so a
                         3M x 1024 float16 set takes 6 GB of (page-cache) memory, not 12+
      segments.parquet   per-segment metadata: segment_id, image, bbox (x, y, w, h), area, source
      labels.parquet     L_ref: label_id, text, root, embedding (fixed-size list float32)
      pairs.parquet      O_ref as sparse pairs: segment_id, label_id (one row per 1 in O_ref)
      dropped.parquet    pairs removed while building, with the reason (provenance)
      index.faiss        FAISS inner-product index over S_ref, kind chosen by size
                         ([`reme.reference.index.choose_index_kind`][reme.reference.index.choose_index_kind]: flat <
                         200k, IVF-SQ8 above)

Format version 1 folders (S_ref as an ``embedding`` column of segments.parquet, read into
memory) still load.

A folder is written under a temporary name and renamed into place when complete, so a
crash never leaves a half-written reference set behind.
"""

from __future__ import annotations

import json
import math
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reme.checks import check_unit_rows
from reme.io import arrow_values, read_parquet, replace_dir, sha256_file
from reme._version import __version__
from reme.errors import ReferenceSetError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: Format versions this reme reads (1: S_ref inside segments.parquet).
READABLE_FORMAT_VERSIONS = (1, 2)
_FILES = ("segments.parquet", "labels.parquet", "pairs.parquet")
S_REF_FILE = "S_ref.npy"
INDEX_FILE = "index.faiss"
DROPPED_FILE = "dropped.parquet"


def empty_dropped() -> dict[str, Any]:
    """An empty ``dropped`` table (see [`ReferenceSet`][reme.reference.ReferenceSet])."""
    return {"image": [], "bbox": np.zeros((0, 4), np.int32), "label": [], "root": [], "reason": [],
            "score": np.zeros(0, np.float32)}


def _dropped_table(d: dict[str, Any]) -> pa.Table:
    bbox = np.asarray(d["bbox"], np.int32).reshape(-1, 4)
    return pa.table({
        "image": pa.array(list(d["image"]), pa.string()),
        "bbox": pa.FixedSizeListArray.from_arrays(pa.array(bbox.ravel(), pa.int32()), 4),
        "label": pa.array(list(d["label"]), pa.string()),
        "root": pa.array(list(d["root"]), pa.string()),
        "reason": pa.array(list(d["reason"]), pa.string()),
        "score": pa.array(np.asarray(d["score"], np.float32)),
    })


@dataclass
class ReferenceSet:
    """A reference set.

    Attributes:
        S_ref: (m, d1) float16 or float32 visual segment embeddings, L2-normalised rows; a
            read-only ``np.memmap`` of ``S_ref.npy`` when loaded from a folder (never copied by
            the retrieval, which reads it block by block).
        L_ref: (n, d2) float32 label text embeddings, L2-normalised rows.
        pair_segment: (p,) int64 and
        pair_label: (p,) int64 -- the nonzeros of the binary O_ref (m x n).
        labels: n label strings (column j of O_ref, row j of L_ref).
        roots: n root nouns of the labels.
        segment_image: m source-image keys (relative paths).
        segment_bbox: (m, 4) int32 XYWH boxes in source-image pixels.
        segment_area: (m,) int64 areas in pixels.
        manifest: encoder specs, parameters and counts (see module docstring).
        segment_source: m strings, the stage that produced each kept segment
            ("caption_pairing", "gt_proposal", "gt_mask"); provenance.
        path: the folder it was loaded from (None when built in memory); where
            `load_index` finds ``index.faiss``.
        dropped: pairs removed while building, as columns ``image`` (m' str), ``bbox``
            ((m', 4) int32 XYWH), ``label``, ``root``, ``reason`` ("group_filter",
            "knee_filter") and ``score`` (float, <S_i, S_center> for the group filter, NaN
            otherwise); provenance for inspection.
    """

    S_ref: np.ndarray
    L_ref: np.ndarray
    pair_segment: np.ndarray
    pair_label: np.ndarray
    labels: list[str]
    roots: list[str]
    segment_image: list[str]
    segment_bbox: np.ndarray
    segment_area: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)
    segment_source: list[str] | None = None
    dropped: dict[str, Any] | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        self.pair_segment = np.asarray(self.pair_segment, np.int64)
        self.pair_label = np.asarray(self.pair_label, np.int64)
        if self.segment_source is None:
            self.segment_source = ["unknown"] * int(self.S_ref.shape[0])
        self.dropped = empty_dropped() if self.dropped is None else self.dropped
        self.validate()

    @property
    def num_segments(self) -> int:
        return int(self.S_ref.shape[0])

    @property
    def num_labels(self) -> int:
        return int(self.L_ref.shape[0])

    def validate(self) -> None:
        """Check shapes and index ranges; raises ReferenceSetError naming the mismatch."""
        m, n = self.S_ref.shape[0], self.L_ref.shape[0]
        checks = [
            (self.S_ref.ndim == 2 and self.L_ref.ndim == 2, f"S_ref {self.S_ref.shape} and L_ref {self.L_ref.shape} must be 2-D"),
            (len(self.labels) == n and len(self.roots) == n, f"{len(self.labels)} labels / {len(self.roots)} roots for L_ref of {n} rows"),
            (len(self.segment_image) == m and len(self.segment_bbox) == m and len(self.segment_area) == m
             and len(self.segment_source) == m,
             f"segment metadata lengths do not match S_ref's {m} rows"),
            (self.pair_segment.shape == self.pair_label.shape, "pair_segment and pair_label differ in length"),
            (self.pair_segment.size == 0 or (self.pair_segment.min() >= 0 and self.pair_segment.max() < m),
             f"O_ref segment ids out of range [0, {m})"),
            (self.pair_label.size == 0 or (self.pair_label.min() >= 0 and self.pair_label.max() < n),
             f"O_ref label ids out of range [0, {n})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ReferenceSetError(f"invalid reference set: {msg}")

    def load_index(self, *, verify: bool = True):
        """The FAISS index saved with this set (``index.faiss``), or None when there is none
        (built in memory, or saved with ``with_index=False``).

        Args:
            verify: check the file's sha256 against the manifest's ``files`` entry first
                (as `load_reference` does for the other files).

        Raises:
            ReferenceSetError: the file does not match its sha256, or FAISS cannot read it
                (truncated or corrupt); the message names the file and the fix.
        """
        if self.path is None or not (Path(self.path) / INDEX_FILE).is_file():
            return None
        from reme.reference.index import read_index

        f = Path(self.path) / INDEX_FILE
        sha = (self.manifest.get("files") or {}).get(INDEX_FILE)
        if verify and sha and _sha256(f) != sha:
            raise ReferenceSetError(
                f"{f} does not match the sha256 in {Path(self.path) / 'manifest.json'} (file changed or truncated); "
                "rebuild the reference set, restore the file, or delete it (an index is then built in memory)"
            )
        try:
            return read_index(f)
        except RuntimeError as exc:  # faiss reports a bad file as RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ReferenceSetError(f"cannot read {f}: {first}; the file is truncated or corrupt, rebuild the "
                                    "reference set or delete the file (an index is then built in memory)") from exc

    def O_ref_dense(self) -> np.ndarray:
        """(m, n) float32 binary O_ref (for small sets and tests)."""
        O = np.zeros((self.num_segments, self.num_labels), np.float32)
        O[self.pair_segment, self.pair_label] = 1.0
        return O

    def save(self, path: str | Path, *, overwrite: bool = False, embedding_dtype: str = "float16",
             with_index: bool = True, extra_tables: dict[str, pa.Table] | None = None) -> Path:
        """Write the reference folder atomically (module docstring).

        Args:
            path: destination folder.
            overwrite: replace an existing folder (after the new one is complete).
            embedding_dtype: "float16" (half the disk and memory) or "float32" for S_ref.
            with_index: also write ``index.faiss`` (kind by size,
                [`reme.reference.index.build_index`][reme.reference.index.build_index]; an IVF index over 1e6 x 1024
                takes about a minute on 2 cores).
            extra_tables: more Parquet files to write into the folder (file name -> table),
                listed with their sha256 in the manifest's ``files`` like the others (an overlay's
                ``examples.parquet``, [`reme.reference.overlay`][reme.reference.overlay]).

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite)")
        if embedding_dtype not in ("float16", "float32"):
            raise ValueError(f"embedding_dtype must be float16 or float32, got {embedding_dtype!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(path)
        tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(path), suffix=".tmp", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the final folder gets the usual mode
        try:
            S = np.lib.format.open_memmap(tmp / S_REF_FILE, mode="w+", dtype=embedding_dtype,
                                          shape=tuple(int(x) for x in self.S_ref.shape))
            for start in range(0, self.num_segments, 65536):                 # no second full copy
                S[start:start + 65536] = self.S_ref[start:start + 65536]
            S.flush()
            bbox = np.asarray(self.segment_bbox, np.int32).reshape(-1, 4)
            seg_table = pa.table({
                "segment_id": pa.array(np.arange(self.num_segments, dtype=np.int64)),
                "image": pa.array(self.segment_image, pa.string()),
                "bbox": pa.FixedSizeListArray.from_arrays(pa.array(bbox.ravel()), 4),
                "area": pa.array(np.asarray(self.segment_area, np.int64)),
                "source": pa.array(self.segment_source, pa.string()),
            })
            dropped_table = _dropped_table(self.dropped)
            label_table = pa.table({
                "label_id": pa.array(np.arange(self.num_labels, dtype=np.int64)),
                "text": pa.array(self.labels, pa.string()),
                "root": pa.array(self.roots, pa.string()),
                "embedding": _fixed_list(np.ascontiguousarray(self.L_ref, np.float32)),
            })
            pair_table = pa.table({"segment_id": pa.array(self.pair_segment), "label_id": pa.array(self.pair_label)})
            for name, table in zip(_FILES, (seg_table, label_table, pair_table)):
                pq.write_table(table, tmp / name, compression="zstd")
            pq.write_table(dropped_table, tmp / DROPPED_FILE, compression="zstd")
            files = list(_FILES) + [DROPPED_FILE, S_REF_FILE]
            for name, table in (extra_tables or {}).items():
                if name in files or name in (INDEX_FILE, "manifest.json") or "/" in name or "\\" in name:
                    raise ValueError(f"extra table name {name!r} is taken or not a plain file name")
                pq.write_table(table, tmp / name, compression="zstd")
                files.append(name)
            manifest = dict(self.manifest)
            manifest.pop("index", None)
            if with_index:
                from reme.reference.index import build_index, describe_index, write_index

                index = build_index(S)
                write_index(index, tmp / INDEX_FILE)
                manifest["index"] = {**describe_index(index), "file": INDEX_FILE}
                del index
                files.append(INDEX_FILE)
            del S
            manifest.update({
                "format_version": FORMAT_VERSION,
                "reme_version": __version__,
                "created": manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "num_segments": self.num_segments,
                "num_labels": self.num_labels,
                "num_pairs": int(self.pair_segment.size),
                "visual_dim": int(self.S_ref.shape[1]),
                "text_dim": int(self.L_ref.shape[1]),
                "embedding_dtype": embedding_dtype,
                "s_ref_file": S_REF_FILE,
                "files": {f: _sha256(tmp / f) for f in files},
            })
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            self.manifest = manifest
            self.path = path
            replace_dir(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("wrote reference set %s (%d segments, %d labels)", path, self.num_segments, self.num_labels)
        return path


def _fixed_list(arr: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])


_sha256 = sha256_file


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a reference folder.

    Raises:
        ReferenceSetError: folder or manifest missing or not valid JSON.
    """
    mpath = Path(path) / "manifest.json"
    if not mpath.is_file():
        raise ReferenceSetError(f"{path} is not a reme reference set: {mpath} not found")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReferenceSetError(f"{mpath} is not valid JSON ({exc}); rebuild the reference set") from exc
    if not isinstance(manifest, dict):
        raise ReferenceSetError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}; rebuild the reference set")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ReferenceSetError(
            f"{mpath}: format_version {manifest.get('format_version')!r}, this reme reads "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; rebuild it with this version (reme build-reference)"
        )
    validate_manifest(manifest, mpath)
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_str_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


#: Manifest keys whose type `validate_manifest` checks: key -> (check, what it must be).
#: A missing key is left to the reader that needs it (old manifests lack some).
MANIFEST_SCHEMA = {
    "num_segments": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "num_labels": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "num_pairs": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "visual_dim": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "text_dim": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "files": (_is_str_dict, "an object mapping file names to sha256 strings"),
    "encoders": (lambda v: isinstance(v, dict) and all(isinstance(x, str) or x is None for x in v.values()),
                 "an object mapping 'visual' / 'text' to encoder specs"),
    "templates": (lambda v: _is_str_list(v) and all(_one_slot(t) for t in v),
                  "a list of format strings with one '{}' each"),
    "embedding_dtype": (lambda v: v in ("float16", "float32"), "'float16' or 'float32'"),
    "s_ref_file": (lambda v: isinstance(v, str) and bool(v) and "/" not in v and "\\" not in v,
                   "a file name inside the folder"),
    "felzenszwalb": (lambda v: v is None or (isinstance(v, dict) and set(v) <= {"scale", "sigma", "min_size"} and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in v.values())
        and v.get("scale", 1) > 0), "an object of finite numbers scale > 0, sigma >= 0, min_size >= 0"),
    "proposals": (lambda v: v is None or isinstance(v, dict), "an object"),
    "index": (lambda v: v is None or isinstance(v, dict), "an object"),
    "counts": (lambda v: isinstance(v, dict), "an object"),
}


def _one_slot(template: str) -> bool:
    """True when ``template.format(label)`` works and uses the label exactly once."""
    try:
        return template.format("\x00").count("\x00") == 1
    except (IndexError, KeyError, ValueError):
        return False


def validate_manifest(manifest: dict[str, Any], where: str | Path = "manifest.json") -> None:
    """Check the types of the manifest's fields (`MANIFEST_SCHEMA`).

    Raises:
        ReferenceSetError: naming the first field of the wrong type, what it holds and what it
            must be.
    """
    for key, (ok, want) in MANIFEST_SCHEMA.items():
        if key in manifest and not ok(manifest[key]):
            shown = json.dumps(manifest[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ReferenceSetError(f"{where}: field {key!r} is {shown}, must be {want}; "
                                    "the manifest is damaged, rebuild the reference set")


def temp_dir_prefix(final: Path) -> str:
    """Name prefix of the temporary folder `ReferenceSet.save` writes ``final`` under
    (``.NAME.pPID-``; the process id lets a later run tell a dead writer's folder)."""
    return f".{final.name}.p{os.getpid()}-"


def remove_stale_temp_dirs(final: str | Path) -> list[Path]:
    """Remove temporary folders left beside ``final`` by an interrupted save (``kill -9``).

    A folder ``.NAME.pPID-XXXX.tmp`` whose process is no longer running, and one of the older
    form without the process id (``.NAME.XXXX.tmp``), is removed; a live writer's is kept.

    Returns:
        The folders removed.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    for d in final.parent.glob(f".{glob_escape(final.name)}.*.tmp"):
        if not d.is_dir() or d.is_symlink():
            continue
        rest = d.name[len(final.name) + 2:]
        pid = rest[1:].split("-", 1)[0] if rest.startswith("p") else ""
        if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        shutil.rmtree(d, ignore_errors=True)
        logger.info("removed %s, left by an interrupted save", d)
        removed.append(d)
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_embedding(table: pa.Table, fname: str, dim: int) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    if col.type.list_size != dim:
        raise ReferenceSetError(f"{fname}: embedding size {col.type.list_size}, manifest says {dim}")
    return arrow_values(col.values).reshape(-1, dim)


def _read_dropped(path: Path, sha: str | None) -> dict[str, Any]:
    if not path.is_file():
        return empty_dropped()
    if sha and _sha256(path) != sha:
        raise ReferenceSetError(f"{path} does not match the sha256 in the manifest; rebuild the reference set")
    try:
        t = read_parquet(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReferenceSetError(f"cannot read {path}: {exc}; the file is truncated or corrupt") from exc
    return {"image": t.column("image").to_pylist(),
            "bbox": arrow_values(t.column("bbox").combine_chunks().values).reshape(-1, 4),
            "label": t.column("label").to_pylist(), "root": t.column("root").to_pylist(),
            "reason": t.column("reason").to_pylist(), "score": arrow_values(t.column("score"))}


def _read_s_ref(path: Path, manifest: dict[str, Any], mmap: bool) -> np.ndarray:
    f = path / manifest.get("s_ref_file", S_REF_FILE)
    try:
        S = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ReferenceSetError(f"{f} is missing; the reference set is incomplete, rebuild it") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise ReferenceSetError(f"cannot read {f}: {exc}; the file is truncated or corrupt, rebuild the reference set") from exc
    want = (int(manifest["num_segments"]), int(manifest["visual_dim"]))
    if S.ndim != 2 or S.shape[1] != want[1]:
        raise ReferenceSetError(f"{f.name}: embedding size {S.shape[1] if S.ndim == 2 else S.shape}, manifest says {want[1]}")
    if S.shape[0] != want[0]:
        raise ReferenceSetError(f"{path}: manifest says num_segments={want[0]}, {f.name} holds {S.shape[0]}")
    if str(S.dtype) != manifest.get("embedding_dtype", str(S.dtype)):
        raise ReferenceSetError(f"{f.name} holds {S.dtype}, manifest says {manifest['embedding_dtype']}")
    return S


def load_reference(path: str | Path, *, verify: bool = True, mmap: bool = True) -> ReferenceSet:
    """Read a reference folder written by [`ReferenceSet.save`][reme.reference.ReferenceSet.save].

    Args:
        path: the folder.
        verify: check every file's sha256 against the manifest (reads each file once more;
            about 1 s per GB here; a manifest without a ``files`` entry for each is refused),
            and that S_ref rows are finite and unit-norm (L_ref rows are always checked;
            tolerance `reme.checks.UNIT_NORM_TOL`).
        mmap: memory-map S_ref.npy read-only (format 2) instead of reading it into memory;
            the pages are shared with the OS page cache, so S_ref is held once.

    Returns:
        The [`ReferenceSet`][reme.reference.ReferenceSet]; S_ref keeps its stored dtype (float16 or
        float32): a read-only ``np.memmap`` (format 2, ``mmap=True``) or an in-memory array.

    Raises:
        ReferenceSetError: missing or altered files (checksum), a manifest that lists no
            checksums, truncated or unreadable Parquet, contents that disagree with the manifest,
            or S_ref / L_ref rows that are not finite and unit-norm; the message names the file
            and the fix.
    """
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest.get("files") or {}
    v1 = manifest.get("format_version") == 1
    for name in _FILES + (() if v1 else (manifest.get("s_ref_file", S_REF_FILE),)):
        f = path / name
        if not f.is_file():
            raise ReferenceSetError(f"{f} is missing; the reference set is incomplete, rebuild it")
        if verify and name not in files:
            raise ReferenceSetError(f"{path / 'manifest.json'} lists no sha256 of {name} (its 'files' section is "
                                    "missing or incomplete), so the folder cannot be verified; rebuild the reference set")
        if verify and _sha256(f) != files[name]:
            raise ReferenceSetError(
                f"{f} does not match the sha256 in {path / 'manifest.json'} (file changed or truncated); "
                "rebuild the reference set or restore the file"
            )
    tables = {}
    for name in _FILES:
        try:
            tables[name] = read_parquet(path / name)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ReferenceSetError(f"cannot read {path / name}: {exc}; the file is truncated or corrupt, rebuild the reference set") from exc
    seg, lab, pairs = (tables[n] for n in _FILES)
    try:
        S = (_read_embedding(seg, "segments.parquet", int(manifest["visual_dim"])) if v1
             else _read_s_ref(path, manifest, mmap))
        L = _read_embedding(lab, "labels.parquet", int(manifest["text_dim"])).astype(np.float32)
        bbox = arrow_values(seg.column("bbox").combine_chunks().values).reshape(-1, 4)
        ref = ReferenceSet(
            S_ref=S, L_ref=L,
            pair_segment=arrow_values(pairs.column("segment_id")), pair_label=arrow_values(pairs.column("label_id")),
            labels=lab.column("text").to_pylist(), roots=lab.column("root").to_pylist(),
            segment_image=seg.column("image").to_pylist(), segment_bbox=bbox,
            segment_area=arrow_values(seg.column("area")), manifest=manifest,
            segment_source=seg.column("source").to_pylist() if "source" in seg.column_names else None,
            dropped=_read_dropped(path / DROPPED_FILE, files.get(DROPPED_FILE) if verify else None),
            path=path,
        )
    except KeyError as exc:
        raise ReferenceSetError(f"{path}: missing column or manifest key {exc}; rebuild the reference set") from exc
    for key, val in (("num_segments", ref.num_segments), ("num_labels", ref.num_labels)):
        if manifest.get(key) != val:
            raise ReferenceSetError(f"{path}: manifest says {key}={manifest.get(key)}, files hold {val}")
    try:
        check_unit_rows(ref.L_ref, str(path / "labels.parquet") + " (L_ref)")
        if verify:  # S_ref is read in full anyway for its sha256
            check_unit_rows(ref.S_ref, str(path / manifest.get("s_ref_file", S_REF_FILE)) + " (S_ref)")
    except ValueError as exc:
        raise ReferenceSetError(f"{exc}; the file is damaged, rebuild the reference set") from None
    return ref


def concat_references(refs: list[ReferenceSet], manifest: dict[str, Any] | None = None) -> ReferenceSet:
    """Concatenate reference sets built with the same encoders; labels with the same text
    are merged into one column of O_ref.

    Args:
        refs: at least one ReferenceSet; all with equal ``manifest["encoders"]`` and dims.
        manifest: manifest of the result (default: the first set's, with ``parts`` listing
            each input's manifest).

    Raises:
        ReferenceSetError: encoders or dimensions differ.
    """
    if not refs:
        raise ValueError("concat_references needs at least one reference set")
    enc = refs[0].manifest.get("encoders")
    for r in refs[1:]:
        if r.manifest.get("encoders") != enc or r.S_ref.shape[1] != refs[0].S_ref.shape[1] \
                or r.L_ref.shape[1] != refs[0].L_ref.shape[1]:
            raise ReferenceSetError(f"cannot concatenate reference sets built with different encoders: {enc} vs {r.manifest.get('encoders')}")
    label_id: dict[str, int] = {}
    labels, roots, L_rows = [], [], []
    ps, pl, offset = [], [], 0
    for r in refs:
        remap = np.empty(r.num_labels, np.int64)
        for j, (t, root) in enumerate(zip(r.labels, r.roots)):
            if t not in label_id:
                label_id[t] = len(labels)
                labels.append(t)
                roots.append(root)
                L_rows.append(r.L_ref[j])
            remap[j] = label_id[t]
        ps.append(r.pair_segment + offset)
        pl.append(remap[r.pair_label])
        offset += r.num_segments
    man = dict(manifest or refs[0].manifest)
    if manifest is None:
        man["parts"] = [r.manifest for r in refs]
    return ReferenceSet(
        S_ref=np.concatenate([np.asarray(r.S_ref) for r in refs]).astype(np.result_type(*[r.S_ref.dtype for r in refs])),
        L_ref=np.stack(L_rows).astype(np.float32),
        pair_segment=np.concatenate(ps), pair_label=np.concatenate(pl), labels=labels, roots=roots,
        segment_image=[k for r in refs for k in r.segment_image],
        segment_bbox=np.concatenate([r.segment_bbox for r in refs]),
        segment_area=np.concatenate([r.segment_area for r in refs]), manifest=man,
        segment_source=[x for r in refs for x in r.segment_source],
        dropped={k: (np.concatenate([np.asarray(r.dropped[k]) for r in refs]) if k in ("bbox", "score")
                     else [x for r in refs for x in r.dropped[k]]) for k in empty_dropped()},
    )
