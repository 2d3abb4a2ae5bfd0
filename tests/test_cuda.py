"""The CUDA branches, checked against the CPU: retrieval with S_ref on the device (exact and FAISS
top-k), overlay rows on the device, FAISS GPU search (when this faiss build has GPUs), the
encoders in half precision. Marked ``cuda``: they skip cleanly without CUDA (the default run
stays green on CPU machines) and ``scripts/gpu_check.sh`` runs them on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_CLIP, photo

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run scripts/gpu_check.sh on a GPU)")]

# the overlay tests' fixtures: 2,000 segments of the embedded default with a flat FAISS index, a photo
import test_overlay  # noqa: E402

CLASSES, base, image = test_overlay.CLASSES, test_overlay.base, test_overlay.image


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1).cpu() == b.argmax(1).cpu()).float().mean())


def test_exact_topk_on_device_matches_cpu():
    from reme.inference.retrieval import exact_topk

    g = torch.Generator().manual_seed(0)
    S_ref = torch.nn.functional.normalize(torch.randn(5000, 64, generator=g), dim=1)
    S_test = torch.nn.functional.normalize(torch.randn(40, 64, generator=g), dim=1)
    s_cpu, i_cpu = exact_topk(S_test, S_ref.half().numpy(), 10, chunk_size=1024)
    s_gpu, i_gpu = exact_topk(S_test.cuda(), S_ref.half().cuda(), 10, chunk_size=1024)
    assert s_gpu.device.type == "cuda"
    np.testing.assert_allclose(s_gpu.cpu().numpy(), s_cpu.numpy(), atol=2e-3)
    assert (i_gpu.cpu() == i_cpu).float().mean() >= 0.99


@pytest.mark.parametrize("retrieval,top_k", [("exact", 10), ("exact", None), ("topk", 10)])
def test_segmenter_on_cuda_matches_cpu(base, image, retrieval, top_k):
    from reme.inference.segmenter import Segmenter

    cpu = Segmenter(base, device="cpu", retrieval=retrieval, top_k=top_k)
    gpu = Segmenter(base, device="cuda", retrieval=retrieval, top_k=top_k)
    assert gpu.predictor.S_ref.device.type == "cuda" and gpu.predictor.L_ref.device.type == "cuda"
    ids_c, P_c, _ = cpu.segment_scores(image, CLASSES)
    ids_g, P_g, _ = gpu.segment_scores(image, CLASSES)
    assert P_g.device.type == "cuda"
    np.testing.assert_array_equal(ids_c, ids_g)                      # proposals do not depend on the device
    assert _agree(P_c, P_g) >= 0.97
    np.testing.assert_allclose(P_g.cpu().numpy(), P_c.numpy(), rtol=0.05, atol=0.02)


def test_overlay_rows_on_cuda(base, image):
    from reme.inference.segmenter import Segmenter

    gpu = Segmenter(base, device="cuda").with_overlay()
    r = gpu.predict(image, CLASSES)
    ids = np.unique(r.segment_ids[r.segment_ids.shape[0] // 2:, :r.segment_ids.shape[1] // 3])[:5]
    gpu.add_examples(image, ids.tolist(), "saucer")                  # new rows added on the device
    assert gpu.overlay.num_rows > 0
    cpu = Segmenter(base, device="cpu", overlay=gpu.overlay)
    _, P_c, _ = cpu.segment_scores(image, CLASSES)
    _, P_g, _ = gpu.segment_scores(image, CLASSES)
    assert _agree(P_c, P_g) >= 0.97
    _, P_b, _ = Segmenter(base, device="cuda").segment_scores(image, CLASSES)
    assert not torch.allclose(P_g, P_b)                               # the overlay rows count on the device


def test_faiss_gpu_search_matches_cpu(base):
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() < 1:
        pytest.skip("this faiss build has no GPU support (pip install 'reme[faiss-gpu]' on a CUDA machine)")
    from reme.reference.index import build_index, search, to_gpu

    S = np.asarray(base.S_ref, np.float32)
    q = S[::97][:50]
    cpu_index = build_index(S, "flat")
    gpu_index = to_gpu(build_index(S, "flat"))
    assert "Gpu" in type(gpu_index).__name__ or hasattr(gpu_index, "getDevice")
    D_c, I_c = search(cpu_index, q, 10)
    D_g, I_g = search(gpu_index, q, 10)
    assert (I_c[:, 0] == I_g[:, 0]).mean() >= 0.99
    np.testing.assert_allclose(D_g, D_c, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dinov2_half_precision_on_cuda(tiny_dinov2, dtype):
    from reme.encoders.dinov2 import load_dinov2

    folder, _ = tiny_dinov2
    img = photo("astronaut")[::4, ::4].copy()
    ref = load_dinov2(str(folder), device="cpu", image_size=112).dense_features(img).float()
    enc = load_dinov2(str(folder), device="cuda", image_size=112, dtype=dtype)
    assert enc.dtype == dtype
    feats = enc.dense_features(img)
    assert feats.device.type == "cuda" and torch.isfinite(feats.float()).all()
    cos = torch.nn.functional.cosine_similarity(feats.float().cpu().flatten(0, -2), ref.flatten(0, -2), dim=-1)
    assert cos.min() > 0.95 and cos.mean() > 0.99


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_clip_half_precision_on_cuda(tiny_clip, precision):
    from reme.encoders.clip import load_clip

    ckpt, _ = tiny_clip
    img = photo("astronaut")[::4, ::4].copy()
    ref = load_clip(f"{TINY_CLIP}:{ckpt}", device="cpu")
    enc = load_clip(f"{TINY_CLIP}:{ckpt}", device="cuda", precision=precision)
    assert enc.dtype in (torch.float16, torch.bfloat16)
    f_ref, f = ref.dense_features(img).float(), enc.dense_features(img)
    assert f.device.type == "cuda" and torch.isfinite(f.float()).all()
    cos = torch.nn.functional.cosine_similarity(f.float().cpu().flatten(0, -2), f_ref.flatten(0, -2), dim=-1)
    assert cos.mean() > 0.98
    t_ref, t = ref.encode(["a cup", "a table"]), enc.encode(["a cup", "a table"])
    assert np.abs(np.asarray(t, np.float32) - np.asarray(t_ref, np.float32)).max() < 0.05
