"""
Cityscapes (fine annotations): 19 classes, Detectron2's builtin ``cityscapes_fine_sem_seg_train``,
``cityscapes_fine_sem_seg_val`` and ``cityscapes_fine_sem_seg_test``.

Detectron2 reads ``*_gtFine_labelTrainIds.png`` next to each ``*_gtFine_polygons.json``; they are
not in the official ``gtFine_trainvaltest.zip``. :func:`prepare_cityscapes` writes them with the
official ``cityscapesscripts`` (``json2labelImg``, "trainIds" encoding: the 19 evaluated classes
0..18, everything else 255), as its ``createTrainIdLabelImgs`` does, but atomically, resumably
and on all cores. The ``*_gtFine_labelIds.png`` of the zip are what the official evaluation
(``CityscapesSemSegEvaluator``) compares against.

Importing this module re-registers the three builtin names with Detectron2's loader and metadata,
plus a clear error when the data or the labelTrainIds files are missing.
"""
import glob
import os

from . import prepare as P

__all__ = [
    "NUM_CLASSES",
    "SPLITS",
    "PREPARE_COMMAND",
    "DOWNLOADS",
    "EXPECTED_TREE",
    "prepare_cityscapes",
    "register_cityscapes_sem_seg",
]

NUM_CLASSES = 19
DATASET_DIRNAME = "cityscapes"
SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")
IMAGE_SUFFIX = "_leftImg8bit.png"
POLYGONS_SUFFIX = "_gtFine_polygons.json"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
PREPARE_COMMAND = "python datasets/prepare_cityscapes_sem_seg.py"
DOWNLOADS = (
    "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip "
    "(https://www.cityscapes-dataset.com/downloads/)"
)
EXPECTED_TREE = """\
  cityscapes/
    leftImg8bit/                       from leftImg8bit_trainvaltest.zip
      train/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      val/<city>/...
      test/<city>/...                  (optional)
    gtFine/                            from gtFine_trainvaltest.zip
      train/<city>/<city>_<seq>_<frame>_gtFine_polygons.json
                                       ..._gtFine_labelIds.png, _instanceIds.png, _color.png
                                       ..._gtFine_labelTrainIds.png   written by the prepare script
      val/<city>/...
      test/<city>/...                  (optional)
"""


def _convert_one(task):
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    dst, src = task
    # json2labelImg picks the format from the name: keep ".png" (the hidden temporary name is
    # skipped by the globs of the Cityscapes loaders and evaluators; no loader lists this folder).
    with P.atomic_path(dst, keep_ext=True) as tmp:
        try:
            json2labelImg(src, tmp, "trainIds")
        except SystemExit:  # cityscapesscripts exits on an unknown label
            raise P.InvalidLabelError(
                f"{src}: cityscapesscripts could not convert it (see the message above; an "
                "unknown label name?)"
            ) from None
        P.check_output_labels(P.read_label_image(tmp), NUM_CLASSES, src)


def _split_dirs(root, split):
    base = os.path.join(root, DATASET_DIRNAME)
    return os.path.join(base, "leftImg8bit", split), os.path.join(base, "gtFine", split)


def _check_pairs(root, splits):
    """Every image needs its polygons: catches a partly extracted or mismatched gtFine."""
    lines = []
    for split in splits:
        image_dir, gt_dir = _split_dirs(root, split)
        images = glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX))
        missing = []
        for image in sorted(images):
            city = os.path.basename(os.path.dirname(image))
            stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
            polygons = os.path.join(gt_dir, city, stem + POLYGONS_SUFFIX)
            if not os.path.isfile(polygons):
                missing.append(polygons)
        if missing:
            lines.append(
                f"  {len(missing)} of {len(images)} images of leftImg8bit/{split} have no "
                f"polygons file, e.g. {os.path.abspath(missing[0])} is missing"
            )
    if lines:
        raise P.LayoutError(
            "Cityscapes: leftImg8bit and gtFine do not match under the data set root "
            f"({P.describe_root()}):\n" + "\n".join(lines) + "\n\nExtract both "
            "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (fine annotations, not "
            "gtCoarse) completely into cityscapes/. Expected tree under $DETECTRON2_DATASETS:\n"
            + EXPECTED_TREE
        )


def prepare_cityscapes(root, *, workers=None, progress=True):
    """
    Writes ``*_gtFine_labelTrainIds.png`` next to every ``*_gtFine_polygons.json`` of
    ``cityscapes/gtFine/{train,val,test}`` under ``root`` (test only when present). Resumable and
    idempotent; the official files are only read.

    Returns:
        list of :class:`~region_contrast.data.prepare.PrepareResult`, one per split.
    """
    required = []
    for split in REQUIRED_SPLITS:
        required += [
            P.Required(f"{DATASET_DIRNAME}/leftImg8bit/{split}", "leftImg8bit_trainvaltest.zip",
                       "*/*" + IMAGE_SUFFIX),
            P.Required(f"{DATASET_DIRNAME}/gtFine/{split}", "gtFine_trainvaltest.zip",
                       "*/*" + POLYGONS_SUFFIX),
        ]
    P.check_layout("Cityscapes", root, required, EXPECTED_TREE, PREPARE_COMMAND)
    splits = [s for s in SPLITS if s in REQUIRED_SPLITS or os.path.isdir(_split_dirs(root, s)[1])]
    _check_pairs(root, splits)
    results = []
    for split in splits:
        _, gt_dir = _split_dirs(root, split)
        sources = sorted(glob.glob(os.path.join(gt_dir, "*", "*" + POLYGONS_SUFFIX)))
        tasks = [(s[: -len(POLYGONS_SUFFIX)] + TRAIN_IDS_SUFFIX, s) for s in sources]
        results.append(
            P.run_conversion(f"cityscapes {split}", tasks, _convert_one, workers=workers,
                             progress=progress)
        )
        if split == "val":
            without = [s for s in sources
                       if not os.path.isfile(s[: -len(POLYGONS_SUFFIX)] + LABEL_IDS_SUFFIX)]
            if without:
                print(
                    f"warning: {len(without)} val images have no *{LABEL_IDS_SUFFIX} (e.g. "
                    f"{without[0][: -len(POLYGONS_SUFFIX)] + LABEL_IDS_SUFFIX}); the official "
                    "evaluation (CityscapesSemSegEvaluator) needs them: they come with "
                    "gtFine_trainvaltest.zip."
                )
    return results


def _load(name, image_dir, gt_dir):
    from detectron2.data.datasets.cityscapes import load_cityscapes_semantic

    P.require_folder(name, image_dir, "*", "the image folder", PREPARE_COMMAND, DOWNLOADS)
    P.require_folder(name, gt_dir, "*", "the annotation folder", PREPARE_COMMAND, DOWNLOADS)
    polygons = glob.glob(os.path.join(gt_dir, "*", "*" + POLYGONS_SUFFIX))
    missing = [
        p for p in polygons if not os.path.isfile(p[: -len(POLYGONS_SUFFIX)] + TRAIN_IDS_SUFFIX)
    ]
    if missing:
        first = missing[0][: -len(POLYGONS_SUFFIX)] + TRAIN_IDS_SUFFIX
        raise FileNotFoundError(
            f"Data set '{name}': {len(missing)} of {len(polygons)} *{TRAIN_IDS_SUFFIX} label "
            f"maps are missing, e.g. {os.path.abspath(first)}. Data sets are read under "
            f"$DETECTRON2_DATASETS ({P.describe_root()}). Write them with `{PREPARE_COMMAND}` "
            "from the repository root, with the same DETECTRON2_DATASETS."
        )
    return load_cityscapes_semantic(image_dir, gt_dir)


def register_cityscapes_sem_seg(root, *, name_prefix="cityscapes_fine_sem_seg"):
    """
    Registers ``<name_prefix>_{train,val,test}`` for ``root``. For Detectron2's own names the
    builtin metadata is kept and only the loader is replaced (same records, clearer errors);
    other names get the same metadata as Detectron2's, rooted at ``root``.

    Returns:
        The registered names.
    """
    classes = P.builtin_metadata(
        "cityscapes_fine_sem_seg_val", ("thing_classes", "thing_colors", "stuff_classes",
                                        "stuff_colors")
    )
    names = []
    for split in SPLITS:
        image_dir, gt_dir = _split_dirs(root, split)
        # CityscapesSemSegEvaluator reads gt_dir.
        names.append(P.register_sem_seg(
            f"{name_prefix}_{split}", _load, image_dir, gt_dir,
            builtin=name_prefix == "cityscapes_fine_sem_seg",
            evaluator_type="cityscapes_sem_seg", image_dir=image_dir, gt_dir=gt_dir, **classes,
        ))
    return names


register_cityscapes_sem_seg(P.datasets_root())
