"""
Hooks on the memory bank: ``MemorySummaryHook`` (TensorBoard pictures while training runs) and
``BankAgreementCheck`` (in multi-process training, every rank ends with the same bank).

``MemorySummaryHook``: at every evaluation (the ``EvalHook``'s period) and at the last
iteration, the bank's class-mean cosine matrix and a 2-D PCA of its entries (the figures of
``tools/visualize_memory.py``) go into the ``EventStorage`` as images, which Detectron2's
``TensorboardXWriter`` writes to ``OUTPUT_DIR``. The hook only reads the bank: no gradient, no
mode switch, no draw from the global random generators (deterministic PCA and subsampling, and
the generators are restored anyway), so a run with it is numerically the run without it,
``--resume`` included.
"""
import hashlib
import logging
from typing import Iterable, Optional, Sequence

import torch

from detectron2.data import MetadataCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..modeling.head_contrast import find_region_contrast
from ..modeling.memory_bank import RegionMemoryBank
from .rng import preserved_rngs

__all__ = [
    "BankAgreementCheck",
    "MemorySummaryHook",
    "build_bank_agreement_check",
    "build_memory_summary_hook",
    "check_banks_agree",
    "tensors_digest",
]

logger = logging.getLogger(__name__)


class MemorySummaryHook(HookBase):
    """
    Puts ``region_contrast/memory_similarity`` and ``region_contrast/memory_projection`` (CHW
    float images in [0, 1]) into the trainer's storage after every ``period``-th iteration and
    after the last one. Register it before the ``PeriodicWriter``, which then writes them in the
    same iteration.
    """

    def __init__(
        self,
        period: int,
        bank: RegionMemoryBank,
        class_names: Optional[Sequence[str]] = None,
        stuff_colors: Optional[Sequence] = None,
        max_per_class: int = 200,
    ):
        """
        Args:
            period: iterations between summaries (the evaluation period); must be > 0.
            bank: the model's memory bank (read, never written); kept as ``self.bank``.
            class_names, stuff_colors: the data set's metadata; None numbers the classes.
            max_per_class: entries per class in the projection (keeps the plot cheap).
        """
        if int(period) != period or period < 1:
            raise ValueError(f"period must be a positive integer, got {period!r}")
        self._period = int(period)
        self.bank = bank
        self._class_names = list(class_names) if class_names is not None else None
        if self._class_names is not None and len(self._class_names) != bank.num_classes:
            # Say it at start-up, not at the first evaluation hours later; numbers still work.
            logger.warning(
                "MemorySummaryHook: %d class names for a bank of %d classes; classes are "
                "numbered instead.", len(self._class_names), bank.num_classes,
            )
            self._class_names, stuff_colors = None, None
        self._stuff_colors = stuff_colors
        self._max_per_class = max_per_class

    def _due(self) -> bool:
        next_iter = self.trainer.iter + 1
        return next_iter % self._period == 0 or next_iter == self.trainer.max_iter

    def after_step(self):
        if self._due():
            self.write_summary()

    def write_summary(self):
        """Puts the two images into the storage now (does nothing while the bank is empty)."""
        # matplotlib only once it is needed
        from ..visualisation.memory_plots import memory_summary_images

        storage = self.trainer.storage
        try:
            with torch.no_grad(), preserved_rngs():
                features, classes = self.bank.snapshot()
                if classes.numel() == 0:
                    logger.info("MemorySummaryHook: the memory bank is still empty; no summary.")
                    return
                images = memory_summary_images(
                    features.cpu(), classes.cpu(), self.bank.num_classes,
                    class_names=self._class_names, stuff_colors=self._stuff_colors,
                    method="pca", max_per_class=self._max_per_class,
                    title=f"memory bank at iteration {self.trainer.iter + 1}",
                )
        except Exception:
            # A picture is not worth a long run: log it and train on.
            logger.exception("MemorySummaryHook: the memory bank summary failed; skipped.")
            return
        for name, image in images.items():
            chw = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
            storage.put_image(f"region_contrast/{name}", chw)


def build_memory_summary_hook(cfg, model) -> Optional[MemorySummaryHook]:
    """
    The hook for a trainer, or None when there is nothing to do: no memory bank
    (``MODEL.REGION_CONTRAST.ENABLED: False``), no periodic evaluation (``TEST.EVAL_PERIOD``
    <= 0), or not the main process (every rank holds the same, all-gathered bank).
    """
    criterion = find_region_contrast(model)
    bank = None if criterion is None else criterion.memory_bank
    if bank is None or cfg.TEST.EVAL_PERIOD <= 0 or not comm.is_main_process():
        return None
    names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
    metadata = MetadataCatalog.get(names[0]) if names else None
    return MemorySummaryHook(
        cfg.TEST.EVAL_PERIOD,
        bank,
        class_names=metadata.get("stuff_classes", None) if metadata is not None else None,
        stuff_colors=metadata.get("stuff_colors", None) if metadata is not None else None,
    )


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes, in order: equal when bitwise equal."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_banks_agree(bank: RegionMemoryBank) -> str:
    """
    A collective: compares ``bank`` across all ranks by a digest of its buffers. Returns the
    digest when every rank holds the same bank bitwise; raises RuntimeError naming the ranks
    that differ (on every rank) otherwise.
    """
    digest = tensors_digest([bank.features, bank.ptr, bank.count])
    digests = comm.all_gather(digest)
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(
            f"RegionContrast: the memory bank of rank(s) {differ} differs from rank 0's "
            f"({len(digests)} processes; digests {digests}). Every rank should hold the same "
            "all-gathered bank; a checkpoint has rank 0's."
        )
    return digest


class BankAgreementCheck(HookBase):
    """
    After a completed multi-process run, :func:`check_banks_agree`: the bank is built from
    all-gathered rows, so every rank must hold the same one, and the checkpoint (written by
    rank 0) stands for all of them. Logs the digest.
    """

    def __init__(self, bank: RegionMemoryBank):
        self.bank = bank

    def after_train(self):
        # TrainerBase leaves iter == max_iter only after the last step: after an exception the
        # other ranks may be inside another collective, and this one must not start.
        if self.trainer.iter != self.trainer.max_iter:
            return
        digest = check_banks_agree(self.bank)
        logger.info(
            f"RegionContrast: the memory bank is identical on all {comm.get_world_size()} ranks "
            f"(sha256 {digest})."
        )


def build_bank_agreement_check(model) -> Optional[BankAgreementCheck]:
    """The check for a multi-process run with a memory bank; None otherwise."""
    criterion = find_region_contrast(model)
    if criterion is None or comm.get_world_size() == 1:
        return None
    return BankAgreementCheck(criterion.memory_bank)
