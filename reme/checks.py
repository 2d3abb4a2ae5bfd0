"""Checks of numeric options and loaded embeddings, shared by the library, the CLI and the demo.

Light on purpose (numpy only): the command line runs them before any model loads, so a bad
value is refused in well under a second.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Largest logit scale (tau1 of eq. 1, tau2 of eq. 2; docs/method.md) accepted. Cosine
#: similarities lie in [-1, 1], so a scale s spreads logits over [-s, s]; at s = 1000 a
#: difference of 0.01 in similarity is already a factor e^10 between two weights, far past any
#: useful sharpness, while float32 still represents every logit (a scale of 1e308 made the
#: scores NaN). The defaults are 50.
MAX_LOGIT_SCALE = 1000.0

#: Largest deviation of a row's L2 norm from 1 accepted in S_ref and L_ref. float16 keeps 11
#: significant bits, so a unit row stored in float16 has a norm within about 1e-3 of 1 (the
#: embedded reference: 0.99990 to 1.00009); 1e-2 leaves ten times that.
UNIT_NORM_TOL = 1e-2


def _number(value: Any, name: str, want: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {want}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def check_logit_scale(value: Any, name: str) -> float:
    """``value`` as a float when it is a finite number in (0, `MAX_LOGIT_SCALE`].

    Raises:
        ValueError: not a number, NaN, infinite, <= 0 or above `MAX_LOGIT_SCALE` (one line
            naming ``name``).
    """
    want = f"a finite number in (0, {MAX_LOGIT_SCALE:g}]"
    v = _number(value, name, want)
    if not 0 < v <= MAX_LOGIT_SCALE:
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def check_range(value: Any, name: str, lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False) -> float:
    """``value`` as a float when it lies in the interval from ``lo`` to ``hi`` (closed unless
    ``lo_open`` / ``hi_open``); NaN and infinities are refused.

    Raises:
        ValueError: outside the interval or not a finite number.
    """
    want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    v = _number(value, name, want)
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def check_others_threshold(value: Any, name: str = "others_threshold") -> float | None:
    """None (off), or a threshold on the normalised confidence (in [0, 1]): a finite number
    >= 0; 0 labels nothing "others", a value above 1 everything. NaN and infinities are refused.

    Raises:
        ValueError: negative or not a finite number.
    """
    if value is None:
        return None
    v = _number(value, name, "a finite number >= 0 (confidences lie in [0, 1])")
    if v < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (confidences lie in [0, 1]), got {value!r}")
    return v


def check_unit_rows(a: Any, what: str, *, tol: float = UNIT_NORM_TOL, block: int = 65536) -> None:
    """Refuse embeddings that are not finite, L2-normalised rows (S_ref, L_ref).

    Args:
        a: (m, d) float16 or float32 array (a memory map is read block by block).
        what: the file or table named in the message.
        tol: largest accepted ``|norm - 1|`` (default `UNIT_NORM_TOL`).
        block: rows per block.

    Raises:
        ValueError: a NaN or infinite value, or a row whose norm is off by more than ``tol``
            (the message names ``what`` and the first bad row).
    """
    for start in range(0, int(a.shape[0]), block):
        x = np.asarray(a[start:start + block], np.float32)
        if not np.isfinite(x).all():
            row = start + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise ValueError(f"{what}: row {row} holds NaN or infinite values")
        n = np.sqrt(np.einsum("ij,ij->i", x, x))
        bad = np.flatnonzero(np.abs(n - 1.0) > tol)
        if bad.size:
            raise ValueError(f"{what}: row {start + int(bad[0])} has L2 norm {float(n[bad[0]]):.4g}, "
                             f"rows must be unit-norm (within {tol:g})")


def check_segment_options(*, top_k: Any = None, smooth_omega: Any = 0.0, retrieval: str = "exact",
                          proposals: str | None = None, n_clusters: Any = None, others_threshold: Any = None,
                          segment_logit_scale: Any = None, label_logit_scale: Any = None,
                          proposal_pixels: Any = None, names: dict[str, str] | None = None) -> None:
    """Check the options of a [`Segmenter`][reme.inference.segmenter.Segmenter] that need no
    model, so that a caller (the CLI) refuses a bad value before anything loads. None means
    "the default" for every option but ``smooth_omega`` and ``retrieval``.

    Args:
        names: how to call each option in messages (the CLI passes its flags, e.g.
            ``{"top_k": "--top-k"}``); default the keyword names.

    Raises:
        ValueError: the first bad option, in one line naming it and its allowed values.
    """
    def n(key: str) -> str:
        return (names or {}).get(key, key)

    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"{n('top_k')} must be an integer >= 0 (0 = all segments), got {top_k!r}")
    check_range(smooth_omega, n("smooth_omega"), 0.0, 1.0, hi_open=True)
    if retrieval not in ("exact", "topk"):
        raise ValueError(f"{n('retrieval')} must be 'exact' or 'topk', got {retrieval!r}")
    if proposals is not None:
        from reme.proposals import check_proposal_method  # imported only when given (skimage, ~0.5 s)

        try:
            check_proposal_method(proposals)
        except ValueError as exc:
            raise ValueError(f"{n('proposals')}: {exc}") from None
    if n_clusters is not None and (isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1):
        raise ValueError(f"{n('n_clusters')} must be an integer >= 1, got {n_clusters!r}")
    if proposal_pixels is not None and (isinstance(proposal_pixels, bool) or not isinstance(proposal_pixels, int)
                                        or proposal_pixels < 0):
        raise ValueError(f"{n('proposal_pixels')} must be an integer >= 0 (0 = the working size), "
                         f"got {proposal_pixels!r}")
    check_others_threshold(others_threshold, n("others_threshold"))
    for key, value in (("segment_logit_scale", segment_logit_scale), ("label_logit_scale", label_logit_scale)):
        if value is not None:
            check_logit_scale(value, n(key))
