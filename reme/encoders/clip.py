"""CLIP through open_clip: text embeddings and MaskCLIP-style dense patch features.

ReME uses CLIP for the initial segment/phrase pairing (docs/method.md step 4: "Embed segments and
phrases with CLIP (ViT-B by default)") and optionally as the visual encoder of the reference set
(step 6: "CLIP-B/L, DINOv2-B work too"). Segment embeddings come from mask average pooling of a
dense feature map, so the visual tower must give one embedding per patch *in the joint
image-text space*. A plain ViT only aligns its CLS token with text; following MaskCLIP (Zhou et
al., "Extract Free Dense Labels from CLIP", ECCV 2022) the last transformer block is replaced by
its value path: ``out_proj(v(ln_1(x)))``, then ``ln_post`` and ``proj``. By default the residual
and MLP of that block are dropped (v-path output only; ClearCLIP, ECCV 2024, shows this is the
cleaner variant); ``maskclip_residual=True`` keeps them as MaskCLIP's original code does.

Specs (see `reme.encoders.factory`)::

    clip:ViT-B-16:openai              open_clip architecture + pretrained tag
    clip:ViT-B-16:/path/to/ckpt.pt    architecture + local checkpoint (.pt/.bin/.pth/.safetensors)
    clip:hf-hub:org/name              open_clip model on the Hugging Face hub
    clip:local-dir:/path/folder       a folder with open_clip_config.json + weights
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reme.encoders import _hub, _preprocess
from reme.encoders.base import CLIPModel
from reme.errors import MissingWeightsError

logger = logging.getLogger(__name__)

#: open_clip defaults used when a model carries no preprocess config (OpenAI CLIP statistics).
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _import_open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - open_clip is a core dependency here
        raise ImportError(
            'CLIP encoders need open_clip: pip install "reme[clip]" (open_clip_torch)'
        ) from exc
    return open_clip


class OpenCLIPEncoder(_preprocess.PatchGridInput, CLIPModel):
    """A frozen open_clip ViT model as text encoder and dense visual encoder.

    Attributes:
        spec (str): canonical spec, e.g. ``"clip:ViT-B-16:openai"``.
        dim (int): joint embedding dimension (open_clip ``embed_dim``; 512 for ViT-B/16).
        device (torch.device): where the forward passes run.
        model (open_clip.CLIP): the model, in eval mode.
        tokenizer: the open_clip tokenizer of the model.
        image_size (int): short side, in pixels, images are resized to for dense features.
        patch_size (tuple[int, int]): ViT patch size (rows, columns).
        mean, std (tuple[float, float, float]): normalisation of the pretrained tag.
        interpolation (str): resize filter of the tag (``"bicubic"`` for OpenAI/LAION).
        maskclip_residual (bool): keep the last block's residual and MLP on the value path.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        spec: str,
        device: str | torch.device = "cpu",
        image_size: int | None = None,
        maskclip_residual: bool = False,
        text_batch_size: int = 256,
        image_batch_size: int = 32,
    ) -> None:
        """Wrap an already loaded open_clip model (use `load_clip` to load one).

        Args:
            model: an open_clip ``CLIP`` / ``CustomTextCLIP`` with a ``VisionTransformer`` tower;
                it is put in eval mode and frozen (``requires_grad_(False)``).
            tokenizer: ``open_clip.get_tokenizer(...)`` of the same model.
            spec: canonical spec string stored in reference-set manifests.
            device: device the model is on.
            image_size: short side for dense features; None uses the model's native input size
                (224 for ViT-B/16). Larger values give finer grids (positional embeddings are
                interpolated bicubically).
            maskclip_residual: False (default, chosen by us after ClearCLIP): the last block's
                output is its attention value path only. True: MaskCLIP's original code, value
                path + residual + MLP.
            text_batch_size: strings per forward pass in `encode`.
            image_batch_size: images per forward pass in `encode_image_global`.

        Raises:
            ValueError: the vision tower is not an open_clip ``VisionTransformer`` (ResNet and
                timm towers), uses attentional pooling (CoCa), or has no projection.
        """
        _import_open_clip()
        from open_clip.transformer import VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"{spec}: only ViT towers (open_clip VisionTransformer) are supported for dense "
                f"features; this model's vision tower is {type(visual).__name__}"
            )
        if visual.attn_pool is not None:
            raise ValueError(
                f"{spec}: ViT towers with attentional pooling (CoCa) are not supported"
            )
        if visual.proj is None:
            raise ValueError(f"{spec}: the vision tower has no output projection (proj is None)")
        if image_size is not None and int(image_size) < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if text_batch_size < 1 or image_batch_size < 1:
            raise ValueError("text_batch_size and image_batch_size must be >= 1")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = torch.device(device)
        self.dim = int(visual.proj.shape[1])
        self.patch_size = tuple(int(p) for p in visual.patch_size)
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        native = visual.image_size
        native = (native, native) if isinstance(native, int) else tuple(native)
        self.image_size = int(image_size) if image_size is not None else int(min(native))
        pp = dict(getattr(visual, "preprocess_cfg", None) or {})
        self.preprocess_cfg = pp
        self.mean = tuple(float(v) for v in pp.get("mean", OPENAI_MEAN))
        self.std = tuple(float(v) for v in pp.get("std", OPENAI_STD))
        self.interpolation = str(pp.get("interpolation", "bicubic"))
        self.maskclip_residual = bool(maskclip_residual)
        self.text_batch_size = int(text_batch_size)
        self.image_batch_size = int(image_batch_size)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._global_transform = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={self.device})"

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the vision tower's weights."""
        return self.model.visual.conv1.weight.dtype

    # ---------------------------------------------------------------- preprocessing


    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        # (1 + gh*gw, width) positional embedding; patch part interpolated bicubically as in
        # open_clip.model.resize_pos_embed (antialias on, align_corners off)
        pos = self.model.visual.positional_embedding
        if (gh, gw) == self.native_grid:
            return pos
        cached = self._pos_cache.get((gh, gw))
        if cached is not None:
            return cached
        cls_pos, grid = pos[:1], pos[1:]
        oh, ow = self.native_grid
        grid = grid.float().reshape(1, oh, ow, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True
        )
        grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
        out = torch.cat([cls_pos, grid], dim=0)
        if len(self._pos_cache) >= 16:
            self._pos_cache.clear()
        self._pos_cache[(gh, gw)] = out
        return out

    # ---------------------------------------------------------------- dense features
    @staticmethod
    def _value_path(attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """``out_proj(W_v y + b_v)``: the attention output when every token attends to itself."""
        width = y.shape[-1]
        if isinstance(attn, nn.MultiheadAttention):
            if attn._qkv_same_embed_dim:
                w_v = attn.in_proj_weight[2 * width:]
            else:
                w_v = attn.v_proj_weight
            b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
            return attn.out_proj(F.linear(y, w_v, b_v))
        # open_clip.transformer.Attention (custom blocks)
        b = attn.in_proj_bias
        v = F.linear(y, attn.in_proj_weight[2 * width:], b[2 * width:] if b is not None else None)
        if getattr(attn, "head_scale", None) is not None:
            heads = attn.num_heads
            v = v.unflatten(-1, (heads, width // heads)) * attn.head_scale.view(heads, 1)
            v = v.flatten(-2)
        v = attn.ln_inner(v)
        return attn.out_proj(v)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """MaskCLIP forward of the vision tower.

        Args:
            pixels: (B, 3, h * ph, w * pw) from `preprocess`.

        Returns:
            (B, 1 + h * w, dim) tokens in the joint space (CLS first, then patches row-major);
            the last block runs only its value path (module docstring).
        """
        visual = self.model.visual
        x = visual.conv1(pixels.to(self.dtype))  # (B, width, h, w)
        batch, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls_tok = visual.class_embedding.view(1, 1, -1).expand(batch, -1, -1).to(x.dtype)
        x = torch.cat([cls_tok, x], dim=1) + self._pos_embed(gh, gw).to(x.dtype)
        x = visual.ln_pre(x)  # patch dropout is the identity in eval mode
        transformer = visual.transformer
        blocks = transformer.resblocks
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        last = blocks[-1]
        out = self._value_path(last.attn, last.ln_1(x))
        out = getattr(last, "ln_attn", nn.Identity())(out)
        out = last.ls_1(out)
        if self.maskclip_residual:
            out = x + out
            out = out + last.ls_2(last.mlp(last.ln_2(out)))
        out = visual.ln_post(out)
        return out @ visual.proj

    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """Per-patch CLIP embeddings in the joint image-text space (MaskCLIP).

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            (h, w, dim) float32 tensor on ``self.device``, not normalised;
            ``(h, w) = self.grid_size(H, W)`` (about ``image_size / patch`` on the short side).

        Raises:
            TypeError, ValueError: ``image`` is not an (H, W, 3) uint8 array.
        """
        with torch.inference_mode():
            pixels = self.preprocess(image)
            gh, gw = pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1]
            tok = self.tokens(pixels)
            return tok[0, 1:].reshape(gh, gw, self.dim).float()

    # ---------------------------------------------------------------- global / text
    def encode_image_global(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Standard CLIP image embeddings (CLS token through the full tower).

        Uses open_clip's eval transform of the tag (resize, centre crop, normalise), so the
        result equals ``model.encode_image(preprocess(img))``. Used for region embeddings of
        clustering proposals (Split Matching, docs/method.md "Related systems").

        Args:
            images: n arrays, each (H, W, 3) uint8 RGB.

        Returns:
            (n, dim) float32 array, rows L2-normalised; (0, dim) for no images.
        """
        images = list(images)
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        from PIL import Image

        if self._global_transform is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            keys = PreprocessCfg.__dataclass_fields__.keys()
            cfg = PreprocessCfg(**{k: v for k, v in self.preprocess_cfg.items() if k in keys})
            self._global_transform = image_transform_v2(cfg, is_train=False)
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.image_batch_size):
                chunk = images[start:start + self.image_batch_size]
                pil = [Image.fromarray(_preprocess.check_rgb_uint8(im)) for im in chunk]
                batch = torch.stack([self._global_transform(im) for im in pil])
                batch = batch.to(self.device, self.dtype)
                out.append(self.model.encode_image(batch).float().cpu())
        return _l2_rows(torch.cat(out).numpy())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed strings with the CLIP text tower (docs/method.md step 4/5).

        Args:
            texts: n strings (a single ``str`` is rejected, it would be split into characters).

        Returns:
            (n, dim) float32 array, rows L2-normalised; (0, dim) when ``n == 0``.

        Raises:
            TypeError: ``texts`` is a single string or holds non-strings.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode() needs strings; got {type(bad[0]).__name__}")
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.text_batch_size):
                tok = self.tokenizer(texts[start:start + self.text_batch_size]).to(self.device)
                out.append(self.model.encode_text(tok).float().cpu())
        return _l2_rows(torch.cat(out).numpy())


def _l2_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# -------------------------------------------------------------------------------- loading
def _check_arch(open_clip: Any, arch: str) -> dict:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        models = open_clip.list_models()
        vits = [m for m in models if m.startswith("ViT-")]
        shown = ", ".join(vits[:25])
        raise ValueError(
            f"unknown open_clip architecture {arch!r}. Some known ones: {shown}, ... "
            f"({len(models)} in total; see open_clip.list_models())"
        )
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        kind = "timm" if "timm_model_name" in vision else "ResNet"
        raise ValueError(
            f"open_clip architecture {arch!r} has a {kind} vision tower; only ViT towers are "
            f"supported for dense features (e.g. ViT-B-16, ViT-L-14)"
        )
    if vision.get("attentional_pool"):
        raise ValueError(f"open_clip architecture {arch!r} (attentional pooling) is not supported")
    return cfg


def _find_checkpoint(folder: str) -> str | None:
    preferred = (
        "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
    )
    for name in preferred:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(n for n in os.listdir(folder) if n.endswith(_CHECKPOINT_SUFFIXES))
    return os.path.join(folder, found[0]) if found else None


def _tag_weights(open_clip: Any, arch: str, tag: str, cache_dir: str | None) -> tuple[str, dict]:
    """Weights file of ``arch:tag`` (cached or freshly downloaded) and the tag's config."""
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = ", ".join(tags) if tags else "none (give a checkpoint path instead)"
        raise ValueError(
            f"unknown pretrained tag {tag!r} for open_clip architecture {arch!r}. Known tags: "
            f"{known}. A local checkpoint works too: clip:{arch}:/path/to/checkpoint.pt"
        )
    found = _hub.find_open_clip_weights(pcfg, cache_dir)
    if found:
        logger.info("using cached weights of %s:%s at %s", arch, tag, found)
        return found, pcfg
    hub = _hub.open_clip_hub_file(pcfg)
    source = _hub.hf_endpoint() if hub is not None else pcfg.get("url", "")
    path_arch = arch
    if pcfg.get("quick_gelu") and not arch.endswith("-quickgelu"):
        if f"{arch}-quickgelu" in open_clip.list_models():
            path_arch = f"{arch}-quickgelu"
    blocker = _hub.download_blocker(source)
    if blocker:
        raise MissingWeightsError(
            _hub.open_clip_missing_message(arch, tag, pcfg, blocker, cache_dir, path_arch=path_arch)
        )
    try:
        path = open_clip.download_pretrained(pcfg, cache_dir=cache_dir)
    except Exception as exc:
        raise MissingWeightsError(
            _hub.open_clip_missing_message(
                arch, tag, pcfg, f"download failed: {exc}", cache_dir, path_arch=path_arch
            )
        ) from exc
    if not path or not os.path.isfile(path):
        raise MissingWeightsError(
            _hub.open_clip_missing_message(arch, tag, pcfg, "download gave no file", cache_dir)
        )
    return path, pcfg


def load_clip(
    target: str,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    image_size: int | None = None,
    precision: str = "fp32",
    maskclip_residual: bool = False,
    text_batch_size: int = 256,
    image_batch_size: int = 32,
) -> OpenCLIPEncoder:
    """Load an open_clip ViT as a `OpenCLIPEncoder` (``clip:`` specs).

    Args:
        target: the spec without ``clip:``: ``"ViT-B-16:openai"`` (architecture + tag),
            ``"ViT-B-16:/path/ckpt.pt"`` (architecture + checkpoint: ``.pt``, ``.pth``,
            ``.bin`` or ``.safetensors``), ``"hf-hub:org/name"`` or ``"local-dir:/folder"``.
        device: torch device; weights are read on the CPU (``weights_only=True``), then moved.
        cache_dir: weights cache (``$REME_CACHE_DIR``); None uses the libraries' defaults.
        image_size: short side for dense features (default: the model's native size, 224 for
            ViT-B/16).
        precision: open_clip precision string (``"fp32"``, ``"fp16"``, ``"bf16"``, ...).
        maskclip_residual: see `OpenCLIPEncoder`.
        text_batch_size, image_batch_size: forward-pass batch sizes.

    Returns:
        The encoder; ``.spec`` is canonical (``"clip:ViT-B-16:openai"``, local paths absolute).

    Raises:
        ValueError: malformed target, unknown architecture (lists some of
            ``open_clip.list_models()``), unknown tag (lists
            ``open_clip.list_pretrained_tags_by_model(arch)``), a non-ViT tower, or a
            checkpoint that does not fit the architecture.
        reme.errors.MissingWeightsError: a local checkpoint or folder that does not exist, or
            a tag/hub model that is not cached while offline or the host is unreachable.

    Notes:
        Tags trained with QuickGELU (e.g. ``ViT-B-16:openai``) are built with QuickGELU, as
        the tag requires, even when the plain architecture name is given. The tag's mean, std
        and resize filter are used for preprocessing (open_clip's pretrained table).
    """
    open_clip = _import_open_clip()
    target = (target or "").strip()
    common: dict[str, Any] = dict(precision=precision, device=device, cache_dir=cache_dir,
                                  require_pretrained=True)
    if "weights_only" in inspect.signature(open_clip.create_model).parameters:
        common["weights_only"] = True  # open_clip >= 2.29; older releases load with torch.load
    if target.startswith(("hf-hub:", "local-dir:")):
        schema, _, ident = target.partition(":")
        ident = ident.strip()
        if not ident:
            raise ValueError(f"empty identifier after {schema}: in clip spec {target!r}")
        if schema == "local-dir":
            folder = os.path.abspath(os.path.expanduser(ident))
            if not os.path.isdir(folder):
                raise MissingWeightsError(
                    f"open_clip folder {folder} (clip:local-dir:) does not exist"
                )
            source, is_local, spec = folder, True, f"clip:local-dir:{folder}"
        else:
            source, is_local = _hub.resolve_hf_repo(
                ident, family="clip", cache_dir=cache_dir, required=("open_clip_config.json",),
                spec_prefix="clip:hf-hub:", local_prefix="clip:local-dir:",
            )
            spec = f"clip:hf-hub:{ident}"
        if is_local:
            if not os.path.isfile(os.path.join(source, "open_clip_config.json")):
                raise MissingWeightsError(
                    f"{source} lacks open_clip_config.json (needed for {spec})"
                )
            if _find_checkpoint(source) is None:
                raise MissingWeightsError(
                    f"{source} has no weights file (*.safetensors, *.bin, *.pth) for {spec}"
                )
            name = f"local-dir:{source}"
        else:
            name = f"hf-hub:{ident}"
        model_cfg = open_clip.get_model_config(name) if is_local else None
        if model_cfg is not None:
            vision = model_cfg.get("vision_cfg", {})
            if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
                raise ValueError(f"{spec}: only ViT towers are supported for dense features")
        model = open_clip.create_model(name, **common)
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    else:
        arch, sep, pretrained = target.partition(":")
        arch, pretrained = arch.strip(), pretrained.strip()
        if not sep or not arch or not pretrained:
            raise ValueError(
                f"clip target {target!r} must be 'ARCH:TAG' (e.g. ViT-B-16:openai), "
                f"'ARCH:/path/to/checkpoint.pt', 'hf-hub:org/name' or 'local-dir:/folder'"
            )
        _check_arch(open_clip, arch)
        expanded = os.path.expanduser(pretrained)
        if _hub.looks_like_path(pretrained) or os.path.exists(expanded):
            path = os.path.abspath(expanded)
            if not os.path.isfile(path):
                what = "does not exist"
                if os.path.isdir(path):
                    what = "is a folder, not a checkpoint file"
                raise MissingWeightsError(
                    f"checkpoint {path} for clip:{arch} {what}. Give an open_clip checkpoint "
                    f"file (.pt/.pth/.bin/.safetensors), e.g. one downloaded with 'hf download "
                    f"timm/vit_base_patch16_clip_224.openai open_clip_pytorch_model.bin "
                    f"--local-dir <dir>', or a pretrained tag: "
                    f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none known'}"
                )
            spec = f"clip:{arch}:{path}"
            try:
                model = open_clip.create_model(arch, pretrained=path, **common)
            except (RuntimeError, AssertionError) as exc:  # open_clip asserts on width changes
                raise ValueError(
                    f"checkpoint {path} could not be loaded into open_clip architecture "
                    f"{arch!r}: {exc}"
                ) from exc
        else:
            path, pcfg = _tag_weights(open_clip, arch, pretrained, cache_dir)
            spec = f"clip:{arch}:{pretrained}"
            arch_cfg = open_clip.get_model_config(arch) or {}
            force_quick_gelu = bool(pcfg.get("quick_gelu", False)) and not arch_cfg.get(
                "quick_gelu", False
            )
            pp = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
            model = open_clip.create_model(
                arch, pretrained=path, force_quick_gelu=force_quick_gelu,
                force_preprocess_cfg=pp, **common,
            )
        tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    encoder = OpenCLIPEncoder(
        model,
        tokenizer,
        spec=spec,
        device=device,
        image_size=image_size,
        maskclip_residual=maskclip_residual,
        text_batch_size=text_batch_size,
        image_batch_size=image_batch_size,
    )
    logger.info("loaded %s (dim %d) on %s", spec, encoder.dim, encoder.device)
    return encoder
