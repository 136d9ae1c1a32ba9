"""Deterministic official-layout checkpoints for the MiDaS v3.1 networks (weights_spec_v31.md).

The v3.1 rule is the v3 rule (`models_registry/detweights.py`) plus one addition: the structural
buffers (`relative_position_index`, `attn_mask`, `attention_bias_idxs`), which timm 0.6 saved with
every checkpoint, keep their constructor values instead of being filled by the rule. timm 1.0 makes
them non-persistent and recomputes them, so their values are taken from a built network, under the
official names given by the reference key maps (`keymap_<model>.json`).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from models_registry.detweights import det_rule_state_dict, official_layout

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "midas_v31"
BACKBONE_PREFIX = "pretrained.model."


@lru_cache(maxsize=None)
def reference_keymap(model: str) -> dict[str, tuple[str | None, str]]:
    """official key -> (full key in a timm 1.0 model or None, kind), measured by the reference.

    Keys outside the backbone (`act_postprocess*`, `scratch.*`) keep their names.
    """
    data = json.loads((REFERENCE_DIR / f"keymap_{model}.json").read_text())
    mapping: dict[str, tuple[str | None, str]] = {}
    for row in data["rows"]:
        target = row["timm1031"] if row["kind"] != "dropped_buffer" else row["timm1031_nonpersistent_buffer"]
        mapping[row["official"]] = (BACKBONE_PREFIX + target if target else None, row["kind"])
    return mapping


def timm_key(model: str, official: str) -> str:
    """Where the reference says a timm 1.0 model holds the tensor of an official key."""
    target = reference_keymap(model).get(official)
    if target is None:
        return official
    assert target[0] is not None, official
    return target[0]


def det_official_state_dict(model: str, network, rule: dict | None = None) -> dict:
    """The complete official layout: rule-filled entries (`rule`, generated when not given) plus the
    structural buffers of `network`."""
    rule = det_rule_state_dict(model) if rule is None else rule
    buffers = dict(network.named_buffers())
    out = {}
    for key, _shape, _dtype in official_layout(model):
        out[key] = rule[key] if key in rule else buffers[timm_key(model, key)].clone()
    return out
