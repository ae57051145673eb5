"""
Region pooling: one vector per (image, class) present in that image (docs/method.md, section 2).

A *region* is the set of pixels of one class in one image. Each pixel gets the key
``image * num_classes + class``; the keys that occur, in ascending order, are the regions (so
rows come out ordered by image, then class), and a region's centre is the mean of its pixels'
features: one ``index_add`` and one ``bincount``, differentiated by autograd.

Pure tensor code: no config, no Detectron2, no I/O.
"""
from typing import Optional, Tuple

import torch

__all__ = [
    "check_labels",
    "region_pixel_index",
    "pool_regions",
    "region_centers",
    "sample_region_pixels",
    "dynamic_subset_centers",
]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums over thousands of pixels lose digits; float64 is kept so that
    # references and gradcheck can run at full precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_labels(labels: torch.Tensor, num_classes: int, ignore_value: int) -> None:
    """
    Raises ValueError, naming the values, if ``labels`` hold a value that is neither a class in
    ``[0, num_classes)`` nor ``ignore_value`` (cross entropy would fail on it, or on a GPU stop
    with a device-side assert that names nothing).
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = (labels != ignore_value) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:8].tolist()
        raise ValueError(
            f"labels contain {int(bad.sum())} pixel(s) with value(s) {values} outside "
            f"[0, {num_classes}) that are not the ignore value {ignore_value}; check "
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES and the data set's label mapping"
        )


def _check_shapes(features: torch.Tensor, labels: torch.Tensor) -> None:
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


def region_pixel_index(
    labels: torch.Tensor, num_classes: int, ignore_value: int = 255
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Assigns every pixel to its region.

    Args:
        labels: (N, H, W) integer class ids; ``ignore_value`` marks pixels of no region.
        num_classes: valid ids are ``[0, num_classes)``; other values raise ValueError.

    Returns:
        region_id: (N*H*W,) long, the pixel's region in ``[0, R)``, -1 for ignored pixels;
            pixels are flattened in (n, h, w) order.
        classes: (R,) long, class of each region.
        image_index: (R,) long, image of each region. Regions are ordered by image, then class,
            the rows of :func:`region_centers`.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (N, H, W), got shape {tuple(labels.shape)}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    check_labels(labels, num_classes, ignore_value)
    n, c = labels.shape[0], num_classes
    flat = labels.reshape(n, -1).long()
    valid = flat != ignore_value
    image = torch.arange(n, device=flat.device).unsqueeze(1)
    # Ignored pixels go to one extra key past the last region's, dropped below.
    key = torch.where(valid, image * c + flat, n * c).view(-1)
    present = torch.bincount(key, minlength=n * c + 1)[: n * c] > 0
    region_of_key = torch.cumsum(present, dim=0) - 1
    region_id = torch.where(valid.view(-1), region_of_key[key.clamp(max=n * c - 1)], -1)
    keys = torch.nonzero(present).view(-1)
    return region_id, keys % c, torch.div(keys, c, rounding_mode="floor")


def pool_regions(features: torch.Tensor, region_id: torch.Tensor, num_regions: int) -> torch.Tensor:
    """
    Mean feature (R, D) of every region, in float32 (float64 for float64 features).

    Args:
        features: (N, D, H, W), any floating dtype; differentiable.
        region_id: (N*H*W,) region of each pixel in (n, h, w) order, -1 for none
            (:func:`region_pixel_index`, or a subset of its pixels).
        num_regions: R. A region without pixels gets a zero row.
    """
    n, d = features.shape[:2]
    # (N, D, H*W) is the feature map's own layout: no transposed copy, forwards or backwards.
    flat = features.reshape(n, d, -1).to(_accumulation_dtype(features.dtype))
    if region_id.shape != (flat.shape[0] * flat.shape[2],):
        raise ValueError(
            f"region_id must have one entry per pixel ({flat.shape[0] * flat.shape[2]}), got "
            f"{tuple(region_id.shape)}"
        )
    # Pixels of no region are summed into one extra column, which is dropped. A region lies in
    # one image, so summing the images' columns adds only zeros to it.
    index = torch.where(region_id >= 0, region_id, num_regions).view(n, 1, -1)
    sums = flat.new_zeros(n, d, num_regions + 1).scatter_add(2, index.expand(n, d, -1), flat)
    sums = sums.sum(dim=0)[:, :num_regions].t()
    counts = torch.bincount(index.view(-1), minlength=num_regions + 1)[:num_regions]
    return sums / counts.clamp(min=1).unsqueeze(1).to(flat.dtype)


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
    _check_shapes(features, labels)
    region_id, classes, image_index = region_pixel_index(labels, num_classes, ignore_value)
    return pool_regions(features, region_id, classes.numel()), classes, image_index


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
    Draws up to ``per_region`` pixels from each region without replacement (docs/method.md,
    section 5).

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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    "Dynamic sampling", this project's reading of the paper (docs/method.md, section 6).

    For each region, ``samples`` extra vectors, each the mean of a random subset of the region's
    pixels: every pixel is kept independently with probability ``fraction``, and a subset that
    would be empty gets one uniformly random pixel of the region instead. ``fraction=1`` gives
    the region centre itself.

    Args:
        features, labels, num_classes, ignore_value: as in :func:`region_centers`.
        samples: number of subsets per region (>= 0).
        fraction: keep probability in (0, 1].

    Returns:
        centers: (R * samples, D) float32; the ``samples`` rows of a region are consecutive.
        classes: (R * samples,) long.
        image_index: (R * samples,) long. Regions keep the order of :func:`region_centers`.
    """
    _check_shapes(features, labels)
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    region_id, classes, image_index = region_pixel_index(labels, num_classes, ignore_value)
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
        pooled.append(pool_regions(features, torch.where(keep, region_id, -1), num_regions))
    centers = torch.stack(pooled, dim=1).reshape(num_regions * samples, features.shape[1])
    return (
        centers,
        classes.repeat_interleave(samples),
        image_index.repeat_interleave(samples),
    )
