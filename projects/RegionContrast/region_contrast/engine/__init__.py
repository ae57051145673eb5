"""Training: the trainer and config setup, hooks, atomic checkpoints, exact-resume sampling."""
from .trainer import (
    Trainer,
    build_sem_seg_train_aug,
    fall_back_to_cpu,
    get_region_contrast_cfg,
    setup,
)

__all__ = [
    "Trainer",
    "build_sem_seg_train_aug",
    "fall_back_to_cpu",
    "get_region_contrast_cfg",
    "setup",
]
