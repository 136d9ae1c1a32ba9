"""Preprocessing and postprocessing follow the official MiDaS transforms and run.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inference.nets import NetConfig, get_config, postprocess, preprocess, target_size
from models_registry.detweights import synthetic_image


@pytest.mark.parametrize(
    ("name", "image_size", "expected"),
    [
        ("DPT_Large", (500, 375), (512, 384)),  # "minimal" keeps the scale closest to 1, no clamp
        ("DPT_Hybrid", (240, 320), (288, 384)),
        ("DPT_Large", (384, 384), (384, 384)),
        ("DPT_Large", (384, 80), (384, 64)),  # 80/32 = 2.5 rounds half to even: 2
        ("DPT_Large", (384, 112), (384, 128)),  # 3.5 -> 4
        ("MiDaS", (500, 375), (384, 288)),  # "upper_bound" fits inside 384
        ("MiDaS", (240, 320), (288, 384)),
        ("MiDaS_small", (240, 320), (192, 256)),
        ("MiDaS_small", (500, 375), (256, 192)),
        ("MiDaS_small", (1000, 1000), (256, 256)),
    ],
)
def test_target_size(name, image_size, expected):
    assert target_size(*image_size, name) == expected
    assert target_size(*image_size, get_config(name)) == expected


def test_upper_bound_floors_when_rounding_overshoots():
    config = dataclasses.replace(get_config("MiDaS"), net_size=(250, 250))
    # 250/32 = 7.8 rounds to 8 -> 256 > 250, so the official rule floors to 7 -> 224.
    assert target_size(250, 250, config) == (224, 224)


def test_too_elongated_image_is_rejected():
    with pytest.raises(ValueError, match="too elongated"):
        target_size(10, 1000, "MiDaS_small")


def test_unknown_name_is_rejected():
    with pytest.raises(KeyError):
        target_size(100, 100, "DPT_large")


def test_config_fields():
    config = get_config("DPT_Large")
    assert isinstance(config, NetConfig)
    assert (config.net_size, config.resize_method, config.mean, config.std, config.ensure_multiple_of) == (
        (384, 384), "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32)
    small = get_config("MiDaS_small")
    assert (small.net_size, small.resize_method, small.mean, small.std) == (
        (256, 256), "upper_bound", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.net_size = (1, 1)


def test_preprocess_shape_and_dtype():
    image = synthetic_image(500, 375)
    before = image.copy()
    x = preprocess(image, "DPT_Large")
    assert x.shape == (1, 3, 512, 384) and x.dtype == torch.float32 and x.is_contiguous()
    assert np.array_equal(image, before)


@pytest.mark.parametrize("name", ["DPT_Large", "MiDaS"])
def test_preprocess_at_native_size_is_exact_normalisation(name):
    config = get_config(name)
    image = synthetic_image(*config.net_size)
    expected = (image / 255.0 - np.array(config.mean)) / np.array(config.std)
    expected = expected.transpose(2, 0, 1)[None].astype(np.float32)
    assert np.array_equal(preprocess(image, config).numpy(), expected)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64, 3), dtype=np.float32),
        np.zeros((64, 64), dtype=np.uint8),
        np.zeros((64, 64, 4), dtype=np.uint8),
    ],
    ids=["float", "grey", "rgba"],
)
def test_preprocess_rejects_non_rgb_uint8(image):
    with pytest.raises(ValueError):
        preprocess(image, "MiDaS_small")


def test_postprocess_shapes_and_dtype():
    prediction = torch.rand(1, 192, 256)
    out = postprocess(prediction, (240, 320))
    assert out.shape == (240, 320) and out.dtype == np.float32
    assert np.array_equal(out, postprocess(prediction[0], (240, 320)))
    assert postprocess(prediction.to(torch.bfloat16), (240, 320)).dtype == np.float32


def test_postprocess_same_size_is_identity():
    with torch.inference_mode():
        prediction = torch.rand(1, 64, 96)
        assert np.array_equal(postprocess(prediction, (64, 96)), prediction[0].numpy())


def test_postprocess_rejects_batches():
    with pytest.raises(ValueError):
        postprocess(torch.zeros(2, 32, 32), (64, 64))
