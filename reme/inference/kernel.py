"""The one streaming retrieval kernel of eq. 1 (docs/method.md, "Inference"): a block loop over
S_ref feeding reducers, in the style of faiss ``contrib/exhaustive_search.py``.

[`scan`][reme.inference.kernel.scan] reads S_ref once, ``chunk_size`` rows at a time (so it may be
a float16 memory map), converts each block to float32 into one reused buffer
([`Blocks`][reme.inference.kernel.Blocks]) and hands it to every reducer:

* [`SoftmaxReducer`][reme.inference.kernel.SoftmaxReducer]: the exact eq.-1 softmax aggregation
  with an online log-sum-exp, folding ``exp(tau s - shift)`` of each block into an accumulator (A1
  with a sparse O_ref, or P_seg with a dense B = O_ref A2), and the softmax normaliser
  log sum_j exp(tau <S_test[i], S_ref[j]>) of every test segment (the evidence's denominator).
* [`TopkReducer`][reme.inference.kernel.TopkReducer]: a result heap of the ``k`` largest inner
  products per test segment; candidates found elsewhere (a FAISS search re-scored exactly, the
  rows of an overlay) are merged into the same heap with
  [`TopkReducer.add_candidates`][reme.inference.kernel.TopkReducer.add_candidates]
  ([`merge_topk`][reme.inference.kernel.merge_topk]).

Several reducers in one call share the pass (the predictor's evidence comes from the pass that
computes P_seg). The eq.-1 functions of [`reme.inference.retrieval`][reme.inference.retrieval] and the
evidence of [`reme.inference.evidence`][reme.inference.evidence] are thin callers of this module.

No reducer changes process-wide state (thread counts included): thread policy belongs to the
entry points (CLI, demo, workers).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

#: Reference rows per block of the streamed eq. 1. Chosen by us: on the 2-core test machine
#: (k = 256, d = 1024) blocks of 8k-16k rows were fastest (docs/performance.md); the working
#: memory is about chunk_size * (d + k) * 4 bytes (~80 MB at 16384 x (1024 + 256)).
DEFAULT_CHUNK_SIZE = 16384

#: The running softmax shift of a test segment is raised only when a block exceeds it by more
#: than this many logits, so exp() never overflows (values stay <= e^20) and the in-place
#: subtraction runs only for the few blocks that raise the maximum.
SHIFT_SLACK = 20.0


def as_tensor(x, device, dtype=torch.float32) -> torch.Tensor:
    """``x`` (array, memory map or tensor) as a ``dtype`` tensor on ``device`` (a copy only when
    needed; read-only numpy buffers are copied because torch wants writable memory).

    Examples:
        >>> as_tensor(np.eye(2, dtype=np.float16), "cpu").dtype
        torch.float32
    """
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    arr = np.ascontiguousarray(x)
    if not arr.flags.writeable:  # Arrow / memory-mapped buffers: torch wants writable memory
        arr = arr.copy()
    return torch.as_tensor(arr, device=device).to(dtype)


def as_view(x) -> torch.Tensor:
    """A CPU tensor sharing memory with a numpy array (read-only arrays and memory maps too; the
    result must only be read)."""
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": never written here
        return torch.from_numpy(arr)


def check_pair(St: torch.Tensor, S_ref) -> None:
    """Check that S_test is (k, d) and S_ref is (m, d) with the same d.

    Raises:
        ValueError: they are not.
    """
    if St.ndim != 2 or S_ref.ndim != 2 or St.shape[1] != S_ref.shape[1]:
        raise ValueError(f"S_test and S_ref must be (k, d) and (m, d) with the same d, got {tuple(St.shape)} and "
                         f"{tuple(S_ref.shape)}")


def check_chunk(chunk_size: int) -> int:
    """``chunk_size`` as an int.

    Raises:
        ValueError: it is < 1.
    """
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def resolve_device(S_test, device) -> torch.device:
    """``device``, else S_test's device when it is a tensor, else the CPU."""
    if device is not None:
        return torch.device(device)
    return S_test.device if isinstance(S_test, torch.Tensor) else torch.device("cpu")


class Blocks:
    """Blocks of S_ref as float32 tensors on ``device``.

    float16 (or off-device) rows are converted into one reused (chunk, d + 1) buffer whose last
    column is 1, so a GEMM against [tau S_test, -shift] also subtracts the softmax shift
    (``fused`` True); float32 rows already on the device are used in place (``fused`` False).
    A block is valid until the next one is read.
    """

    def __init__(self, S_ref, chunk_size: int, device: torch.device):
        self.src, self.device = S_ref, device
        self.m, self.d = int(S_ref.shape[0]), int(S_ref.shape[1])
        self.chunk = min(chunk_size, max(self.m, 1))
        on_device = S_ref.device == device if isinstance(S_ref, torch.Tensor) else device.type == "cpu"
        self.fused = not (on_device and S_ref.dtype in (np.float32, torch.float32))
        if self.fused:
            self.buf = torch.empty(self.chunk, self.d + 1, device=device)
            self.buf[:, self.d] = 1.0

    def __iter__(self):
        for start in range(0, self.m, self.chunk):
            yield start, self.get(start, min(self.m, start + self.chunk))

    def get(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a float32 tensor (plus the ones column when ``fused``)."""
        block = as_view(self.src[start:stop])
        if not self.fused:
            return block
        if block.device != self.device:
            block = block.to(self.device, non_blocking=True)
        out = self.buf[:stop - start]
        out[:, :self.d].copy_(block)  # float16 -> float32
        return out

    def queries(self, Sq: torch.Tensor) -> torch.Tensor:
        """Test-side GEMM operand for these blocks: ``Sq`` plus a zero column when ``fused``."""
        return torch.cat([Sq, torch.zeros(Sq.shape[0], 1, device=Sq.device)], 1) if self.fused else Sq


class SoftmaxReducer:
    """Exact eq.-1 softmax aggregation over all of S_ref, with an online log-sum-exp.

    For every block R = S_ref[s:t]: E = exp(tau R S_test^T - shift) ((t-s) x k, float32, in
    place), ``add_block(s, t, E)`` adds its contribution to the caller's accumulator ``acc``
    (q x k, columns = test segments), and the per-column denominators are summed.
    [`finish`][reme.inference.kernel.SoftmaxReducer.finish] returns acc / denominator.

    The shift of each column starts at the maximum of the first block and is raised only when a
    later block's column sum shows values above e^SHIFT_SLACK (or overflowed, in which case the
    block is recomputed), so most blocks cost one GEMM, one exp and one sum.

    Args:
        logit_scale: tau1.
        acc: (q, k) float32 accumulator, or None for the normaliser alone.
        add_block: ``add_block(s, t, E)`` folding block E into ``acc`` (ignored without acc).
    """

    def __init__(self, logit_scale: float, acc: torch.Tensor | None = None, add_block=None):
        self.logit_scale, self.acc, self.add_block = float(logit_scale), acc, add_block

    def start(self, St: torch.Tensor, blocks: Blocks) -> None:
        """Begin a pass: (k, d) float32 test embeddings and the blocks to come."""
        k, self.d = St.shape[0], St.shape[1]
        self.blocks = blocks
        self.W = blocks.queries(St * self.logit_scale)
        self.shift = torch.zeros(k, device=St.device)
        self.denom = torch.zeros(k, device=St.device)
        self.ebuf = torch.empty(blocks.chunk, k, device=St.device)
        self.limit = float(np.exp(SHIFT_SLACK))

    def _logits(self, R, e):
        torch.mm(R, self.W.T, out=e)                               # tau S_ref S_test^T (- shift)
        if not self.blocks.fused:
            e.sub_(self.shift)

    def _raise_shift(self, delta, rescale=True):
        self.shift = self.shift + delta
        if rescale:                                                # acc, denom hold earlier blocks
            f = torch.exp(-delta)
            self.denom.mul_(f)
            if self.acc is not None:
                self.acc.mul_(f)
        if self.blocks.fused:
            self.W[:, self.d] = -self.shift

    def add(self, start: int, R: torch.Tensor) -> None:
        """Fold the block of S_ref rows ``start:start + len(R)`` into the accumulator."""
        e = self.ebuf[:R.shape[0]]
        self._logits(R, e)
        if start == 0:
            cmax = e.amax(dim=0)
            e.sub_(cmax)
            self._raise_shift(cmax, rescale=False)
        e.exp_()
        colsum = e.sum(dim=0)
        if not (bool(torch.isfinite(colsum).all()) and float(colsum.max()) <= self.limit):
            # rare: this block holds values far above the running shift; redo it exactly
            self._logits(R, e)
            cmax = e.amax(dim=0)
            delta = torch.where(cmax > 0, cmax, torch.zeros_like(cmax))
            e.sub_(delta)
            self._raise_shift(delta)
            e.exp_()
            colsum = e.sum(dim=0)
        self.denom += colsum
        if self.acc is not None:
            self.add_block(start, start + e.shape[0], e)

    def finish(self) -> torch.Tensor | None:
        """acc / denominator ((q, k)), or None without an accumulator."""
        return None if self.acc is None else self.acc / self.denom

    def log_normaliser(self) -> torch.Tensor:
        """(k,) log sum_j exp(tau <S_test[i], S_ref[j]>): the eq.-1 softmax denominator."""
        return self.shift + torch.log(self.denom)


def merge_topk(sims_a: torch.Tensor, ids_a: torch.Tensor, sims_b: torch.Tensor, ids_b: torch.Tensor, *,
               offset: int = 0, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of two candidate lists per row (the result-heap merge of every top-k in reme).

    Args:
        sims_a, ids_a: (q, t_a) similarities and int row ids.
        sims_b, ids_b: (q, t_b) similarities and row ids; ``offset`` is added to ``ids_b`` (rows of
            a second table stacked after the first).
        k: how many to keep.

    Returns:
        (q, min(k, t_a + t_b)) float similarities, descending, and int64 ids.

    Raises:
        RuntimeError: the row counts differ (from torch.cat).

    Examples:
        >>> v, i = merge_topk(torch.tensor([[0.9, 0.1]]), torch.tensor([[4, 7]]),
        ...                   torch.tensor([[0.5]]), torch.tensor([[0]]), offset=10, k=2)
        >>> v.tolist(), i.tolist()
        ([[0.8999999761581421, 0.5]], [[4, 10]])
    """
    sims = torch.cat([sims_a, sims_b.to(sims_a.device)], 1)
    ids = torch.cat([ids_a.to(torch.int64), ids_b.to(ids_a.device, torch.int64) + offset], 1)
    vals, order = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    return vals, torch.gather(ids, 1, order)


class TopkReducer:
    """Result heap: the ``k`` largest inner products <S_test[i], S_ref[j]> per test segment.

    Each block is multiplied as (k_test, rows), so that the top-k runs along contiguous rows in
    parallel over test segments: measured 0.70 s against 1.1-1.5 s for (rows, k_test) with the
    top-k down the columns (672 x 1e5 x 1024, float16 S_ref, 2 CPU threads; docs/performance.md).

    Args:
        k: neighbours kept per test segment (>= 1).

    Raises:
        ValueError: ``k`` < 1.
    """

    def __init__(self, k: int):
        if k is None or int(k) < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {k}")
        self.k = int(k)
        self.vals: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None

    def start(self, St: torch.Tensor, blocks: Blocks) -> None:
        """Begin a pass: (k, d) float32 test embeddings and the blocks to come."""
        self.W = blocks.queries(St)
        self.vals = torch.full((St.shape[0], 0), -float("inf"), device=St.device)
        self.ids = torch.zeros((St.shape[0], 0), dtype=torch.int64, device=St.device)

    def add(self, start: int, R: torch.Tensor) -> None:
        """Merge the top-k of the block of S_ref rows ``start:start + len(R)``."""
        sim = self.W @ R.T
        v, i = torch.topk(sim, min(self.k, sim.shape[1]), dim=1)
        self.add_candidates(v, i, offset=start)

    def seed(self, sims: torch.Tensor, ids: torch.Tensor) -> None:
        """Start the heap from (q, t <= k) candidates found elsewhere (a FAISS search re-scored
        exactly), kept in their given column order until a merge re-sorts them."""
        self.vals, self.ids = sims, ids.to(sims.device, torch.int64)

    def add_candidates(self, sims: torch.Tensor, ids: torch.Tensor, *, offset: int = 0) -> None:
        """Merge (q, t) candidates found elsewhere (a re-scored FAISS search, overlay rows; ids
        -1 with sims -inf for missing ones) into the heap; ``offset`` is added to their ids."""
        if self.vals is None:
            self.vals = torch.full((sims.shape[0], 0), -float("inf"), device=sims.device)
            self.ids = torch.zeros((sims.shape[0], 0), dtype=torch.int64, device=sims.device)
        self.vals, self.ids = merge_topk(self.vals, self.ids, sims, ids, offset=offset, k=self.k)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sims, ids)``: (k_test, min(k, rows seen)) float32 descending, int64 ids."""
        return self.vals, self.ids


def scan(S_test, S_ref, reducers, *, chunk_size: int = DEFAULT_CHUNK_SIZE, device=None) -> torch.Tensor:
    """The block loop over S_ref: every reducer sees every float32 block once.

    Args:
        S_test: (k, d1) float array or tensor, L2-normalised test segment embeddings.
        S_ref: (m, d1) float16/float32 array, memory map, `StackedRows` view or tensor.
        reducers: objects with ``start(St, blocks)`` and ``add(start_row, block)``
            ([`SoftmaxReducer`][reme.inference.kernel.SoftmaxReducer],
            [`TopkReducer`][reme.inference.kernel.TopkReducer]); read their results afterwards.
        chunk_size: reference rows per block.
        device: where to compute (default: S_test's device, else the CPU).

    Returns:
        S_test as the (k, d1) float32 tensor the reducers saw.

    Raises:
        ValueError: dimension mismatch or ``chunk_size`` < 1.

    Examples:
        >>> S_ref = np.eye(3, dtype=np.float16)
        >>> top, soft = TopkReducer(2), SoftmaxReducer(1.0)
        >>> _ = scan(np.array([[0.6, 0.8, 0.0]], np.float32), S_ref, [top, soft], chunk_size=2)
        >>> [round(x, 2) for x in top.finish()[0][0].tolist()], top.finish()[1].tolist()
        ([0.8, 0.6], [[1, 0]])
        >>> round(float(soft.log_normaliser()[0]), 4) == round(float(np.log(np.exp([.6, .8, 0]).sum())), 4)
        True
    """
    device = resolve_device(S_test, device)
    St = as_tensor(S_test, device)
    check_pair(St, S_ref)
    blocks = Blocks(S_ref, check_chunk(chunk_size), device)
    for r in reducers:
        r.start(St, blocks)
    for start, R in blocks:
        for r in reducers:
            r.add(start, R)
    return St


def candidate_a1_parts(sims, ids, o_ref, logit_scale: float):
    """(crow, col, values) of A1 restricted to candidate neighbours (top-k eq. 1), rows = test
    segments: softmax over each row's candidates, then one entry per (candidate, label) of O_ref.

    Args:
        sims, ids, o_ref, logit_scale: as in
            [`topk_label_affinity`][reme.inference.retrieval.topk_label_affinity].

    Returns:
        ``(crow (k + 1,), col (nnz,), values (nnz,))`` tensors on ``sims``' device.
    """
    sims = torch.as_tensor(sims, dtype=torch.float32)
    k, t = sims.shape
    w = torch.softmax(logit_scale * sims, dim=1) if t else sims
    w = torch.nan_to_num(w, nan=0.0)                                           # rows with no candidate
    I = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, np.int64).ravel()
    safe = np.where(I >= 0, I, 0)
    counts = np.where(I >= 0, o_ref.ptr[safe + 1] - o_ref.ptr[safe], 0)
    total = int(counts.sum())
    starts = np.repeat(o_ref.ptr[safe] - np.cumsum(counts) + counts, counts)
    labels = o_ref.label[starts + np.arange(total)] if total else np.zeros(0, np.int64)
    crow = np.zeros(k + 1, np.int64)
    np.cumsum(counts.reshape(k, t).sum(1), out=crow[1:])
    dev = sims.device
    vals = w.reshape(-1)[torch.as_tensor(np.repeat(np.arange(I.size), counts), device=dev)]
    return torch.as_tensor(crow, device=dev), torch.as_tensor(labels, device=dev), vals


def candidate_class_scores(sims: torch.Tensor, ids: torch.Tensor, B: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """P_seg of top-k eq. 1 with a dense B = O_ref A2: softmax over each row's candidates
    weighting their B rows.

    Args:
        sims: (k, t) float32 inner products; ids: (k, t) int64 rows of S_ref (all valid).
        B: (m, c) float32; logit_scale: tau1.

    Returns:
        (k, c) float32 tensor.
    """
    w = torch.softmax(logit_scale * sims, dim=1)                              # (k, t)
    return torch.einsum("kt,ktc->kc", w, B[ids])
