"""The Depth Anything V2 networks reproduce the official code's golden outputs under the deterministic weights."""
from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inference.nets import NET_NAMES, create_model, get_config, postprocess, preprocess, target_size
from inference.nets.depth_anything import interpolate_pos_embed
from models_registry.detweights import det_array, net_input, official_layout, synthetic_image
from tests.nets.fidelity import (
    IMAGE_SIZES,
    SAME_PATH,
    TOLERANCE,
    assert_end_to_end_matches,
    assert_net_matches,
    loaded_network,
    relative_error,
)
from tests.support.detweights_dav2 import (
    ENCODERS,
    MODELS,
    det_state_dict,
    per_key_digests,
    whole_digest,
    write_official_checkpoint,
)

PARAMS = [
    "Depth_Anything_V2_Small",
    pytest.param("Depth_Anything_V2_Base", marks=pytest.mark.slow),
    pytest.param("Depth_Anything_V2_Large", marks=pytest.mark.slow),
]
NET_SIZES = [(518, 518), (518, 392)]  # native (no position interpolation), and 37x28 patches
POS_TOLERANCE = 1e-6
MASK_TOKEN = "pretrained.mask_token"


@pytest.fixture(scope="session")
def dav2_dir(reference_dir):
    return reference_dir / "depth_anything_v2"


@pytest.fixture(scope="module", params=PARAMS)
def loaded(request):
    yield from loaded_network(request.param, det_state_dict)


# --- weights and layout -------------------------------------------------------------------------


def test_weights_match_reference_digests(loaded, dav2_dir):
    name, model, official = loaded
    reference = json.loads((dav2_dir / f"weights_digest_{ENCODERS[name]}.json").read_text())
    wanted = [(key, digest) for key, digest in reference["per_key_sha256_16"]]
    generated = per_key_digests(official)
    assert generated == wanted
    assert whole_digest(generated) == reference["all_entries_sha256"]
    # Every tensor the network holds is the official tensor of the same key, bit for bit; the only
    # official entry it lacks is the training-only mask token.
    assert per_key_digests(model.state_dict()) == [(k, d) for k, d in wanted if k != MASK_TOKEN]


def test_state_dict_layout_is_official_minus_mask_token(loaded):
    name, model, _ = loaded
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == [entry for entry in official_layout(name) if entry[0] != MASK_TOKEN]


def test_backbone_settings_the_goldens_cannot_see(loaded):
    # LayerNorm eps 1e-5 instead of 1e-6 moves the output by less than float32 noise (bug_costs.json):
    # check it by inspection, with the exact GELU, the patch size and the single prefix (class) token.
    _, model, _ = loaded
    norms = [m for m in model.pretrained.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    gelus = [m for m in model.pretrained.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)
    assert model.pretrained.patch_embed.patch_size == (14, 14)
    assert model.pretrained.num_prefix_tokens == 1 and model.pretrained.reg_token is None


# --- golden outputs -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("size", NET_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_net_output_matches_golden(loaded, dav2_dir, size):
    name, model, _ = loaded
    if size != NET_SIZES[0] and name != "Depth_Anything_V2_Small":
        # The position table interpolated to another grid is the family's code, proven on Small (Large's took
        # 16 s on two cores); each encoder's native golden proves its network.
        pytest.skip(SAME_PATH)
    height, width = size
    assert_net_matches(model, height, width, dav2_dir / f"net_{ENCODERS[name]}_{height}x{width}.npy", name)


@pytest.mark.slow
@pytest.mark.parametrize("image_size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_end_to_end_matches_golden(loaded, dav2_dir, image_size):
    name, model, _ = loaded
    if name != "Depth_Anything_V2_Small":
        # Preprocessing and output resize are the family's: the larger encoders' net goldens prove their networks.
        pytest.skip(SAME_PATH)
    height, width = image_size
    # The synthetic image is RGB; the official infer_image gets it as BGR and converts.
    assert tuple(preprocess(synthetic_image(height, width), name).shape[-2:]) == target_size(height, width, name)
    assert_end_to_end_matches(model, name, height, width, dav2_dir / f"e2e_{ENCODERS[name]}_{height}x{width}.npy",
                              name, output_config=name)


# --- position embedding -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vits_pos_embed():
    return torch.from_numpy(det_array("pretrained.pos_embed", (1, 1370, 384)))


@pytest.mark.parametrize("grid", [(37, 28), (37, 49), (49, 37)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_pos_embed_interpolation_matches_official(vits_pos_embed, dav2_dir, grid):
    golden = np.load(dav2_dir / f"posembed_vits_{grid[0]}x{grid[1]}.npy")
    out = interpolate_pos_embed(vits_pos_embed, grid)
    assert out.shape == (1, 1 + grid[0] * grid[1], 384) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], vits_pos_embed[:, 0])  # the class position passes through
    patches = out[0, 1:].reshape(*grid, 384)[:, :, :8].numpy()
    assert relative_error(patches, golden) <= POS_TOLERANCE


def test_timm_resampling_is_not_the_official_one(vits_pos_embed, dav2_dir):
    # What the goldens guard against: timm's dynamic_img_size resampling (size-driven, antialiased).
    from timm.layers import resample_abs_pos_embed

    golden = np.load(dav2_dir / "posembed_vits_37x28.npy")
    timm_way = resample_abs_pos_embed(vits_pos_embed, new_size=(37, 28), old_size=(37, 37), num_prefix_tokens=1)
    assert relative_error(timm_way[0, 1:].reshape(37, 28, 384)[:, :, :8].numpy(), golden) > 100 * POS_TOLERANCE


def test_pos_embed_native_grid_and_half_precision(vits_pos_embed):
    assert interpolate_pos_embed(vits_pos_embed, (37, 37)) is vits_pos_embed
    half = interpolate_pos_embed(vits_pos_embed.half(), (37, 28))
    assert half.dtype == torch.float16  # interpolated in float32, as the official code does
    assert torch.equal(half, interpolate_pos_embed(vits_pos_embed.half().float(), (37, 28)).half())


# --- preprocessing and postprocessing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [
        ((240, 320), (518, 686)),  # the short side covers 518, the long one follows (x14, half to even)
        ((500, 375), (686, 518)),
        ((518, 518), (518, 518)),
        ((4000, 3000), (686, 518)),
        ((7, 9), (518, 672)),
        ((100, 400), (518, 2072)),  # 4:1 is the limit
        ((100, 401), (518, 2072)),
    ],
)
def test_lower_bound_target_size(image_size, expected):
    for name in MODELS:
        assert target_size(*image_size, name) == expected


@pytest.mark.parametrize("image_size", [(100, 402), (1000, 100), (10, 50_000)])
def test_very_elongated_images_are_refused_before_allocating(image_size):
    # lower_bound has no upper clamp: 10x50000 would become a 518x2590000 input (tens of GB).
    with pytest.raises(ValueError, match=r"too elongated for Depth_Anything_V2_Small: .* limit of 2072 pixels"):
        target_size(*image_size, "Depth_Anything_V2_Small")
    with pytest.raises(ValueError, match="too elongated"):
        preprocess(np.zeros((*image_size, 3), dtype=np.uint8), "Depth_Anything_V2_Small")


def test_postprocess_is_bilinear_align_corners():
    prediction = torch.from_numpy(net_input(28, 42)[:, 0])
    out = postprocess(prediction, (61, 45), "Depth_Anything_V2_Small")
    expected = F.interpolate(prediction[:, None], (61, 45), mode="bilinear", align_corners=True)[0, 0]
    assert np.array_equal(out, expected.numpy())
    # align_corners=True keeps the corner values exactly; MiDaS's bicubic default does not.
    assert out[0, 0] == prediction[0, 0, 0] and out[-1, -1] == prediction[0, -1, -1]
    assert not np.array_equal(postprocess(prediction, (61, 45)), out)


def test_configs():
    assert NET_NAMES[-3:] == MODELS  # registered last
    for name in MODELS:
        config = get_config(name)
        assert (config.name, config.family, config.net_size, config.resize_method, config.ensure_multiple_of) == (
            name, "depth_anything_v2", (518, 518), "lower_bound", 14)
        assert config.mean == (0.485, 0.456, 0.406) and config.std == (0.229, 0.224, 0.225)
        assert (config.output_interpolation, config.output_align_corners) == ("bilinear", True)


# --- checkpoints (on the small network: cheap to build) ------------------------------------------


@pytest.fixture(scope="module")
def small():
    state_dict = det_state_dict("Depth_Anything_V2_Small")
    return state_dict, create_model("Depth_Anything_V2_Small", state_dict=state_dict)


def _probe(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(net_input(70, 98)))


@pytest.mark.slow
def test_official_pth_file_loads_strict_and_reports_the_mask_token(small, tmp_path, caplog):
    _, reference = small
    path = write_official_checkpoint("Depth_Anything_V2_Small", tmp_path / "depth_anything_v2_vits.pth")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert MASK_TOKEN in checkpoint
    with caplog.at_level(logging.INFO, logger="inference.nets.factory"):
        model = create_model("Depth_Anything_V2_Small", state_dict=checkpoint)
    assert any(MASK_TOKEN in record.getMessage() for record in caplog.records)
    assert torch.equal(_probe(model), _probe(reference))
    key = "pretrained.blocks.3.ls2.gamma"
    assert model.state_dict()[key].data_ptr() == checkpoint[key].data_ptr()  # adopted, not copied
    assert not [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]


def test_checkpoint_without_mask_token_loads(small):
    state_dict, reference = small
    without = {k: v for k, v in state_dict.items() if k != MASK_TOKEN}
    model = create_model("Depth_Anything_V2_Small", state_dict=without)
    assert torch.equal(_probe(model), _probe(reference))


def test_missing_layerscale_is_refused(small):
    # A loader that skipped LayerScale would leave timm's init (0.5 - 0.8 of the range off).
    state_dict, _ = small
    broken = {k: v for k, v in state_dict.items() if k != "pretrained.blocks.0.ls1.gamma"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): pretrained\.blocks\.0\.ls1\.gamma"):
        create_model("Depth_Anything_V2_Small", state_dict=broken)


def test_other_encoder_checkpoint_is_refused(small):
    state_dict, _ = small
    broken = dict(state_dict, **{"pretrained.pos_embed": torch.zeros(1, 1370, 768)})
    wrong = r"pretrained\.pos_embed: checkpoint \(1, 1370, 768\) vs model \(1, 1370, 384\)"
    with pytest.raises(ValueError, match=wrong):
        create_model("Depth_Anything_V2_Small", state_dict=broken)
    extra = dict(state_dict, **{"depth_head.readout_projects.0.0.weight": torch.zeros(384, 768)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): depth_head\.readout_projects"):
        create_model("Depth_Anything_V2_Small", state_dict=extra)


def test_input_must_be_a_multiple_of_the_patch(small):
    _, model = small
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.zeros(1, 3, 64, 70))


@pytest.mark.slow
def test_batch_and_low_precision(small):
    state_dict, reference = small
    x = torch.from_numpy(net_input(70, 98))
    with torch.inference_mode():
        single = reference(x)
        batched = reference(torch.cat([x, x.flip(-1)]))
        assert batched.shape == (2, 70, 98)
        assert float((batched[0] - single[0]).abs().max()) <= TOLERANCE * float(single.max() - single.min())
        twin = create_model("Depth_Anything_V2_Small", state_dict={k: v.bfloat16() for k, v in state_dict.items()})
        out = twin(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert float((out.float() - single).abs().max()) / float(single.max() - single.min()) <= 0.1


@pytest.mark.slow
def test_conventional_build_runs():
    model = create_model("Depth_Anything_V2_Small")
    assert not model.training
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 70, 98))
    assert out.shape == (2, 70, 98) and bool((out >= 0).all())


@pytest.mark.slow
def test_functional_health_check_runs(small):
    # The registry's health check feeds a fixed probe: it must be a size the patch-14 network accepts.
    from inference.health import probe_size, weights_functional_hash

    state_dict, _ = small
    arrays = {key: value.numpy() for key, value in state_dict.items()}
    model = types.SimpleNamespace(architecture="Depth_Anything_V2_Small")
    digest = weights_functional_hash(model, arrays)
    assert len(digest) == 64 and digest == weights_functional_hash(model, arrays)
    assert probe_size("Depth_Anything_V2_Small") == (70, 70) and probe_size("MiDaS_small") == (64, 64)
    last_bias = "depth_head.scratch.output_conv2.2.bias"
    changed = dict(arrays, **{last_bias: arrays[last_bias] + 1})
    assert weights_functional_hash(model, changed) != digest
