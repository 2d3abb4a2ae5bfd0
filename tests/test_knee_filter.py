"""Ambiguous-label knee filter (docs/method.md step 8) on Zipf-shaped group sizes, as caption
builds produce them (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from reme.build.filtering import ambiguous_roots, knee_cut, knee_index

AMBIGUOUS = ("image", "photo", "view", "side", "front")
REAL = {"person": 1, "car": 3, "dog": 8}          # Zipf rank of a few real classes


def zipf_sizes(a: float, *, g: int = 5000, top: int = 1000, seed: int = 0, planted: bool = True) -> dict[str, int]:
    """``g`` root groups with size ~ top * rank^-a (10 % log-normal noise); with ``planted``,
    five ambiguous roots 4-8 times the largest real group on top."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, g + 1)
    sizes = np.maximum(1, np.round(top * ranks ** -a * np.exp(rng.normal(0, 0.1, g)))).astype(int)
    names = {r: n for n, r in REAL.items()}
    out = {names.get(int(r), f"root{r}"): int(s) for r, s in zip(ranks, sizes)}
    if planted:
        for name, f in zip(AMBIGUOUS, (8.0, 7.0, 6.0, 5.0, 4.0)):
            out[name] = int(round(top * f * np.exp(rng.normal(0, 0.05))))
    return out


@pytest.mark.parametrize("a", [1.0, 1.1, 1.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knee_on_log_sizes_removes_planted_ambiguous_roots_only(a, seed):
    sizes = zipf_sizes(a, seed=seed)
    # the planted roots hold 75-90 % of these pairs, so lift the cap to see the knee itself
    assert set(ambiguous_roots(sizes, max_removed_share=1.0)) == set(AMBIGUOUS)
    cut = knee_cut(sizes)                                   # default cap 0.5: largest ambiguous first
    assert cut["capped"] and cut["knee_rank"] == len(AMBIGUOUS)
    assert 0 < cut["removed_share"] <= 0.5 and set(cut["removed"]) < set(AMBIGUOUS)
    assert cut["removed"] == sorted(cut["removed"], key=lambda r: -sizes[r])
    assert not set(cut["removed"]) & set(REAL)


@pytest.mark.parametrize("a", [1.0, 1.1, 1.2])
def test_knee_on_pure_zipf_removes_nothing(a):
    """Without planted roots no group is abnormally large; Kneedle on linear sizes (old main)
    cut ~sqrt(g) of the largest real classes here."""
    sizes = zipf_sizes(a, planted=False)
    assert ambiguous_roots(sizes) == []
    assert knee_cut(sizes)["removed_share"] == 0.0


def test_knee_parameters_and_cap():
    s = np.array([900, 100, 90, 80, 10, 9])
    assert knee_index(s) == 1                               # 9x drop after rank 1
    assert knee_index(s, max_rank=3) == 1 and knee_index(s, min_ratio=10) == 0
    assert knee_index(np.array([5, 5, 5, 5])) == 0 and knee_index(np.array([7])) == 0
    with pytest.raises(ValueError):
        knee_index(s, min_ratio=1.0)
    sizes = {f"r{i}": int(v) for i, v in enumerate([500, 400, 20, 18, 16, 14, 12, 10, 9, 8])}
    assert knee_cut(sizes, max_removed_share=1.0)["removed"] == ["r0", "r1"]
    cut = knee_cut(sizes, max_removed_share=0.6)           # r0+r1 hold 89 %, r0 alone 50 %
    assert cut["removed"] == ["r0"] and cut["capped"] and abs(cut["removed_share"] - 500 / 1007) < 1e-9
    assert knee_cut(sizes, max_removed_share=0.0)["removed"] == []
    assert knee_cut(dict(list(sizes.items())[:5]))["removed"] == []          # fewer than min_groups


class _HashText:
    spec, dim = "hash-text", 8

    def encode(self, texts):
        import zlib

        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_build_stages_record_the_knee_and_cap():
    """caption_global_stages (the build's steps 7-10) on Zipf-sized root groups with a planted
    "image" root: the knee, the cap and the removed share are returned for the manifest."""
    from reme.build.pipeline import CaptionBuildParams
    from reme.build._global_stages import ArrayReader, caption_global_stages

    rng = np.random.default_rng(0)
    sizes = {f"root{r}": max(1, int(200 * r ** -1.1)) for r in range(1, 200)} | {"image": 650}
    roots = [r for r, n in sizes.items() for _ in range(n)]
    S = rng.normal(size=(len(roots), 8)).astype(np.float32)
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    reader = ArrayReader(S, np.arange(len(roots)), [f"a {r}" for r in roots], roots)
    params = CaptionBuildParams(group_filter=False, k_sim=0)
    _, info, dropped = caption_global_stages(reader, params, _HashText(), ("{}",))
    kf = info["knee_filter"]
    assert info["ambiguous_roots_removed"] == ["image"] and kf["knee_rank"] == 1 and not kf["capped"]
    assert kf["removed_share"] == pytest.approx(650 / len(roots))
    assert (kf["min_ratio"], kf["max_rank"], kf["max_removed_share"]) == (3.0, 20, 0.5)
    assert info["pairs_after_knee_filter"] == len(roots) - 650 and set(dropped["reason"]) == {"knee_filter"}
    capped = caption_global_stages(reader, CaptionBuildParams(group_filter=False, k_sim=0,
                                                              knee_max_removed_share=0.3), _HashText(), ("{}",))[1]
    assert capped["knee_filter"]["capped"] and capped["ambiguous_roots_removed"] == []
