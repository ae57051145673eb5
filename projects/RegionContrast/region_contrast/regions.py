"""
Region pooling: one vector per (image, class) present in that image.

A *region* is the set of pixels of one class in one image (METHOD.md section 2). Everything here
is vectorised over images, classes and pixels: regions are found by one ``bincount`` over the flat
key ``image * num_classes + class`` (keys come out sorted, which gives the image-then-class row
order for free) and pooled by one batched matmul with the regions' indicators.

Finding the regions (:func:`find_regions`) needs the host to read region counts; pooling them
(:func:`pool_regions`) does not. On a GPU, a caller that finds the regions from the labels before
it queues the network's forward keeps the device busy: nothing after that waits for the GPU.

Pure tensor code: no config, no Detectron2, no I/O.
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "Regions",
    "find_regions",
    "invalid_label_error",
    "invalid_labels",
    "pool_regions",
    "pool_slots",
    "region_centers",
    "region_pixel_index",
    "sample_region_pixels",
    "dynamic_subset_centers",
]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums over thousands of pixels lose digits; float64 is kept so that
    # references and gradcheck can run at full precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_labels(features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be (N, D, H, W), got shape {tuple(features.shape)}")
    if labels.dim() != 3:
        raise ValueError(f"labels must be (N, H, W), got shape {tuple(labels.shape)}")
    n, _, h, w = features.shape
    if tuple(labels.shape) != (n, h, w):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match features {tuple(features.shape)}: labels "
            f"must be (N, H, W) at the feature resolution ({n}, {h}, {w}); nearest-downsample "
            "the ground truth to the feature map before pooling"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def region_pixel_index(
    labels: torch.Tensor, num_classes: int, ignore_value: int = 255
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Assigns every pixel to its region.

    Args:
        labels: (N, H, W) integer class ids; ``ignore_value`` marks pixels that belong to no region.
        num_classes: valid ids are ``[0, num_classes)``.

    Returns:
        region_id: (N*H*W,) long, index of the pixel's region in ``[0, R)``, -1 for ignored pixels;
            pixels are flattened in (n, h, w) order.
        classes: (R,) long, class of each region.
        image_index: (R,) long, image of each region. Regions are ordered by image, then class,
            the same rows as :func:`region_centers`.
    """
    regions = find_regions(labels, num_classes, ignore_value)
    return regions.region_id, regions.classes, regions.image_index


class Regions(NamedTuple):
    """The regions of a label map (:func:`find_regions`), ready to pool any feature map with."""

    classes: torch.Tensor  # (R,) class of each region
    image_index: torch.Tensor  # (R,) image of each region; rows ordered by image, then class
    first: torch.Tensor  # (N,) id of each image's first region
    width: int  # K, the most regions in one image
    rows: torch.Tensor  # (R,) row of each region among the (N * K) per-image slots
    shape: Tuple[int, int, int]  # (N, H, W) of the labels
    slot: torch.Tensor  # (N, H*W) position of each pixel's region among its image's, K if none
    size: torch.Tensor  # (R,) pixels of each region

    @property
    def region_id(self) -> torch.Tensor:
        """(N*H*W,) region of each pixel in (n, h, w) order, -1 if ignored (made on demand: only
        pixel anchors and dynamic samples need it)."""
        inside = self.slot < self.width
        return torch.where(inside, self.slot + self.first.unsqueeze(1), -1).view(-1)


def invalid_labels(labels: torch.Tensor, num_classes: int, ignore_value: int) -> torch.Tensor:
    """Where ``labels`` are neither a class in ``[0, num_classes)`` nor ``ignore_value``."""
    return (labels != ignore_value) & ((labels < 0) | (labels >= num_classes))


def invalid_label_error(labels, num_classes, ignore_value):
    """The ValueError for ``labels`` with :func:`invalid_labels`, naming the values."""
    flat = labels.reshape(-1).long()
    offending = torch.unique(flat[invalid_labels(flat, num_classes, ignore_value)])[:8].tolist()
    return ValueError(
        f"labels contain value(s) {offending} outside [0, {num_classes}) that are not the "
        f"ignore value {ignore_value}; check NUM_CLASSES and the dataset's label mapping"
    )


def find_regions(labels: torch.Tensor, num_classes: int, ignore_value: int = 255) -> Regions:
    """
    The regions of ``labels`` (N, H, W) and where each sits among its image's regions, for
    :func:`pool_regions`. All of region pooling's host synchronisation happens here: one read
    of a few counts.

    Every pixel falls into one of ``C + 3`` bins of its image (below range, the C classes, above
    range, ignored), so one ``bincount`` finds the regions, checks the labels and sizes the
    images at once; the regions are its non-empty class bins, in image-then-class order.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (N, H, W), got shape {tuple(labels.shape)}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    n, c = labels.shape[0], num_classes
    flat = labels.reshape(n, -1)
    if flat.dtype != torch.long:
        flat = flat.long()
    device = flat.device
    bins = c + 3
    value = torch.where(flat == ignore_value, c + 1, flat.clamp(-1, c))
    key = value + torch.arange(1, n * bins, bins, device=device).view(n, 1)
    counts = torch.bincount(key.view(-1), minlength=n * bins).view(n, bins)
    present = counts[:, 1 : c + 1] > 0
    per_image = present.sum(dim=1)
    # The one host read: regions per image and the count of out-of-range labels.
    *per_image, num_invalid = torch.cat([per_image, counts[:, 0::c + 1].sum().view(1)]).tolist()
    if num_invalid:
        raise invalid_label_error(labels, num_classes, ignore_value)
    k = max(per_image, default=0)
    first = [0] * n
    for i in range(1, n):
        first[i] = first[i - 1] + per_image[i - 1]
    rows = [i * k + j for i, m in enumerate(per_image) for j in range(m)]
    first = torch.tensor(first, dtype=torch.long, device=device)
    # Bin -> position among the image's regions (K for the other bins), and -> region id (-1).
    local = torch.cumsum(present, dim=1) - 1
    slot = torch.take(F.pad(local, (1, 2), value=k), key)
    # (image, class) of each region, in order; the count is known, so no second read back.
    index = torch.nonzero_static(present.view(-1), size=sum(per_image)).view(-1)
    image_index = torch.div(index, c, rounding_mode="floor")
    return Regions(
        index - image_index * c,
        image_index,
        first,
        k,
        torch.tensor(rows, dtype=torch.long, device=device),
        tuple(labels.shape),
        slot,
        counts[:, 1 : c + 1].reshape(-1)[index],
    )


def pool_regions(
    features: torch.Tensor, regions: Regions, key: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Mean feature (R, D) of every region; no host synchronisation.

    Args:
        features: (N, D, H, W) at the labels' resolution, any floating dtype; differentiable.
        regions: :func:`find_regions` of the labels.
        key: optional (N*H*W,) region of each pixel to pool instead of ``regions.region_id``
            (-1 leaves a pixel out), e.g. a random subset of each region's pixels.

    The sums are :func:`pool_slots` of the regions' slots.
    """
    if features.dim() != 4 or (features.shape[0], *features.shape[2:]) != regions.shape:
        raise ValueError(
            f"features {tuple(features.shape)} do not match the regions' labels "
            f"{regions.shape}: expected (N, D, H, W) with (N, H, W) = {regions.shape}"
        )
    k = regions.width
    if key is None:
        slot, size = regions.slot, regions.size
    else:
        key = key.view(features.shape[0], -1)
        # Region id -> position among its image's regions; left-out pixels go to column K.
        slot = torch.where(key >= 0, key - regions.first.unsqueeze(1), torch.full_like(key, k))
        size = None
    sums, counts = pool_slots(features, slot, k, with_counts=size is None)
    sums = sums[regions.rows]
    if size is None:
        size = counts[regions.rows].clamp(min=1)
    return sums / size.unsqueeze(1)


class _SlotSums(torch.autograd.Function):
    """
    Per-image sums (N, D, K) of the features (N, D, P) over each slot's pixels, in ``dtype``.
    Forwards, one batched matmul with the slots' 0/1 indicators (N, K, P); backwards, every
    pixel takes its slot's gradient, which is a gather. The matmul's own backward would contract
    over the K slots, an inner dimension of a few to a few hundred that runs far below matmul
    speed on the CPU (3x slower than the gather at 8 images x 7 slots).
    """

    @staticmethod
    def forward(ctx, flat, indicator, slot, dtype):
        ctx.save_for_backward(slot)
        ctx.in_dtype = flat.dtype
        # (D, P) @ (P, K): the features' own layout; the other way round copies them.
        if flat.dtype == dtype:
            return torch.bmm(flat, indicator.transpose(1, 2))
        return torch.bmm(flat, indicator.transpose(1, 2), out_dtype=dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        n, d, _ = grad.shape
        # Column K is the slot of no region: its pixels get 0.
        padded = F.pad(grad, (0, 1))
        grad_flat = torch.gather(padded, 2, slot.unsqueeze(1).expand(n, d, slot.shape[1]))
        return grad_flat.to(ctx.in_dtype), None, None, None


_HALF_BMM_TO_FLOAT: Dict[torch.device, bool] = {}


def _sums_in_half_inputs(features: torch.Tensor) -> bool:
    """
    Whether to pool half-precision CUDA features as they are, with float32 sums: products with
    0/1 indicators are exact and the tensor cores accumulate in float32, so the sums are those
    of the upcast features, from a matmul several times faster (float32 matmuls run without
    TF32 by default). Needs ``torch.bmm(..., out_dtype=)`` (recent PyTorch), probed once.
    """
    if not (features.is_cuda and features.dtype in (torch.float16, torch.bfloat16)):
        return False
    ok = _HALF_BMM_TO_FLOAT.get(features.device)
    if ok is None:
        probe = torch.zeros(1, 1, 1, dtype=features.dtype, device=features.device)
        try:
            ok = torch.bmm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _HALF_BMM_TO_FLOAT[features.device] = ok
    return ok


def pool_slots(
    features: torch.Tensor, slot: torch.Tensor, width: int, *, with_counts: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """
    Sums (N * K, D) and pixel counts (N * K,) of every image's K = ``width`` slots, in the
    accumulation dtype (float32, or float64 for float64 features); no host synchronisation.

    ``slot`` (N, H*W) holds each pixel's slot in [0, K], K for a pixel of none (such as
    :class:`Regions`' ``slot``). A slot holds pixels of its own image only, so each image's sums
    are one matmul with its slots' indicator rows, batched over images, and their gradient a
    gather (:class:`_SlotSums`). This reads the (N, D, H, W) layout as it is (no transposed copy
    of the features) and, unlike a scatter of every pixel row, runs at matmul speed.
    """
    n, d = features.shape[:2]
    dtype = _accumulation_dtype(features.dtype)
    if not _sums_in_half_inputs(features):
        features = features.to(dtype)
    flat = features.reshape(n, d, -1)
    # Column K collects the pixels of no slot; it is dropped.
    indicator = flat.new_zeros(n, width + 1, flat.shape[2]).scatter_(1, slot.unsqueeze(1), 1.0)
    indicator = indicator[:, :width]
    # Sums in the accumulation dtype, also under autocast (which would run bmm in half).
    with torch.autocast(device_type=flat.device.type, enabled=False):
        sums = _SlotSums.apply(flat, indicator, slot, dtype).transpose(1, 2).reshape(n * width, d)
    counts = indicator.sum(dim=2, dtype=dtype).reshape(n * width) if with_counts else None
    return sums, counts


def region_centers(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_value: int = 255
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Mean feature of every region (all pixels of one class in one image).

    Args:
        features: (N, D, H, W), any floating dtype; differentiable.
        labels: (N, H, W) integer, at the feature resolution (nearest-downsampled by the caller).
        num_classes: valid ids are ``[0, num_classes)``; ``ignore_value`` pixels never count.

    Returns:
        centers: (R, D) float32 (float64 for float64 input), one row per (image, class) present.
        classes: (R,) long.
        image_index: (R,) long. Rows are ordered by image, then class.
    """
    _check_labels(features, labels)
    regions = find_regions(labels, num_classes, ignore_value)
    return pool_regions(features, regions), regions.classes, regions.image_index


def _rank_in_sorted_groups(groups: torch.Tensor) -> torch.Tensor:
    """Position of each element within its run, for a sorted 1-D ``groups``."""
    if groups.numel() == 0:
        return groups.clone()
    first = torch.searchsorted(groups, groups, right=False)
    return torch.arange(groups.numel(), device=groups.device) - first


def _shuffle_then_group(
    candidates: torch.Tensor, region_id: torch.Tensor, generator: Optional[torch.Generator]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random order within regions: returns (pixels sorted by region, their regions, ranks)."""
    perm = torch.randperm(candidates.numel(), generator=generator, device=candidates.device)
    shuffled = candidates[perm]
    regions, order = torch.sort(region_id[shuffled], stable=True)
    return shuffled[order], regions, _rank_in_sorted_groups(regions)


def sample_region_pixels(
    region_id: torch.Tensor,
    num_regions: int,
    per_region: int,
    hard_mask: Optional[torch.Tensor] = None,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Draws up to ``per_region`` pixels from each region without replacement (METHOD.md section 5).

    ``per_region // 2`` of them are hard pixels (``hard_mask`` True, e.g. mis-classified) where
    the region has that many; the rest are drawn uniformly from the region's remaining pixels
    (hard or not). Each region gets ``min(per_region, region size)`` pixels.

    Args:
        region_id: (P,) long from :func:`region_pixel_index`, -1 for ignored pixels.
        num_regions: R, the number of regions.
        per_region: maximum pixels per region (>= 1).
        hard_mask: optional bool tensor with P elements (any shape).

    Returns:
        pixel_index: (K,) long indices into ``region_id`` (the flat pixels), grouped by region.
        pixel_region: (K,) long region of each sampled pixel.
    """
    if per_region < 1:
        raise ValueError(f"per_region must be >= 1, got {per_region}")
    region_id = region_id.reshape(-1)
    device = region_id.device
    candidates = torch.nonzero(region_id >= 0, as_tuple=True)[0]
    taken = torch.zeros(num_regions, dtype=torch.long, device=device)
    chosen = []
    if hard_mask is not None and per_region >= 2:
        hard_mask = hard_mask.reshape(-1).to(device=device, dtype=torch.bool)
        if hard_mask.numel() != region_id.numel():
            raise ValueError(
                f"hard_mask has {hard_mask.numel()} elements, region_id has {region_id.numel()}"
            )
        hard = candidates[hard_mask[candidates]]
        pixels, regions, rank = _shuffle_then_group(hard, region_id, generator)
        keep = rank < per_region // 2
        chosen.append(pixels[keep])
        taken += torch.bincount(regions[keep], minlength=num_regions)
        # Hard pixels not picked by the quota compete with the easy ones for the rest.
        is_chosen = torch.zeros(region_id.numel(), dtype=torch.bool, device=device)
        is_chosen[pixels[keep]] = True
        candidates = candidates[~is_chosen[candidates]]
    pixels, regions, rank = _shuffle_then_group(candidates, region_id, generator)
    chosen.append(pixels[rank < per_region - taken[regions]])
    pixel_index = torch.cat(chosen)
    # Group the result by region (pixel order inside a region is irrelevant but deterministic).
    pixel_region, order = torch.sort(region_id[pixel_index], stable=True)
    return pixel_index[order], pixel_region


def dynamic_subset_centers(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    samples: int,
    fraction: float,
    ignore_value: int = 255,
    *,
    generator: Optional[torch.Generator] = None,
    regions: Optional[Regions] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    "Dynamic sampling", this project's reading of the paper (METHOD.md section 6).

    For each region, ``samples`` extra vectors, each the mean of a random subset of the region's
    pixels: every pixel is kept independently with probability ``fraction``, and a subset that
    would be empty gets one uniformly random pixel of the region instead. ``fraction=1`` gives
    the region centre itself.

    Args:
        features, labels, num_classes, ignore_value: as in :func:`region_centers`.
        samples: number of subsets per region (>= 0).
        fraction: keep probability in (0, 1].
        regions: :func:`find_regions` of ``labels`` when the caller already has them.

    Returns:
        centers: (R * samples, D) float32; the ``samples`` rows of a region are consecutive.
        classes: (R * samples,) long.
        image_index: (R * samples,) long. Regions keep the order of :func:`region_centers`.
    """
    _check_labels(features, labels)
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if regions is None:
        regions = find_regions(labels, num_classes, ignore_value)
    region_id, classes, image_index = regions.region_id, regions.classes, regions.image_index
    num_regions = classes.numel()
    if samples == 0 or num_regions == 0:  # no region (e.g. an all-ignore batch): no subset
        empty = features.new_zeros(0, features.shape[1], dtype=_accumulation_dtype(features.dtype))
        return empty, classes[:0], image_index[:0]
    valid = region_id >= 0
    safe_region = region_id.clamp(min=0)
    pooled = []
    for _ in range(samples):  # `samples` is a small constant; pixels and regions stay vectorised
        u = torch.rand(region_id.shape, generator=generator, device=region_id.device)
        u = torch.where(valid, u, torch.full_like(u, 2.0))
        region_min = torch.full((num_regions,), 2.0, device=u.device)
        region_min = region_min.scatter_reduce(0, safe_region, u, reduce="amin")
        # The region's smallest draw is < fraction whenever any is, so this adds it only to
        # subsets that would otherwise be empty.
        keep = valid & ((u < fraction) | (u == region_min[safe_region]))
        key = torch.where(keep, region_id, torch.full_like(region_id, -1))
        pooled.append(pool_regions(features, regions, key))
    centers = torch.stack(pooled, dim=1).reshape(num_regions * samples, features.shape[1])
    return (
        centers,
        classes.repeat_interleave(samples),
        image_index.repeat_interleave(samples),
    )
