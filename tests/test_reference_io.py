"""Reference-set files: round trip, atomic writes, and refusal of damaged or mismatched sets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from reme.errors import ReferenceSetError
from reme.reference import ReferenceSet, concat_references, load_reference, read_manifest
from reme.inference.segmenter import Segmenter


def make_ref(m=40, n=6, d1=26, d2=384, seed=0, encoders=None) -> ReferenceSet:
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(m, d1)).astype(np.float32)
    L = rng.normal(size=(n, d2)).astype(np.float32)
    return ReferenceSet(
        S_ref=S / np.linalg.norm(S, axis=1, keepdims=True), L_ref=L / np.linalg.norm(L, axis=1, keepdims=True),
        pair_segment=np.arange(m), pair_label=rng.integers(0, n, m),
        labels=[f"label {j}" for j in range(n)], roots=[f"root{j}" for j in range(n)],
        segment_image=[f"img{i % 3}.jpg" for i in range(m)], segment_bbox=rng.integers(0, 50, (m, 4)),
        segment_area=rng.integers(1, 500, m),
        manifest={"encoders": encoders or {"visual": "classical", "text": "minilm"}, "mode": "test"},
    )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
    ref = make_ref()
    ref.save(tmp_path / "ref", embedding_dtype=dtype)
    back = load_reference(tmp_path / "ref")
    assert back.S_ref.dtype == np.dtype(dtype)
    np.testing.assert_allclose(back.S_ref.astype(np.float32), ref.S_ref, atol=1e-3 if dtype == "float16" else 0)
    np.testing.assert_array_equal(back.L_ref, ref.L_ref)
    np.testing.assert_array_equal(back.O_ref_dense(), ref.O_ref_dense())
    assert back.labels == ref.labels and back.segment_image == ref.segment_image
    assert back.segment_source == ref.segment_source and back.dropped["label"] == []
    np.testing.assert_array_equal(back.segment_bbox, ref.segment_bbox)
    man = read_manifest(tmp_path / "ref")
    assert man["num_segments"] == 40 and man["visual_dim"] == 26 and set(man["files"]) >= {"segments.parquet", "index.faiss"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_existing_folder_needs_overwrite(tmp_path):
    make_ref().save(tmp_path / "ref")
    with pytest.raises(FileExistsError):
        make_ref(seed=1).save(tmp_path / "ref")
    make_ref(m=10, seed=1).save(tmp_path / "ref", overwrite=True)
    assert load_reference(tmp_path / "ref").num_segments == 10


def test_checksum_mismatch_and_truncation_are_refused(tmp_path):
    make_ref().save(tmp_path / "ref")
    seg = tmp_path / "ref" / "segments.parquet"
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReferenceSetError, match="segments.parquet.*sha256"):
        load_reference(tmp_path / "ref")
    with pytest.raises(ReferenceSetError, match="truncated or corrupt"):
        load_reference(tmp_path / "ref", verify=False)


def test_missing_file_and_bad_manifest(tmp_path):
    make_ref().save(tmp_path / "ref")
    os.remove(tmp_path / "ref" / "pairs.parquet")
    with pytest.raises(ReferenceSetError, match="pairs.parquet is missing"):
        load_reference(tmp_path / "ref")
    (tmp_path / "ref" / "manifest.json").write_text("{not json")
    with pytest.raises(ReferenceSetError, match="not valid JSON"):
        load_reference(tmp_path / "ref")
    with pytest.raises(ReferenceSetError, match="not a reme reference set"):
        load_reference(tmp_path / "nothing")


def test_manifest_dimension_mismatch(tmp_path):
    make_ref().save(tmp_path / "ref")
    mpath = tmp_path / "ref" / "manifest.json"
    man = json.loads(mpath.read_text())
    man["visual_dim"] = 64
    mpath.write_text(json.dumps(man))
    with pytest.raises(ReferenceSetError, match="embedding size 26, manifest says 64"):
        load_reference(tmp_path / "ref")


def test_invalid_pairs_rejected():
    with pytest.raises(ReferenceSetError, match="out of range"):
        ReferenceSet(**{**make_ref().__dict__, "pair_label": np.full(40, 99)})


def test_segmenter_refuses_wrong_encoder_and_dims(tmp_path):
    make_ref(encoders={"visual": "classical", "text": "minilm"}, d1=26).save(tmp_path / "ok")
    with pytest.raises(ReferenceSetError, match="built with visual encoder 'classical', not 'dinov2:x'"):
        Segmenter(load_reference(tmp_path / "ok"), visual_encoder=_FakeVisual("dinov2:x", 26), device="cpu")
    make_ref(d1=20).save(tmp_path / "bad")
    with pytest.raises(ReferenceSetError, match="26-d features but S_ref is 20-d"):
        Segmenter(tmp_path / "bad", device="cpu")


def test_concat_merges_labels_and_offsets_segments():
    a, b = make_ref(m=5, n=3, seed=0), make_ref(m=4, n=4, seed=1)
    c = concat_references([a, b])
    assert c.num_segments == 9 and c.labels == ["label 0", "label 1", "label 2", "label 3"]
    np.testing.assert_array_equal(c.O_ref_dense()[:5, :3], a.O_ref_dense())
    np.testing.assert_array_equal(c.O_ref_dense()[5:], b.O_ref_dense())
    with pytest.raises(ReferenceSetError):
        concat_references([a, make_ref(encoders={"visual": "x", "text": "y"})])


class _FakeVisual:
    def __init__(self, spec, dim):
        self.spec, self.dim = spec, dim


def _rewrite_manifest(folder, **changes):
    man = json.loads((folder / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            man.pop(k, None)
        else:
            man[k] = v
    (folder / "manifest.json").write_text(json.dumps(man))
    return man


def test_manifest_without_files_is_refused_even_with_flipped_bytes(tmp_path):
    """Before issue 22 a manifest without 'files' skipped every sha256 check."""
    make_ref().save(tmp_path / "ref", embedding_dtype="float32")
    _rewrite_manifest(tmp_path / "ref", files=None)
    with pytest.raises(ReferenceSetError, match="lists no sha256"):
        load_reference(tmp_path / "ref")


def _save_with_s(tmp_path, S, L=None):
    """A saved reference whose S_ref (and L_ref) are replaced by given values, checksums updated."""
    ref = make_ref(m=S.shape[0], d1=S.shape[1])
    ref.S_ref, ref.L_ref = S.astype(np.float32), (ref.L_ref if L is None else L.astype(np.float32))
    ref.save(tmp_path / "ref", embedding_dtype="float16")
    return tmp_path / "ref"


@pytest.mark.parametrize("what", ["nan_s", "norm_1000_s", "huge_l"])
def test_non_unit_or_non_finite_embeddings_are_refused(tmp_path, what):
    ref = make_ref()
    S, L = np.array(ref.S_ref), np.array(ref.L_ref)
    if what == "nan_s":
        S[:] = np.nan
    elif what == "norm_1000_s":
        S[5] *= 1000
    else:
        L[2, 7] = 6.6e36
    folder = _save_with_s(tmp_path, S, L)
    with pytest.raises(ReferenceSetError, match="S_ref|L_ref") as exc:
        load_reference(folder)
    assert ("row 5" in str(exc.value)) == (what == "norm_1000_s")


def test_float16_unit_rows_pass_the_norm_check(tmp_path):
    """Unit rows rounded to float16 stay within the tolerance (the check must not refuse real sets)."""
    rng = np.random.default_rng(1)
    S = rng.normal(size=(500, 26))
    folder = _save_with_s(tmp_path, S / np.linalg.norm(S, axis=1, keepdims=True))
    assert load_reference(folder).num_segments == 500


@pytest.mark.parametrize("field,value,match", [
    ("templates", ["a photo of a {0} {0}"], "templates"),
    ("templates", ["no slot"], "templates"),
    ("templates", ["{x}"], "templates"),
    ("felzenszwalb", {"scale": 100, "sigma": -1, "min_size": 20}, "felzenszwalb"),
    ("felzenszwalb", {"scale": 100, "sigmaa": 1}, "felzenszwalb"),
])
def test_bad_manifest_parameters_name_the_manifest(tmp_path, field, value, match):
    make_ref().save(tmp_path / "ref")
    _rewrite_manifest(tmp_path / "ref", **{field: value})
    with pytest.raises(ReferenceSetError, match=f"manifest.json: field '{match}'"):
        read_manifest(tmp_path / "ref")


def test_loading_a_reference_imports_neither_pandas_nor_pyarrow_dataset():
    """Both cost a cold `reme segment` time (0.3 s and 0.4 s) and nothing in loading needs them."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys; from reme.reference import load_reference; "
            f"r = load_reference({str(REPO / 'reference_sets' / 'default')!r}); "
            "print(r.num_segments, 'pandas' in sys.modules, 'pyarrow.dataset' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    assert int(out[0]) > 1000 and out[1:] == ["False", "False"]


def test_arrow_values_match_pyarrow_to_numpy():
    import pyarrow as pa

    from reme.io import arrow_values

    for arr in (pa.array(np.arange(7, dtype=np.int64)).slice(2, 3), pa.array(np.float16([1, 2, 3])),
                pa.chunked_array([pa.array([1, 2], pa.int32()), pa.array([3], pa.int32())]),
                pa.array([1.0, None, 3.0], pa.float32()), pa.array(np.arange(12, dtype=np.float32))):
        got, want = arrow_values(arr), arr.to_numpy(zero_copy_only=False)
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
