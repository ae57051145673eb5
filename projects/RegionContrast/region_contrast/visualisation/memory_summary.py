"""
What the memory bank has learned, as numbers: its entries from a checkpoint, the cosine similarity
of the class means, and a 2-D projection of the entries.

Pure tensor code (no config, no plotting; scikit-learn only for t-SNE, imported on demand), shared
by ``tools/visualize_memory.py`` and the training-time summary hook
(:mod:`region_contrast.engine.hooks`).
Nothing here draws random numbers from the global generators: PCA is an eigen-decomposition and
subsampling is evenly strided, so calling it during training leaves the run's numerics unchanged.
"""
from typing import Mapping, NamedTuple, Optional, Tuple

import torch
from torch.nn import functional as F

from ..modeling.memory_bank import RegionMemoryBank

__all__ = [
    "BANK_KEYS",
    "find_bank_prefix",
    "bank_from_state_dict",
    "class_means",
    "class_mean_cosine",
    "subsample_per_class",
    "Projection",
    "project_2d",
]

# The buffers of RegionMemoryBank, as they appear in a state dict after the module's prefix.
BANK_KEYS = ("features", "ptr", "count")
_BANK_SUFFIX = "memory_bank.features"


def find_bank_prefix(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """
    The key prefix of the memory bank's buffers (``"memory_bank."`` for a checkpoint written by
    ``train_net.py``; a DDP-wrapped model would add ``"module."``), or None without a bank.
    """
    for key in state_dict:
        if key == _BANK_SUFFIX or key.endswith("." + _BANK_SUFFIX):
            return key[: -len("features")]
    return None


def bank_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "the state dict"
) -> RegionMemoryBank:
    """
    Rebuilds the :class:`RegionMemoryBank` (on the CPU, in its storage dtype) from a model state
    dict, so that its own :meth:`~RegionMemoryBank.snapshot` says which slots are filled.

    Args:
        state_dict: a model state dict (a checkpoint's ``"model"`` entry).
        source: how to name the state dict in errors (e.g. the checkpoint's path).

    Raises:
        ValueError: without ``memory_bank.*`` buffers (a model trained without region contrast),
            or with buffers of inconsistent shapes.
    """
    prefix = find_bank_prefix(state_dict)
    if prefix is None:
        raise ValueError(
            f"{source} has no region memory bank (no 'memory_bank.features' entry): this "
            "checkpoint was trained with MODEL.REGION_CONTRAST.ENABLED False, or is not a "
            "RegionContrast checkpoint. Pass a checkpoint of a recipe with ENABLED True (e.g. "
            "output/<region_contrast recipe>/model_final.pth)."
        )
    missing = [prefix + k for k in BANK_KEYS if prefix + k not in state_dict]
    if missing:
        raise ValueError(f"{source}: the memory bank is incomplete, {missing} missing.")
    features = state_dict[prefix + "features"]
    if features.dim() != 3 or not features.dtype.is_floating_point:
        raise ValueError(
            f"{source}: '{prefix}features' has shape {tuple(features.shape)} and dtype "
            f"{features.dtype}; expected a floating point (num_classes, size, dim) tensor."
        )
    num_classes, size, dim = features.shape
    bank = RegionMemoryBank(num_classes, size, dim, dtype=features.dtype)
    # The bank's own loader checks the shapes of ptr/count against features and names the keys.
    bank.load_state_dict(
        {k: state_dict[prefix + k].detach().cpu() for k in BANK_KEYS}, strict=True
    )
    return bank


def _check_entries(features: torch.Tensor, classes: torch.Tensor, num_classes: int):
    if features.dim() != 2:
        raise ValueError(f"features must be (M, D), got shape {tuple(features.shape)}")
    classes = classes.reshape(-1)
    if classes.numel() != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {classes.numel()} classes given")
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(
            f"classes must lie in [0, {num_classes}), got values in "
            f"[{int(classes.min())}, {int(classes.max())}]"
        )
    return classes.long()


@torch.no_grad()
def class_means(features: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """
    The unit-length mean direction of each class: entries are L2-normalised (the contrast compares
    directions), averaged per class and normalised again.

    Returns:
        (num_classes, D) float64; the row of a class without entries is NaN.
    """
    classes = _check_entries(features, classes, num_classes)
    unit = F.normalize(features.double(), dim=1)
    sums = unit.new_zeros(num_classes, unit.shape[1]).index_add_(0, classes, unit)
    counts = torch.bincount(classes, minlength=num_classes)
    means = F.normalize(sums, dim=1)
    means[counts == 0] = float("nan")
    return means


@torch.no_grad()
def class_mean_cosine(
    features: torch.Tensor, classes: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """
    Cosine similarity between the class means of :func:`class_means`.

    Returns:
        (num_classes, num_classes) float64, symmetric, 1 on the diagonal of classes with entries;
        the row and column of a class without entries are NaN.
    """
    means = class_means(features, classes, num_classes)
    return means @ means.T


def subsample_per_class(classes: torch.Tensor, max_per_class: int) -> torch.Tensor:
    """
    Indices of at most ``max_per_class`` entries of each class, evenly spread over the class's
    entries in their order (deterministic: no random draw). ``max_per_class <= 0`` keeps all.

    Returns:
        (K,) long indices into ``classes``, ascending.
    """
    classes = classes.reshape(-1).long()
    n = classes.numel()
    if max_per_class <= 0 or n == 0:
        return torch.arange(n, device=classes.device)
    order = torch.sort(classes, stable=True).indices
    sorted_classes = classes[order]
    counts = torch.bincount(sorted_classes)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=classes.device) - first[sorted_classes]
    total = counts[sorted_classes]
    # Entry `rank` of a class of `total` is kept when it opens one of max_per_class equal
    # buckets; with total <= max_per_class every entry opens its own bucket.
    bucket = rank * max_per_class // total
    previous = (rank - 1) * max_per_class // total
    keep = (rank == 0) | (bucket != previous)
    return torch.sort(order[keep]).values


class Projection(NamedTuple):
    """A 2-D embedding of bank entries."""

    coords: torch.Tensor  # (M, 2) float64
    method: str  # "pca" or "tsne"
    explained: Optional[Tuple[float, float]]  # PCA: fraction of the variance on each axis


def _pca_2d(x: torch.Tensor) -> Projection:
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    # Eigen-decomposition of the D x D scatter matrix: deterministic (torch.pca_lowrank draws
    # random projections) and cheap for many entries, as it costs one M x D x D product.
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x)
    top = torch.argsort(eigenvalues, descending=True)[:2]
    components = eigenvectors[:, top]
    # Fix each axis's sign (eigenvectors are defined up to it): largest loading positive.
    signs = torch.sign(components.gather(0, components.abs().argmax(dim=0, keepdim=True)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    coords = x @ components
    if coords.shape[1] < 2:  # one-dimensional features: the second axis is zero
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 2 - coords.shape[1])], 1)
    total = float(eigenvalues.clamp(min=0).sum())
    kept = [float(v) / total if total > 0 else 0.0 for v in eigenvalues[top].clamp(min=0)]
    kept += [0.0] * (2 - len(kept))
    return Projection(coords, "pca", (kept[0], kept[1]))


def _tsne_2d(x: torch.Tensor, seed: int) -> Projection:
    try:
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise ImportError(
            "method 'tsne' needs scikit-learn, which is not importable here "
            f"({e}). Install it (`.venv/bin/pip install scikit-learn`) or use method 'pca'."
        ) from e
    m = x.shape[0]
    if m < 4:
        raise ValueError(f"t-SNE needs at least 4 entries, got {m}; use method 'pca'.")
    # scikit-learn requires perplexity < number of samples; 30 is its default.
    perplexity = min(30.0, (m - 1) / 3.0)
    # random_state gives t-SNE its own generator: the global ones are not touched.
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    coords = tsne.fit_transform(x.double().cpu().numpy())
    return Projection(torch.from_numpy(coords).double(), "tsne", None)


@torch.no_grad()
def project_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> Projection:
    """
    Projects (M, D) entries to 2-D after L2 normalisation (the geometry the contrast sees).

    Args:
        method: "pca" (deterministic, the default) or "tsne" (needs scikit-learn; ``seed`` is its
            ``random_state``).
    """
    if method not in ("pca", "tsne"):
        raise ValueError(f"method = {method!r} is invalid: expected 'pca' or 'tsne'.")
    if features.dim() != 2:
        raise ValueError(f"features must be (M, D), got shape {tuple(features.shape)}")
    x = F.normalize(features.double(), dim=1).cpu()
    if x.shape[0] == 0:
        return Projection(x.new_zeros(0, 2), method, (0.0, 0.0) if method == "pca" else None)
    if method == "tsne":
        return _tsne_2d(x, seed)
    return _pca_2d(x)
