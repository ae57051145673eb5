"""
Figures of the memory bank (from :mod:`region_contrast.visualisation.memory_summary`), rendered
to RGB arrays.

Used by ``tools/visualize_memory.py`` (PNG files) and by the training-time summary hook
(TensorBoard images), so both show the same thing. Figures are drawn on matplotlib's Agg canvas
directly, without pyplot: no global figure state, no GUI backend, whatever backend the caller's
process has selected, and the pixel size is always ``FIGURE_SIZE * DPI``.
"""
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .memory_summary import class_mean_cosine, project_2d, subsample_per_class

__all__ = [
    "FIGURE_SIZE",
    "DPI",
    "FIGURE_PIXELS",
    "default_class_names",
    "class_colors",
    "projection_figure",
    "similarity_figure",
    "render",
    "memory_summary_images",
]

FIGURE_SIZE = (8.0, 6.0)  # inches
DPI = 100
FIGURE_PIXELS = (int(FIGURE_SIZE[1] * DPI), int(FIGURE_SIZE[0] * DPI))  # (height, width)
# Past these many classes, legends, in-plot labels and per-cell values would be unreadable.
_MAX_LEGEND_CLASSES = 30
_MAX_TICK_LABELS = 40
_MAX_ANNOTATED_CELLS = 15


def default_class_names(num_classes: int) -> list:
    """``class 0`` ... for a bank whose data set metadata is not at hand."""
    return [f"class {i}" for i in range(num_classes)]


def class_colors(num_classes: int, stuff_colors: Optional[Sequence] = None) -> np.ndarray:
    """
    (num_classes, 3) RGB in [0, 1]: the data set's ``stuff_colors`` (0-255, as in Detectron2's
    metadata, so the plots match the demo's overlays) when it has one per class, else a
    qualitative colour map.
    """
    if stuff_colors is not None and len(stuff_colors) >= num_classes:
        return np.asarray(stuff_colors[:num_classes], dtype=np.float64).reshape(-1, 3) / 255.0
    from matplotlib import colormaps

    if num_classes <= 20:
        cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
        return np.asarray([cmap(i)[:3] for i in range(num_classes)])
    cmap = colormaps["turbo"]
    return np.asarray([cmap(x)[:3] for x in np.linspace(0.0, 1.0, num_classes)])


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_SIZE, dpi=DPI, constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def render(fig) -> np.ndarray:
    """The figure's pixels: (H, W, 3) uint8 RGB, H x W = ``FIGURE_PIXELS``."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def projection_figure(projection, classes: torch.Tensor, class_names, colors, title=""):
    """Scatter plot of a :class:`~.memory_summary.Projection`, one colour per class."""
    fig = _new_figure()
    ax = fig.add_subplot()
    coords = projection.coords.cpu().numpy()
    classes = classes.reshape(-1).cpu().numpy()
    num_classes = len(class_names)
    present = np.unique(classes).tolist()
    size = 14 if coords.shape[0] <= 2000 else 5
    labelled = len(present) <= _MAX_LEGEND_CLASSES
    for c in present:
        points = coords[classes == c]
        ax.scatter(points[:, 0], points[:, 1], s=size, color=colors[c], alpha=0.7,
                   linewidths=0, label=f"{class_names[c]} ({len(points)})")
        if labelled:
            # The class name at the centre of its points reads faster than the legend.
            cx, cy = points.mean(axis=0)
            # Just above it, so that a class of one entry still shows its point.
            ax.annotate(class_names[c], (cx, cy), xytext=(0, 9), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9, weight="bold",
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=colors[c], alpha=0.8))
    if labelled and present:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2,
                  frameon=False, title="class (entries)", title_fontsize=8)
    if projection.method == "pca":
        ax.set_xlabel(f"PC 1 ({projection.explained[0]:.0%} of the variance)")
        ax.set_ylabel(f"PC 2 ({projection.explained[1]:.0%} of the variance)")
    else:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    missing = num_classes - len(present)
    note = f"{coords.shape[0]} entries of {len(present)}/{num_classes} classes"
    if missing:
        note += f" ({missing} without entries)"
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


def similarity_figure(similarity, class_names, title=""):
    """Heatmap of the class-mean cosine matrix; classes without entries (NaN) are left blank."""
    fig = _new_figure()
    ax = fig.add_subplot()
    sim = similarity.cpu().numpy() if isinstance(similarity, torch.Tensor) else similarity
    num_classes = sim.shape[0]
    from matplotlib import colormaps

    cmap = colormaps["coolwarm"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(sim), cmap=cmap, vmin=-1.0, vmax=1.0,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85, label="cosine similarity of class means")
    empty = np.isnan(np.diag(sim)) if num_classes else np.zeros(0, bool)
    if num_classes <= _MAX_TICK_LABELS:
        ticks = np.arange(num_classes)
        labels = [n + " (empty)" if e else n for n, e in zip(class_names, empty)]
        fontsize = 9 if num_classes <= 20 else 6
    else:
        step = math.ceil(num_classes / 20)
        ticks = np.arange(0, num_classes, step)
        labels = [str(i) for i in ticks]
        fontsize = 8
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=fontsize)
    if num_classes <= _MAX_ANNOTATED_CELLS:
        for i in range(num_classes):
            for j in range(num_classes):
                if not np.isnan(sim[i, j]):
                    ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(sim[i, j]) > 0.6 else "black")
    off = sim[~np.eye(num_classes, dtype=bool) & ~np.isnan(sim)]
    note = (f"mean off-diagonal {off.mean():.2f}, max {off.max():.2f}" if off.size
            else "fewer than two classes with entries")
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=10)
    return fig


def memory_summary_images(
    features: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
    class_names: Optional[Sequence[str]] = None,
    stuff_colors: Optional[Sequence] = None,
    method: str = "pca",
    max_per_class: int = 500,
    seed: int = 0,
    title: str = "",
) -> Dict[str, np.ndarray]:
    """
    The two summary figures of a bank's filled entries (``RegionMemoryBank.snapshot()``).

    Args:
        class_names: one per class (the data set's ``stuff_classes``); None numbers them.
        stuff_colors: the data set's colours (0-255), else a colour map.
        method: "pca" or "tsne" for the projection.
        max_per_class: entries per class in the projection, evenly strided (0: all); the
            similarity uses every entry.
        seed: t-SNE's random state.
        title: first line of both titles (e.g. the checkpoint or the iteration).

    Returns:
        ``{"memory_projection": (H, W, 3) uint8, "memory_similarity": (H, W, 3) uint8}``.
    """
    if class_names is None:
        class_names = default_class_names(num_classes)
    if len(class_names) != num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a bank of {num_classes} classes; the names "
            "must come from the data set the checkpoint was trained on."
        )
    features = features.detach().cpu()
    classes = classes.detach().reshape(-1).cpu()
    colors = class_colors(num_classes, stuff_colors)
    images = {}
    keep = subsample_per_class(classes, max_per_class)
    projection = project_2d(features[keep], method=method, seed=seed)
    fig = projection_figure(projection, classes[keep], list(class_names), colors, title)
    images["memory_projection"] = render(fig)
    similarity = class_mean_cosine(features, classes, num_classes)
    fig = similarity_figure(similarity, list(class_names), title)
    images["memory_similarity"] = render(fig)
    return images
