"""The exportable resizes (inference/nets/resample.py, BEiT's index) against what eager PyTorch computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import gen_relative_position_index

from inference.nets.beit import relative_position_index
from inference.nets.resample import cubic_matrix, linear_matrix, resample_2d


@pytest.mark.parametrize(("rows", "cols"), [(24, 24), (22, 24), (24, 32), (47, 31), (12, 8)])
def test_linear_matrices_resize_as_bilinear_interpolate(rows, cols):
    grid = torch.randn(1, 16, 24, 24, generator=torch.Generator().manual_seed(0))
    eager = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
    matrix = resample_2d(grid, linear_matrix(rows, 24), linear_matrix(cols, 24))
    assert matrix.shape == eager.shape
    assert (matrix - eager).abs().max().item() < 1e-5


def test_linear_matrix_at_the_same_size_is_the_identity():
    assert torch.equal(linear_matrix(24, 24), torch.eye(24))


@pytest.mark.parametrize(("rows", "cols"), [(37, 37), (35, 37), (37, 49), (74, 52), (19, 12)])
def test_cubic_matrices_resize_as_scale_driven_bicubic_interpolate(rows, cols):
    # The DINOv2 rule: bicubic, no antialiasing, driven by the scale (size + 0.1) / 37.
    grid = torch.randn(1, 16, 37, 37, generator=torch.Generator().manual_seed(1))
    scale = ((rows + 0.1) / 37, (cols + 0.1) / 37)
    eager = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    matrix = resample_2d(grid, cubic_matrix(rows, 37, scale=scale[0]), cubic_matrix(cols, 37, scale=scale[1]))
    assert matrix.shape == eager.shape
    assert (matrix - eager).abs().max().item() < 5e-5


def test_cubic_matrix_at_scale_one_is_the_identity():
    assert torch.equal(cubic_matrix(37, 37, scale=1.0), torch.eye(37))


@pytest.mark.parametrize("grid", [(24, 24), (32, 32), (22, 24), (24, 32), (3, 5), (1, 1)])
def test_relative_position_index_is_timms(grid):
    assert torch.equal(relative_position_index(grid), gen_relative_position_index(grid))
