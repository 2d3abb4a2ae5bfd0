"""O_ref, the binary segment x label matrix of a reference set (docs/method.md step 10), in
compressed-row form: what every eq.-1 path multiplies the softmax weights by."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ORefCSR:
    """O_ref (m x n, binary) in compressed-row form: the labels of segment i are
    ``label[ptr[i]:ptr[i + 1]]``.

    Attributes:
        ptr: (m + 1,) int64 row pointers.
        label: (p,) int64 label ids (columns of O_ref), grouped by segment.
        num_labels: n.
    """

    ptr: np.ndarray
    label: np.ndarray
    num_labels: int

    @property
    def num_segments(self) -> int:
        """m, the rows of O_ref."""
        return int(self.ptr.shape[0] - 1)


def o_ref_csr(pair_segment, pair_label, num_segments: int, num_labels: int) -> ORefCSR:
    """O_ref from its nonzeros ``(pair_segment[j], pair_label[j])`` as
    [`ORefCSR`][reme.reference.oref.ORefCSR].

    Args:
        pair_segment, pair_label: (p,) int ids in [0, m) and [0, n).
        num_segments: m. num_labels: n.

    Raises:
        ValueError: lengths differ or ids are out of range.

    Examples:
        >>> o = o_ref_csr([0, 1, 1], [2, 0, 1], num_segments=3, num_labels=3)
        >>> o.ptr.tolist(), o.label.tolist(), o.num_segments
        ([0, 1, 3, 3], [2, 0, 1], 3)
    """
    ps = np.asarray(pair_segment, np.int64).ravel()
    pl = np.asarray(pair_label, np.int64).ravel()
    if ps.shape != pl.shape:
        raise ValueError(f"pair_segment and pair_label differ in length: {ps.shape} vs {pl.shape}")
    if ps.size and (ps.min() < 0 or ps.max() >= num_segments or pl.min() < 0 or pl.max() >= num_labels):
        raise ValueError(f"O_ref pairs out of range for m={num_segments}, n={num_labels}")
    order = np.argsort(ps, kind="stable")
    ptr = np.zeros(num_segments + 1, np.int64)
    np.cumsum(np.bincount(ps, minlength=num_segments), out=ptr[1:])
    return ORefCSR(ptr=ptr, label=np.ascontiguousarray(pl[order]), num_labels=int(num_labels))
