"""The model: regions, bank, loss, projection, the criterion that joins them, its wiring around
any semantic head, the DeepLab heads and the meta-architecture."""
from .criterion import ContrastOutput, RegionContrastCriterion
from .head_contrast import (
    RegionContrastHead,
    add_region_contrast,
    add_region_contrast_from_config,
    classifier_input,
    find_region_contrast,
)
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
    "RegionContrastHead",
    "RegionContrastSegmentor",
    "RegionMemoryBank",
    "add_region_contrast",
    "add_region_contrast_from_config",
    "classifier_input",
    "find_region_contrast",
    "region_centers",
    "region_contrast_loss",
]
