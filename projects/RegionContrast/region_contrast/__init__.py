"""RegionContrast: region-aware contrastive learning for semantic segmentation, for Detectron2."""
from . import compat  # noqa: F401  (must run before anything imports Detectron2)
from . import data  # noqa: F401  (registers the data sets)
from .config import add_region_contrast_config
from .modeling import (  # noqa: F401  (registers the heads and the meta-architecture)
    RegionContrastCriterion,
    RegionContrastDeepLabV3Head,
    RegionContrastDeepLabV3PlusHead,
    RegionContrastHead,
    RegionContrastSegmentor,
    add_region_contrast,
    find_region_contrast,
)

__all__ = [
    "add_region_contrast_config",
    "RegionContrastCriterion",
    "RegionContrastDeepLabV3Head",
    "RegionContrastDeepLabV3PlusHead",
    "RegionContrastHead",
    "RegionContrastSegmentor",
    "add_region_contrast",
    "find_region_contrast",
]
