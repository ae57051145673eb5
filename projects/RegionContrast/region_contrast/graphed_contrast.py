"""
The region contrast of a training step in fixed shapes, replayed as CUDA graphs.

On a GPU the contrast's cost is not arithmetic but the host's: a few hundred small operators,
each launched from Python, next to a network whose own launches already keep the host busy.
:class:`SlotContrast` computes the same loss (region centres, projection, loss against the bank)
with no host read and no data-dependent shape: every image has K slots (K rounded up to a power
of two, :func:`~region_contrast.regions.find_regions` with ``round_width``), the bank is read as
classes x slots with a mask of the filled ones (``RegionMemoryBank.padded_rows``), and padding
rows take no part in the loss. :class:`GraphedSlotContrast` captures its forward and backward
with ``torch.cuda.make_graphed_callables``, once per input shape, and then replays two graphs
per step instead of launching each operator.

The graphs read the bank and the projection head where they are, so the bank's pushes and the
optimizer's in-place updates are seen by the next replay. Nothing in them writes outside their
own memory: the bank is pushed by the caller, after the loss.
"""
import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .loss import plan_padded_contrast, region_contrast_loss
from .memory_bank import RegionMemoryBank
from .projection import project
from .regions import pool_slots

__all__ = ["SlotContrast", "GraphedSlotContrast"]

logger = logging.getLogger(__name__)


class SlotContrast(nn.Module):
    """
    Region-anchor contrast over fixed-shape slots: ``forward(embedding, slot, slot_classes)``
    returns (loss, (pos_cos, neg_cos), anchors), where

    - ``embedding`` (N, D, H, W) float32 are the features to pool (differentiable),
    - ``slot`` (N, H*W) long puts every pixel into one of its image's ``width`` slots, or
      ``width`` for none (``Regions.slot``),
    - ``slot_classes`` (N * width,) long is each slot's class (any class for an empty slot),
    - ``anchors`` (N * width, out_dim) are the slots' projected centres, detached, zero for
      empty slots: the rows the caller pushes into the bank are among them.

    The loss and statistics equal ``region_contrast_loss`` of the non-empty slots against
    ``bank.sample(samples_per_class)``.
    """

    def __init__(
        self,
        *,
        projector: Optional[nn.Module],
        bank: RegionMemoryBank,
        temperature: float,
        samples_per_class: int,
        width: int,
    ):
        """
        Args:
            projector: the projection head (its parameters are the module's), or None.
            bank: the memory bank, read (never written) by the forward.
            temperature, samples_per_class: as in the meta-architecture.
            width: K, slots per image.
        """
        super().__init__()
        self.projector = projector
        # Not a child: the bank's buffers are not this module's to move or to save.
        self.__dict__["bank"] = bank
        self.temperature = temperature
        self.samples_per_class = samples_per_class
        self.width = width

    def forward(self, embedding, slot, slot_classes):
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            sums, counts = pool_slots(embedding, slot, self.width)
            present = counts > 0
            centres = sums / counts.clamp(min=1).unsqueeze(1)
            # Empty slots are zero rows: they add nothing to the loss's sums of logits.
            anchors = project(self.projector, centres) * present.unsqueeze(1)
            memory, filled = self.bank.padded_rows(self.samples_per_class)
            plan = plan_padded_contrast(slot_classes, present, memory, filled)
            # Each row's class (for the loss's shape checks); no repeat_interleave, which reads
            # its output size back.
            memory_classes = torch.arange(filled.shape[0], device=memory.device).unsqueeze(1)
            loss, stats = region_contrast_loss(
                anchors, slot_classes, memory, memory_classes.expand_as(filled).reshape(-1),
                self.temperature, return_stats=True, plan=plan,
            )
        return loss, torch.stack([stats["pos_cos"], stats["neg_cos"]]), anchors.detach()


class GraphedSlotContrast:
    """
    :class:`SlotContrast` captured as CUDA graphs, one capture per (embedding shape, width):
    call it like ``SlotContrast.forward`` plus the width. On the CPU, or when gradients are
    off, it runs the module directly. Captures are dropped and redone when the projection head
    or the bank moves to new memory (``.to()``, a new optimizer's ``.cuda()``); past
    ``max_graphs`` distinct shapes (inputs whose size changes every step) it runs eagerly and
    says so once.
    """

    def __init__(
        self,
        *,
        projector: Optional[nn.Module],
        bank: RegionMemoryBank,
        temperature: float,
        samples_per_class: int,
        max_graphs: int = 16,
    ):
        self.projector = projector
        self.bank = bank
        self.temperature = temperature
        self.samples_per_class = samples_per_class
        self.max_graphs = max_graphs
        self._graphs: Dict[tuple, SlotContrast] = {}
        self._where: Optional[tuple] = None
        self._warned = False

    def _module(self, width):
        return SlotContrast(projector=self.projector, bank=self.bank,
                            temperature=self.temperature,
                            samples_per_class=self.samples_per_class, width=width)

    def _memory_signature(self):
        params = [] if self.projector is None else list(self.projector.parameters())
        return tuple((t.data_ptr(), t.requires_grad) for t in params) + (
            self.bank.features.data_ptr(), self.bank.count.data_ptr())

    def __call__(
        self, embedding: torch.Tensor, slot: torch.Tensor, slot_classes: torch.Tensor, width: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not (embedding.is_cuda and torch.is_grad_enabled() and embedding.requires_grad):
            return self._module(width)(embedding, slot, slot_classes)
        where = self._memory_signature()
        if where != self._where:
            self._graphs.clear()
            self._where = where
        key = (tuple(embedding.shape), embedding.dtype, tuple(slot.shape), width)
        graphed = self._graphs.get(key)
        if graphed is None:
            if len(self._graphs) >= self.max_graphs:
                if not self._warned:
                    logger.warning(
                        f"region contrast: more than {self.max_graphs} input shapes; shapes "
                        "beyond them run without CUDA graphs (a fixed INPUT.CROP gives one)")
                    self._warned = True
                return self._module(width)(embedding, slot, slot_classes)
            graphed = self._capture(width, embedding, slot, slot_classes)
            self._graphs[key] = graphed
        return graphed(embedding, slot, slot_classes)

    def _capture(self, width, embedding, slot, slot_classes):
        module = self._module(width)
        # Fresh leaves: the graphs' static inputs, into which every call copies its own.
        sample = (embedding.detach().clone().requires_grad_(True), slot.clone(),
                  slot_classes.clone())
        # The module runs in float32 anyway; autocast's weight cache cannot be captured.
        with torch.autocast(device_type="cuda", enabled=False):
            graphed = torch.cuda.make_graphed_callables(module, sample)
        logger.info(f"region contrast: captured CUDA graphs for {len(self._graphs) + 1} "
                    f"shape(s), now embedding {tuple(embedding.shape)} x {width} slots per image")
        return graphed

    def __getstate__(self):
        # Captured graphs cannot be copied or pickled; a copy captures its own when it runs.
        state = dict(self.__dict__)
        state.update(_graphs={}, _where=None)
        return state
