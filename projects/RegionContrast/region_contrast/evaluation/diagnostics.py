"""
What the contrast claims to do, measured apart from mIoU: are classes confused less, and are the
features that the classifier reads more separable?

- :func:`confusion_fractions`: of the pixels of the foreground classes, the fraction predicted as
  another foreground class and the fraction predicted as background;
- :func:`separability`: over region centres (one per image and class present, ground-truth
  regions) of the classifier's input features, L2-normalised: nearest-class-mean accuracy
  (cosine to each class's mean direction) and the ratio of between-class to within-class
  scatter;
- :func:`feature_diagnostics`: both, for a trained model over a registered data set.
"""
from typing import Dict, Iterable

import numpy as np
import torch
from torch.nn import functional as F

from detectron2.structures import ImageList

from ..modeling.criterion import labels_at
from ..modeling.head_contrast import classifier_input
from ..modeling.regions import region_centers

__all__ = ["confusion_fractions", "separability", "feature_diagnostics"]


def confusion_fractions(confusion: np.ndarray, background: int = 0) -> Dict[str, float]:
    """
    Args:
        confusion: (K, K) pixel counts, ``confusion[gt, pred]``, over the K classes (ignored
            pixels left out).
        background: the class that is not foreground.

    Returns:
        ``foreground_as_other_foreground``, ``foreground_as_background``, ``foreground_correct``:
        fractions of the foreground classes' pixels (NaN without any).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    fg = [k for k in range(confusion.shape[0]) if k != background]
    rows = confusion[fg]
    total = rows.sum()
    if total == 0:
        nan = float("nan")
        return {"foreground_as_other_foreground": nan, "foreground_as_background": nan,
                "foreground_correct": nan}
    correct = sum(confusion[k, k] for k in fg)
    as_background = rows[:, background].sum()
    return {
        "foreground_as_other_foreground": float((total - correct - as_background) / total),
        "foreground_as_background": float(as_background / total),
        "foreground_correct": float(correct / total),
    }


def separability(centers: torch.Tensor, classes: torch.Tensor) -> Dict[str, float]:
    """
    Args:
        centers: (R, D) region centres; they are L2-normalised here.
        classes: (R,) their classes.

    Returns:
        ``ncm_accuracy``: fraction of centres whose most similar class mean direction (cosine)
        is their own class's; ``scatter_ratio``: between-class scatter (class means around the
        overall mean, weighted by class size) over within-class scatter (centres around their
        class mean); ``num_regions``.
    """
    x = F.normalize(centers.double(), dim=1)
    present, index = torch.unique(classes, return_inverse=True)
    counts = torch.bincount(index, minlength=present.numel()).double()
    means = torch.zeros(present.numel(), x.shape[1], dtype=x.dtype).index_add_(0, index, x)
    means = means / counts.unsqueeze(1)
    predicted = (x @ F.normalize(means, dim=1).t()).argmax(dim=1)
    within = ((x - means[index]) ** 2).sum() / x.shape[0]
    between = (counts * ((means - x.mean(dim=0)) ** 2).sum(dim=1)).sum() / x.shape[0]
    return {
        "ncm_accuracy": float((predicted == index).double().mean()),
        "scatter_ratio": float(between / within) if within > 0 else float("inf"),
        "num_regions": int(x.shape[0]),
    }


@torch.no_grad()
def feature_diagnostics(model, dataset_dicts: Iterable[dict], mapper, *, background: int = 0,
                        batch_size: int = 8, feature_module: str = "predictor") -> Dict[str, float]:
    """
    Runs ``model`` (a ``SemanticSegmentor`` or subclass, with or without region contrast) in
    eval mode over ``dataset_dicts`` mapped by ``mapper`` (which must keep ``sem_seg``, e.g. a
    training mapper without augmentations), at the images' own size. The features are the input
    of the head's ``feature_module``, those the contrast acts on.

    Returns :func:`confusion_fractions` of the pixel predictions and :func:`separability` of the
    region centres of the head's classifier input.
    """
    head = model.sem_seg_head
    num_classes = head.predictor.out_channels
    ignore = head.ignore_value
    was_training = model.training
    model.eval()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    all_centers, all_classes = [], []
    dicts = list(dataset_dicts)
    try:
        for start in range(0, len(dicts), batch_size):
            batch = [mapper(d) for d in dicts[start : start + batch_size]]
            divisibility = model.backbone.size_divisibility
            images = ImageList.from_tensors(
                [(x["image"].to(model.device) - model.pixel_mean) / model.pixel_std for x in batch],
                divisibility)
            targets = ImageList.from_tensors(
                [x["sem_seg"].to(model.device) for x in batch], divisibility, ignore).tensor
            with classifier_input(head, feature_module) as seen:
                logits, _ = head(model.backbone(images.tensor))
            embedding = seen[0]
            pred = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear",
                                 align_corners=False).argmax(dim=1)
            valid = targets != ignore
            confusion += np.bincount(
                (targets[valid] * num_classes + pred[valid]).cpu().numpy(),
                minlength=num_classes * num_classes,
            ).reshape(num_classes, num_classes)
            centers, classes, _ = region_centers(
                embedding.float(), labels_at(targets, embedding.shape[-2:]), num_classes, ignore)
            all_centers.append(centers.cpu())
            all_classes.append(classes.cpu())
    finally:
        model.train(was_training)
    out = confusion_fractions(confusion, background)
    out.update(separability(torch.cat(all_centers), torch.cat(all_classes)))
    return out
