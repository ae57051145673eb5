"""The projection head of the contrast (docs/method.md, section 1) and the map to unit vectors."""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["build_projection_head", "project"]


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


def project(projector: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Rows (R, in_dim) in the contrast space: through the projection head, L2-normalised."""
    if projector is not None:
        x = projector(x)
    return F.normalize(x, dim=1)
