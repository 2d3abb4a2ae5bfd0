"""Captioners for the reference-set build (docs/method.md step 2).

ReME describes every reference image with a captioner and mines noun phrases from the text
(step 3). The paper's default is LLaVA-1.5 with a fixed detailed-description prompt
(`LLAVA_PROMPT`); BLIP(-2) and human captions are weaker alternatives
("LLaVA > BLIP-2 > GT captions").

Specs::

    llava:llava-hf/llava-1.5-7b-hf            LLaVA-1.5 (hub id or local folder), greedy decoding
    blip:Salesforce/blip-image-captioning-base  BLIP captioning model (lighter)
    captions:/path/file.jsonl                 captions read from a JSON-lines file (no model)
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch

from reme.encoders import _hub, _preprocess
from reme.encoders.base import Captioner

logger = logging.getLogger(__name__)

#: The paper's LLaVA-1.5 captioning prompt, verbatim (docs/method.md step 2).
LLAVA_PROMPT: str = (
    "Describe this image in detail. Mention all visible objects, their parts, context and "
    "attributes such as size, colour and texture. Also describe the background/foreground "
    "context, including any natural scenery or man-made structures such as walls, ceilings, "
    "sky and clouds. Focus only on visible objects or context. Avoid guessing or speculating."
)
#: LLaVA-1.5 conversation format, used when the processor has no chat template.
LLAVA_15_TEMPLATE: str = "USER: <image>\n{prompt} ASSISTANT:"
#: Default generation budget of LLaVA (the paper gives none; 256 tokens fit a detailed
#: paragraph).
LLAVA_MAX_NEW_TOKENS: int = 256
#: Default generation budget of BLIP (chosen by us; BLIP captions are one short sentence).
BLIP_MAX_NEW_TOKENS: int = 40


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover
        raise ImportError('model captioners need transformers: pip install "reme[hf]"') from exc
    return transformers


def _default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    # half precision on GPUs (LLaVA-1.5-7B is 14 GB in fp16, 28 GB in fp32), fp32 on CPU
    if dtype is not None:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def _to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(_preprocess.check_rgb_uint8(image))


class _ClassDefault:
    """Marker default of `_HFCaptioner.__init__`: the subclass's ``DEFAULT_*`` value."""

    def __repr__(self) -> str:
        return "<class default>"


_CLASS_DEFAULT: Any = _ClassDefault()


class _HFCaptioner(Captioner):
    """Shared parts of the transformers captioners.

    A subclass sets `DEFAULT_PROMPT` and `DEFAULT_MAX_NEW_TOKENS` (its constructor's defaults,
    shown by ``inspect.signature``) and may refuse prompts (`_check_prompt`) or derive the model
    input from the settings (`_ready`).

    Attributes:
        spec (str): canonical spec, e.g. ``"llava:llava-hf/llava-1.5-7b-hf"``.
        device (torch.device): where generation runs.
        model: the wrapped ``transformers`` model, eval mode; processor: its processor.
        prompt (str | None): the instruction or caption prefix.
        max_new_tokens (int): greedy decoding budget.
        dim: None (no embeddings).
    """

    model: Any
    processor: Any
    spec: str
    device: torch.device
    #: Captioners have no embedding dimension.
    dim: int | None = None
    max_new_tokens: int
    #: The constructor's default ``prompt``.
    DEFAULT_PROMPT: str | None = None
    #: The constructor's default ``max_new_tokens``.
    DEFAULT_MAX_NEW_TOKENS: int

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        spec: str,
        device: str | torch.device = "cpu",
        prompt: str | None = _CLASS_DEFAULT,
        max_new_tokens: int = _CLASS_DEFAULT,
    ) -> None:
        """Wrap a loaded model and processor (use the family's loader); the subclass docstrings
        name the model classes and the defaults.

        Args:
            model: the ``transformers`` generation model.
            processor: its processor.
            spec: canonical spec string.
            device: device the model is on.
            prompt: the instruction or caption prefix; default `DEFAULT_PROMPT`.
            max_new_tokens: greedy decoding budget; default `DEFAULT_MAX_NEW_TOKENS`.

        Raises:
            ValueError: a prompt the subclass refuses, or ``max_new_tokens < 1``.
        """
        prompt = self.DEFAULT_PROMPT if prompt is _CLASS_DEFAULT else prompt
        max_new_tokens = self.DEFAULT_MAX_NEW_TOKENS if max_new_tokens is _CLASS_DEFAULT else max_new_tokens
        self._check_prompt(prompt)
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model.eval()
        self.processor = processor
        self.spec = spec
        self.device = torch.device(device)
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self._ready()

    def __init_subclass__(cls, **kwargs) -> None:
        """Give the subclass the constructor signature with its own defaults."""
        super().__init_subclass__(**kwargs)
        defaults = {"prompt": cls.DEFAULT_PROMPT, "max_new_tokens": cls.DEFAULT_MAX_NEW_TOKENS}
        base = inspect.signature(_HFCaptioner.__init__)
        _, *params = base.parameters.values()
        cls.__signature__ = base.replace(parameters=[p.replace(default=defaults.get(p.name, p.default))
                                                     for p in params])

    def _check_prompt(self, prompt: str | None) -> None:
        """Refuse a prompt the model cannot use (ValueError); any prompt by default."""

    def _ready(self) -> None:
        """Derive what generation needs from the stored settings; nothing by default."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, device={self.device})"

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights."""
        return next(self.model.parameters()).dtype

    def _generate(self, inputs: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            return self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )


class LLaVACaptioner(_HFCaptioner):
    """LLaVA-1.5 with the paper's prompt and greedy decoding (docs/method.md step 2); wraps a
    loaded ``LlavaForConditionalGeneration`` and its ``AutoProcessor`` (use `load_llava`).

    Args:
        model: ``LlavaForConditionalGeneration``.
        processor: its ``AutoProcessor``.
        spec: canonical spec string.
        device: device the model is on.
        prompt: the instruction; default the paper's prompt (`LLAVA_PROMPT`).
        max_new_tokens: greedy decoding budget (default 256).

    Raises:
        ValueError: ``max_new_tokens < 1`` or an empty prompt.

    Attributes:
        prompt (str): the instruction (default `LLAVA_PROMPT`).
        text (str): the full model input text (chat template applied).
    """

    DEFAULT_PROMPT = LLAVA_PROMPT
    DEFAULT_MAX_NEW_TOKENS = LLAVA_MAX_NEW_TOKENS

    def _check_prompt(self, prompt: str | None) -> None:
        if not prompt or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")

    def _ready(self) -> None:
        self.text = self._build_text(self.prompt)

    def _build_text(self, prompt: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
            ]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return LLAVA_15_TEMPLATE.format(prompt=prompt)

    def caption(self, image: np.ndarray, key: str | None = None) -> list[str]:
        """Describe one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            key: unused (model captioners look at the pixels).

        Returns:
            ``[caption]`` (the generated text after the prompt, stripped), or ``[]`` when the
            model generated nothing.
        """
        inputs = self.processor(images=_to_pil(image), text=self.text, return_tensors="pt")
        out = self._generate(dict(inputs))
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        text = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
        return [text] if text else []


class BLIPCaptioner(_HFCaptioner):
    """BLIP image captioning (the lighter alternative of docs/method.md step 2); wraps a loaded
    ``BlipForConditionalGeneration`` and its ``BlipProcessor`` (use `load_blip`).

    Args:
        model: ``BlipForConditionalGeneration``.
        processor: its ``BlipProcessor``.
        spec: canonical spec string.
        device: device the model is on.
        prompt: None (default) for unconditional captions, or a prefix the caption continues.
        max_new_tokens: greedy decoding budget (default 40, chosen by us).

    Raises:
        ValueError: ``max_new_tokens < 1``.

    Attributes:
        prompt (str | None): optional text prefix (conditional captioning, e.g. "a photo of").
    """

    DEFAULT_PROMPT = None
    DEFAULT_MAX_NEW_TOKENS = BLIP_MAX_NEW_TOKENS

    def caption(self, image: np.ndarray, key: str | None = None) -> list[str]:
        """Caption one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            key: unused.

        Returns:
            ``[caption]`` (stripped; includes ``prompt`` when one is set), or ``[]`` if empty.
        """
        kwargs: dict[str, Any] = {"images": _to_pil(image), "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = self.prompt
        inputs = self.processor(**kwargs)
        out = self._generate(dict(inputs))
        text = self.processor.batch_decode(out, skip_special_tokens=True)[0].strip()
        return [text] if text else []


def _spec_for(family: str, target: str, source: str) -> str:
    given_folder = os.path.isdir(os.path.expanduser(target))
    return f"{family}:{source}" if given_folder else f"{family}:{target}"


def _load_hf_captioner(cls: type[_HFCaptioner], family: str, target: str, device, cache_dir: str | None, dtype, *,
                       model_class: str, processor_class: str, expected: str, **settings) -> _HFCaptioner:
    """A ``cls`` captioner (``settings``: its prompt and max_new_tokens) of a ``family:`` model,
    on ``device``, whose config's ``model_type`` must be ``family`` (else ValueError naming
    ``expected``)."""
    transformers = _import_transformers()
    target = (target or "").strip()
    source, _ = _hub.resolve_hf_repo(target, family=family, cache_dir=cache_dir)
    spec = _spec_for(family, target, source)
    dev = torch.device(device)
    config = transformers.AutoConfig.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=False)
    if getattr(config, "model_type", None) != family:
        raise ValueError(f"{spec}: config model_type is {config.model_type!r}, expected {expected}")
    model = getattr(transformers, model_class).from_pretrained(
        source, config=config, cache_dir=cache_dir, trust_remote_code=False,
        **_hub.hf_dtype_kwargs(_default_dtype(dev, dtype)),
    ).to(dev)
    processor = getattr(transformers, processor_class).from_pretrained(source, cache_dir=cache_dir)
    captioner = cls(model, processor, spec=spec, device=dev, **settings)
    logger.info("loaded %s on %s", spec, dev)
    return captioner


def load_llava(
    target: str,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    prompt: str = LLAVA_PROMPT,
    max_new_tokens: int = LLAVA_MAX_NEW_TOKENS,
    dtype: torch.dtype | None = None,
) -> LLaVACaptioner:
    """Load LLaVA-1.5 (``llava:`` specs) with ``LlavaForConditionalGeneration`` + ``AutoProcessor``.

    Args:
        target: hub id (``llava-hf/llava-1.5-7b-hf``) or a local ``save_pretrained`` folder
            holding model and processor.
        device: torch device; weights are read on the CPU, then moved.
        cache_dir: hub cache (``$REME_CACHE_DIR``); None uses the default cache.
        prompt: instruction (default the paper's, `LLAVA_PROMPT`).
        max_new_tokens: greedy decoding budget (default 256).
        dtype: weights dtype; None means float16 on CUDA, float32 on CPU.

    Returns:
        A `LLaVACaptioner`.

    Raises:
        reme.errors.MissingWeightsError: folder missing, or hub id not cached while offline /
            unreachable (the message gives the ``hf download`` command and the local spec).
        ValueError: the config is not a LLaVA model.
    """
    return _load_hf_captioner(
        LLaVACaptioner, "llava", target, device, cache_dir, dtype, model_class="LlavaForConditionalGeneration",
        processor_class="AutoProcessor", expected="'llava'", prompt=prompt, max_new_tokens=max_new_tokens)


def load_blip(
    target: str,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int = BLIP_MAX_NEW_TOKENS,
    dtype: torch.dtype | None = None,
) -> BLIPCaptioner:
    """Load a BLIP captioner (``blip:`` specs) with ``BlipForConditionalGeneration``.

    The processor is read with ``BlipProcessor`` from the same folder or repo.

    Args:
        target: hub id (``Salesforce/blip-image-captioning-base``) or a local folder.
        device: torch device.
        cache_dir: hub cache (``$REME_CACHE_DIR``); None uses the default cache.
        prompt: optional caption prefix (None: unconditional captioning).
        max_new_tokens: greedy decoding budget (default 40).
        dtype: weights dtype; None means float16 on CUDA, float32 on CPU.

    Returns:
        A `BLIPCaptioner`.

    Raises:
        reme.errors.MissingWeightsError: as `load_llava`.
        ValueError: the config is not a BLIP model.
    """
    return _load_hf_captioner(
        BLIPCaptioner, "blip", target, device, cache_dir, dtype, model_class="BlipForConditionalGeneration",
        processor_class="BlipProcessor", expected="'blip' (BLIP-2 checkpoints are not supported by this loader)",
        prompt=prompt, max_new_tokens=max_new_tokens)


# -------------------------------------------------------------------------------- caption files
def _clean_relpath(raw: str) -> PurePosixPath | None:
    """Normalised relative POSIX path, or None when it is absolute or escapes its root."""
    text = raw.strip().replace("\\", "/")
    if not text:
        return None
    if text.startswith("/") or (len(text) > 1 and text[1] == ":" and text[0].isalpha()):
        return None
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts)


class CaptionFileCaptioner(Captioner):
    """Captions read from a JSON-lines file (human or precomputed captions; no model).

    File format, one JSON object per line (blank lines are skipped)::

        {"image": "relative/path.jpg", "captions": ["...", "..."]}
        {"file_name": "relative/path.jpg", "caption": "..."}     # also accepted

    Several rows for the same image are merged in file order. Paths are relative to an image
    root; absolute paths and paths with ``..`` are rejected.

    Lookup of a key (the image path relative to the image root the caller walks) tries, in
    order: the exact normalised path; paths sharing the file name where one path is a suffix of
    the other (so key ``val2017/x.jpg`` or ``x.jpg`` finds row ``coco_tiny/images/val2017/x.jpg``);
    then the file-name stem (``x`` or ``x.png`` finds ``x.jpg``). Ambiguous matches and missing
    keys give ``[]`` and a warning (logged once; later misses are logged at debug level).

    Attributes:
        spec (str): ``"captions:/abs/path/file.jsonl"``.
        path (pathlib.Path): the file.
        captions (dict[str, list[str]]): normalised relative path -> captions.
        device (torch.device): CPU (no model).
        dim: None (no embeddings).
    """

    dim: int | None = None

    def __init__(self, path: str | os.PathLike) -> None:
        """Read and validate the file.

        Args:
            path: the ``.jsonl`` file.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: a line is not valid JSON or not an object, has no ``image`` /
                ``file_name``, has captions that are not strings, or a path that is absolute or
                escapes the root (``..``); the message names the file and line number.
        """
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file {self.path} does not exist")
        self.spec = f"captions:{self.path}"
        self.device = torch.device("cpu")
        self.captions: dict[str, list[str]] = {}
        self._by_name: dict[str, list[str]] = {}
        self._by_stem: dict[str, list[str]] = {}
        self._warned_missing = False
        self._read()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, images={len(self.captions)})"

    def __len__(self) -> int:
        return len(self.captions)

    def _read(self) -> None:
        with self.path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
                raw = row.get("image", row.get("file_name"))
                if not isinstance(raw, str) or not raw.strip():
                    raise ValueError(f"{where}: missing 'image' (or 'file_name') path string")
                rel = _clean_relpath(raw)
                if rel is None:
                    raise ValueError(
                        f"{where}: image path {raw!r} escapes the image root (absolute paths and "
                        f"'..' are not allowed)"
                    )
                caps = row.get("captions", row.get("caption", []))
                if isinstance(caps, str):
                    caps = [caps]
                if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                    raise ValueError(
                        f"{where}: 'captions' must be a list of strings (or 'caption' a string)"
                    )
                key = rel.as_posix()
                if key not in self.captions:
                    self.captions[key] = []
                    self._by_name.setdefault(rel.name, []).append(key)
                    self._by_stem.setdefault(rel.stem, []).append(key)
                self.captions[key].extend(c.strip() for c in caps if c.strip())
        logger.info("read captions of %d images from %s", len(self.captions), self.path)

    def _warn_missing(self, msg: str, *args: Any) -> None:
        if not self._warned_missing:
            self._warned_missing = True
            logger.warning(msg + " (further misses are logged at debug level)", *args)
        else:
            logger.debug(msg, *args)

    def lookup(self, key: str) -> list[str]:
        """Captions of the image ``key`` (see the class docstring for the matching rules).

        Args:
            key: image path relative to the image root (absolute paths are matched by suffix).

        Returns:
            A new list of captions, ``[]`` when no row (or more than one) matches.
        """
        text = str(key).strip().replace("\\", "/")
        parts = tuple(p for p in text.split("/") if p not in ("", "."))
        if not parts:
            raise ValueError(f"empty caption key {key!r}")
        joined = "/".join(parts)
        if joined in self.captions:
            return list(self.captions[joined])
        name = parts[-1]
        candidates = []
        for cand in self._by_name.get(name, []):
            cparts = tuple(cand.split("/"))
            n = min(len(cparts), len(parts))
            if cparts[-n:] == parts[-n:]:
                candidates.append(cand)
        if not candidates:
            stem = PurePosixPath(name).stem
            candidates = list(self._by_stem.get(stem, []))
        if len(candidates) == 1:
            return list(self.captions[candidates[0]])
        if not candidates:
            self._warn_missing("no captions for %r in %s", key, self.path)
        else:
            self._warn_missing(
                "caption key %r is ambiguous in %s (matches %s); returning no captions",
                key, self.path, ", ".join(candidates[:5]),
            )
        return []

    def caption(self, image: np.ndarray | None, key: str | None = None) -> list[str]:
        """Captions of one image, looked up by ``key`` (the pixels are not used).

        Args:
            image: (H, W, 3) uint8 RGB; ignored.
            key: the image's path relative to the image root.

        Returns:
            The file's captions for this image, ``[]`` if it has none.

        Raises:
            ValueError: ``key`` is None (a caption file cannot caption by pixels).
        """
        if key is None:
            raise ValueError(
                f"{self.spec} looks captions up by image key; pass key=<relative path>"
            )
        return self.lookup(key)

    def caption_keys(self, keys: Sequence[str]) -> list[list[str]]:
        """Captions of several keys (``[]`` for each missing one)."""
        return [self.lookup(k) for k in keys]


def load_caption_file(
    target: str,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> CaptionFileCaptioner:
    """Captions from a JSON-lines file (``captions:`` specs); see `CaptionFileCaptioner`.

    Args:
        target: path of the ``.jsonl`` file.
        device: ignored (no model).
        cache_dir: ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a malformed line or a path escaping the root (message names the line).
    """
    if not target or not target.strip():
        raise ValueError("captions: spec needs a file path, e.g. captions:/path/file.jsonl")
    return CaptionFileCaptioner(target.strip())
