from typing import Optional

import torch
from torch import nn

__all__ = ["MAX_DOT", "build_projection_head", "project"]

# A bound on |a . m| for rows from :func:`project` and a bank that holds them: unit vectors, which
# a float16 or bfloat16 bank rounds by at most 2^-8 relative (the loss's ``max_dot``).
MAX_DOT = 1.01


def build_projection_head(in_dim: int, proj_dim: int):
    """
    Linear - LayerNorm - ReLU - Linear, applied to region centres (R, in_dim) or sampled pixel
    embeddings, not to the full feature map. Returns None when ``proj_dim == 0`` (the features are
    contrasted directly, as in the authors' code).

    LayerNorm rather than BatchNorm: the number of rows changes every step and can be 1, and a
    per-row norm needs no cross-GPU synchronisation.
    """
    if proj_dim == 0:
        return None
    return nn.Sequential(
        nn.Linear(in_dim, in_dim),
        nn.LayerNorm(in_dim),
        nn.ReLU(inplace=True),
        nn.Linear(in_dim, proj_dim),
    )


class _UnitRows(torch.autograd.Function):
    """
    ``F.normalize(x, dim=1)``, the same values, with its gradient in closed form: five
    operators instead of the fifteen or so that autograd runs through the norm, its clamp and
    the division, which cost more than their arithmetic at the contrast's few hundred rows.
    """

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        scale = norm.clamp_min(eps)
        y = x / scale
        # Where the norm is clamped, y = x / eps is linear in x: no term through the norm.
        ctx.save_for_backward(y, scale, norm > eps)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        y, scale, unclamped = ctx.saved_tensors
        # d(x / |x|): (g - y (y . g)) / |x|.
        along = (grad * y).sum(dim=1, keepdim=True).mul_(unclamped)
        return grad.addcmul(y, along, value=-1.0).div_(scale), None


def project(projector: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Rows (R, in_dim) in the contrast space: through the projection head, L2-normalised."""
    if projector is not None:
        x = projector(x)
    return _UnitRows.apply(x, 1e-12)  # F.normalize's eps
