"""
COCO panoptic, reused for semantic segmentation: Detectron2's builtin
``coco_2017_train_panoptic_stuffonly`` and ``coco_2017_val_panoptic_stuffonly`` (54 classes: 0 =
"things", 1..53 = the 53 stuff categories of COCO panoptic in id order; 255 = unlabeled).

Detectron2 registers them (with ``register_coco_panoptic_separated``) on the label maps of
``coco/panoptic_stuff_{train,val}2017/<image>.png``, which it does not ship.
:func:`prepare_coco_panoptic_stuff` writes them from the official panoptic annotations: each
pixel of a segment gets 0 if the segment's category is a thing, 1 + the stuff category's rank
(by id) if it is stuff; pixels of no segment (panoptic id 0, void) get 255. The panoptic PNGs
encode the segment id as ``R + 256 * G + 256**2 * B``.

The same script also writes the 133-class semantic maps of COCO panoptic (80 things + 53 stuff,
contiguous in id order, void 255) into ``coco/panoptic_semseg_{train,val}2017/``, registered as
``coco_2017_train_panoptic_sem_seg`` and ``coco_2017_val_panoptic_sem_seg`` (the names
Mask2Former uses).

Importing this module re-registers the two builtin stuffonly names with Detectron2's loader and
metadata, plus a clear error when the folders are missing, and registers the two 133-class names.
"""
import json
import os

import numpy as np

from . import prepare as P

__all__ = [
    "NUM_CLASSES",
    "NUM_SEMSEG_CLASSES",
    "PREPARE_COMMAND",
    "EXPECTED_TREE",
    "stuffonly_id_map",
    "semseg_id_map",
    "panoptic_png_to_ids",
    "panoptic_to_stuffonly",
    "prepare_coco_panoptic_stuff",
    "register_coco_panoptic_stuffonly",
    "register_coco_panoptic_sem_seg",
]

NUM_CLASSES = 54
NUM_SEMSEG_CLASSES = 133
SPLITS = ("train2017", "val2017")
PREPARE_COMMAND = "python datasets/prepare_coco_panoptic_stuff_sem_seg.py"
DOWNLOADS = (
    "panoptic_annotations_trainval2017.zip, train2017.zip and val2017.zip "
    "(https://cocodataset.org)"
)
EXPECTED_TREE = """\
  coco/
    train2017/*.jpg                    from train2017.zip
    val2017/*.jpg                      from val2017.zip
    annotations/                       from panoptic_annotations_trainval2017.zip
      panoptic_train2017.json
      panoptic_val2017.json
    panoptic_train2017/*.png           from annotations/panoptic_train2017.zip inside it
    panoptic_val2017/*.png             (annotations/panoptic_{train,val}2017/ is accepted too)
    panoptic_stuff_train2017/*.png     written by the prepare script (0 things, 1..53 stuff,
    panoptic_stuff_val2017/*.png         255 = unlabeled)
    panoptic_semseg_{train,val}2017/   written by the prepare script (133 classes, 255 = void)
"""


def stuffonly_id_map(categories=None):
    """
    {COCO panoptic category id: stuffonly class}: things -> 0, stuff -> 1..53 in id order, the
    order of Detectron2's ``coco_panoptic_separated`` metadata. ``categories`` defaults to
    Detectron2's ``COCO_CATEGORIES``.
    """
    if categories is None:
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES as categories
    stuff = sorted(c["id"] for c in categories if not c["isthing"])
    id_map = {c["id"]: 0 for c in categories if c["isthing"]}
    id_map.update({cat_id: k + 1 for k, cat_id in enumerate(stuff)})
    return id_map


def semseg_id_map(categories=None):
    """{COCO panoptic category id: 0..132}, contiguous in id order (the 80 things, then stuff)."""
    if categories is None:
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES as categories
    return {cat_id: k for k, cat_id in enumerate(sorted(c["id"] for c in categories))}


def panoptic_png_to_ids(rgb):
    """Segment ids of a panoptic PNG (H x W x 3 uint8): R + 256 * G + 256**2 * B."""
    rgb = np.asarray(rgb, dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_to_stuffonly(ids, segments_info, id_map, where="<array>",
                          num_classes=NUM_CLASSES):
    """The label map (uint8) of a segment-id map and its ``segments_info``, through ``id_map``
    (:func:`stuffonly_id_map`, or :func:`semseg_id_map` with ``num_classes=133``)."""
    out = np.full(ids.shape, P.IGNORE_LABEL, dtype=np.uint8)
    for seg in segments_info:
        cat = seg["category_id"]
        if cat not in id_map:
            raise P.InvalidLabelError(f"{where}: segment {seg['id']} has unknown category {cat}")
        out[ids == seg["id"]] = id_map[cat]
    P.check_output_labels(out, num_classes, where)
    return out


def _convert_one(task):
    dst, src, segments_info, id_map, num_classes = task
    from PIL import Image

    with Image.open(src) as img:
        if img.mode != "RGB":
            raise P.InvalidLabelError(f"{src}: expected an RGB panoptic PNG, got mode {img.mode}")
        ids = panoptic_png_to_ids(np.asarray(img))
    P.write_png_atomic(dst, panoptic_to_stuffonly(ids, segments_info, id_map, src, num_classes))


def _panoptic_dir(root, split):
    """Detectron2's documented place first, then where unzipping the inner zip in place puts it."""
    for rel in (f"coco/panoptic_{split}", f"coco/annotations/panoptic_{split}"):
        if os.path.isdir(os.path.join(root, rel)):
            return rel
    return f"coco/panoptic_{split}"


def _check_categories(json_path, categories):
    """The JSON's categories must be the ones the registration's class list is built from."""
    expected = stuffonly_id_map()
    found = {c["id"]: bool(c["isthing"]) for c in categories}
    want = {c: v == 0 for c, v in expected.items()}
    if found != want:
        diff = sorted(set(found.items()) ^ set(want.items()))[:10]
        raise P.InvalidLabelError(
            f"{json_path}: its categories are not COCO panoptic 2017's 80 things + 53 stuff "
            f"(first differences, (id, isthing): {diff}); is this the official file?"
        )


def prepare_coco_panoptic_stuff(root, *, workers=None, progress=True):
    """
    Writes ``coco/panoptic_stuff_{train,val}2017/*.png`` (54 classes) and
    ``coco/panoptic_semseg_{train,val}2017/*.png`` (133 classes) under ``root`` from the official
    panoptic annotations (see the module docstring). Resumable and idempotent.

    Returns:
        list of :class:`~region_contrast.data.prepare.PrepareResult`, two per split.
    """
    src = "panoptic_annotations_trainval2017.zip"
    required = []
    for split in SPLITS:
        required += [
            P.Required(f"coco/annotations/panoptic_{split}.json", src, None),
            P.Required(_panoptic_dir(root, split), f"annotations/panoptic_{split}.zip in {src}",
                       "*.png"),
        ]
    P.check_layout("COCO panoptic", root, required, EXPECTED_TREE, PREPARE_COMMAND)
    outputs = (
        ("panoptic_stuff", stuffonly_id_map(), NUM_CLASSES),
        ("panoptic_semseg", semseg_id_map(), NUM_SEMSEG_CLASSES),
    )
    results = []
    for split in SPLITS:
        json_path = os.path.join(root, "coco", "annotations", f"panoptic_{split}.json")
        with open(json_path) as f:
            data = json.load(f)
        _check_categories(json_path, data["categories"])
        pan_dir = os.path.join(root, _panoptic_dir(root, split))
        annotations = [
            (os.path.join(pan_dir, ann["file_name"]), ann["file_name"], ann["segments_info"])
            for ann in data["annotations"]
        ]
        del data
        missing = [png for png, _, _ in annotations if not os.path.isfile(png)]
        if missing:
            raise P.LayoutError(
                f"COCO panoptic: {len(missing)} of the {len(annotations)} PNGs named in "
                f"{json_path} "
                f"are missing, e.g. {os.path.abspath(missing[0])}. Extract "
                f"annotations/panoptic_{split}.zip of {src} completely. Expected tree under "
                f"$DETECTRON2_DATASETS ({P.describe_root()}):\n{EXPECTED_TREE}"
            )
        if not os.path.isdir(os.path.join(root, "coco", split)):
            print(
                f"warning: {os.path.abspath(os.path.join(root, 'coco', split))} is missing: "
                f"training and evaluation need the images ({split}.zip)."
            )
        for prefix, id_map, num_classes in outputs:
            out_dir = os.path.join(root, "coco", f"{prefix}_{split}")
            tasks = [
                (os.path.join(out_dir, name), png, segments, id_map, num_classes)
                for png, name, segments in annotations
            ]
            results.append(
                P.run_conversion(f"coco_{prefix} {split}", tasks, _convert_one,
                                 workers=workers, progress=progress)
            )
    return results


def _load(name, image_dir, gt_dir):
    from detectron2.data.datasets import load_sem_seg

    P.require_folder(name, image_dir, "*.jpg", "the image folder", PREPARE_COMMAND, DOWNLOADS)
    P.require_folder(name, gt_dir, "*.png", "the label folder", PREPARE_COMMAND, DOWNLOADS)
    return load_sem_seg(gt_dir, image_dir)


def register_coco_panoptic_stuffonly(root, *, name_prefix="coco_2017"):
    """
    Registers ``<name_prefix>_{train,val}_panoptic_stuffonly`` for ``root``. For Detectron2's own
    names the builtin metadata is kept and only the loader is replaced (same records, clearer
    errors); other names get the metadata Detectron2's ``register_coco_panoptic_separated``
    gives them.

    Returns:
        The registered names.
    """
    classes = P.builtin_metadata(
        "coco_2017_val_panoptic_stuffonly",
        ("thing_dataset_id_to_contiguous_id", "thing_classes", "thing_colors",
         "stuff_dataset_id_to_contiguous_id", "stuff_classes", "stuff_colors"),
    )
    return [
        P.register_sem_seg(
            f"{name_prefix}_{split[:-4]}_panoptic_stuffonly", _load,
            os.path.join(root, "coco", split),
            os.path.join(root, "coco", f"panoptic_stuff_{split}"),
            builtin=name_prefix == "coco_2017", **classes,
        )
        for split in SPLITS
    ]


def register_coco_panoptic_sem_seg(root, *, name_prefix="coco_2017"):
    """
    Registers ``<name_prefix>_{train,val}_panoptic_sem_seg`` (133 classes; the label maps are
    contiguous, ``stuff_dataset_id_to_contiguous_id`` maps the COCO panoptic category ids to
    them, as Mask2Former's metadata does) for ``root``.

    Returns:
        The registered names.
    """
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    categories = sorted(COCO_CATEGORIES, key=lambda c: c["id"])
    classes = dict(
        stuff_classes=[c["name"] for c in categories],
        stuff_colors=[list(c["color"]) for c in categories],
        stuff_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
    )
    return [
        P.register_sem_seg(
            f"{name_prefix}_{split[:-4]}_panoptic_sem_seg", _load,
            os.path.join(root, "coco", split),
            os.path.join(root, "coco", f"panoptic_semseg_{split}"),
            **classes,
        )
        for split in SPLITS
    ]


register_coco_panoptic_stuffonly(P.datasets_root())
register_coco_panoptic_sem_seg(P.datasets_root())
