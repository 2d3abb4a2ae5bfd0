"""GFA fusion of two visual encoders as an encoder spec (issue 7), and SAM's overlapping
masks in pooling and eq. 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO, photo
from reme.encoders import resolve_encoder
from reme.encoders.base import VisualEncoder
from reme.encoders.fused import GFAFusedEncoder, parse_gfa_target
from reme.encoders.pooling import mask_average_pool, masks_average_pool
from reme.inference.segmenter import Segmenter
from test_build_resume import HashText, make_dataset


class GridEncoder(VisualEncoder):
    """Returns a fixed (h, w, d) grid for any image."""

    def __init__(self, grid: np.ndarray, spec: str):
        self.grid = torch.as_tensor(grid, dtype=torch.float32)
        self.dim, self.spec, self.device = self.grid.shape[2], spec, torch.device("cpu")

    def dense_features(self, image):
        return self.grid.clone()


def test_spec_parsing_and_round_trip():
    assert parse_gfa_target("dinov2-vitl14+clip-vit-b-16") == ("dinov2-vitl14", "clip-vit-b-16", 0.5, 5.0)
    assert parse_gfa_target("classical+classical:size=160@0.3,8") == ("classical", "classical:size=160", 0.3, 8.0)
    assert parse_gfa_target("dinov2:/w/a@b+classical")[:2] == ("dinov2:/w/a@b", "classical")  # '@' in a path
    for bad in ("classical", "classical+", "classical+classical@x"):
        with pytest.raises(ValueError, match="GFA spec"):
            parse_gfa_target(bad)
    enc = resolve_encoder("gfa:classical+classical:size=160,stride=8@0.3", device="cpu")
    assert enc.dim == 26 and enc.omega == 0.3 and enc.secondary.image_size == 160
    assert resolve_encoder(enc.spec, device="cpu").spec == enc.spec == "gfa:classical+classical:size=160,stride=8@0.3,5"
    with pytest.raises(ValueError, match="omega"):
        resolve_encoder("gfa:classical+classical@1.0", device="cpu")
    with pytest.raises(ValueError, match="size=INT"):
        resolve_encoder("classical:scale=2", device="cpu")


def test_fusion_repairs_a_segment_whose_primary_view_is_noisy():
    """Four segments (quadrants): two pairs agree in both encoders, except that segment 0's
    primary features point elsewhere; its secondary features match segment 1's. The walk pulls
    segment 0 towards segment 1 in the primary space; omega = 0 is plain MAP."""
    rng = np.random.default_rng(0)
    a, b, noise = (v / np.linalg.norm(v) for v in rng.normal(size=(3, 8)))
    P = np.zeros((4, 4, 8), np.float32)
    Q = np.zeros((2, 2, 4), np.float32)                            # coarser secondary grid
    P[:2, :2], P[:2, 2:], P[2:, :2], P[2:, 2:] = 0.3 * a + noise, a, b, b
    Q[0, 0], Q[0, 1], Q[1, 0], Q[1, 1] = [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]
    seg = np.repeat(np.repeat(np.array([[0, 1], [2, 3]]), 8, 0), 8, 1)  # 16 x 16 image
    img = np.zeros((16, 16, 3), np.uint8)
    prim, sec = GridEncoder(P, "p"), GridEncoder(Q, "q")
    plain = mask_average_pool(prim.dense_features(img), seg)
    enc = GFAFusedEncoder(prim, sec, omega=0.7, lam=5.0)
    feats = enc.dense_features(img)
    assert feats.shape == (4, 4, 12)                                # both views on the primary grid
    fused = enc.segment_embeddings(feats, seg)
    assert fused.shape == (4, 8) and torch.allclose(fused.norm(dim=1), torch.ones(4))
    a_t = torch.as_tensor(a, dtype=torch.float32)
    assert fused[0] @ a_t > plain[0] @ a_t + 0.1
    torch.testing.assert_close(GFAFusedEncoder(prim, sec, omega=0.0).segment_embeddings(feats, seg), plain)
    masks = np.stack([seg == i for i in range(4)])
    torch.testing.assert_close(enc.mask_embeddings(feats, masks), fused)


def test_fused_reference_and_segmenter_share_the_fusion(tmp_path):
    """A reference built with a gfa: spec stores fused S_ref; the Segmenter rebuilds the same
    fused encoder from the manifest, so a training image retrieves its own segments."""
    from reme.build.pipeline import build_gt_reference

    imgs, masks = make_dataset(tmp_path / "data", n=3)
    spec = "gfa:classical:size=48,stride=8+classical:size=32,stride=8@0.5"
    vis = resolve_encoder(spec, device="cpu")
    ref = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "ref", segments="masks", progress=False)
    assert ref.manifest["encoders"]["visual"] == vis.spec
    seg = Segmenter(tmp_path / "ref", text_encoder=HashText(), device="cpu", top_k=1)
    assert isinstance(seg.visual_encoder, GFAFusedEncoder) and seg.visual_encoder.spec == vis.spec
    plain = resolve_encoder("classical:size=48,stride=8", device="cpu")
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(imgs / "img00.png"))
    gt = masks.label_map("img00.png", img.shape[:2])
    m = np.stack([gt == i for i in np.unique(gt)])
    fused = vis.mask_embeddings(vis.dense_features(img), m).numpy()
    unfused = masks_average_pool(plain.dense_features(img), m).numpy()
    S_ref = np.asarray(ref.S_ref, np.float32)
    assert np.abs(S_ref @ fused.T).max(0).min() > 0.999              # S_ref holds the fused rows
    assert not np.allclose(fused, unfused, atol=1e-2)
    with pytest.raises(Exception, match="built with visual encoder"):
        Segmenter(tmp_path / "ref", visual_encoder="classical:size=48,stride=8", text_encoder=HashText(), device="cpu")


class FixedMasks:
    """Stands in for SamProposals: two overlapping masks (whole image, left half)."""

    def masks(self, image):
        H, W = image.shape[:2]
        left = np.zeros((H, W), bool)
        left[:, : W // 2] = True
        return np.stack([np.ones((H, W), bool), left])


def test_sam_overlapping_masks_in_pooling_and_eq3(tiny_sam):
    from reme.eval.protocol import Protocol, predict_image

    image = photo("coffee")[::4, ::4].copy()
    classes = ["cup", "table", "sky"]
    seg = Segmenter(REPO / "reference_sets" / "default", device="cpu", proposals=f"sam:{tiny_sam}",
                    unlabelled=False)                                  # eq. 3 as the paper writes it
    seg.proposer.sam = FixedMasks()
    assert seg.overlapping_proposals
    ids, P, names, S, masks = seg.segment_scores(image, classes, return_embeddings=True, return_masks=True)
    feats = seg.visual_encoder.dense_features(image)
    # the whole-image mask is pooled over the whole image, not only its visible (right) part
    torch.testing.assert_close(S, masks_average_pool(feats, masks))
    assert (ids[:, : image.shape[1] // 2] == 1).all() and (ids[:, image.shape[1] // 2:] == 0).all()
    res = seg.predict(image, classes, return_scores=True)
    Pn = P.numpy()
    W2 = image.shape[1] // 2
    assert (res.label_map[:, :W2] == (Pn[0] + Pn[1]).argmax()).all()    # eq. 3: sum over covering masks
    assert (res.label_map[:, W2:] == Pn[0].argmax()).all()
    np.testing.assert_allclose(res.scores[0, 0], Pn[0] + Pn[1], rtol=1e-5)
    lab, conf = predict_image(seg, image, classes, Protocol(short_side=None))
    assert np.array_equal(lab, res.label_map)
    expect = (Pn[0] + Pn[1]).max() / (Pn[0] + Pn[1]).sum()
    assert conf[0, 0] == pytest.approx(expect, rel=1e-5)


def test_cli_gfa_with_builds_a_fused_reference_that_segment_reads(tmp_path):
    from test_cli import run

    imgs, masks = make_dataset(tmp_path / "data", n=2)
    cls = tmp_path / "classes.txt"
    cls.write_text("\n".join(masks.label_names))
    run("build-reference", "--images", imgs, "--masks", masks.mask_root, "--classes-file", cls,
        "--visual-encoder", "classical:size=48,stride=8", "--gfa-with", "classical:size=32,stride=8",
        "--gfa-omega", "0.4", "--out", tmp_path / "ref", "--quiet")
    import json

    man = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert man["encoders"]["visual"] == "gfa:classical:size=48,stride=8+classical:size=32,stride=8@0.4,5"
    run("segment", imgs / "img00.png", "--classes", "dark,bright", "--reference", tmp_path / "ref",
        "--out", tmp_path / "out", "--quiet")
    assert (tmp_path / "out" / "img00_labels.png").is_file()
    bad = run("build-reference", "--images", imgs, "--masks", masks.mask_root, "--classes-file", cls,
              "--visual-encoder", "classical", "--gfa-with", "classical", "--gfa-omega", "1.5",
              "--out", tmp_path / "ref2", "--quiet", check=False)
    assert bad.returncode != 0 and "omega" in bad.stderr and not (tmp_path / "ref2").exists()
