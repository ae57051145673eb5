"""Training: the config entry point, the trainer and train_net's main, hooks, atomic checkpoints,
exact-resume sampling."""
from .trainer import (
    Trainer,
    build_sem_seg_train_aug,
    check_launch,
    fall_back_to_cpu,
    get_region_contrast_cfg,
    load_config,
    main,
    setup,
)

__all__ = [
    "Trainer",
    "build_sem_seg_train_aug",
    "check_launch",
    "fall_back_to_cpu",
    "get_region_contrast_cfg",
    "load_config",
    "main",
    "setup",
]
