"""The Ray Data engine on a local 2-CPU Ray instance gives the local engine's files.

Marked ``slow`` and ``ray`` (starting Ray and its actors takes 20-40 s here); CI runs it
separately with ``pytest -m ray`` after installing the ``ray`` extra.
"""

from __future__ import annotations

import pytest

from reme.build.pipeline import build_gt_reference
from reme.encoders import resolve_encoder
from test_build_resume import HashText, make_dataset, same_files

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray.shutdown()


def test_ray_engine_matches_local_engine_and_resumes_its_shards(tmp_path, ray_local):
    imgs, masks = make_dataset(tmp_path / "d", n=6)
    vis = resolve_encoder("classical", device="cpu", image_size=48)  # actors rebuild it from its spec
    local = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "local", shard_size=2, progress=False)
    via_ray = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "ray", shard_size=2, workers=2,
                                 engine="ray", progress=False)
    assert via_ray.manifest["build"]["engine"] == "ray" and via_ray.manifest["build"]["shards_reused"] == 0
    assert same_files(tmp_path / "local", tmp_path / "ray")
    assert local.manifest["counts"] == via_ray.manifest["counts"]
    # a build started locally and finished on Ray (same work folder) gives the same files too
    work = tmp_path / "work"
    build_gt_reference(imgs, masks, vis, HashText(), work_dir=work, shard_size=2, progress=False)
    (work / "shards" / "000002.json").unlink()  # as if the last shard had been killed half-way
    mixed = build_gt_reference(imgs, masks, vis, HashText(), work_dir=work, shard_size=2, engine="ray",
                               out=tmp_path / "mixed", progress=False)
    assert mixed.manifest["build"]["shards_reused"] == 5 and mixed.manifest["build"]["images_computed"] == 1
    assert same_files(tmp_path / "mixed", tmp_path / "local")
