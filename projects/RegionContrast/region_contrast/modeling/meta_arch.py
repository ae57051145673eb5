"""
``RegionContrastSegmentor``: Detectron2's ``SemanticSegmentor`` plus region contrast in training.

This is the only module that knows training from evaluation. Training reads like the method:
backbone, head, the head's losses, the contrast criterion. Evaluation, and training with
``MODEL.REGION_CONTRAST.ENABLED: False``, run the parent's ``forward`` unchanged, except that
evaluation can be asked to slide a window over the image (``TEST.SLIDING_WINDOW``).
"""
import logging
from typing import Optional, Sequence

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..evaluation.sliding_window import sliding_window_logits
from .criterion import RegionContrastCriterion

__all__ = ["RegionContrastSegmentor"]

logger = logging.getLogger(__name__)


def _sliding_window_from_cfg(cfg, size_divisibility):
    """The constructor's window arguments from ``TEST.SLIDING_WINDOW`` ({} when disabled)."""
    sw = cfg.TEST.SLIDING_WINDOW
    if not sw.ENABLED:
        return {}

    def bad(key, value, expected):
        return ValueError(
            f"TEST.SLIDING_WINDOW.{key} = {value!r} is invalid: expected {expected}. "
            "Fix it in the recipe or on the command line."
        )

    window = list(sw.CROP_SIZE)
    if not window:
        if not (cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute"):
            raise bad("CROP_SIZE", sw.CROP_SIZE, "(height, width) in pixels: it defaults to "
                      "INPUT.CROP.SIZE only with an absolute INPUT.CROP")
        window = list(cfg.INPUT.CROP.SIZE)
    if len(window) != 2 or min(window) <= 0:
        raise bad("CROP_SIZE", sw.CROP_SIZE, "two positive integers (height, width)")
    if size_divisibility > 0 and any(w % size_divisibility for w in window):
        raise bad("CROP_SIZE", window, f"multiples of the backbone's size divisibility "
                  f"{size_divisibility}")
    stride = list(sw.STRIDE) or [max(1, 2 * w // 3) for w in window]
    if len(stride) != 2 or min(stride) <= 0 or any(s > w for s, w in zip(stride, window)):
        raise bad("STRIDE", sw.STRIDE, f"two positive integers at most the window {window}")
    if sw.BATCH_SIZE < 1:
        raise bad("BATCH_SIZE", sw.BATCH_SIZE, "an integer >= 1")
    return {
        "window_size": tuple(int(w) for w in window),
        "window_stride": tuple(int(s) for s in stride),
        "window_batch_size": int(sw.BATCH_SIZE),
    }


@META_ARCH_REGISTRY.register()
class RegionContrastSegmentor(SemanticSegmentor):
    """
    Semantic segmentation with region-aware contrastive learning (Hu et al., ICCV 2021).

    In training, the head's penultimate feature map and the ground truth go to a
    :class:`RegionContrastCriterion`, whose loss is added to the head's; the batch's region
    centres enter the criterion's memory bank after the step.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        sem_seg_head,
        pixel_mean,
        pixel_std,
        criterion: Optional[RegionContrastCriterion] = None,
        window_size: Optional[Sequence[int]] = None,
        window_stride: Optional[Sequence[int]] = None,
        window_batch_size: int = 4,
    ):
        """
        Args:
            backbone, sem_seg_head, pixel_mean, pixel_std: as in ``SemanticSegmentor``; the head
                must have ``forward_features`` when a criterion is given.
            criterion: the region contrast; None trains the plain baseline.
            window_size, window_stride: (height, width) of the windows of sliding-window
                evaluation and of the step between them; None evaluates the whole image.
            window_batch_size: windows per forward pass in sliding-window evaluation.
        """
        super().__init__(
            backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        # None leaves no trace in the state dict, so a disabled model is the baseline exactly.
        self.criterion = criterion
        if (window_size is None) != (window_stride is None):
            raise ValueError("window_size and window_stride are given together or not at all")
        self.window_size = None if window_size is None else tuple(window_size)
        self.window_stride = None if window_stride is None else tuple(window_stride)
        self.window_batch_size = window_batch_size

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(_sliding_window_from_cfg(cfg, ret["backbone"].size_divisibility))
        if cfg.MODEL.REGION_CONTRAST.ENABLED:
            head = ret["sem_seg_head"]
            if not hasattr(head, "forward_features"):
                raise ValueError(
                    f"MODEL.SEM_SEG_HEAD.NAME = {cfg.MODEL.SEM_SEG_HEAD.NAME!r} cannot expose its "
                    "penultimate features (no forward_features). With "
                    "MODEL.REGION_CONTRAST.ENABLED use RegionContrastDeepLabV3PlusHead or "
                    "RegionContrastDeepLabV3Head."
                )
            criterion = RegionContrastCriterion(cfg, head.predictor.in_channels)
            bank = criterion.memory_bank
            logger.info(f"RegionContrast memory bank: {bank.num_classes} classes x {bank.size} "
                        f"slots x {bank.dim} dims in {bank.dtype} = {bank.nbytes / 2**20:.1f} MiB")
            ret["criterion"] = criterion
        return ret

    @property
    def contrast_enabled(self) -> bool:
        return self.criterion is not None

    @property
    def memory_bank(self):
        """The criterion's memory bank, or None for the baseline."""
        return None if self.criterion is None else self.criterion.memory_bank

    def forward(self, batched_inputs):
        if not self.training and self.window_size is not None:
            return self.sliding_window_inference(batched_inputs)
        if not (self.training and self.contrast_enabled):
            return super().forward(batched_inputs)

        images, targets = self.preprocess_labelled_batch(batched_inputs)
        features = self.backbone(images.tensor)
        logits, embedding = self.sem_seg_head.forward_features(features)
        # The criterion first: it names labels that are neither a class nor ignored, on which
        # the cross entropy would fail without saying which.
        contrast = self.criterion(embedding, targets, logits)
        losses = self.sem_seg_head.losses(logits, targets)
        losses["loss_contrast"] = contrast.loss
        # Nothing of a step whose loss is not finite enters the bank: Detectron2 stops with
        # FloatingPointError right after, and the bank must stay clean.
        finite = bool(torch.isfinite(sum(losses.values()).detach()))
        self.criterion.update(contrast, accept=finite)
        return losses

    def preprocess_labelled_batch(self, batched_inputs):
        """
        Normalised images (an ``ImageList``) and their labels (N, H, W), both padded to the
        backbone's size divisibility; padding is labelled ignore, never a class (the authors'
        release padded with 0).
        """
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        targets = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.sem_seg_head.ignore_value,
        ).tensor
        return images, targets

    def sliding_window_inference(self, batched_inputs):
        """
        The parent's inference, each image evaluated in overlapping windows of ``window_size``
        (see :mod:`region_contrast.evaluation.sliding_window`): the logits of the windows are
        averaged where they overlap, then cut and resized to the requested output size as the
        parent does. With a window the size of the image, this is the parent's result.
        """
        processed_results = []
        for x in batched_inputs:
            image = (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
            logits = sliding_window_logits(
                image, self._window_logits, self.window_size, self.window_stride,
                self.window_batch_size,
            )
            image_size = tuple(image.shape[-2:])
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            processed_results.append(
                {"sem_seg": sem_seg_postprocess(logits, image_size, height, width)}
            )
        return processed_results

    def _window_logits(self, windows):
        """Logits (n, K, h, w) of a batch of normalised windows, at input resolution."""
        logits, _ = self.sem_seg_head(self.backbone(windows))
        return logits
