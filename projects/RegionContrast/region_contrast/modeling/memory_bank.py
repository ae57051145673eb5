"""
Per-class FIFO memory of region embeddings (docs/method.md, section 3).

The state lives in persistent buffers, so checkpoints and resume carry it. Under
``torch.distributed`` every push is all-gathered first, so all ranks hold the same bank (DDP's
buffer broadcast from rank 0 is then harmless instead of overwriting the other ranks' rows).

Pure tensor code: no config, no Detectron2, no I/O.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["RegionMemoryBank"]


def _world_size() -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def _all_gather_rows(
    features: torch.Tensor, classes: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenates every rank's (ragged) rows in rank order."""
    world = dist.get_world_size()
    count = torch.tensor([features.shape[0]], dtype=torch.long, device=features.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts: List[int] = torch.cat(counts).tolist()
    longest = max(counts)
    if longest == 0:
        return features, classes
    # all_gather needs equal shapes: pad to the longest, trim after.
    padded = features.new_zeros(longest, features.shape[1])
    padded[: features.shape[0]] = features
    padded_classes = classes.new_zeros(longest)
    padded_classes[: classes.shape[0]] = classes
    gathered = [torch.empty_like(padded) for _ in range(world)]
    gathered_classes = [torch.empty_like(padded_classes) for _ in range(world)]
    dist.all_gather(gathered, padded)
    dist.all_gather(gathered_classes, padded_classes)
    return (
        torch.cat([g[:n] for g, n in zip(gathered, counts)]),
        torch.cat([g[:n] for g, n in zip(gathered_classes, counts)]),
    )


class RegionMemoryBank(nn.Module):
    """
    One ring of ``size`` slots per class, holding ``dim``-wide vectors in ``dtype``.

    Buffers: ``features`` (num_classes, size, dim), ``ptr`` (num_classes,) next slot to write,
    ``count`` (num_classes,) filled slots (capped at ``size``). Slots never written are never
    returned by :meth:`snapshot` or :meth:`sample`.
    """

    def __init__(self, num_classes: int, size: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("size", size), ("dim", dim)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        self.num_classes = int(num_classes)
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("features", torch.zeros(num_classes, size, dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the ``features`` buffer."""
        return self.num_classes * self.size * self.dim * self.features.element_size()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, size={self.size}, dim={self.dim}, "
            f"dtype={self.dtype}, memory={self.nbytes / 2**20:.1f} MiB"
        )

    @property
    def num_slots(self) -> int:
        return self.num_classes * self.size

    def fill_fraction(self) -> float:
        """Filled slots / all slots, in [0, 1]."""
        return float(self.count.sum()) / self.num_slots

    def _output_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def push(self, features: torch.Tensor, classes: torch.Tensor) -> None:
        """
        Stores detached copies of ``features`` (R, D) under ``classes`` (R,), oldest out first.

        Rows of one class are written in order, as if pushed one by one (with more than ``size``
        rows of a class only the last ``size`` remain). Under ``torch.distributed`` with world
        size > 1, this is a collective: every rank must call it, possibly with zero rows.

        Raises:
            ValueError: for a shape mismatch, a class outside ``[0, num_classes)`` or a row that
                is not finite (in the storage dtype); the bank is then left unchanged (on every
                rank, as the checks run after the all-gather).
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must be (R, {self.dim}), got shape {tuple(features.shape)}"
            )
        if classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise ValueError(f"classes must be an integer tensor, got {classes.dtype}")
        classes = classes.reshape(-1)
        if classes.numel() != features.shape[0]:
            raise ValueError(
                f"{features.shape[0]} feature rows but {classes.numel()} classes given"
            )
        device = self.features.device
        # Gathered in float32 (gloo lacks half-precision collectives); cast to storage below.
        features = features.detach().to(device=device, dtype=self._output_dtype())
        classes = classes.detach().to(device=device, dtype=torch.long)
        if _world_size() > 1:
            features, classes = _all_gather_rows(features, classes)
        if classes.numel() == 0:
            return
        stored = features.to(self.dtype)
        self._check(stored, classes)
        self._write(stored, classes)

    def _write(self, stored: torch.Tensor, classes: torch.Tensor) -> None:
        """The ring write: each class's rows in order after its write pointer."""
        size = self.size
        classes, order = torch.sort(classes, stable=True)
        stored = stored[order]
        per_class = torch.bincount(classes, minlength=self.num_classes)
        first = torch.cumsum(per_class, 0) - per_class
        rank = torch.arange(classes.numel(), device=classes.device) - first[classes]
        # Of more rows of a class than it has slots only the last `size` would survive.
        keep = rank >= per_class[classes] - size
        slot = (self.ptr[classes] + rank) % size
        self.features[classes[keep], slot[keep]] = stored[keep]
        self.ptr.add_(per_class).remainder_(size)
        self.count.add_(per_class).clamp_(max=size)

    def _check(self, stored: torch.Tensor, classes: torch.Tensor) -> None:
        n = classes.numel()
        bad_class = (classes < 0) | (classes >= self.num_classes)
        if bool(bad_class.any()):
            values = torch.unique(classes[bad_class])[:8].tolist()
            raise ValueError(
                f"{int(bad_class.sum())} of {n} rows have classes {values} outside "
                f"[0, {self.num_classes}); nothing was pushed"
            )
        finite = torch.isfinite(stored).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(
                f"{int((~finite).sum())} of {n} rows are not finite (NaN/inf, or beyond the "
                f"range of {self.dtype}); nothing was pushed"
            )

    def _filled(self) -> torch.Tensor:
        """(num_classes, size) bool: which slots hold a pushed row."""
        slots = torch.arange(self.size, device=self.count.device)
        return slots.unsqueeze(0) < self.count.unsqueeze(1)

    @torch.no_grad()
    def snapshot(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Returns:
            features: (M, D) float32 copies of all filled slots (float64 for a float64 bank),
                grouped by class.
            classes: (M,) long.
        """
        return self._rows(torch.nonzero(self._filled().view(-1)).view(-1))

    @torch.no_grad()
    def sample(
        self, per_class: int, *, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Up to ``per_class`` distinct random filled slots of each class (all of them if the class
        has fewer); ``per_class <= 0`` returns :meth:`snapshot`.

        Returns:
            features: (M, D) float32, grouped by class; classes: (M,) long.
        """
        if per_class <= 0 or per_class >= self.size:
            return self.snapshot()
        filled = self._filled()
        keys = torch.rand(self.num_classes, self.size, generator=generator, device=filled.device)
        # Unfilled slots get a key above every draw, so each class's draws come first.
        keys.masked_fill_(~filled, 2.0)
        drawn, slots = keys.topk(per_class, dim=1, largest=False)
        classes = torch.arange(self.num_classes, device=filled.device).unsqueeze(1)
        return self._rows((classes * self.size + slots)[drawn < 1.5])

    def _rows(self, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copies of the slots at flat ``index`` (class * size + slot), and their classes."""
        features = self.features.view(-1, self.dim).index_select(0, index)
        return features.to(self._output_dtype()), torch.div(index, self.size, rounding_mode="floor")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        expected = {
            "features": (self.num_classes, self.size, self.dim),
            "ptr": (self.num_classes,),
            "count": (self.num_classes,),
        }
        for name, shape in expected.items():
            key = prefix + name
            if key in state_dict and tuple(state_dict[key].shape) != shape:
                error_msgs.append(
                    f"region memory bank '{key}': checkpoint has shape "
                    f"{tuple(state_dict[key].shape)}, this model expects {shape} "
                    "(num_classes, size, dim); MODEL.REGION_CONTRAST.MEMORY_SIZE, PROJ_DIM and "
                    "the number of classes (NUM_CLASSES) must match the checkpoint"
                )
                return  # skip the default handler and its less helpful duplicate message
        present = [prefix + name in state_dict for name in expected]
        if any(present) and not all(present):
            # A partial bank (e.g. fvcore's Checkpointer drops a buffer whose shape differs, with
            # a warning) would pair fill counts with zero vectors: keep this bank empty instead.
            missing_keys.extend(prefix + n for n, p in zip(expected, present) if not p)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
