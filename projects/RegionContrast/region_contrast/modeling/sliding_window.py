"""
Sliding-window inference for dense prediction (pure tensor code: no config, no Detectron2).

An image is covered by windows of a fixed size placed every ``stride`` pixels; the last window of
each row and column is moved back to end at the border, so no window reaches past the image and
every pixel is covered. An image smaller than the window is first padded at the bottom and right
with zeros (the pixel mean once normalised, as the training crops are padded), and the padding is
cut off again at the end. The windows go through the network in batches, and each pixel's logits
are the mean over the windows that contain it (a running sum divided by a count map).
"""
import math
from typing import Callable, List, Sequence, Tuple

import torch
from torch.nn import functional as F

__all__ = ["window_starts", "window_boxes", "sliding_window_logits"]


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """
    Start offsets of windows of size ``window`` every ``stride`` along a side of ``length``
    pixels, the last one ending at the border (``[0]`` when the window covers the side).
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if stride > window:
        raise ValueError(f"stride ({stride}) larger than the window ({window}) leaves gaps")
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def window_boxes(
    height: int, width: int, window: Tuple[int, int], stride: Tuple[int, int]
) -> List[Tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the windows covering a ``height x width`` image, row-major."""
    ys = window_starts(height, window[0], stride[0])
    xs = window_starts(width, window[1], stride[1])
    return [(y, x) for y in ys for x in xs]


def sliding_window_logits(
    image: torch.Tensor,
    predict: Callable[[torch.Tensor], torch.Tensor],
    window: Sequence[int],
    stride: Sequence[int],
    batch_size: int = 4,
) -> torch.Tensor:
    """
    Args:
        image: (C, H, W) normalised image (the network's input, padding value 0).
        predict: maps a batch of windows (n, C, wh, ww) to logits (n, K, h, w) with h >= wh and
            w >= ww cropped to the window (the network's output grid may overshoot a window whose
            size is not a multiple of its stride; that part is padding) or smaller, resized up.
        window, stride: (height, width) of the windows and of the step between them.
        batch_size: windows per call of ``predict``.

    Returns:
        (K, H, W) float32 logits, averaged over the windows covering each pixel.
    """
    wh, ww = int(window[0]), int(window[1])
    height, width = image.shape[-2:]
    padded_h, padded_w = max(height, wh), max(width, ww)
    if (padded_h, padded_w) != (height, width):
        image = F.pad(image, (0, padded_w - width, 0, padded_h - height))
    boxes = window_boxes(padded_h, padded_w, (wh, ww), (int(stride[0]), int(stride[1])))

    logit_sum = None
    count = torch.zeros((1, padded_h, padded_w), dtype=torch.float32, device=image.device)
    for first in range(0, len(boxes), max(1, int(batch_size))):
        chunk = boxes[first : first + max(1, int(batch_size))]
        windows = torch.stack([image[:, y : y + wh, x : x + ww] for y, x in chunk])
        logits = predict(windows)[..., :wh, :ww].float()
        if logits.shape[-2:] != (wh, ww):
            logits = F.interpolate(logits, size=(wh, ww), mode="bilinear", align_corners=False)
        if logit_sum is None:
            logit_sum = logits.new_zeros((logits.shape[1], padded_h, padded_w))
        for (y, x), window_logits in zip(chunk, logits):
            logit_sum[:, y : y + wh, x : x + ww] += window_logits
            count[:, y : y + wh, x : x + ww] += 1
    return (logit_sum / count)[:, :height, :width]
