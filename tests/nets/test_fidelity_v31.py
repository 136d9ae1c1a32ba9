"""The eight MiDaS v3.1 networks reproduce the official code's golden outputs under the deterministic weights.

Goldens and digests come from the official classes on timm 0.6.13 (tests/fixtures/reference/midas_v31);
our networks run on timm 1.0 modules, so every check also proves the checkpoint conversion.
"""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch

from inference.nets import NET_NAMES, create_model, get_config, target_size
from models_registry.detweights import array_digest16, net_input, official_layout
from tests.nets.fidelity import (
    IMAGE_SIZES,
    SAME_PATH,
    TOLERANCE,
    assert_end_to_end_matches,
    assert_net_matches,
    loaded_network,
)
from models_registry.detweights import det_rule_state_dict, structural_keys
from tests.support.detweights_v31 import REFERENCE_DIR, det_official_state_dict, timm_key

V31 = ("DPT_BEiT_L_512", "DPT_BEiT_L_384", "DPT_BEiT_B_384", "DPT_SwinV2_L_384", "DPT_SwinV2_B_384",
       "DPT_SwinV2_T_256", "DPT_Swin_L_384", "DPT_LeViT_224")
# The large encoders cost 2-8 s a forward on two cores; BEiT-B keeps the non-square BEiT path in the fast set.
FAST = {"DPT_BEiT_B_384", "DPT_SwinV2_T_256", "DPT_LeViT_224"}
MODELS = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in V31]
# The smallest member of each family: preprocessing and output resize are the family's, so the end-to-end
# goldens of its larger members repeat the same code around a network their net goldens already prove.
E2E = FAST | {"DPT_Swin_L_384"}
# Every net-only golden: the native square, and for BEiT (the only family that accepts other sizes) one more
# (run for BEiT-B; the larger BEiTs' repeat its code path, and their files stay as the reference made them).
NET_SIZES = {
    "DPT_BEiT_L_512": [(512, 512), (512, 320)],
    "DPT_BEiT_L_384": [(384, 384), (384, 256)],
    "DPT_BEiT_B_384": [(384, 384), (384, 256)],
    "DPT_SwinV2_L_384": [(384, 384)],
    "DPT_SwinV2_B_384": [(384, 384)],
    "DPT_SwinV2_T_256": [(256, 256)],
    "DPT_Swin_L_384": [(384, 384)],
    "DPT_LeViT_224": [(224, 224)],
}


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    """(name, model, rule-filled official entries): built from an official-layout checkpoint less its
    structural buffers, which the network recomputes."""
    yield from loaded_network(request.param, det_rule_state_dict)


def test_weights_and_recomputed_buffers_match_reference_digests(loaded):
    name, model, _ = loaded
    reference = json.loads((REFERENCE_DIR / f"weights_digest_{name}.json").read_text())
    # Persistent tensors plus the non-persistent buffers timm 1.0 recomputes (the official structural ones).
    tensors = model.state_dict() | dict(model.named_buffers())
    ours = [(official, array_digest16(tensors[timm_key(name, official)].cpu().numpy()))
            for official, _ in reference["per_key_sha256_16"]]
    mismatched = [key for (key, got), (_, want) in zip(ours, reference["per_key_sha256_16"]) if got != want]
    assert not mismatched, mismatched[:5]
    whole = hashlib.sha256("".join(digest for _, digest in ours).encode("ascii")).hexdigest()
    assert whole == reference["all_entries_sha256"]
    structural = set(structural_keys(name))
    rule = hashlib.sha256("".join(d for k, d in ours if k not in structural).encode("ascii")).hexdigest()
    assert rule == reference["rule_entries_sha256"]
    # Nothing persistent beyond the official entries: a real checkpoint can fill every tensor.
    expected = {timm_key(name, key) for key, _, _ in official_layout(name) if key not in structural}
    assert set(model.state_dict()) == expected


@pytest.mark.slow
def test_net_output_matches_golden(loaded):
    name, model, _ = loaded
    height, width = NET_SIZES[name][0]
    assert_net_matches(model, height, width, REFERENCE_DIR / f"net_{name}_{height}x{width}.npy", name)


@pytest.mark.slow
def test_net_output_at_another_size_matches_golden(loaded):
    # The relative-position table stretched to another grid: the same code for every BEiT, proven on BEiT-B
    # (BEiT-L at 512x320 took 20 s more on two cores, for that code again).
    name, model, _ = loaded
    if len(NET_SIZES[name]) < 2:
        pytest.skip("a fixed-size network: its native square is its only input")
    if name not in FAST:
        pytest.skip(SAME_PATH)
    height, width = NET_SIZES[name][1]
    assert_net_matches(model, height, width, REFERENCE_DIR / f"net_{name}_{height}x{width}.npy", name)


@pytest.mark.slow
@pytest.mark.parametrize("image_size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_end_to_end_matches_golden(loaded, image_size):
    name, model, _ = loaded
    if name not in E2E:
        pytest.skip(SAME_PATH)
    height, width = image_size
    assert_end_to_end_matches(model, name, height, width, REFERENCE_DIR / f"e2e_{name}_{height}x{width}.npy", name)


def test_official_checkpoint_with_structural_buffers_loads_strict(loaded, caplog):
    name, model, state_dict = loaded
    official = det_official_state_dict(name, model, state_dict)
    assert [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in official.items()] == official_layout(name)
    with caplog.at_level(logging.INFO, logger="inference.nets.factory"):
        twin = create_model(name, state_dict=official)
    count = len(structural_keys(name))
    assert f"dropped {count} structural buffers" in caplog.text
    # Adopted as-is (no copy) under the timm 1.0 names.
    twin_tensors = twin.state_dict()
    for key in ("scratch.layer1_rn.weight", official_layout(name)[0][0]):
        assert twin_tensors[timm_key(name, key)].data_ptr() == official[key].data_ptr()


@pytest.mark.slow
def test_other_input_sizes(loaded):
    name, model, _ = loaded
    config = get_config(name)
    height, width = config.net_size
    with torch.inference_mode():
        if config.fixed_input_size:
            # A clear refusal instead of a shape error deep in the attention.
            with pytest.raises(ValueError, match=rf"accepts {height}x{width} inputs only, got {height}x{width - 32}"):
                model(torch.zeros(1, 3, height, width - 32))
        else:
            with pytest.raises(ValueError, match="multiples of 16"):
                model(torch.zeros(1, 3, 72, 40))
            # Any multiple of 16, with the bias table stretched per call and nothing cached between calls.
            small = torch.from_numpy(net_input(64, 96))
            first = model(small)
            model(torch.from_numpy(net_input(48, 48)))
            assert first.shape == (1, 64, 96) and torch.isfinite(first).all()
            assert torch.equal(model(small), first)


@pytest.mark.slow
def test_batch_matches_single_images(loaded):
    name, model, _ = loaded
    if name not in FAST:
        pytest.skip(SAME_PATH)
    height, width = get_config(name).net_size
    if not get_config(name).fixed_input_size:
        height, width = 64, 96
    x = torch.from_numpy(net_input(height, width))
    with torch.inference_mode():
        single = model(x)
        batch = model(torch.cat((x, x.flip(-1))))
    assert batch.shape == (2, height, width)
    value_range = float(single.max() - single.min())
    assert float((batch[:1] - single).abs().max()) / value_range <= TOLERANCE


@pytest.mark.slow
def test_bfloat16_runs_close_to_float32(loaded):
    name, model, state_dict = loaded
    if name not in FAST:
        pytest.skip(SAME_PATH)
    if get_config(name).fixed_input_size:
        # Swin V2 and LeViT take their native square only; bf16 there took 189 s on a CPU without bf16 units.
        pytest.skip("fixed-size network: bf16 at its native square takes minutes on a CPU without bf16 units")
    x = torch.from_numpy(net_input(64, 96))
    with torch.inference_mode():
        single = model(x)
        value_range = float(single.max() - single.min())
        twin = create_model(name, state_dict={k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                              for k, v in state_dict.items()})
        out = twin(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert float((out.float() - single).abs().max()) / value_range <= 0.1


# --- registry and preprocessing (no weights) ----------------------------------------------------


def test_registry_order_and_configs():
    assert NET_NAMES[4:12] == V31
    for name in V31:
        config = get_config(name)
        assert config.name == name and config.mean == config.std == (0.5, 0.5, 0.5)
        stretched = name.startswith(("DPT_Swin", "DPT_LeViT"))
        assert config.keep_aspect_ratio is not stretched
        assert config.fixed_input_size is stretched
    # The four originals keep the defaults.
    assert all(get_config(n).keep_aspect_ratio and not get_config(n).fixed_input_size for n in NET_NAMES[:4])


@pytest.mark.parametrize(
    "name, image_size, expected",
    [
        # The network inputs of the reference's end-to-end runs.
        ("DPT_BEiT_L_512", (240, 320), (384, 512)),
        ("DPT_BEiT_L_512", (500, 375), (512, 384)),
        ("DPT_BEiT_L_384", (240, 320), (288, 384)),
        ("DPT_BEiT_B_384", (500, 375), (512, 384)),
        ("DPT_SwinV2_L_384", (240, 320), (384, 384)),
        ("DPT_SwinV2_T_256", (500, 375), (256, 256)),
        ("DPT_Swin_L_384", (500, 375), (384, 384)),
        ("DPT_LeViT_224", (240, 320), (224, 224)),
        # Stretching: even an extreme panorama becomes the native square.
        ("DPT_LeViT_224", (10, 1000), (224, 224)),
    ],
)
def test_target_size(name, image_size, expected):
    assert target_size(*image_size, name) == expected


def test_registry_layout_files_list_every_official_key():
    for name in V31:
        layout = official_layout(name)
        data = json.loads((REFERENCE_DIR / f"weights_digest_{name}.json").read_text())
        assert [key for key, _, _ in layout] == [key for key, _ in data["per_key_sha256_16"]]
        assert set(structural_keys(name)) <= {key for key, _, _ in layout}


@pytest.mark.slow
def test_functional_health_check_runs_fixed_size_networks(loaded):
    # The registry's health check feeds a fixed probe; Swin/SwinV2/LeViT refuse anything but their square.
    from types import SimpleNamespace

    from inference.health import weights_functional_hash

    name, model, state_dict = loaded
    if get_config(name).fixed_input_size and name not in E2E:
        pytest.skip(SAME_PATH)  # SwinV2-B and -L: SwinV2-T's probe at a larger square (8-10 s each here)
    arrays = {key: value.numpy() for key, value in det_official_state_dict(name, model, state_dict).items()}
    digest = weights_functional_hash(SimpleNamespace(architecture=name), arrays)
    assert len(digest) == 64
    if name not in FAST:
        return  # the probe runs at the native size: one more forward is costly on two cores
    # Bound to the weights: a different bias in the depth head changes the hash.
    arrays["scratch.output_conv.4.bias"] = arrays["scratch.output_conv.4.bias"] + np.float32(1.0)
    assert weights_functional_hash(SimpleNamespace(architecture=name), arrays) != digest

