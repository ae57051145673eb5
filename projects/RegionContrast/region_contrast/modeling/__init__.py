"""The model: regions, bank, loss, projection, the criterion that joins them, heads, meta-arch."""
from .criterion import ContrastOutput, RegionContrastCriterion
from .heads import RegionContrastDeepLabV3Head, RegionContrastDeepLabV3PlusHead
from .loss import region_contrast_loss
from .memory_bank import RegionMemoryBank
from .meta_arch import RegionContrastSegmentor
from .regions import region_centers

__all__ = [
    "ContrastOutput",
    "RegionContrastCriterion",
    "RegionContrastDeepLabV3Head",
    "RegionContrastDeepLabV3PlusHead",
    "RegionContrastSegmentor",
    "RegionMemoryBank",
    "region_centers",
    "region_contrast_loss",
]
