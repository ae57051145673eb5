"""RegionContrast: region-aware contrastive learning for semantic segmentation, for Detectron2."""
from . import compat  # noqa: F401  (must run before anything imports Detectron2)
from . import data  # noqa: F401  (registers the data sets)
from .config import add_region_contrast_config
from .heads import RegionContrastDeepLabV3Head, RegionContrastDeepLabV3PlusHead
from .meta_arch import RegionContrastSegmentor

__all__ = [
    "add_region_contrast_config",
    "RegionContrastDeepLabV3Head",
    "RegionContrastDeepLabV3PlusHead",
    "RegionContrastSegmentor",
]
