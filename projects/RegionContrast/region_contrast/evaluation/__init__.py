"""Evaluation: Detectron2's evaluators with input checks, sliding window, test-time augmentation."""
from .evaluator import OfficialCityscapesSemSegEvaluator, ValidatingSemSegEvaluator
from .sliding_window import sliding_window_logits
from .test_time_augmentation import SemanticSegmentorWithTTA

__all__ = [
    "OfficialCityscapesSemSegEvaluator",
    "SemanticSegmentorWithTTA",
    "ValidatingSemSegEvaluator",
    "sliding_window_logits",
]
