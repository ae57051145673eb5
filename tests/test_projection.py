"""region_contrast.modeling.projection: the head's shape and unit rows."""
import torch

from region_contrast.modeling.projection import build_projection_head, project


def test_head_maps_to_proj_dim_and_zero_means_none():
    head = build_projection_head(6, 4)
    assert [type(m).__name__ for m in head] == ["Linear", "LayerNorm", "ReLU", "Linear"]
    assert head(torch.randn(3, 6)).shape == (3, 4)
    assert build_projection_head(6, 0) is None


def test_rows_are_unit_vectors_and_differentiable():
    torch.manual_seed(0)
    head = build_projection_head(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(project(head, x).norm(dim=1), torch.ones(5, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda v: project(head, v), (x,))
    # Without a head the rows are normalised directly (PROJ_DIM 0): x / |x|.
    torch.testing.assert_close(project(None, x), x / x.norm(dim=1, keepdim=True))
