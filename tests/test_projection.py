"""region_contrast.projection: the unit rows and their closed-form gradient against F.normalize."""
import pytest
import torch
import torch.nn.functional as F

from region_contrast.projection import build_projection_head, project


def _rows(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3.0
    x[2] = 0.0  # a zero row: F.normalize's clamp at eps, where the gradient skips the norm
    x[4] = 1e-14  # a row below eps as well, not zero
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_rows_equal_f_normalize_with_its_gradient(dtype):
    x = _rows(dtype).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    y, ref = project(None, x), F.normalize(ref_x, dim=1)
    assert torch.equal(y, ref)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, g)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(grad, ref_grad, **tol)
    # The clamped rows' gradient is g / eps, not a projection through the norm.
    torch.testing.assert_close(grad[2], g[2] / 1e-12, **tol)


def test_unit_rows_gradcheck_through_the_head():
    torch.manual_seed(0)
    head = build_projection_head(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: project(head, v), (x,))
    # Without a head the rows are normalised directly (PROJ_DIM 0).
    assert torch.autograd.gradcheck(lambda v: project(None, v), (x,))
    y = project(head, x)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(5, dtype=torch.float64))
