"""Overlay reference sets: segments a user adds by example, searched with a base reference set.

Retrieval keeps its knowledge in a table, so adding rows is learning (kNN-CLIP's continual
segmentation by retrieval). An [`Overlay`][reme.reference.overlay.Overlay] holds the rows added to a base
reference set: S_ref rows of the example's segments, one label each (O_ref), and the label
embeddings of labels the base does not have (L_ref). At query time
[`Segmenter`][reme.inference.segmenter.Segmenter] searches base and overlay together as one reference set
whose rows are the base's followed by the overlay's, and whose labels are the base's followed
by the overlay's new labels; an empty overlay is the base, exactly.

On disk an overlay is a reference folder (``reme.reference`` format: float16 ``S_ref.npy``,
Parquet tables, sha256 manifest, written under a temporary name and renamed) with
``manifest["overlay"]`` describing the base it was made on and one more file,
``examples.parquet``, one row per S_ref row: ``segment_id``, ``example_id``, source ``image``,
``mask_bbox`` (XYWH box of the example's mask in that image), ``label``, ``added`` (UTC ISO
time) and ``encoder`` (visual encoder spec). It lives beside the base folder, never inside it.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from reme.classes import check_label
from reme.errors import ReferenceSetError
from reme.io import arrow_values, read_parquet, sha256_file
from reme.reference import ReferenceSet, load_reference
from reme.reference.oref import ORefCSR

EXAMPLES_FILE = "examples.parquet"
#: ``segments.parquet`` source of an overlay row.
EXAMPLE_SOURCE = "example"


class StackedRows:
    """Several (m_i, d) arrays read as one (sum m_i, d) array, without copying them.

    Supports what the retrieval reads from S_ref (`reme.inference.retrieval`): ``shape``, ``ndim``,
    ``dtype``, ``len``, row slices (a slice across parts is concatenated, one block at a time)
    and integer row arrays. All parts share ``d`` and dtype.

    Raises:
        ValueError: parts of different widths or dtypes.
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = [p for p in parts if p.shape[0]] or list(parts[:1])
        if len({p.shape[1] for p in self.parts}) > 1 or len({np.dtype(p.dtype) for p in self.parts}) > 1:
            raise ValueError(f"parts differ in width or dtype: {[(p.shape, p.dtype) for p in self.parts]}")
        self.starts = np.cumsum([0] + [int(p.shape[0]) for p in self.parts])
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]))
        self.dtype = np.dtype(self.parts[0].dtype)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("StackedRows supports row slices with step 1 only")
            out = []
            for p, s in zip(self.parts, self.starts[:-1]):
                lo, hi = max(start - s, 0), min(stop - s, p.shape[0])
                if lo < hi:
                    out.append(p[lo:hi])
            if len(out) == 1:
                return out[0]
            return np.concatenate(out) if out else np.zeros((0, self.shape[1]), self.dtype)
        idx = np.asarray(key, np.int64)
        if idx.ndim != 1:
            raise IndexError("StackedRows takes a row slice or a 1-D array of row ids")
        if idx.size and (idx.min() < -self.shape[0] or idx.max() >= self.shape[0]):
            raise IndexError(f"row ids out of range [0, {self.shape[0]})")
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((idx.size, self.shape[1]), self.dtype)
        for j, p in enumerate(self.parts):
            sel = part == j
            if sel.any():
                out[sel] = p[idx[sel] - self.starts[j]]
        return out


def concat_csr(base: ORefCSR, extra_labels: np.ndarray, num_labels: int) -> ORefCSR:
    """O_ref of a base followed by rows with one label each.

    Args:
        base: O_ref of the base (m x n) in CSR form.
        extra_labels: (r,) int64 label id of each added row, in [0, num_labels).
        num_labels: columns of the result (n + new labels).

    Returns:
        (m + r) x num_labels [`ORefCSR`][reme.reference.oref.ORefCSR].
    """
    extra = np.asarray(extra_labels, np.int64)
    ptr = np.concatenate([base.ptr, base.ptr[-1] + np.arange(1, extra.size + 1, dtype=np.int64)])
    return ORefCSR(ptr=ptr, label=np.concatenate([base.label, extra]), num_labels=int(num_labels))


@contextlib.contextmanager
def folder_lock(path: str | Path, *, exclusive: bool) -> Iterator[None]:
    """Reader/writer lock of an overlay folder: ``flock`` on ``.NAME.lock`` beside it.

    Writers (`Overlay.save`) hold it exclusively from reading the folder's current rows to
    swapping in the merged folder (one read-modify-write transaction), readers (`load_overlay`)
    shared while they read its files, so a reader never mixes files of two saves and no writer
    overwrites another's rows, across threads and processes. ``flock`` locks belong to an open
    file, so two threads of one process exclude each other too. Where ``fcntl`` is missing
    (Windows) it does nothing.
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def normalise_label(label: str) -> str:
    """A label as stored: surrounding white space removed, inner runs collapsed to one space,
    checked against the class-list grammar (`reme.classes.check_label`).

    Raises:
        ValueError: not a string, empty, with ``,`` ``;`` or a control character, or too long.
    """
    return check_label(label)


def check_overlay_path(path: str | Path, base_path: str | Path | None) -> Path:
    """``path`` as a Path, or ValueError when it is the base folder or inside it (an overlay
    lives beside its base, never inside it)."""
    path = Path(path)
    if base_path is not None:
        b, p = Path(base_path).resolve(), path.resolve()
        if p == b or b in p.parents:
            raise ValueError(f"the overlay {path} must not be inside the base reference set {base_path}; "
                             f"put it beside it (e.g. {Path(base_path).parent / (Path(base_path).name + '-overlay')})")
    return path


@dataclass
class Overlay:
    """Rows added by example to a base reference set (module docstring).

    Attributes:
        S: (r, d1) S_ref rows of the added segments, the base's dtype (float16 or float32),
            L2-normalised.
        labels: r label strings, one per row (O_ref: one label per added segment).
        example_ids: r ids of the `add` call each row came from (undo removes a whole call).
        images: r source-image names.
        bbox: (r, 4) int32 XYWH box of each segment in source-image pixels.
        area: (r,) int64 segment areas in pixels.
        mask_bbox: (r, 4) int32 XYWH box of the example's mask (pixels of ``label``).
        added: r UTC ISO times.
        label_embeddings: label -> (d2,) float32 L_ref row of every label in ``labels``.
        encoders: ``{"visual": spec, "text": spec}`` the rows were made with (the base's).
        templates: prompt templates of the label embeddings (the base's).
        base: what identifies the base: ``path``, ``num_segments``, ``num_labels``, ``s_ref_sha256``.
        path: the folder it was loaded from or last saved to (None before).
    """

    S: np.ndarray
    labels: list[str]
    example_ids: list[str]
    images: list[str]
    bbox: np.ndarray
    area: np.ndarray
    mask_bbox: np.ndarray
    added: list[str]
    label_embeddings: dict[str, np.ndarray]
    encoders: dict[str, Any]
    templates: list[str]
    base: dict[str, Any]
    text_dim: int = 0
    path: Path | None = None
    #: example ids as of the last load or save (what a save compares the folder against).
    known_ids: frozenset = field(default_factory=frozenset, repr=False, compare=False)

    @classmethod
    def empty(cls, base: ReferenceSet) -> "Overlay":
        """An overlay with no rows for ``base`` (its encoders, templates, dims and dtype)."""
        man = base.manifest
        return cls(S=np.zeros((0, base.S_ref.shape[1]), base.S_ref.dtype), labels=[], example_ids=[], images=[],
                   bbox=np.zeros((0, 4), np.int32), area=np.zeros(0, np.int64),
                   mask_bbox=np.zeros((0, 4), np.int32), added=[], label_embeddings={},
                   encoders=dict(man.get("encoders") or {}), templates=list(man.get("templates") or []),
                   base=base_identity(base), text_dim=int(base.L_ref.shape[1]))

    @property
    def num_rows(self) -> int:
        """r, the number of added segments."""
        return int(self.S.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    def add(self, S: np.ndarray, labels: Sequence[str], *, image: str, bbox: np.ndarray, area: np.ndarray,
            mask_bbox: np.ndarray, label_embeddings: dict[str, np.ndarray], example_id: str | None = None) -> str:
        """Append the rows of one example; returns its id.

        Args:
            S: (r, d1) float L2-normalised segment embeddings (stored in the overlay's dtype).
            labels: r labels (normalised with `normalise_label`; a label equal but for case to
                one the overlay has is stored with the overlay's spelling).
            image: source-image name.
            bbox: (r, 4) XYWH segment boxes; area: (r,) areas; mask_bbox: (r, 4) mask boxes.
            label_embeddings: an L_ref row for every label of ``labels`` the overlay lacks.
            example_id: the id to record (default a new random one).

        Raises:
            ValueError: shapes that disagree, or a label without an embedding.
        """
        S = np.asarray(S)
        same = {t.casefold(): t for t in reversed(self.labels)}   # labels equal but for case are one
        given = [normalise_label(x) for x in labels]
        labels = [same.get(x.casefold(), x) for x in given]
        r = len(labels)
        if S.ndim != 2 or S.shape != (r, self.S.shape[1]):
            raise ValueError(f"S must be ({r}, {self.S.shape[1]}), got {S.shape}")
        for lab in labels:
            if lab not in self.label_embeddings and lab not in label_embeddings:
                raise ValueError(f"no label embedding for {lab!r}")
        example_id = example_id or uuid.uuid4().hex[:12]
        if example_id in self.example_ids:
            raise ValueError(f"example id {example_id!r} is already in the overlay")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for lab in set(labels) - set(self.label_embeddings):
            self.label_embeddings[lab] = np.asarray(label_embeddings[lab], np.float32).ravel()
        self.S = np.concatenate([self.S, S.astype(self.S.dtype)])
        self.labels += labels
        self.example_ids += [example_id] * r
        self.images += [str(image)] * r
        self.bbox = np.concatenate([self.bbox, np.asarray(bbox, np.int32).reshape(r, 4)])
        self.area = np.concatenate([self.area, np.asarray(area, np.int64).reshape(r)])
        self.mask_bbox = np.concatenate([self.mask_bbox, np.asarray(mask_bbox, np.int32).reshape(r, 4)])
        self.added += [now] * r
        return example_id

    def remove(self, example_id: str | None = None) -> int:
        """Remove the rows of one example (None: the last one added); returns how many.

        Labels no row uses any more are dropped, so removing every example gives back the base.

        Raises:
            KeyError: no example with that id.
        """
        if example_id is None:
            if not self.example_ids:
                return 0
            example_id = self.example_ids[-1]
        keep = np.array([e != example_id for e in self.example_ids], bool)
        if keep.all():
            raise KeyError(f"no example {example_id!r} in the overlay")
        self._select(keep)
        return int((~keep).sum())

    def clear(self) -> int:
        """Remove every row; returns how many."""
        n = self.num_rows
        self._select(np.zeros(n, bool))
        return n

    def _select(self, keep: np.ndarray) -> None:
        idx = np.flatnonzero(keep)
        self.S = self.S[idx]
        for name in ("labels", "example_ids", "images", "added"):
            setattr(self, name, [getattr(self, name)[i] for i in idx])
        self.bbox, self.area, self.mask_bbox = self.bbox[idx], self.area[idx], self.mask_bbox[idx]
        used = set(self.labels)
        self.label_embeddings = {k: v for k, v in self.label_embeddings.items() if k in used}

    def examples(self) -> list[dict[str, Any]]:
        """One JSON-ready record per example, in the order added: ``example_id``, ``image``,
        ``labels`` (distinct, in row order), ``rows``, ``mask_bbox`` (of its first row) and
        ``added``."""
        out: dict[str, dict[str, Any]] = {}
        for i, e in enumerate(self.example_ids):
            rec = out.get(e)
            if rec is None:
                rec = out[e] = {"example_id": e, "image": self.images[i], "labels": [], "rows": 0,
                                "mask_bbox": [int(v) for v in self.mask_bbox[i]], "added": self.added[i]}
            rec["rows"] += 1
            if self.labels[i] not in rec["labels"]:
                rec["labels"].append(self.labels[i])
        return list(out.values())

    def new_labels(self, base_labels: Sequence[str]) -> list[str]:
        """The overlay's labels the base lacks, in order of first use."""
        have = {t.casefold() for t in base_labels}
        return list(dict.fromkeys(x for x in self.labels if x.casefold() not in have))

    def label_ids(self, base_labels: Sequence[str]) -> np.ndarray:
        """(r,) int64 label id of each row in the merged label space: a base label keeps its
        base id (its L_ref row is reused; labels equal but for case are one), a new label gets
        n + its index in `new_labels`."""
        ids: dict[str, int] = {}
        for j, t in enumerate(base_labels):
            ids.setdefault(t.casefold(), j)
        n = len(base_labels)
        for j, t in enumerate(self.new_labels(base_labels)):
            ids[t.casefold()] = n + j
        return np.array([ids[x.casefold()] for x in self.labels], np.int64)

    def to_reference(self) -> ReferenceSet:
        """The overlay as a self-contained [`ReferenceSet`][reme.reference.ReferenceSet]: its rows,
        and L_ref rows for the labels they use (``concat_references([base, it])`` is the merged
        set the Segmenter searches)."""
        labels = list(dict.fromkeys(self.labels))
        lid = {t: j for j, t in enumerate(labels)}
        d2 = int(next(iter(self.label_embeddings.values())).shape[0]) if self.label_embeddings else self.text_dim
        L = np.stack([self.label_embeddings[t] for t in labels]) if labels else np.zeros((0, d2), np.float32)
        manifest = {"mode": "overlay", "encoders": dict(self.encoders), "templates": list(self.templates),
                    "overlay": {"base": dict(self.base), "examples": len(self.examples())}}
        return ReferenceSet(S_ref=self.S, L_ref=L.astype(np.float32),
                            pair_segment=np.arange(self.num_rows), pair_label=np.array([lid[x] for x in self.labels], np.int64),
                            labels=labels, roots=list(labels), segment_image=list(self.images),
                            segment_bbox=self.bbox, segment_area=self.area, manifest=manifest,
                            segment_source=[EXAMPLE_SOURCE] * self.num_rows)

    def save(self, path: str | Path | None = None, *, base_path: str | Path | None = None) -> Path:
        """Write the overlay folder as one transaction: under an exclusive lock shared by every
        process (`folder_lock`), read the folder's current rows, merge, and write the result
        atomically (temporary folder, then rename; a reader sees the old overlay or the new one).

        The merge is three-way against `known_ids`, the examples this object last loaded or
        saved: rows another writer added meanwhile are kept (appended after this object's
        rows), examples this object removed stay removed, and examples another writer removed
        (undo) are dropped here too. Afterwards this object holds the merged rows, so two
        processes adding examples to one folder never lose each other's rows.

        Args:
            path: destination (default: `path`, where it was loaded from or last saved).
            base_path: the base folder, to refuse an overlay inside it (default: the
                recorded ``base["path"]``).

        Returns:
            The folder written.

        Raises:
            ValueError: no path, the path is the base folder or inside it, or it holds
                something that is not an overlay.
            ReferenceSetError: the overlay already in the folder is damaged (its files do not
                match the manifest) or was made with other encoders; nothing is written.
        """
        path = path if path is not None else self.path
        if path is None:
            raise ValueError("no overlay path: pass path= (CLI: --overlay DIR)")
        path = check_overlay_path(path, base_path if base_path is not None else self.base.get("path"))
        with folder_lock(path, exclusive=True):
            if path.exists() and not (path / "manifest.json").is_file():
                if any(path.iterdir()):
                    raise ValueError(f"{path} exists and is not an overlay folder; choose another --overlay path")
            elif path.exists():
                from reme.reference import read_manifest

                if "overlay" not in read_manifest(path):
                    raise ValueError(f"{path} is a reference set, not an overlay; refusing to replace it")
                self._merge_from(_load_overlay(path, True))
            ref = self.to_reference()
            ref.save(path, overwrite=True, embedding_dtype=str(np.dtype(self.S.dtype)), with_index=False,
                     extra_tables={EXAMPLES_FILE: self._examples_table()})
        self.path = path
        self.known_ids = frozenset(self.example_ids)
        return path

    def _merge_from(self, disk: "Overlay") -> None:
        """Three-way merge of the folder's rows ``disk`` into this object (`save`)."""
        if disk.encoders != self.encoders or disk.S.shape[1] != self.S.shape[1] or \
                list(disk.templates) != list(self.templates):
            raise ReferenceSetError(f"the overlay at {disk.path} was made with other encoders or templates "
                                    f"({disk.encoders}) than this one ({self.encoders}); save to another folder")
        on_disk = set(disk.example_ids)
        # examples another writer removed since this object last synchronised: drop them here too
        gone = {e for e in self.known_ids if e not in on_disk}
        if gone:
            self._select(np.array([e not in gone for e in self.example_ids], bool))
        mine = set(self.example_ids)
        take = np.array([e not in mine and e not in self.known_ids for e in disk.example_ids], bool)
        if not take.any():
            return
        idx = np.flatnonzero(take)
        same = {t.casefold(): t for t in reversed(self.labels)}
        theirs = [same.setdefault(disk.labels[i].casefold(), disk.labels[i]) for i in idx]
        for i, lab in zip(idx, theirs):
            self.label_embeddings.setdefault(lab, disk.label_embeddings[disk.labels[i]])
        self.S = np.concatenate([self.S, disk.S[idx].astype(self.S.dtype)])
        self.labels = self.labels + theirs
        for name in ("example_ids", "images", "added"):
            setattr(self, name, getattr(self, name) + [getattr(disk, name)[i] for i in idx])
        self.bbox = np.concatenate([self.bbox, disk.bbox[idx]])
        self.area = np.concatenate([self.area, disk.area[idx]])
        self.mask_bbox = np.concatenate([self.mask_bbox, disk.mask_bbox[idx]])

    def _examples_table(self) -> pa.Table:
        r = self.num_rows
        return pa.table({
            "segment_id": pa.array(np.arange(r, dtype=np.int64)),
            "example_id": pa.array(self.example_ids, pa.string()),
            "image": pa.array(self.images, pa.string()),
            "mask_bbox": pa.FixedSizeListArray.from_arrays(pa.array(self.mask_bbox.astype(np.int32).ravel(), pa.int32()), 4),
            "label": pa.array(self.labels, pa.string()),
            "added": pa.array(self.added, pa.string()),
            "encoder": pa.array([str(self.encoders.get("visual"))] * r, pa.string()),
        })


def base_identity(base: ReferenceSet) -> dict[str, Any]:
    """What an overlay records about its base: folder, counts and the S_ref sha256."""
    files = base.manifest.get("files") or {}
    return {"path": str(base.path) if base.path is not None else None, "num_segments": base.num_segments,
            "num_labels": base.num_labels, "s_ref_sha256": files.get(base.manifest.get("s_ref_file", "S_ref.npy"))}


def load_overlay(path: str | Path, *, verify: bool = True) -> Overlay:
    """Read an overlay folder written by [`Overlay.save`][reme.reference.overlay.Overlay.save].

    Raises:
        ReferenceSetError: not an overlay, missing or altered files (sha256), truncated Parquet,
            or tables that disagree (the message names the file).
    """
    path = Path(path)
    if not path.is_dir():
        raise ReferenceSetError(f"no overlay at {path}")
    with folder_lock(path, exclusive=False):  # no save swaps the folder while it is read
        return _load_overlay(path, verify)


#: What to do about a damaged overlay (not "rebuild the reference set": an overlay is not built).
OVERLAY_FIX = "restore the file, or delete the overlay folder and add the examples again (reme add-examples)"


def _load_overlay(path: Path, verify: bool) -> Overlay:
    try:
        ref = load_reference(path, verify=verify, mmap=False)
    except ReferenceSetError as exc:
        msg = str(exc)
        for said in ("rebuild the reference set or restore the file", "rebuild the reference set", "rebuild it"):
            msg = msg.replace(said, OVERLAY_FIX)
        raise ReferenceSetError(msg.replace("the reference set is incomplete", "the overlay is incomplete")) from None
    man = ref.manifest
    if "overlay" not in man:
        raise ReferenceSetError(f"{path} is a reference set, not an overlay (no 'overlay' in its manifest)")
    f = path / EXAMPLES_FILE
    sha = (man.get("files") or {}).get(EXAMPLES_FILE)
    if not f.is_file():
        raise ReferenceSetError(f"{f} is missing; the overlay is incomplete: {OVERLAY_FIX}")
    if verify and sha256_file(f) != sha:
        raise ReferenceSetError(f"{f} does not match the sha256 in {path / 'manifest.json'} (file changed or "
                                f"truncated, or not listed): {OVERLAY_FIX}")
    try:
        t = read_parquet(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReferenceSetError(f"cannot read {f}: {exc}; the file is truncated or corrupt: {OVERLAY_FIX}") from exc
    r = ref.num_segments
    if t.num_rows != r:
        raise ReferenceSetError(f"{f} has {t.num_rows} rows, S_ref has {r}")
    row_label = [ref.labels[j] for j in ref.pair_label[np.argsort(ref.pair_segment, kind="stable")]]
    if len(row_label) != r or row_label != t.column("label").to_pylist():
        raise ReferenceSetError(f"{path}: pairs.parquet and {EXAMPLES_FILE} disagree on the row labels")
    mb = arrow_values(t.column("mask_bbox").combine_chunks().values).reshape(-1, 4)
    return Overlay(S=np.asarray(ref.S_ref), labels=row_label, example_ids=t.column("example_id").to_pylist(),
                   images=list(ref.segment_image), bbox=np.asarray(ref.segment_bbox, np.int32),
                   area=np.asarray(ref.segment_area, np.int64), mask_bbox=mb.astype(np.int32),
                   added=t.column("added").to_pylist(),
                   label_embeddings={t_: ref.L_ref[j].astype(np.float32) for j, t_ in enumerate(ref.labels)},
                   encoders=dict(man.get("encoders") or {}), templates=list(man.get("templates") or []),
                   base=dict(man["overlay"].get("base") or {}), text_dim=int(ref.L_ref.shape[1]), path=path,
                   known_ids=frozenset(t.column("example_id").to_pylist()))


def check_overlay(overlay: Overlay, base: ReferenceSet) -> None:
    """Refuse an overlay made with other encoders, templates or dimensions than ``base``; warn
    (UserWarning) when it was made on another base with the same encoders (its rows are
    self-contained, so it still works).

    Raises:
        ReferenceSetError: naming what differs.
    """
    enc = base.manifest.get("encoders") or {}
    for kind in ("visual", "text"):
        if overlay.encoders.get(kind) != enc.get(kind):
            raise ReferenceSetError(
                f"the overlay{' ' + str(overlay.path) if overlay.path else ''} was made with {kind} encoder "
                f"{overlay.encoders.get(kind)!r}, the base reference set with {enc.get(kind)!r}; an overlay only "
                "works with the encoders of its base: add the examples again on this base")
    if overlay.S.shape[1] != base.S_ref.shape[1]:
        raise ReferenceSetError(f"overlay rows are {overlay.S.shape[1]}-d, S_ref is {base.S_ref.shape[1]}-d")
    d2 = {int(v.shape[0]) for v in overlay.label_embeddings.values()}
    if d2 and d2 != {base.L_ref.shape[1]}:
        raise ReferenceSetError(f"overlay label embeddings are {sorted(d2)}-d, L_ref is {base.L_ref.shape[1]}-d")
    if list(overlay.templates) != list(base.manifest.get("templates") or overlay.templates):
        raise ReferenceSetError("the overlay's label templates differ from the base's; add the examples again on this base")
    if overlay.S.dtype != base.S_ref.dtype:
        overlay.S = overlay.S.astype(base.S_ref.dtype)
    mine = base_identity(base)
    sha, theirs = mine.get("s_ref_sha256"), overlay.base.get("s_ref_sha256")
    if sha and theirs and sha != theirs:
        warnings.warn(f"the overlay was made on another base reference set ({overlay.base.get('path')}, "
                      f"{overlay.base.get('num_segments')} segments); its rows still apply (same encoders)",
                      UserWarning, stacklevel=3)
