"""
The region contrast of a training step in fixed shapes, replayed as CUDA graphs.

On a GPU the contrast's cost is not arithmetic but the host's: a few hundred small operators,
each launched from Python, and reads of device values, each of which waits for the GPU and
then leaves it idle while the host catches up. :class:`DenseRegionContrast` computes the same
loss with neither: every image has one slot per class (empty slots are padding that takes no
part in the loss), the bank is read as classes x slots with a mask of the filled ones
(``RegionMemoryBank.padded_rows``), labels are checked on the device, and the bank push is a
masked write (``RegionMemoryBank.push_masked``) guarded on the device by the loss being finite
and the labels valid. What the host needs (statistics to log, whether the labels were valid)
comes back as one small tensor that the caller reads later, when the GPU is done anyway.

:class:`GraphedRegionContrast` captures its forward and backward with
``torch.cuda.make_graphed_callables``, once per input shape, and replays two graphs per step
instead of launching each operator. The graphs read the bank and the projection head where they
are, so the optimizer's in-place updates are seen by the next replay.
"""
import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .loss import plan_padded_contrast, region_contrast_loss
from .memory_bank import RegionMemoryBank
from .projection import MAX_DOT, project
from .regions import invalid_labels, pool_slots

__all__ = ["DenseRegionContrast", "GraphedRegionContrast", "STATISTICS", "dense_fits"]

logger = logging.getLogger(__name__)

# The entries of the statistics tensor that DenseRegionContrast returns.
STATISTICS = ("pos_cos", "neg_cos", "filled", "num_invalid", "invalid_min", "invalid_max",
              "pushed")


# The most (anchor slot, bank row) logits a step may pad to: the loss's one chunk. Every
# recipe's per-GPU batch fits (COCO-Stuff, 2 images x 171 slots x 17,100 rows: 5.8M); a
# 16-image batch of 171 classes does not, and its padding would cost more than it saves.
MAX_DENSE_LOGITS = 2**24


def dense_fits(num_images: int, num_classes: int, bank_rows: int) -> bool:
    """Whether :class:`DenseRegionContrast`'s padded logits stay within ``MAX_DENSE_LOGITS``."""
    return num_images * num_classes * bank_rows <= MAX_DENSE_LOGITS


class DenseRegionContrast(nn.Module):
    """
    Region-anchor contrast of ground-truth regions in fixed shapes:
    ``forward(embedding, labels)`` returns (loss, statistics, rows, present), where

    - ``embedding`` (N, D, H, W) are the features to pool (differentiable; half precision
      from autocast is pooled into float32 sums) and ``labels`` (N, H, W) long the labels at
      their resolution;
    - ``loss`` equals ``region_contrast_loss`` of the region centres against
      ``bank.sample(samples_per_class)``;
    - ``statistics`` (len(STATISTICS),) float32: mean positive and negative cosine, filled bank
      slots before the step's push, the count and range of labels that are neither a class
      nor ignored, and 1 if the rows were pushed;
    - ``rows`` (N * C, out_dim) are every (image, class) slot's projected centre, detached, and
      ``present`` (N * C,) says which slots are regions.

    With ``push``, the forward also pushes the regions' rows into the bank, unless the loss is
    not finite or a label is invalid (then the bank is left as it was). Without it the caller
    pushes ``rows[present]`` (with classes ``arange(C)`` per image), e.g. as a collective.
    """

    def __init__(
        self,
        *,
        projector: Optional[nn.Module],
        bank: RegionMemoryBank,
        num_classes: int,
        ignore_value: int,
        temperature: float,
        samples_per_class: int,
        push: bool,
    ):
        """
        Args:
            projector: the projection head (its parameters are the module's), or None.
            bank: the memory bank.
            num_classes, ignore_value: the labels' classes and the value of unlabelled pixels.
            temperature, samples_per_class: as in the meta-architecture.
            push: whether the forward pushes the regions into the bank.
        """
        super().__init__()
        self.projector = projector
        # Not a child: the bank's buffers are not this module's to move or to save.
        self.__dict__["bank"] = bank
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.temperature = temperature
        self.samples_per_class = samples_per_class
        self.push = push

    def forward(self, embedding, labels):
        c = self.num_classes
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            flat = labels.reshape(labels.shape[0], -1)
            invalid = invalid_labels(flat, c, self.ignore_value)
            # Slot C collects ignored and invalid pixels; it is dropped.
            slot = torch.where((flat == self.ignore_value) | invalid, c, flat)
            sums, counts = pool_slots(embedding, slot, c)
            present = counts > 0
            centres = sums / counts.clamp(min=1).unsqueeze(1)
            # Empty slots are zero rows: they add nothing to the loss's sums of logits.
            anchors = project(self.projector, centres) * present.unsqueeze(1)
            grid = torch.arange(c, device=flat.device)
            classes = grid.expand(flat.shape[0], c).reshape(-1)
            memory, filled = self.bank.padded_rows(self.samples_per_class)
            loss, stats = region_contrast_loss(
                anchors, classes, memory, grid.unsqueeze(1).expand_as(filled).reshape(-1),
                self.temperature, return_stats=True,
                plan=plan_padded_contrast(classes, present, memory, filled), max_dot=MAX_DOT,
            )
            rows = anchors.detach()
            num_invalid = invalid.sum()
            ok = torch.isfinite(loss.detach()) & (num_invalid == 0)
            filled = self.bank.count.sum().float()  # before the push, as the eager path logs it
            if self.push:
                self.bank.push_masked(rows, classes, present & ok)
            big = torch.iinfo(torch.long).max
            statistics = torch.stack([
                stats["pos_cos"], stats["neg_cos"], filled,
                num_invalid.float(), torch.where(invalid, flat, big).amin().float(),
                torch.where(invalid, flat, -big).amax().float(), (ok & self.push).float(),
            ])
        return loss, statistics, rows, present


class GraphedRegionContrast:
    """
    :class:`DenseRegionContrast` captured as CUDA graphs, one capture per input shape and
    dtype; call it like its ``forward``, plus ``push`` (the module's argument). On the CPU, or
    when gradients are off, it runs the module directly.
    Captures are dropped and redone when the projection head or the bank moves to new memory
    (``.to()``); past ``max_graphs`` distinct shapes (inputs whose size changes every step) it
    runs eagerly and says so once.
    """

    def __init__(self, *, max_graphs: int = 16, **module_args):
        """
        Args:
            max_graphs: captures kept at most.
            module_args: :class:`DenseRegionContrast`'s arguments but ``push``.
        """
        self.module_args = module_args
        self.max_graphs = max_graphs
        self._graphs: Dict[tuple, DenseRegionContrast] = {}
        self._where: Optional[tuple] = None
        self._warned = False

    @property
    def projector(self):
        return self.module_args["projector"]

    @property
    def bank(self):
        return self.module_args["bank"]

    def _memory_signature(self):
        params = [] if self.projector is None else list(self.projector.parameters())
        return tuple((t.data_ptr(), t.requires_grad) for t in params) + (
            self.bank.features.data_ptr(), self.bank.count.data_ptr(), self.bank.ptr.data_ptr())

    def _module(self, push):
        return DenseRegionContrast(push=push, **self.module_args)

    def __call__(
        self, embedding: torch.Tensor, labels: torch.Tensor, push: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if not (embedding.is_cuda and torch.is_grad_enabled() and embedding.requires_grad):
            return self._module(push)(embedding, labels)
        where = self._memory_signature()
        if where != self._where:
            self._graphs.clear()
            self._where = where
        key = (tuple(embedding.shape), embedding.dtype, tuple(labels.shape), labels.dtype, push)
        graphed = self._graphs.get(key)
        if graphed is None:
            if len(self._graphs) >= self.max_graphs:
                if not self._warned:
                    logger.warning(
                        f"region contrast: more than {self.max_graphs} input shapes; shapes "
                        "beyond them run without CUDA graphs (a fixed INPUT.CROP gives one)")
                    self._warned = True
                return self._module(push)(embedding, labels)
            graphed = self._capture(self._module(push), embedding, labels)
            self._graphs[key] = graphed
        return graphed(embedding, labels)

    def _capture(self, module, embedding, labels):
        # Fresh leaves: the graphs' static inputs, into which every call copies its own.
        sample = (embedding.detach().clone().requires_grad_(True), labels.clone())
        bank = self.bank
        # Capturing runs the forward a few times first, and each run pushes: put the bank back.
        saved = {k: v.clone() for k, v in bank.state_dict().items()}
        # The module runs in float32 anyway; autocast's weight cache cannot be captured.
        with torch.autocast(device_type="cuda", enabled=False):
            graphed = torch.cuda.make_graphed_callables(module, sample)
        with torch.no_grad():
            for name, value in saved.items():
                getattr(bank, name).copy_(value)
        logger.info(f"region contrast: captured CUDA graphs for embedding "
                    f"{tuple(embedding.shape)} ({len(self._graphs) + 1} shape(s) so far)")
        return graphed

    def __getstate__(self):
        # Captured graphs cannot be copied or pickled; a copy captures its own when it runs.
        state = dict(self.__dict__)
        state.update(_graphs={}, _where=None)
        return state
