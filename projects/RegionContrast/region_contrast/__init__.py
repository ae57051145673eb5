"""RegionContrast: region-aware contrastive learning for semantic segmentation, for Detectron2."""
from . import compat  # noqa: F401  (must run before anything imports Detectron2)
