"""Images of every common mode reach the model as the 8-bit RGB picture a viewer shows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from transnext.data import load_image
from transnext.data.datasets import ALPHA_WARNING


def _grey(h: int = 12, w: int = 16) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 255 // (h * w - 1)).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, suffix: str) -> None:
    grey = _grey()
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # full 16-bit range
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(str(path)))
    assert rgb.shape == (*grey.shape, 3)
    # before: every non-black pixel came out 255 (white)
    np.testing.assert_array_equal(rgb[..., 0], grey)
    np.testing.assert_array_equal(rgb[..., 1], grey)


def test_8_bit_images_unchanged(tmp_path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr[..., 0]).save(tmp_path / "g.png")
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "a.png"))), arr)
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "g.png")))[..., 2], arr[..., 0])


def test_alpha_is_composed_on_white_with_a_warning(tmp_path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # the stored colour is red everywhere ...
    rgba[:4, :, 3] = 0  # ... but the top half is fully transparent
    rgba[4:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rgb = np.asarray(load_image(str(tmp_path / "t.png")))
    assert any(str(w.message) == ALPHA_WARNING for w in caught)
    assert (rgb[:4] == 255).all()  # white, not the hidden red
    assert (rgb[4:] == [255, 0, 0]).all()


def test_palette_transparency_is_composed(tmp_path) -> None:
    img = Image.new("P", (6, 6), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.info["transparency"] = 1
    img.save(tmp_path / "p.png", transparency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rgb = np.asarray(load_image(str(tmp_path / "p.png")))
    assert (rgb == 255).all()


def test_predict_sees_a_16_bit_image_as_its_8_bit_twin(tmp_path) -> None:
    import torch

    from transnext.engine.predict import predict_images
    from transnext.models import create_model

    grey = np.asarray(Image.fromarray(_grey(40, 40)).resize((40, 40)))
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    from transnext.data import build_eval_transform

    torch.manual_seed(0)
    model = create_model("transnext_micro", num_classes=5, img_size=32).eval()
    paths = [str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png")]
    eight, sixteen = predict_images(model, paths, build_eval_transform(32), [str(i) for i in range(5)], topk=5)
    assert [p["index"] for p in eight["predictions"]] == [p["index"] for p in sixteen["predictions"]]
    for a, b in zip(eight["predictions"], sixteen["predictions"]):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-6)
