"""region_contrast.evaluation.diagnostics against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from region_contrast.evaluation.diagnostics import confusion_fractions, separability


def test_confusion_fractions_by_hand():
    # Rows: ground truth (0 background, 1 and 2 foreground); columns: prediction.
    confusion = np.array([[50, 5, 5],
                          [4, 10, 6],
                          [1, 9, 10]])
    out = confusion_fractions(confusion)
    # 40 foreground pixels: 20 correct, 15 as the other foreground class, 5 as background.
    assert out["foreground_correct"] == pytest.approx(20 / 40)
    assert out["foreground_as_other_foreground"] == pytest.approx(15 / 40)
    assert out["foreground_as_background"] == pytest.approx(5 / 40)
    empty = confusion_fractions(np.diag([7, 0, 0]))
    assert all(math.isnan(v) for v in empty.values())


def test_separability_by_hand():
    # Class 0 around (1, 0), class 1 around (0, 1); one class-1 centre leans towards class 0.
    centers = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    classes = torch.tensor([0, 0, 1, 1])
    out = separability(centers, classes)
    assert out["num_regions"] == 4
    # Class means of the unit rows: (1, 0) and (0.4, 0.8). The leaning centre (0.8, 0.6) has
    # cosine 0.8 to (1, 0) and (0.32 + 0.48) / 0.894 = 0.894 to class 1's: still its own.
    assert out["ncm_accuracy"] == pytest.approx(1.0)
    means = np.array([[1.0, 0.0], [0.4, 0.8]])
    overall = centers.numpy().mean(axis=0)
    within = (0 + 0 + np.sum((centers.numpy()[2:] - means[1]) ** 2)) / 4
    between = 2 * np.sum((means - overall) ** 2) / 4
    assert out["scatter_ratio"] == pytest.approx(between / within)
    # A centre nearer the other class's mean is counted as wrong.
    wrong = separability(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.05]]),
                         torch.tensor([0, 0, 1, 1]))
    assert wrong["ncm_accuracy"] == pytest.approx(0.5)
