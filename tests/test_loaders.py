"""Weight loaders of reme.encoders (clip, dinov2, captioners) with tiny random-weight models.

No pretrained weights can be downloaded in CI, so each loader is exercised with a tiny model
built from a config, saved to a temporary folder and loaded back through the user-facing
path (:func:`reme.encoders.resolve_encoder`). The tests run offline.
"""

from __future__ import annotations



import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from reme.encoders import _hub, resolve_encoder  # noqa: E402
from reme.errors import MissingWeightsError  # noqa: E402

from conftest import SHARED, TINY_CLIP, TINY_CLIP_CFG, bert_tokenizer, needs_shared  # noqa: E402


def _photo(name: str = "astronaut") -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _coco_val_images(n: int = 3) -> list[Path]:
    folder = SHARED / "coco_tiny" / "images" / "val2017"
    return sorted(folder.glob("*.jpg"))[:n]


def _same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clip_encoder(tiny_clip):
    ckpt, _ = tiny_clip
    return resolve_encoder(f"clip:{TINY_CLIP}:{ckpt}", device="cpu")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    import transformers as T

    tok = bert_tokenizer()
    folder = tmp_path_factory.mktemp("blip") / "tiny-blip"
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=32)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id,
                sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    model = T.BlipForConditionalGeneration(
        T.BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    ).eval()
    processor = T.BlipProcessor(
        image_processor=T.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ CLIP
def test_clip_checkpoint_loads_through_resolver(tiny_clip, clip_encoder):
    ckpt, state = tiny_clip
    enc = clip_encoder
    assert enc.spec == f"clip:{TINY_CLIP}:{ckpt.resolve()}"
    assert enc.dim == 32 and enc.device == torch.device("cpu")
    assert enc.image_size == 64 and enc.patch_size == (16, 16)
    _same_state(enc.model.state_dict(), state)  # the checkpoint was used, not a random init


def test_clip_dense_features_follow_image_aspect(clip_encoder):
    enc = clip_encoder
    square = enc.dense_features(_photo("astronaut"))  # 512 x 512
    assert square.shape == (4, 4, 32) and square.dtype == torch.float32
    wide = enc.dense_features(_photo("coffee"))  # 400 x 600
    assert wide.shape == (4, 6, 32)
    assert enc.grid_size(400, 600) == (4, 6)
    assert torch.isfinite(wide).all()
    assert torch.equal(wide, enc.dense_features(_photo("coffee")))


def test_clip_image_size_kwarg(tiny_clip):
    ckpt, _ = tiny_clip
    enc = resolve_encoder(f"clip:{TINY_CLIP}:{ckpt}", device="cpu", image_size=96)
    assert enc.dense_features(_photo("coffee")).shape == (6, 9, 32)


def test_clip_text_and_global_embeddings_unit_norm(clip_encoder):
    enc = clip_encoder
    emb = enc.encode(["a photo of a cat", "a photo of a dog", "sky"])
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, 32)
    with pytest.raises(TypeError):
        enc.encode("a single string")
    glob = enc.encode_image_global([_photo("astronaut"), _photo("coffee")])
    assert glob.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(glob, axis=1), 1.0, atol=1e-5)


def test_clip_global_embedding_matches_open_clip(clip_encoder):
    import open_clip
    from PIL import Image

    enc = clip_encoder
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP)
    img = _photo("coffee")
    with torch.no_grad():
        ref = enc.model.encode_image(preprocess(Image.fromarray(img))[None], normalize=True)
    np.testing.assert_allclose(enc.encode_image_global([img])[0], ref[0].numpy(), atol=1e-5)


def _reference_maskclip(model, pixels: torch.Tensor) -> torch.Tensor:
    """MaskCLIP tokens computed with open_clip's own modules: embeddings via ``_embeds`` and the
    last block's attention run with an identity attention pattern (each token attends only to
    itself), which makes nn.MultiheadAttention return out_proj(V)."""
    visual = model.visual
    with torch.no_grad():
        x = visual._embeds(pixels)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        n = x.shape[1]
        only_self = torch.full((n, n), float("-inf"))
        only_self.fill_diagonal_(0.0)
        y = last.ln_1(x)
        v_out = last.attn(y, y, y, need_weights=False, attn_mask=only_self)[0]
        return visual.ln_post(v_out) @ visual.proj


def test_clip_maskclip_matches_reference_native_grid(clip_encoder):
    enc = clip_encoder
    img = _photo("astronaut")
    pixels = enc.preprocess(img)
    assert pixels.shape == (1, 3, 64, 64)
    ref = _reference_maskclip(enc.model, pixels)[0, 1:].reshape(4, 4, 32)
    torch.testing.assert_close(enc.dense_features(img), ref, atol=1e-5, rtol=1e-5)


def test_clip_maskclip_matches_reference_interpolated_grid(tiny_clip, clip_encoder):
    """Non-native grid: the reference model is rebuilt at the new input size and its positional
    embedding resized by open_clip's own ``resize_pos_embed`` (bicubic)."""
    import open_clip
    from open_clip.model import resize_pos_embed

    _, state = tiny_clip
    enc = clip_encoder
    img = _photo("coffee")
    pixels = enc.preprocess(img)
    assert pixels.shape == (1, 3, 64, 96)
    ref_model = open_clip.create_model(TINY_CLIP, force_image_size=(64, 96)).eval()
    sd = dict(state)
    resize_pos_embed(sd, ref_model)
    ref_model.load_state_dict(sd)
    ref = _reference_maskclip(ref_model, pixels)[0, 1:].reshape(4, 6, 32)
    torch.testing.assert_close(enc.dense_features(img), ref, atol=1e-5, rtol=1e-5)


def test_clip_preprocess_matches_open_clip_normalisation(clip_encoder):
    """At the native size no resize happens, so pixels must equal open_clip's eval transform."""
    import open_clip
    from PIL import Image

    enc = clip_encoder
    img = _photo("astronaut")[100:164, 200:264].copy()  # 64 x 64
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP)
    ref = preprocess(Image.fromarray(img))[None]
    torch.testing.assert_close(enc.preprocess(img), ref, atol=1e-6, rtol=1e-6)


def test_clip_rejects_bad_images(clip_encoder):
    with pytest.raises(TypeError):
        clip_encoder.dense_features(_photo("astronaut").astype(np.float32))
    with pytest.raises(ValueError):
        clip_encoder.dense_features(np.zeros((10, 10), dtype=np.uint8))


def test_clip_checkpoint_of_other_arch_is_rejected(tiny_clip):
    ckpt, _ = tiny_clip
    with pytest.raises(ValueError, match="could not be loaded"):
        resolve_encoder(f"clip:{TINY_CLIP}-narrow:{ckpt}", device="cpu")


# ------------------------------------------------------------------------------------ DINOv2
def test_dinov2_local_folder(tiny_dinov2):
    folder, state = tiny_dinov2
    enc = resolve_encoder(f"dinov2:{folder}", device="cpu", image_size=56)
    assert enc.spec == f"dinov2:{folder.resolve()}"
    assert enc.dim == 32 and enc.patch_size == (14, 14) and enc.device == torch.device("cpu")
    _same_state(enc.model.state_dict(), state)
    square = enc.dense_features(_photo("astronaut"))
    assert square.shape == (4, 4, 32) and square.dtype == torch.float32
    wide = enc.dense_features(_photo("coffee"))  # 400 x 600 -> 56 x 84 px -> 4 x 6
    assert wide.shape == (4, 6, 32)
    assert torch.equal(wide, enc.dense_features(_photo("coffee")))  # deterministic
    # patch tokens of last_hidden_state, CLS dropped, row-major grid
    with torch.no_grad():
        hidden = enc.model(pixel_values=enc.preprocess(_photo("coffee"))).last_hidden_state
    torch.testing.assert_close(wide, hidden[0, 1:].reshape(4, 6, 32))


def test_dinov2_default_image_size(tiny_dinov2):
    folder, _ = tiny_dinov2
    enc = resolve_encoder(f"dinov2:{folder}", device="cpu")
    assert enc.image_size == 448
    assert enc.grid_size(400, 600) == (32, 48)


def test_dinov2_register_tokens_dropped(tmp_path):
    import transformers

    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers release has no Dinov2WithRegistersModel")
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, patch_size=14, image_size=56,
                                    num_register_tokens=4)
    torch.manual_seed(0)
    Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "reg")
    enc = resolve_encoder(f"dinov2:{tmp_path / 'reg'}", device="cpu", image_size=56)
    assert enc.num_register_tokens == 4
    feats = enc.dense_features(_photo("coffee"))
    with torch.no_grad():
        hidden = enc.model(pixel_values=enc.preprocess(_photo("coffee"))).last_hidden_state
    assert hidden.shape[1] == 1 + 4 + 24
    torch.testing.assert_close(feats, hidden[0, 5:].reshape(4, 6, 32))


# ------------------------------------------------------------------------------------ captioners
@needs_shared
def test_blip_captions_real_photos(tiny_blip):
    folder, state = tiny_blip
    cap = resolve_encoder(f"blip:{folder}", device="cpu", max_new_tokens=8)
    assert cap.spec == f"blip:{folder.resolve()}"
    _same_state(cap.model.state_dict(), state)
    for path in _coco_val_images(3):
        out = cap.caption(_read_rgb(path), key=path.name)
        assert isinstance(out, list) and all(isinstance(c, str) for c in out)


@needs_shared
def test_llava_captions_real_photos(tiny_llava):
    from reme.encoders.captioners import LLAVA_PROMPT

    folder, state = tiny_llava
    cap = resolve_encoder(f"llava:{folder}", device="cpu", max_new_tokens=8)
    assert cap.spec == f"llava:{folder.resolve()}"
    _same_state(cap.model.state_dict(), state)
    assert cap.text == f"USER: <image>\n{LLAVA_PROMPT} ASSISTANT:"
    assert LLAVA_PROMPT.startswith("Describe this image in detail. Mention all visible objects")
    assert LLAVA_PROMPT.endswith(
        "Focus only on visible objects or context. Avoid guessing or speculating."
    )
    for path in _coco_val_images(3):
        out = cap.caption(_read_rgb(path))
        assert isinstance(out, list) and len(out) <= 1 and all(isinstance(c, str) for c in out)


def test_llava_uses_chat_template_when_present(tiny_llava):
    from reme.encoders.captioners import LLaVACaptioner

    folder, _ = tiny_llava
    cap = resolve_encoder(f"llava:{folder}", device="cpu", max_new_tokens=2, prompt="Hi.")
    cap.processor.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    rebuilt = LLaVACaptioner(cap.model, cap.processor, spec=cap.spec, prompt="Hi.",
                             max_new_tokens=2)
    assert rebuilt.text == "USER: <image>\nHi. ASSISTANT:"
    assert isinstance(rebuilt.caption(_photo("coffee")), list)


# ------------------------------------------------------------------------------------ hub cache
def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path | str]) -> Path:
    """Lay files out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, src in files.items():
        if isinstance(src, Path):
            (snap / name).write_bytes(src.read_bytes())
        else:
            (snap / name).write_text(src)
    return snap


def test_dinov2_from_hub_cache_offline(tiny_dinov2, tmp_path, monkeypatch):
    folder, state = tiny_dinov2
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "reme-test/tiny-dinov2",
                    {p.name: p for p in folder.iterdir() if p.is_file()})
    monkeypatch.setenv("REME_CACHE_DIR", str(cache))
    enc = resolve_encoder("dinov2:reme-test/tiny-dinov2", device="cpu", image_size=56)
    assert enc.spec == "dinov2:reme-test/tiny-dinov2"  # the hub id, not the cache folder
    _same_state(enc.model.state_dict(), state)


def test_clip_hf_hub_and_local_dir_offline(tiny_clip, tmp_path, monkeypatch):
    ckpt, state = tiny_clip
    config = json.dumps({"model_cfg": TINY_CLIP_CFG,
                         "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "reme-test/tiny-clip",
                           {"open_clip_config.json": config, "open_clip_pytorch_model.bin": ckpt})
    monkeypatch.setenv("REME_CACHE_DIR", str(cache))
    enc = resolve_encoder("clip:hf-hub:reme-test/tiny-clip", device="cpu")
    assert enc.spec == "clip:hf-hub:reme-test/tiny-clip"
    assert enc.mean == (0.5, 0.5, 0.5)
    _same_state(enc.model.state_dict(), state)
    local = resolve_encoder(f"clip:local-dir:{snap}", device="cpu")
    assert local.spec == f"clip:local-dir:{snap}"
    torch.testing.assert_close(local.dense_features(_photo("coffee")),
                               enc.dense_features(_photo("coffee")))


def test_clip_tag_from_hub_cache_offline(tiny_clip, tmp_path, monkeypatch):
    """A pretrained tag whose weights sit in the hub cache: the tag's mean/std and QuickGELU
    flag are applied (open_clip's pretrained table is patched to know a tiny tag)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    ckpt, state = tiny_clip
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "reme-test/tiny-clip-tag", {"open_clip_pytorch_model.bin": ckpt})
    monkeypatch.setenv("REME_CACHE_DIR", str(cache))
    tag_cfg = {"url": "", "hf_hub": "reme-test/tiny-clip-tag/", "mean": (0.1, 0.2, 0.3),
               "std": (0.4, 0.5, 0.6), "interpolation": "bicubic", "resize_mode": "shortest",
               "quick_gelu": True}
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda arch, tag: dict(tag_cfg) if (arch, tag) == (TINY_CLIP, "tinytag")
                        else real(arch, tag))
    enc = resolve_encoder(f"clip:{TINY_CLIP}:tinytag", device="cpu")
    assert enc.spec == f"clip:{TINY_CLIP}:tinytag"
    assert enc.mean == (0.1, 0.2, 0.3) and enc.std == (0.4, 0.5, 0.6)
    assert isinstance(enc.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    _same_state(enc.model.state_dict(), state)


# ------------------------------------------------------------------------------- missing weights
@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("REME_CACHE_DIR", str(cache))
    return cache


def test_missing_dinov2_hub_weights_fail_fast(empty_cache):
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as info:
        resolve_encoder("dinov2:facebook/dinov2-large", device="cpu")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "facebook/dinov2-large" in msg and "dinov2:" in msg and "REME_CACHE_DIR" in msg
    assert "hf download" in msg or "huggingface-cli download" in msg


def test_missing_clip_tag_weights_fail_fast(empty_cache):
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as info:
        resolve_encoder("clip:ViT-B-16:openai", device="cpu")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "clip:ViT-B-16:openai" in msg and "open_clip_pytorch_model.bin" in msg
    assert "hf download" in msg or "huggingface-cli download" in msg
    assert "clip:ViT-B-16-quickgelu:" in msg  # openai weights need QuickGELU


@pytest.mark.parametrize("spec", ["llava:llava-hf/llava-1.5-7b-hf", "blip-base",
                                  "clip:hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K"])
def test_missing_hub_models_fail_fast(empty_cache, spec):
    with pytest.raises(MissingWeightsError, match="download"):
        resolve_encoder(spec, device="cpu")


def test_unreachable_hub_fails_fast(empty_cache, monkeypatch):
    """Without the offline variables, an unreachable host gives MissingWeightsError too."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(_hub, "host_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(MissingWeightsError, match="not reachable"):
        resolve_encoder("dinov2:facebook/dinov2-small", device="cpu")


def test_probe_of_closed_port_is_quick():
    start = time.monotonic()
    assert _hub.host_reachable("http://127.0.0.1:9", timeout=1.0) is False
    assert time.monotonic() - start < 2


def test_unknown_tag_and_arch_list_options():
    with pytest.raises(ValueError, match="openai") as info:
        resolve_encoder("clip:ViT-B-16:not-a-tag", device="cpu")
    assert "laion2b_s34b_b88k" in str(info.value)
    with pytest.raises(ValueError, match="ViT-B-16") as info:
        resolve_encoder("clip:ViT-Nope-99:openai", device="cpu")
    assert "list_models" in str(info.value)
    with pytest.raises(ValueError, match="only ViT towers"):
        resolve_encoder("clip:RN50:openai", device="cpu")
    with pytest.raises(ValueError):
        resolve_encoder("clip:ViT-B-16", device="cpu")


def test_missing_local_paths(tmp_path):
    with pytest.raises(MissingWeightsError):
        resolve_encoder(f"clip:ViT-B-16:{tmp_path / 'nope.pt'}", device="cpu")
    with pytest.raises(MissingWeightsError):
        resolve_encoder(f"dinov2:{tmp_path / 'no-folder'}", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="config.json"):
        resolve_encoder(f"dinov2:{tmp_path / 'empty'}", device="cpu")


def test_unknown_loader_kwarg_raises(tiny_dinov2):
    folder, _ = tiny_dinov2
    with pytest.raises(TypeError):
        resolve_encoder(f"dinov2:{folder}", device="cpu", imagesize=56)


# ------------------------------------------------------------------------------------ caption files
@needs_shared
def test_caption_file_real_coco_lookups(caplog):
    path = SHARED / "captions" / "coco_captions.jsonl"
    cap = resolve_encoder(f"captions:{path}")
    assert cap.spec == f"captions:{path.resolve()}"
    assert len(cap) == 100
    full = cap.caption(None, key="coco_tiny/images/val2017/000000006818.jpg")
    assert len(full) == 5 and all(isinstance(c, str) and c for c in full)
    assert cap.caption(None, key="000000006818.jpg") == full  # relative to images/val2017
    assert cap.caption(None, key="val2017/000000006818.jpg") == full
    assert cap.caption(None, key="000000006818") == full  # stem
    assert cap.caption(None, key=str(SHARED / "coco_tiny/images/val2017/000000006818.jpg")) == full
    with caplog.at_level(logging.WARNING, logger="reme.encoders.captioners"):
        assert cap.caption(None, key="000000999999.jpg") == []
        assert cap.caption(None, key="other/missing.jpg") == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    with pytest.raises(ValueError):
        cap.caption(None)


def test_caption_file_formats_and_ambiguity(tmp_path):
    path = tmp_path / "caps.jsonl"
    rows = [
        {"file_name": "a/x.jpg", "caption": "one"},
        {"file_name": "a/x.jpg", "caption": "two"},
        {"image": "b/x.jpg", "captions": ["three"]},
        {"image": "c/y.png", "captions": ["four", "  "]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cap = resolve_encoder(f"captions:{path}")
    assert cap.caption(None, key="a/x.jpg") == ["one", "two"]
    assert cap.caption(None, key="x.jpg") == []  # a/x.jpg or b/x.jpg: ambiguous
    assert cap.caption(None, key="y.jpg") == ["four"]  # stem match, blank caption dropped


@pytest.mark.parametrize("bad", ["../escape.jpg", "/etc/passwd", "a/../../b.jpg", "C:/x.jpg"])
def test_caption_file_rejects_escaping_paths(tmp_path, bad):
    path = tmp_path / "caps.jsonl"
    path.write_text(json.dumps({"image": "ok.jpg", "captions": ["fine"]}) + "\n"
                    + json.dumps({"image": bad, "captions": ["bad"]}) + "\n")
    with pytest.raises(ValueError, match=r"caps\.jsonl:2"):
        resolve_encoder(f"captions:{path}")


def test_caption_file_malformed_and_missing(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "ok.jpg", "captions": ["fine"]}\n{not json}\n')
    with pytest.raises(ValueError, match=r"caps\.jsonl:2"):
        resolve_encoder(f"captions:{path}")
    with pytest.raises(FileNotFoundError):
        resolve_encoder(f"captions:{tmp_path / 'none.jsonl'}")
