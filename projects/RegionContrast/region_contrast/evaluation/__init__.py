"""Evaluation: Detectron2's evaluators with input checks, test-time augmentation, diagnostics."""
from .evaluator import OfficialCityscapesSemSegEvaluator, ValidatingSemSegEvaluator
from .test_time_augmentation import SemanticSegmentorWithTTA

__all__ = [
    "OfficialCityscapesSemSegEvaluator",
    "SemanticSegmentorWithTTA",
    "ValidatingSemSegEvaluator",
]
