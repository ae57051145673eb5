"""
``RegionContrastCriterion``: the whole contrast of a training step, as one module.

It owns the projection head, the memory bank and the contrast's settings, and turns the head's
penultimate feature map and the ground truth into the contrastive loss and the rows that go into
the bank afterwards (docs/method.md, sections 1-7):

    labels at the embedding's resolution -> regions -> centres -> projection -> unit vectors
    anchors (the centres, or sampled pixels) x the bank -> loss
    after the step: the centres (and dynamic samples) -> bank

The same code runs on the CPU and the GPU. A new anchor type or loss variant is a change here
(or a function in ``regions.py``/``loss.py``) and a config key.
"""
import logging
from typing import Dict, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.utils.events import get_event_storage

from .loss import region_contrast_loss
from .memory_bank import RegionMemoryBank
from .projection import build_projection_head, project
from .regions import (
    dynamic_subset_centers,
    pool_regions,
    region_pixel_index,
    sample_region_pixels,
)

__all__ = ["ContrastOutput", "RegionContrastCriterion"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ContrastOutput(NamedTuple):
    """What :class:`RegionContrastCriterion` returns for a step."""

    loss: torch.Tensor  # the weighted contrastive loss (weight 0 during the warm-up)
    bank_rows: torch.Tensor  # (R, D) detached unit vectors to push after the step
    bank_classes: torch.Tensor  # (R,) their classes
    stats: Dict[str, torch.Tensor]  # detached: pos_cos, neg_cos, num_valid


def _event_storage():
    try:
        return get_event_storage()
    except AssertionError:  # called outside a trainer: no schedule, no logging
        return None


def check_region_contrast_cfg(rc, num_classes):
    """Rejects invalid ``MODEL.REGION_CONTRAST`` values, naming the key and the fix."""
    checks = [
        ("EXCLUDED_CLASSES", all(0 <= c < num_classes for c in rc.EXCLUDED_CLASSES),
         f"class ids in [0, MODEL.SEM_SEG_HEAD.NUM_CLASSES = {num_classes})"),
        ("TEMPERATURE", rc.TEMPERATURE > 0, "a number > 0 (the paper uses 0.1)"),
        ("LOSS_WEIGHT", rc.LOSS_WEIGHT >= 0, "a number >= 0"),
        ("MEMORY_SIZE", rc.MEMORY_SIZE >= 1, "an integer >= 1 (slots per class)"),
        ("PROJ_DIM", rc.PROJ_DIM >= 0, "an integer >= 0 (0 disables the projection head)"),
        ("MEMORY_DTYPE", rc.MEMORY_DTYPE in DTYPES, f"one of {sorted(DTYPES)}"),
        ("REGION_SOURCE", rc.REGION_SOURCE in ("gt", "pred"), "'gt' or 'pred'"),
        ("ANCHORS", rc.ANCHORS in ("region", "pixel"), "'region' or 'pixel'"),
        ("SAMPLES_PER_CLASS", rc.SAMPLES_PER_CLASS >= 0, "an integer >= 0 (0 uses all slots)"),
        ("PIXELS_PER_REGION", rc.PIXELS_PER_REGION >= 1, "an integer >= 1"),
        ("DYNAMIC_SAMPLES", rc.DYNAMIC_SAMPLES >= 0, "an integer >= 0 (0 turns it off)"),
        ("DYNAMIC_FRACTION", 0 < rc.DYNAMIC_FRACTION <= 1, "a fraction in (0, 1]"),
        ("WARMUP_ITERS", rc.WARMUP_ITERS >= 0, "an integer >= 0"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(
                f"MODEL.REGION_CONTRAST.{key} = {rc.get(key)!r} is invalid: expected {expected}. "
                "Fix it in the recipe or on the command line."
            )


def labels_at(targets: torch.Tensor, size) -> torch.Tensor:
    """The labels (N, H, W) nearest-downsampled to ``size`` (h, w), as F.interpolate does."""
    if tuple(targets.shape[-2:]) == tuple(size):
        return targets
    return F.interpolate(targets[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class RegionContrastCriterion(nn.Module):
    """
    Region-aware contrast against a per-class memory bank (Hu et al., ICCV 2021).

    ``forward(embedding, targets, logits)`` returns a :class:`ContrastOutput`;
    :meth:`update` then pushes its rows into the bank (after the step's loss is known to be
    finite) and logs its statistics.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        proj_dim: int = 256,
        memory_size: int = 1000,
        memory_dtype: torch.dtype = torch.float32,
        ignore_value: int = 255,
        temperature: float = 0.1,
        loss_weight: float = 0.1,
        warmup_iters: int = 0,
        region_source: str = "gt",
        samples_per_class: int = 0,
        anchors: str = "region",
        pixels_per_region: int = 16,
        dynamic_samples: int = 0,
        dynamic_fraction: float = 0.5,
        excluded_classes: Sequence[int] = (),
    ):
        """
        Args:
            num_classes, ignore_value: the data set's classes and the label of no class.
            embedding_dim: channels of the feature map the head's classifier reads.
            proj_dim: output width of the projection head; 0 contrasts the features directly.
            memory_size, memory_dtype: slots per class of the bank and their storage dtype.
            temperature, loss_weight: t and the weight of the contrastive loss.
            warmup_iters: iterations before the loss is weighted in (the bank still fills).
            region_source: "gt" or "pred" (argmax of ``logits`` on non-ignored pixels).
            samples_per_class: filled slots drawn per class for each step's loss (0 = all).
            anchors: "region" (the centres) or "pixel" (sampled pixel embeddings).
            pixels_per_region: pixel anchors per region, half of them hard when possible.
            dynamic_samples, dynamic_fraction: extra bank rows per region, each the mean of a
                random ``dynamic_fraction`` of its pixels.
            excluded_classes: class ids treated as ignored by the contrast (never an anchor,
                never in the bank); the head's own loss still sees them.
        """
        super().__init__()
        self.projector = build_projection_head(embedding_dim, proj_dim)
        self.memory_bank = RegionMemoryBank(
            num_classes, memory_size, proj_dim or embedding_dim, dtype=memory_dtype
        )
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.temperature = temperature
        self.loss_weight = loss_weight
        self.warmup_iters = warmup_iters
        self.region_source = region_source
        self.samples_per_class = samples_per_class
        self.anchors = anchors
        self.pixels_per_region = pixels_per_region
        self.dynamic_samples = dynamic_samples
        self.dynamic_fraction = dynamic_fraction
        bad = [c for c in excluded_classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"excluded_classes {bad} are not class ids in [0, {num_classes})")
        self.excluded_classes = tuple(int(c) for c in excluded_classes)

    @classmethod
    def from_config(cls, cfg, embedding_dim):
        rc = cfg.MODEL.REGION_CONTRAST
        check_region_contrast_cfg(rc, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "embedding_dim": embedding_dim,
            "proj_dim": rc.PROJ_DIM,
            "memory_size": rc.MEMORY_SIZE,
            "memory_dtype": DTYPES[rc.MEMORY_DTYPE],
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "temperature": rc.TEMPERATURE,
            "loss_weight": rc.LOSS_WEIGHT,
            "warmup_iters": rc.WARMUP_ITERS,
            "region_source": rc.REGION_SOURCE,
            "samples_per_class": rc.SAMPLES_PER_CLASS,
            "anchors": rc.ANCHORS,
            "pixels_per_region": rc.PIXELS_PER_REGION,
            "dynamic_samples": rc.DYNAMIC_SAMPLES,
            "dynamic_fraction": rc.DYNAMIC_FRACTION,
            "excluded_classes": list(rc.EXCLUDED_CLASSES),
        }

    def forward(
        self, embedding: torch.Tensor, targets: torch.Tensor, logits: Optional[torch.Tensor] = None
    ) -> ContrastOutput:
        """
        Args:
            embedding: (N, D, h, w) the feature map the classifier reads.
            targets: (N, H, W) ground truth (padding is ``ignore_value``), any resolution.
            logits: (N, K, h, w) the head's prediction at the embedding's resolution; needed
                for ``region_source="pred"`` and for the hard pixels of pixel anchors.
        """
        # The contrast runs in float32 whatever autocast does around it: dot products over
        # hundreds of dims divided by t = 0.1 overflow float16.
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            embedding = embedding.float()
            labels = labels_at(targets, embedding.shape[-2:])
            pred = None
            if self.region_source == "pred" or self.anchors == "pixel":
                if logits is None:
                    raise ValueError(
                        f"region_source={self.region_source!r} / anchors={self.anchors!r} need "
                        "the head's logits"
                    )
                pred = logits.detach().argmax(dim=1)  # the head's logits share its stride
            if self.region_source == "pred":  # predicted regions; ignored pixels stay ignored
                labels = torch.where(labels == self.ignore_value, labels, pred)
            if self.excluded_classes:
                excluded = torch.isin(labels, labels.new_tensor(self.excluded_classes))
                labels = labels.masked_fill(excluded, self.ignore_value)
            region_id, classes, _ = region_pixel_index(labels, self.num_classes, self.ignore_value)
            centers = project(self.projector, pool_regions(embedding, region_id, classes.numel()))
            if self.anchors == "pixel":
                anchors, anchor_classes = self._pixel_anchors(embedding, region_id, classes,
                                                              labels, pred)
            else:
                anchors, anchor_classes = centers, classes
            memory, memory_classes = self.memory_bank.sample(self.samples_per_class)
            loss, stats = region_contrast_loss(
                anchors, anchor_classes, memory, memory_classes, self.temperature,
                return_stats=True,
            )
            rows, row_classes = centers.detach(), classes
            if self.dynamic_samples > 0:
                with torch.no_grad():
                    extra, extra_classes, _ = dynamic_subset_centers(
                        embedding, labels, self.num_classes, self.dynamic_samples,
                        self.dynamic_fraction, self.ignore_value,
                    )
                    rows = torch.cat([rows, project(self.projector, extra)])
                    row_classes = torch.cat([row_classes, extra_classes])
        return ContrastOutput(loss * self._weight(), rows, row_classes, stats)

    def _weight(self) -> float:
        storage = _event_storage()
        if storage is not None and storage.iter < self.warmup_iters:
            # Weight 0 rather than no loss: every parameter stays in the graph for DDP.
            return 0.0
        return self.loss_weight

    def _pixel_anchors(self, embedding, region_id, classes, labels, pred):
        """Up to ``pixels_per_region`` pixel embeddings per region, half hard when possible."""
        index, pixel_region = sample_region_pixels(
            region_id, classes.numel(), self.pixels_per_region, hard_mask=(pred != labels)
        )
        flat = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        return project(self.projector, flat[index]), classes[pixel_region]

    @torch.no_grad()
    def update(self, output: ContrastOutput, *, accept: bool = True) -> None:
        """
        Pushes the step's rows into the bank (none when ``accept`` is False, e.g. after a loss
        that is not finite: every rank still joins the bank's all-gather) and logs the step's
        statistics.
        """
        rows, classes = output.bank_rows, output.bank_classes
        if not accept:
            rows, classes = rows[:0], classes[:0]
        self.memory_bank.push(rows, classes)
        storage = _event_storage()
        if storage is not None:
            # One read of the device for both values.
            pos_cos, neg_cos = torch.stack(
                [output.stats["pos_cos"], output.stats["neg_cos"]]).tolist()
            storage.put_scalars(
                region_contrast_bank_fill=self.memory_bank.fill_fraction(),
                region_contrast_pos_cos=pos_cos,
                region_contrast_neg_cos=neg_cos,
                smoothing_hint=False,
            )
