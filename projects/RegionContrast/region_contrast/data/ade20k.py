"""
ADE20K (MIT SceneParsing, ``ADEChallengeData2016.zip``): 150 classes, Detectron2's builtin
``ade20k_sem_seg_train`` and ``ade20k_sem_seg_val``.

Detectron2 reads its label maps from ``ADEChallengeData2016/annotations_detectron2/``, which
:func:`prepare_ade20k` writes from the official ``annotations/``: the official value 0 ("other",
not one of the 150 classes) becomes 255 (ignored) and every other value k (1..150) becomes k - 1.

Importing this module re-registers the two builtin names with the same loader and metadata as
Detectron2, plus a clear error when the data is missing (see :func:`register_ade20k`).
"""
import os

from . import prepare as P

__all__ = [
    "NUM_CLASSES",
    "ADE20K_LUT",
    "SPLITS",
    "PREPARE_COMMAND",
    "DOWNLOADS",
    "EXPECTED_TREE",
    "ade20k_label_map",
    "prepare_ade20k",
    "register_ade20k",
]

NUM_CLASSES = 150
DATASET_DIRNAME = "ADEChallengeData2016"
OUTPUT_DIRNAME = "annotations_detectron2"
# (name suffix, official folder name)
SPLITS = (("train", "training"), ("val", "validation"))
PREPARE_COMMAND = "python datasets/prepare_ade20k_sem_seg.py"
DOWNLOADS = "ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu/)"
EXPECTED_TREE = """\
  ADEChallengeData2016/                from ADEChallengeData2016.zip
    images/training/*.jpg
    images/validation/*.jpg
    annotations/training/*.png         uint8, 0 = other, 1..150 = classes
    annotations/validation/*.png
    annotations_detectron2/            written by the prepare script (0..149, 255 = ignore)
"""

# Official value -> Detectron2 label: 0 -> 255, k -> k - 1; values above 150 are invalid.
ADE20K_LUT = P.build_lut({0: P.IGNORE_LABEL, **{k: k - 1 for k in range(1, NUM_CLASSES + 1)}})


def ade20k_label_map(raw, where="<array>"):
    """The Detectron2 label map (uint8) of an official ADE20K annotation (uint8 array)."""
    out = P.apply_lut(raw, ADE20K_LUT, where)
    P.check_output_labels(out, NUM_CLASSES, where)
    return out


def _convert_one(task):
    dst, src = task
    P.write_png_atomic(dst, ade20k_label_map(P.read_label_image(src), src))


def _split_dirs(root, folder):
    base = os.path.join(root, DATASET_DIRNAME)
    return (
        os.path.join(base, "images", folder),
        os.path.join(base, "annotations", folder),
        os.path.join(base, OUTPUT_DIRNAME, folder),
    )


def prepare_ade20k(root, *, workers=None, progress=True):
    """
    Writes ``ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png`` under
    ``root`` from the official annotations (see the module docstring). Resumable and idempotent.

    Returns:
        list of :class:`~region_contrast.data.prepare.PrepareResult`, one per split.
    """
    required = []
    for _, folder in SPLITS:
        required += [
            P.Required(f"{DATASET_DIRNAME}/images/{folder}", "ADEChallengeData2016.zip", "*.jpg"),
            P.Required(
                f"{DATASET_DIRNAME}/annotations/{folder}", "ADEChallengeData2016.zip", "*.png"
            ),
        ]
    P.check_layout("ADE20K", root, required, EXPECTED_TREE, PREPARE_COMMAND)
    results = []
    for _, folder in SPLITS:
        _, ann_dir, out_dir = _split_dirs(root, folder)
        tasks = P.png_tasks(ann_dir, out_dir)
        results.append(
            P.run_conversion(f"ade20k {folder}", tasks, _convert_one, workers=workers,
                             progress=progress)
        )
    return results


def _load(name, image_dir, gt_dir):
    from detectron2.data.datasets import load_sem_seg

    P.require_folder(name, image_dir, "*.jpg", "the image folder", PREPARE_COMMAND, DOWNLOADS)
    P.require_folder(name, gt_dir, "*.png", "the label folder", PREPARE_COMMAND, DOWNLOADS)
    return load_sem_seg(gt_dir, image_dir, gt_ext="png", image_ext="jpg")


def register_ade20k(root, *, name_prefix="ade20k_sem_seg"):
    """
    Registers ``<name_prefix>_train`` and ``<name_prefix>_val`` for ``root``. For Detectron2's
    own names the builtin metadata is kept (it is the same) and only the loader is replaced by one
    that explains a missing folder; other names get the same metadata as Detectron2's.

    Returns:
        The registered names.
    """
    from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

    names = []
    for suffix, folder in SPLITS:
        image_dir, _, gt_dir = _split_dirs(root, folder)
        names.append(P.register_sem_seg(
            f"{name_prefix}_{suffix}", _load, image_dir, gt_dir,
            builtin=name_prefix == "ade20k_sem_seg",
            stuff_classes=list(ADE20K_SEM_SEG_CATEGORIES),
        ))
    return names


register_ade20k(P.datasets_root())
