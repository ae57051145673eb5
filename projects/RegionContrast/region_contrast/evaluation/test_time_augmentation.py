"""
Multi-scale and flip test-time augmentation for semantic segmentation.

Detectron2 v0.6 ships test-time augmentation only for R-CNN (``GeneralizedRCNNWithTTA``). This
is the semantic-segmentation counterpart, in the same style: a module wrapping a trained model,
configured by Detectron2's own ``TEST.AUG`` keys (``MIN_SIZES``, ``MAX_SIZE``, ``FLIP``), used as
``model`` by ``inference_on_dataset`` / ``DefaultTrainer.test``.
"""
from typing import Dict, List

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.data.transforms import HFlipTransform, ResizeShortestEdge, ResizeTransform

__all__ = ["SemanticSegmentorWithTTA"]


class SemanticSegmentorWithTTA(nn.Module):
    """
    Evaluates a semantic segmentation model on each image at several scales (shortest edge
    ``TEST.AUG.MIN_SIZES``, longest at most ``TEST.AUG.MAX_SIZE``), each also mirrored
    left-right when ``TEST.AUG.FLIP``, and returns the mean of the softmax probabilities, all
    taken at the image's original resolution (the ``height`` and ``width`` of its record).

    The wrapped model must take Detectron2's list of dicts (``image`` a (C, H, W) tensor in the
    input format, optional ``height``/``width``) and return ``[{"sem_seg": (K, height, width)
    logits}]``, as ``SemanticSegmentor`` and ``RegionContrastSegmentor`` do, whole-image or
    sliding-window. Augmented versions of the same shape (an image and its mirror) run as one
    batch; different scales run separately, so no image is padded to another's size.

    Note: DeepLab heads trained with an absolute crop pool their ASPP image branch over a window
    fixed by ``INPUT.CROP.SIZE``; ``RegionContrastSegmentor`` evaluates scales that are not a
    multiple of it in sliding windows of the crop, so any scale works with it.
    """

    def __init__(self, cfg, model, batch_size=None):
        """
        Args:
            cfg (CfgNode): reads ``TEST.AUG.MIN_SIZES``, ``TEST.AUG.MAX_SIZE``, ``TEST.AUG.FLIP``.
            model: the semantic segmentation model (a ``DistributedDataParallel`` is unwrapped).
            batch_size (int or None): augmented inputs per forward pass at most; None batches
                each scale's versions (one, or two with the flip) together.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        self.min_sizes = [int(s) for s in cfg.TEST.AUG.MIN_SIZES]
        self.max_size = int(cfg.TEST.AUG.MAX_SIZE)
        self.flip = bool(cfg.TEST.AUG.FLIP)
        self.batch_size = batch_size
        if not self.min_sizes:
            raise ValueError("TEST.AUG.MIN_SIZES is empty: expected at least one test scale.")

    def forward(self, batched_inputs: List[Dict]):
        return [self._inference_one_image(x) for x in batched_inputs]

    def _augmented_inputs(self, inp):
        """
        Lists of inputs, one list per scale (the image, then its mirror when flipping), and
        for each input whether its output must be mirrored back.
        """
        image = inp["image"]
        h, w = image.shape[-2:]
        height, width = inp.get("height", h), inp.get("width", w)
        array = image.permute(1, 2, 0).cpu().numpy()  # HWC, as Detectron2's transforms take it
        groups = []
        for min_size in self.min_sizes:
            new_h, new_w = ResizeShortestEdge.get_output_shape(
                height, width, min_size, self.max_size
            )
            # Scales are relative to the original image; the input already went through the
            # test mapper's resize, so one resize takes it from there to the target scale.
            resized = array
            if (new_h, new_w) != (h, w):
                resized = ResizeTransform(h, w, new_h, new_w).apply_image(array)
            versions = [(resized, False)]
            if self.flip:
                versions.append((HFlipTransform(new_w).apply_image(resized), True))
            group = []
            for arr, flipped in versions:
                tensor = torch.as_tensor(np.ascontiguousarray(arr.transpose(2, 0, 1)))
                group.append(({"image": tensor, "height": height, "width": width}, flipped))
            groups.append(group)
        return groups

    def _inference_one_image(self, inp):
        prob_sum, count = None, 0
        for group in self._augmented_inputs(inp):
            step = self.batch_size or len(group)
            for first in range(0, len(group), step):
                chunk = group[first : first + step]
                outputs = self.model([x for x, _ in chunk])
                for (_, flipped), output in zip(chunk, outputs):
                    prob = output["sem_seg"].float().softmax(dim=0)
                    if flipped:
                        prob = prob.flip(dims=[-1])
                    prob_sum = prob if prob_sum is None else prob_sum + prob
                    count += 1
        return {"sem_seg": prob_sum / count}
