"""
``RegionContrastSegmentor``: Detectron2's ``SemanticSegmentor`` with sliding-window evaluation,
the meta-architecture of this project's DeepLab recipes.

Training is the parent's. Region contrast rides with the semantic head
(:mod:`region_contrast.modeling.head_contrast`), so it needs no meta-architecture; this one adds
it to its head when ``MODEL.REGION_CONTRAST.ENABLED`` is set and the head has none yet, which
keeps the recipes written for it (``ENABLED`` alone) working, and it loads their checkpoints,
whose contrast was stored at the top level (``criterion.*``).
"""
import copy
import logging
from typing import Optional, Sequence

from detectron2.config import configurable
from detectron2.layers import ASPP
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.utils.logger import log_first_n

from .head_contrast import add_region_contrast_from_config, find_region_contrast
from .sliding_window import sliding_window_logits

__all__ = ["RegionContrastSegmentor"]

logger = logging.getLogger(__name__)

# Where checkpoints of the earlier layout kept the contrast, and where it is now.
_OLD_PREFIX, _NEW_PREFIX = "criterion.", "sem_seg_head.region_contrast."


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


def _pooling_window(cfg, head):
    """
    The input size a DeepLab head's ASPP pools over (its image branch averages a window fixed by
    an absolute ``INPUT.CROP.SIZE``), or None when the head has no such window.
    """
    fixed = any(isinstance(m, ASPP) and m.pool_kernel_size is not None for m in head.modules())
    if not (fixed and cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute"):
        return None
    return tuple(int(s) for s in cfg.INPUT.CROP.SIZE)


@META_ARCH_REGISTRY.register()
class RegionContrastSegmentor(SemanticSegmentor):
    """
    ``SemanticSegmentor`` that can evaluate in sliding windows, with region contrast on its head
    when ``MODEL.REGION_CONTRAST.ENABLED`` (Hu et al., ICCV 2021).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        sem_seg_head,
        pixel_mean,
        pixel_std,
        window_size: Optional[Sequence[int]] = None,
        window_stride: Optional[Sequence[int]] = None,
        window_batch_size: int = 4,
        tile_size: Optional[Sequence[int]] = None,
    ):
        """
        Args:
            backbone, sem_seg_head, pixel_mean, pixel_std: as in ``SemanticSegmentor``.
            window_size, window_stride: (height, width) of the windows of sliding-window
                evaluation and of the step between them; None evaluates the whole image.
            window_batch_size: windows per forward pass in sliding-window evaluation.
            tile_size: (height, width) that whole-image evaluation needs the (padded) image
                size to be a multiple of, e.g. the crop over which a DeepLab head's ASPP pools;
                other images are evaluated in windows of that size. None: any size.
        """
        super().__init__(
            backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        if (window_size is None) != (window_stride is None):
            raise ValueError("window_size and window_stride are given together or not at all")
        self.window_size = None if window_size is None else tuple(window_size)
        self.window_stride = None if window_stride is None else tuple(window_stride)
        self.window_batch_size = window_batch_size
        self.tile_size = None if tile_size is None else tuple(tile_size)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(_sliding_window_from_cfg(cfg, ret["backbone"].size_divisibility))
        ret["tile_size"] = _pooling_window(cfg, ret["sem_seg_head"])
        if find_region_contrast(ret["sem_seg_head"]) is None:
            ret["sem_seg_head"] = add_region_contrast_from_config(ret["sem_seg_head"], cfg)
        return ret

    @property
    def criterion(self):
        """The head's :class:`RegionContrastCriterion`, or None for the baseline."""
        return find_region_contrast(self.sem_seg_head)

    @property
    def contrast_enabled(self) -> bool:
        return self.criterion is not None

    @property
    def memory_bank(self):
        """The criterion's memory bank, or None for the baseline."""
        criterion = self.criterion
        return None if criterion is None else criterion.memory_bank

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """The parent's, reading the earlier layout's ``criterion.*`` keys as the head's."""
        old = [k for k in state_dict if k.startswith(_OLD_PREFIX)]
        if old:
            state_dict = copy.copy(state_dict)  # the caller's dict stays as it was
            for key in old:
                state_dict[_NEW_PREFIX + key[len(_OLD_PREFIX):]] = state_dict.pop(key)
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def forward(self, batched_inputs):
        if not self.training and self.window_size is not None:
            return self.sliding_window_inference(batched_inputs)
        if not self.training and self.tile_size is not None and not all(
            self._tiles(x["image"]) for x in batched_inputs
        ):
            # Any test scale a user asks for (TEST.AUG.MIN_SIZES included) evaluates, instead of
            # stopping in the ASPP pooling: such images go through windows of the pooled size.
            log_first_n(
                logging.INFO,
                f"Images whose size is not a multiple of {self.tile_size} (the window the "
                f"head's ASPP pools over) are evaluated in sliding windows of that size.",
                name=__name__,
            )
            stride = tuple(max(1, 2 * t // 3) for t in self.tile_size)
            return self.sliding_window_inference(batched_inputs, self.tile_size, stride)
        return super().forward(batched_inputs)

    def _tiles(self, image):
        """Whether the image, padded as the parent pads it, is a multiple of ``tile_size``."""
        divisor = self.backbone.size_divisibility
        size = [s if divisor <= 0 else -(-s // divisor) * divisor for s in image.shape[-2:]]
        return all(s % t == 0 for s, t in zip(size, self.tile_size))

    def sliding_window_inference(self, batched_inputs, window_size=None, window_stride=None):
        """
        The parent's inference, each image evaluated in overlapping windows of ``window_size``
        (see :mod:`region_contrast.modeling.sliding_window`): the logits of the windows are
        averaged where they overlap, then cut and resized to the requested output size as the
        parent does. With a window the size of the image, this is the parent's result.
        """
        processed_results = []
        for x in batched_inputs:
            image = (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
            logits = sliding_window_logits(
                image, self._window_logits, window_size or self.window_size,
                window_stride or self.window_stride, self.window_batch_size,
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
