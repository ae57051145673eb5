"""
``RegionContrastSegmentor``: Detectron2's ``SemanticSegmentor`` plus region contrast in training.

This is the only module that knows training from evaluation. Evaluation, and training with
``MODEL.REGION_CONTRAST.ENABLED: False``, run the parent's ``forward`` unchanged, except that
evaluation can be asked to slide a window over the image (``TEST.SLIDING_WINDOW``).
"""
import logging
import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .graphed_contrast import STATISTICS, GraphedRegionContrast, dense_fits
from .loss import ContrastPlan, plan_region_contrast, region_contrast_loss
from .memory_bank import RegionMemoryBank
from .projection import MAX_DOT, build_projection_head, project
from .regions import (
    Regions,
    dynamic_subset_centers,
    find_regions,
    invalid_label_error,
    invalid_labels,
    pool_regions,
    sample_region_pixels,
)
from .sliding_window import sliding_window_logits

__all__ = ["RegionContrastSegmentor"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _event_storage():
    try:
        return get_event_storage()
    except AssertionError:  # called outside a trainer: no schedule, no logging
        return None


class _Prepared(NamedTuple):
    """A step's regions and bank read, found before the contrast runs (:meth:`_prepare`)."""

    labels: torch.Tensor  # (N, h, w) at the embedding's resolution
    regions: Regions
    memory: torch.Tensor
    memory_classes: torch.Tensor
    plan: Optional[ContrastPlan]  # None for pixel anchors: their classes are drawn later


def _check_region_contrast_cfg(rc):
    """Rejects invalid ``MODEL.REGION_CONTRAST`` values, naming the key and the fix."""
    checks = [
        ("TEMPERATURE", rc.TEMPERATURE > 0, "a number > 0 (the paper uses 0.1)"),
        ("LOSS_WEIGHT", rc.LOSS_WEIGHT >= 0, "a number >= 0"),
        ("MEMORY_SIZE", rc.MEMORY_SIZE >= 1, "an integer >= 1 (slots per class)"),
        ("PROJ_DIM", rc.PROJ_DIM >= 0, "an integer >= 0 (0 disables the projection head)"),
        ("MEMORY_DTYPE", rc.MEMORY_DTYPE in _DTYPES, f"one of {sorted(_DTYPES)}"),
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


def _sliding_window_from_cfg(cfg, size_divisibility):
    """``(window, stride, batch_size)`` from ``TEST.SLIDING_WINDOW``, or None when disabled."""
    sw = cfg.TEST.SLIDING_WINDOW
    if not sw.ENABLED:
        return None

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
    return tuple(int(w) for w in window), tuple(int(s) for s in stride), int(sw.BATCH_SIZE)


@META_ARCH_REGISTRY.register()
class RegionContrastSegmentor(SemanticSegmentor):
    """
    Semantic segmentation with region-aware contrastive learning (Hu et al., ICCV 2021).

    In training, the head's penultimate feature map is pooled into one centre per (image, class),
    projected and L2-normalised; anchors (those centres, or sampled pixels) are contrasted with a
    per-class memory bank of centres from earlier iterations, and the batch's centres are then
    pushed into the bank.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        sem_seg_head,
        pixel_mean,
        pixel_std,
        num_classes: int,
        projector: Optional[nn.Module] = None,
        memory_bank: Optional[RegionMemoryBank] = None,
        temperature: float = 0.1,
        loss_weight: float = 0.1,
        region_source: str = "gt",
        samples_per_class: int = 0,
        anchors: str = "region",
        pixels_per_region: int = 16,
        dynamic_samples: int = 0,
        dynamic_fraction: float = 0.5,
        warmup_iters: int = 0,
        cuda_graphs: bool = False,
        window_size: Optional[Sequence[int]] = None,
        window_stride: Optional[Sequence[int]] = None,
        window_batch_size: int = 4,
    ):
        """
        Args:
            backbone, sem_seg_head, pixel_mean, pixel_std: as in ``SemanticSegmentor``; the head
                must have ``forward_features`` when the bank is given.
            num_classes: number of classes of the data set.
            projector: maps region centres / pixel embeddings to the contrast space; None
                contrasts the head's features directly.
            memory_bank: the per-class bank; None disables region contrast entirely.
            temperature, loss_weight: t and the weight of the contrastive loss.
            region_source: "gt" or "pred", the labels that define regions.
            samples_per_class: filled slots drawn per class for each step's loss (0 = all).
            anchors: "region" (region centres) or "pixel" (sampled pixel embeddings).
            pixels_per_region: pixel anchors per region, half of them hard when possible.
            dynamic_samples, dynamic_fraction: extra bank entries per region, each the mean of a
                random ``dynamic_fraction`` of its pixels.
            warmup_iters: iterations before the contrastive loss is added (the bank still fills).
            cuda_graphs: on CUDA, run the contrast of region anchors from ground-truth regions
                without dynamic samples as captured CUDA graphs (:mod:`.graphed_contrast`).
            window_size, window_stride: (height, width) of the windows of sliding-window
                evaluation and of the step between them; None evaluates the whole image.
            window_batch_size: windows per forward pass in sliding-window evaluation.
        """
        super().__init__(
            backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        # None leaves no trace in the state dict, so a disabled model is the baseline exactly.
        self.projector = projector
        self.memory_bank = memory_bank
        self.num_classes = num_classes
        self.temperature = temperature
        self.loss_weight = loss_weight
        self.region_source = region_source
        self.samples_per_class = samples_per_class
        self.anchors = anchors
        self.pixels_per_region = pixels_per_region
        self.dynamic_samples = dynamic_samples
        self.dynamic_fraction = dynamic_fraction
        self.warmup_iters = warmup_iters
        self.cuda_graphs = cuda_graphs
        # Not modules or buffers: the runner holds the projector and the bank, not new state.
        self._graphed = None if memory_bank is None else GraphedRegionContrast(
            projector=projector, bank=memory_bank, num_classes=num_classes,
            ignore_value=sem_seg_head.ignore_value, temperature=temperature,
            samples_per_class=samples_per_class,
        )
        self._pending_statistics = None
        if (window_size is None) != (window_stride is None):
            raise ValueError("window_size and window_stride are given together or not at all")
        self.window_size = None if window_size is None else tuple(window_size)
        self.window_stride = None if window_stride is None else tuple(window_stride)
        self.window_batch_size = window_batch_size

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        rc = cfg.MODEL.REGION_CONTRAST
        _check_region_contrast_cfg(rc)
        ret["num_classes"] = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        sliding = _sliding_window_from_cfg(cfg, ret["backbone"].size_divisibility)
        if sliding is not None:
            ret.update(window_size=sliding[0], window_stride=sliding[1],
                       window_batch_size=sliding[2])
        if not rc.ENABLED:
            return ret
        head = ret["sem_seg_head"]
        if not hasattr(head, "forward_features"):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NAME = {cfg.MODEL.SEM_SEG_HEAD.NAME!r} cannot expose its "
                "penultimate features (no forward_features). With MODEL.REGION_CONTRAST.ENABLED "
                "use RegionContrastDeepLabV3PlusHead or RegionContrastDeepLabV3Head."
            )
        in_dim = head.predictor.in_channels
        dim = rc.PROJ_DIM or in_dim
        bank = RegionMemoryBank(
            ret["num_classes"], rc.MEMORY_SIZE, dim, dtype=_DTYPES[rc.MEMORY_DTYPE]
        )
        logger.info(
            f"RegionContrast memory bank: {ret['num_classes']} classes x {rc.MEMORY_SIZE} slots x "
            f"{dim} dims in {rc.MEMORY_DTYPE} = {bank.nbytes / 2**20:.1f} MiB"
        )
        ret.update(
            projector=build_projection_head(in_dim, rc.PROJ_DIM),
            memory_bank=bank,
            temperature=rc.TEMPERATURE,
            loss_weight=rc.LOSS_WEIGHT,
            region_source=rc.REGION_SOURCE,
            samples_per_class=rc.SAMPLES_PER_CLASS,
            anchors=rc.ANCHORS,
            pixels_per_region=rc.PIXELS_PER_REGION,
            dynamic_samples=rc.DYNAMIC_SAMPLES,
            dynamic_fraction=rc.DYNAMIC_FRACTION,
            warmup_iters=rc.WARMUP_ITERS,
            cuda_graphs=rc.CUDA_GRAPHS,
        )
        return ret

    @property
    def contrast_enabled(self):
        return self.memory_bank is not None

    def forward(self, batched_inputs):
        if not self.training and self.window_size is not None:
            return self.sliding_window_inference(batched_inputs)
        if not (self.training and self.contrast_enabled):
            return super().forward(batched_inputs)

        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        # Padding is labelled ignore, never a class (the authors' release padded with 0).
        targets = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.sem_seg_head.ignore_value,
        ).tensor

        if self._runs_graphed(len(batched_inputs)):
            self._check_labels_and_log_previous_step(targets)
            features = self.backbone(images.tensor)
            logits, embedding = self.sem_seg_head.forward_features(features)
            return self._graphed_losses(embedding, logits, targets)

        # Every host read of device values that the contrast needs (region counts, the bank's
        # classes) happens here, before the network's forward is queued: on a GPU the contrast's
        # kernels then queue behind the network's instead of waiting for them.
        prepared = None
        stride = getattr(self.sem_seg_head, "embedding_stride", None)
        if self.region_source == "gt" and stride:
            height, width = images.tensor.shape[-2:]
            prepared = self._prepare(targets, (height // stride, width // stride))
        features = self.backbone(images.tensor)
        logits, embedding = self.sem_seg_head.forward_features(features)
        contrast_loss, bank_rows, bank_classes, stats = self._contrast(
            embedding, logits, targets, prepared
        )
        losses = self.sem_seg_head.losses(logits, targets)
        losses["loss_contrast"] = contrast_loss

        # One host read for the finiteness checks (the loss's and, for the bank, the rows') and
        # the logged statistics (each read waits for the GPU to finish everything queued before).
        bank = self.memory_bank
        device = stats["pos_cos"].device
        total, pos_cos, neg_cos, filled, rows_finite = torch.stack([
            sum(losses.values()).detach().float(), stats["pos_cos"].float(),
            stats["neg_cos"].float(), bank.count.sum().to(device).float(),
            torch.isfinite(bank_rows).all().to(device).float(),
        ]).tolist()
        self._log_statistics(pos_cos, neg_cos, filled)
        # Push after the loss, and nothing from a step whose loss is not finite: Detectron2
        # raises FloatingPointError right after, and the bank must stay clean. Every rank still
        # joins the bank's all-gather (with no rows) so that none of them hangs.
        if not math.isfinite(total):
            bank_rows, bank_classes = bank_rows[:0], bank_classes[:0]
        # Rows are unit vectors (finite in any storage dtype when finite here) and classes come
        # from validated labels, so the bank need not read them again; if a row is not finite,
        # the bank's own check names it.
        bank.push(bank_rows, bank_classes, checked=bool(rows_finite))
        return losses

    def _log_statistics(self, pos_cos, neg_cos, filled):
        storage = _event_storage()
        if storage is not None:
            storage.put_scalars(
                region_contrast_bank_fill=filled / self.memory_bank.num_slots,
                region_contrast_pos_cos=pos_cos,
                region_contrast_neg_cos=neg_cos,
                smoothing_hint=False,
            )

    def _graphed_losses(self, embedding, logits, targets):
        """
        The training losses with the contrast as CUDA graphs (:mod:`.graphed_contrast`). In a
        single process the graphs also push into the bank and nothing is read back: the step's
        statistics and label check are read at the start of the next step
        (:meth:`_check_labels_and_log_previous_step`), when the GPU is idle anyway. Under
        torch.distributed the push is a collective, after one read as in the eager path.
        """
        labels = self._labels_at(targets, embedding.shape[-2:])
        distributed = comm.get_world_size() > 1
        # The head's loss first: its check for a batch without labels reads a device value,
        # which then waits for the network's forward only, and the contrast's kernels run while
        # the host queues the backward.
        losses = self.sem_seg_head.losses(logits, targets)
        # The embedding goes in as autocast made it: the graph upcasts it while pooling, which
        # spares a full-size copy outside the graph.
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            loss, statistics, rows, present = self._graphed(
                embedding, labels, push=not distributed
            )
        losses["loss_contrast"] = self._weighted(loss)
        if not distributed:
            self._pending_statistics = statistics
            return losses
        total = sum(losses.values()).detach().float().view(1)
        *values, total = torch.cat([statistics, total]).tolist()
        values = dict(zip(STATISTICS, values))
        self._check_labels(values)
        self._log_statistics(values["pos_cos"], values["neg_cos"], values["filled"])
        classes = torch.arange(self.num_classes, device=rows.device).repeat(labels.shape[0])
        # As in the eager path: every rank joins the all-gather, with no rows after a loss that
        # is not finite.
        if not math.isfinite(total):
            present = torch.zeros_like(present)
        self.memory_bank.push(rows[present], classes[present])
        return losses

    def _check_labels_and_log_previous_step(self, targets):
        """
        One read before the forward: whether this batch's labels are all classes or ignored
        (the cross entropy's kernels would fail on others without saying which), and the
        last graphed step's statistics, which are logged now.
        """
        ignore = self.sem_seg_head.ignore_value
        invalid = invalid_labels(targets, self.num_classes, ignore).any()
        pending = self._pending_statistics
        self._pending_statistics = None
        if pending is None:
            if bool(invalid):
                raise invalid_label_error(targets, self.num_classes, ignore)
            return
        invalid, *values = torch.cat([invalid.view(1).to(pending), pending]).tolist()
        if invalid:
            raise invalid_label_error(targets, self.num_classes, ignore)
        values = dict(zip(STATISTICS, values))
        self._check_labels(values, previous=True)
        self._log_statistics(values["pos_cos"], values["neg_cos"], values["filled"])

    def _check_labels(self, values, previous=False):
        if values["num_invalid"]:
            which = "the previous training batch" if previous else "this training batch"
            raise ValueError(
                f"labels of {which} contain {int(values['num_invalid'])} pixel(s) with values "
                f"in [{int(values['invalid_min'])}, {int(values['invalid_max'])}] outside "
                f"[0, {self.num_classes}) that are not the ignore value "
                f"{self.sem_seg_head.ignore_value}; check NUM_CLASSES and the dataset's label "
                "mapping (nothing from that batch entered the memory bank)"
            )

    def sliding_window_inference(self, batched_inputs):
        """
        The parent's inference, each image evaluated in overlapping windows of ``window_size``
        (see :mod:`region_contrast.sliding_window`): the logits of the windows are averaged where
        they overlap, then cut and resized to the requested output size as the parent does.
        With a window the size of the image, this is the parent's result.
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

    def _project(self, x):
        return project(self.projector, x)

    def _runs_graphed(self, num_images):
        """Whether this step's contrast runs as CUDA graphs (the fixed-shape contrast)."""
        rows = self.memory_bank.sample_width(self.samples_per_class)
        return (self.cuda_graphs and self.device.type == "cuda" and torch.is_grad_enabled()
                and self.anchors == "region" and self.region_source == "gt"
                and self.dynamic_samples == 0
                and dense_fits(num_images, self.num_classes, self.num_classes * rows))

    @staticmethod
    def _labels_at(targets, size):
        """The labels nearest-downsampled to ``size``."""
        (height, width), (h, w) = targets.shape[-2:], size
        if height == h * (height // h) and width == w * (width // w):
            # What nearest interpolation picks at a whole-number stride, as a view.
            return targets[:, :: height // h, :: width // w]
        labels = F.interpolate(targets[:, None].float(), size=size, mode="nearest")[:, 0]
        return labels.long()

    def _prepare(self, targets, size, pred=None):
        """Labels at ``size``, their regions, the bank read for this step and the loss's plan."""
        ignore = self.sem_seg_head.ignore_value
        labels = self._labels_at(targets, size)
        if pred is not None:  # predicted regions; ignored pixels stay ignored
            labels = torch.where(labels == ignore, labels, pred)
        regions = find_regions(labels, self.num_classes, ignore)
        # No copy of the bank: the loss is done with it before the step's push.
        bank = self.memory_bank
        memory, memory_classes, uniform = bank.read(self.samples_per_class, copy=False)
        plan = None
        if self.anchors == "region":
            counts, bound = bank.class_counts(self.samples_per_class)
            plan = plan_region_contrast(regions.classes, memory, memory_classes,
                                        class_counts=counts, max_count=bound,
                                        rows_per_class=uniform)
        return _Prepared(labels, regions, memory, memory_classes, plan)

    def _contrast(self, embedding, logits, targets, prepared=None):
        """
        Returns (weighted contrastive loss, rows to push, their classes, the loss's statistics);
        reads no device value on the host when ``prepared`` fits the embedding.
        """
        ignore = self.sem_seg_head.ignore_value
        # The contrast runs in float32 whatever autocast does around it: dot products over
        # hundreds of dims divided by t = 0.1 overflow fp16.
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            embedding = embedding.float()
            # The prediction is needed only for predicted regions or hard pixel anchors.
            needs_pred = self.region_source == "pred" or self.anchors == "pixel"
            pred = logits.detach().argmax(dim=1) if needs_pred else None
            if prepared is None or prepared.labels.shape[-2:] != embedding.shape[-2:]:
                prepared = self._prepare(
                    targets, embedding.shape[-2:], pred if self.region_source == "pred" else None
                )
            labels, regions = prepared.labels, prepared.regions
            classes = regions.classes
            region_embeddings = self._project(pool_regions(embedding, regions))
            if self.anchors == "pixel":
                anchors, anchor_classes = self._pixel_anchors(embedding, regions, labels, pred)
            else:
                anchors, anchor_classes = region_embeddings, classes

            loss, stats = region_contrast_loss(
                anchors, anchor_classes, prepared.memory, prepared.memory_classes,
                self.temperature, return_stats=True, plan=prepared.plan, max_dot=MAX_DOT,
            )

            bank_rows, bank_classes = region_embeddings.detach(), classes
            if self.dynamic_samples > 0:
                with torch.no_grad():
                    extra, extra_classes, _ = dynamic_subset_centers(
                        embedding, labels, self.num_classes, self.dynamic_samples,
                        self.dynamic_fraction, ignore, regions=regions,
                    )
                    bank_rows = torch.cat([bank_rows, self._project(extra)])
                    bank_classes = torch.cat([bank_classes, extra_classes])

        return self._weighted(loss), bank_rows, bank_classes, stats

    def _weighted(self, loss):
        weight = self.loss_weight
        storage = _event_storage()
        if storage is not None and storage.iter < self.warmup_iters:
            # Weight 0 rather than skipping: every parameter stays in the graph for DDP.
            weight = 0.0
        return loss * weight

    def _pixel_anchors(self, embedding, regions, labels, pred):
        """Up to ``pixels_per_region`` pixel embeddings per region, half hard when possible."""
        hard = (pred != labels).flatten()
        index, pixel_region = sample_region_pixels(
            regions.region_id, regions.classes.numel(), self.pixels_per_region, hard_mask=hard
        )
        flat = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        return self._project(flat[index]), regions.classes[pixel_region]
