"""
Per-class FIFO memory of region embeddings (METHOD.md section 3).

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
    def push(
        self, features: torch.Tensor, classes: torch.Tensor, *, checked: bool = False
    ) -> None:
        """
        Stores detached copies of ``features`` (R, D) under ``classes`` (R,), oldest out first.

        Rows of one class are written in order, as if pushed one by one (with more than ``size``
        rows of a class only the last ``size`` remain). Under ``torch.distributed`` with world
        size > 1, this is a collective: every rank must call it, possibly with zero rows.

        ``checked=True`` says the caller has already read that every row is finite in the
        storage dtype and every class in range, and skips that check and its read of device
        values. Under ``torch.distributed`` the gathered rows are checked regardless, so that
        every rank reaches the same decision.

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
            checked = False
        self._write(features, classes, checked)

    def _write(self, features: torch.Tensor, classes: torch.Tensor, checked: bool = False) -> None:
        n = classes.numel()
        if n == 0:
            return
        stored = features.to(self.dtype)
        if not checked:
            self._check(stored, classes)
        self._write_masked(stored, classes)

    @torch.no_grad()
    def push_masked(
        self, features: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """
        :meth:`push` of the rows where ``mask`` (R,) is True, in fixed shapes and without
        reading device values on the host (what a CUDA graph can capture). The rows are not
        checked: the caller masks out rows that are not finite or have classes outside
        ``[0, num_classes)`` (their classes are never used). Not a collective: under
        ``torch.distributed`` use :meth:`push`.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (R, {self.dim}), got shape {tuple(features.shape)}")
        if classes.shape != features.shape[:1] or mask.shape != features.shape[:1]:
            raise ValueError(
                f"classes {tuple(classes.shape)} and mask {tuple(mask.shape)} must be "
                f"({features.shape[0]},) for {features.shape[0]} rows"
            )
        if features.shape[0] == 0:
            return
        stored = features.detach().to(device=self.features.device, dtype=self.dtype)
        classes = classes.to(device=stored.device, dtype=torch.long)
        self._write_masked(stored, classes, mask.to(device=stored.device, dtype=torch.bool))

    def _write_masked(
        self, stored: torch.Tensor, classes: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> None:
        """
        The ring write of :meth:`push` and :meth:`push_masked`: rows (R, D) in the storage
        dtype, classes (R,) long and an optional mask (R,) of the rows to write, on the bank's
        device. No host read and no data-dependent shape.
        """
        n, size, num_classes = classes.numel(), self.size, self.num_classes
        # Masked-out rows go to a virtual class past the last, which nothing reads.
        key = classes if mask is None else torch.where(mask, classes, num_classes)
        key, order = torch.sort(key, stable=True)
        per_class = torch.zeros(num_classes + 1, dtype=torch.long, device=key.device)
        per_class.scatter_add_(0, key, torch.ones_like(key))
        first = torch.cumsum(per_class, 0) - per_class
        rank = torch.arange(n, device=key.device) - first[key]  # position within its class
        flat = self.features.view(-1, self.dim)
        values = stored[order]
        if mask is None and n <= size:
            # The usual push: no class gets more rows than it has slots, every row is written
            # to a slot of its own.
            target = key * size + (rank + self.ptr[key]) % size
        else:
            real = key < num_classes
            cls = key.clamp(max=num_classes - 1)
            # As in push: rows of one class in order, only the last `size` of them survive.
            keep = real & (rank >= per_class[key] - size)
            target = cls * size + (rank + self.ptr[cls]) % size
            # Rows not kept write what a kept row writes (or slot 0 its own value when none
            # is kept): duplicate indices then carry equal values, so the result is
            # deterministic. (index_select with a one-element index: indexing with a 0-d
            # tensor reads it back.)
            anchor = torch.argmax(keep.to(torch.uint8)).view(1)
            any_kept = keep.index_select(0, anchor)
            fallback_target = torch.where(any_kept, target.index_select(0, anchor), 0)
            fallback_value = torch.where(any_kept.unsqueeze(1), values.index_select(0, anchor),
                                         flat[:1])
            target = torch.where(keep, target, fallback_target)
            values = torch.where(keep.unsqueeze(1), values, fallback_value)
        flat.index_copy_(0, target, values)
        self.ptr.add_(per_class[:num_classes]).remainder_(size)
        self.count.add_(per_class[:num_classes]).clamp_(max=size)

    def _check(self, stored: torch.Tensor, classes: torch.Tensor) -> None:
        # One host read for both checks; the details are worked out only when one fails.
        n = classes.numel()
        finite, low, high = torch.stack(
            [torch.isfinite(stored).all(), *torch.aminmax(classes)]
        ).tolist()
        if low < 0 or high >= self.num_classes:
            bad_class = (classes < 0) | (classes >= self.num_classes)
            values = torch.unique(classes[bad_class])[:8].tolist()
            raise ValueError(
                f"{int(bad_class.sum())} of {n} rows have classes {values} outside "
                f"[0, {self.num_classes}); nothing was pushed"
            )
        if not finite:
            num_non_finite = int((~torch.isfinite(stored).all(dim=1)).sum())
            raise ValueError(
                f"{num_non_finite} of {n} rows are not finite (NaN/inf, or beyond the range of "
                f"{self.dtype}); nothing was pushed"
            )

    def sample_width(self, per_class: int = 0) -> int:
        """Slots per class that ``sample(per_class)`` draws from: ``per_class``, or all of them."""
        return per_class if 0 < per_class < self.size else self.size

    def class_counts(self, per_class: int = 0) -> Tuple[torch.Tensor, int]:
        """
        (num_classes,) rows of each class that ``sample(per_class)`` returns, on the device, and
        a bound on them known on the host (:meth:`sample_width`).
        """
        width = self.sample_width(per_class)
        return (self.count if width == self.size else self.count.clamp(max=width)), width

    def _filled(self) -> torch.Tensor:
        slots = torch.arange(self.size, device=self.count.device)
        return slots.unsqueeze(0) < self.count.unsqueeze(1)

    def _class_grid(self) -> torch.Tensor:
        return torch.arange(self.num_classes, device=self.count.device).unsqueeze(1)

    @torch.no_grad()
    def snapshot(self, *, copy: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            copy: False may return a view of the buffer (a full float32/float64 bank), which
                the next :meth:`push` overwrites: for a caller that is done with it by then,
                such as the loss, whose backward keeps nothing of the memory. Copying a large
                bank costs more than the loss itself on a CPU.

        Returns:
            features: (M, D) float32 copies of all filled slots (float64 for a float64 bank),
                grouped by class.
            classes: (M,) long.
        """
        return self.read(0, copy=copy)[:2]

    @torch.no_grad()
    def sample(
        self, per_class: int, *, generator: Optional[torch.Generator] = None, copy: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Up to ``per_class`` distinct random filled slots of each class (all of them if the class
        has fewer); ``per_class <= 0`` returns :meth:`snapshot` (``copy`` as there).

        Returns:
            features: (M, D) float32, grouped by class; classes: (M,) long.
        """
        return self.read(per_class, generator=generator, copy=copy)[:2]

    @torch.no_grad()
    def read(
        self, per_class: int = 0, *, generator: Optional[torch.Generator] = None,
        copy: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        """
        :meth:`sample` (``per_class <= 0``: :meth:`snapshot`), and the number of rows that
        every class gives when it is the same for all (a full bank, the steady state), else
        None; with one host read, whether the bank is that full.
        """
        width = self.sample_width(per_class)
        flat = self.features.view(-1, self.dim)
        uniform = bool((self.count >= width).all())
        if width == self.size:
            if uniform:  # every slot filled
                index = torch.arange(flat.shape[0], device=flat.device)
                features = flat.to(self._output_dtype(), copy=copy)
            else:
                # Filled slots are a prefix of each ring; index_select is much faster than a
                # boolean mask over the (C, size, D) buffer.
                index = torch.nonzero(self._filled().view(-1), as_tuple=True)[0]
                features = flat.index_select(0, index).to(self._output_dtype())
            classes = torch.div(index, self.size, rounding_mode="floor")
            return features, classes, width if uniform else None
        rows, ok = self.padded_rows(per_class, generator=generator)
        classes = self._class_grid().expand(-1, per_class).reshape(-1)
        if uniform:  # every drawn slot is filled
            return rows, classes, width
        ok = ok.view(-1)
        return rows[ok], classes[ok], None

    @torch.no_grad()
    def padded_rows(
        self, per_class: int = 0, *, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        :meth:`sample` in fixed shapes and without reading device values on the host (what a
        CUDA graph can capture): S slots of every class whether filled or not, S the slots per
        class (``per_class <= 0``) or ``per_class`` slots drawn as :meth:`sample` draws them.

        Returns:
            features: (num_classes * S, D) float32 (float64 for a float64 bank), grouped by
                class; a float32 (float64) bank with ``per_class <= 0`` gives a view of the
                buffer, which the next :meth:`push` overwrites.
            filled: (num_classes, S) bool, which rows are filled slots; each class's filled rows
                come first. :meth:`sample` returns exactly the filled rows.
        """
        filled = self._filled()
        if self.sample_width(per_class) == self.size:
            return self.features.view(-1, self.dim).to(self._output_dtype()), filled
        keys = torch.rand(
            self.num_classes, self.size, generator=generator, device=self.features.device
        )
        keys.masked_fill_(~filled, 2.0)
        # Ascending: the drawn filled slots come first, unfilled ones (key 2) last.
        top, slots = keys.topk(per_class, dim=1, largest=False)
        index = (self._class_grid() * self.size + slots).view(-1)
        rows = self.features.view(-1, self.dim).index_select(0, index)
        return rows.to(self._output_dtype()), top < 1.5  # a real draw is in [0, 1)

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
