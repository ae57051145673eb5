"""
COCO-Stuff: 171 classes (80 COCO "things" + 91 "stuff"), in two releases.

**COCO-Stuff-164k** (all of COCO 2017): ``coco_2017_train_stuff_164k_sem_seg`` and
``coco_2017_val_stuff_164k_sem_seg``, also registered under the names MaskFormer and Mask2Former
use, ``coco_2017_train_stuff_sem_seg`` and ``coco_2017_test_stuff_sem_seg`` (val2017). The
official ``stuffthingmaps_trainval2017.zip`` holds one
uint8 PNG per image whose value is the COCO-Stuff id minus 1 (0..181; 255 = unlabeled). COCO ids
1..182 leave 11 thing ids unused, so :func:`prepare_coco_stuff_164k` maps the 171 used raw values
to contiguous ids 0..170 in id order and everything else (255, the unused ids) to 255, into
``coco/stuffthingmaps_detectron2/``.

**COCO-Stuff-10k**: ``coco_2017_train_stuff_10k_sem_seg`` and
``coco_2017_test_stuff_10k_sem_seg`` (9,000 / 1,000 images). Its annotations are MATLAB files
with a label map ``S``, in one of two releases, told apart by the file format:

- v1.1 (``cocostuff-10k-v1.1.zip``, MATLAB 5 files, read with scipy): 0 = unlabeled, else the
  COCO-Stuff id 1..182 (raw value v - 1 of the 164k maps);
- v1.0 (``cocostuff-10k-v1.0.zip``, the one MaskFormer/Mask2Former point to; MATLAB 7.3 files,
  which are HDF5, read with h5py and stored transposed): 1 = unlabeled, 2..172 = the 171 classes
  in contiguous order plus 2 (MaskFormer's conversion subtracts 2); 0 is taken as unlabeled.

:func:`prepare_coco_stuff_10k` writes PNG label maps with the same 171 contiguous classes and
links (or copies) the images into the folders the registration reads: the layout and values of
MaskFormer's ``images_detectron2``/``annotations_detectron2``, so a folder it prepared is used
as it is.

Importing this module registers the six names (cheap; nothing is read until loaded). Their
metadata maps the contiguous ids back to COCO ids (``stuff_dataset_id_to_contiguous_id``), so
``sem_seg_predictions.json`` holds COCO category ids.
"""
import glob
import os

import numpy as np

from . import prepare as P

__all__ = [
    "COCO_STUFF_CATEGORIES",
    "COCO_STUFF_CLASSES",
    "COCO_STUFF_COLORS",
    "UNUSED_COCO_IDS",
    "NUM_CLASSES",
    "RAW_TO_CONTIGUOUS",
    "RAW_LUT",
    "MAT_LUT",
    "coco_stuff_164k_label_map",
    "coco_stuff_10k_label_map",
    "read_coco_stuff_10k_mat",
    "prepare_coco_stuff_164k",
    "prepare_coco_stuff_10k",
    "register_coco_stuff_164k",
    "register_coco_stuff_10k",
]

# COCO-Stuff ids and names (the official labels of cocostuff, 1..182): 80 things, then 91 stuff.
# fmt: off
COCO_STUFF_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
    (92, "banner"), (93, "blanket"), (94, "branch"), (95, "bridge"), (96, "building-other"),
    (97, "bush"), (98, "cabinet"), (99, "cage"), (100, "cardboard"), (101, "carpet"),
    (102, "ceiling-other"), (103, "ceiling-tile"), (104, "cloth"), (105, "clothes"),
    (106, "clouds"), (107, "counter"), (108, "cupboard"), (109, "curtain"), (110, "desk-stuff"),
    (111, "dirt"), (112, "door-stuff"), (113, "fence"), (114, "floor-marble"),
    (115, "floor-other"), (116, "floor-stone"), (117, "floor-tile"), (118, "floor-wood"),
    (119, "flower"), (120, "fog"), (121, "food-other"), (122, "fruit"),
    (123, "furniture-other"), (124, "grass"), (125, "gravel"), (126, "ground-other"),
    (127, "hill"), (128, "house"), (129, "leaves"), (130, "light"), (131, "mat"),
    (132, "metal"), (133, "mirror-stuff"), (134, "moss"), (135, "mountain"), (136, "mud"),
    (137, "napkin"), (138, "net"), (139, "paper"), (140, "pavement"), (141, "pillow"),
    (142, "plant-other"), (143, "plastic"), (144, "platform"), (145, "playingfield"),
    (146, "railing"), (147, "railroad"), (148, "river"), (149, "road"), (150, "rock"),
    (151, "roof"), (152, "rug"), (153, "salad"), (154, "sand"), (155, "sea"), (156, "shelf"),
    (157, "sky-other"), (158, "skyscraper"), (159, "snow"), (160, "solid-other"),
    (161, "stairs"), (162, "stone"), (163, "straw"), (164, "structural-other"), (165, "table"),
    (166, "tent"), (167, "textile-other"), (168, "towel"), (169, "tree"), (170, "vegetable"),
    (171, "wall-brick"), (172, "wall-concrete"), (173, "wall-other"), (174, "wall-panel"),
    (175, "wall-stone"), (176, "wall-tile"), (177, "wall-wood"), (178, "water-other"),
    (179, "waterdrops"), (180, "window-blind"), (181, "window-other"), (182, "wood"),
]
# fmt: on
NUM_THINGS = 80
NUM_CLASSES = 171
MAX_COCO_ID = 182
COCO_STUFF_CLASSES = [name for _, name in COCO_STUFF_CATEGORIES]
# COCO ids 1..91 are things, of which these 11 were never used.
UNUSED_COCO_IDS = sorted(set(range(1, 92)) - {i for i, _ in COCO_STUFF_CATEGORIES})
assert len(COCO_STUFF_CATEGORIES) == NUM_CLASSES and len(UNUSED_COCO_IDS) == 11
assert [i for i, _ in COCO_STUFF_CATEGORIES] == sorted(i for i, _ in COCO_STUFF_CATEGORIES)
# A fixed, distinct-enough colour per class (for visualisation only).
COCO_STUFF_COLORS = [
    [int(c) for c in np.random.default_rng([20170, k]).integers(0, 256, size=3)]
    for k in range(NUM_CLASSES)
]

# stuffthingmaps value (COCO id - 1) -> contiguous class id.
RAW_TO_CONTIGUOUS = {coco_id - 1: k for k, (coco_id, _) in enumerate(COCO_STUFF_CATEGORIES)}
# COCO id -> contiguous class id (the metadata's stuff_dataset_id_to_contiguous_id).
RAW_TO_CONTIGUOUS_COCO_ID = {coco_id: k for k, (coco_id, _) in enumerate(COCO_STUFF_CATEGORIES)}
# Every uint8 value is valid in stuffthingmaps: unused ids and 255 become 255.
RAW_LUT = P.build_lut(RAW_TO_CONTIGUOUS, default=P.IGNORE_LABEL)
# COCO-Stuff-10k "S" value (0 unlabeled, else COCO id) -> contiguous; values above 182 invalid.
MAT_LUT = P.build_lut(
    {0: P.IGNORE_LABEL,
     **{v: RAW_TO_CONTIGUOUS.get(v - 1, P.IGNORE_LABEL) for v in range(1, MAX_COCO_ID + 1)}},
    size=65536,
)

# COCO-Stuff-10k v1.0 "S" value (MATLAB 7.3 files) -> contiguous; values above 172 invalid.
MAT_V10_LUT = P.build_lut(
    {0: P.IGNORE_LABEL, 1: P.IGNORE_LABEL, **{v: v - 2 for v in range(2, NUM_CLASSES + 2)}},
    size=65536,
)

PREPARE_164K = "python datasets/prepare_coco_stuff_164k_sem_seg.py"
PREPARE_10K = "python datasets/prepare_coco_stuff_10k_sem_seg.py"
DOWNLOADS_164K = (
    "train2017.zip, val2017.zip (https://cocodataset.org) and stuffthingmaps_trainval2017.zip "
    "(https://github.com/nightrome/cocostuff)"
)
DOWNLOADS_10K = (
    "cocostuff-10k-v1.1.zip or cocostuff-10k-v1.0.zip (https://github.com/nightrome/cocostuff10k)"
)
TREE_164K = """\
  coco/
    train2017/*.jpg                    from train2017.zip
    val2017/*.jpg                      from val2017.zip
    stuffthingmaps/                    from stuffthingmaps_trainval2017.zip
      train2017/*.png                  (unzip -d coco/stuffthingmaps)
      val2017/*.png
    stuffthingmaps_detectron2/         written by the prepare script (0..170, 255 = ignore)
"""
TREE_10K = """\
  coco/
    coco_stuff_10k/                    from cocostuff-10k-v1.1.zip or -v1.0.zip
      images/*.jpg                     COCO_train2014_<id>.jpg (unzip -d coco/coco_stuff_10k)
      annotations/*.mat                MATLAB files with "S" (v1.1: 0 = unlabeled, 1..182 =
                                         COCO ids; v1.0: 1 = unlabeled, 2..172 = classes)
      imageLists/train.txt             one image name (no extension) per line
      imageLists/test.txt
      images_detectron2/{train,test}/       written by the prepare script (links to images/)
      annotations_detectron2/{train,test}/  written by the prepare script (0..170, 255 = ignore)
"""
SPLITS_164K = ("train2017", "val2017")
SPLITS_10K = ("train", "test")
DIR_10K = os.path.join("coco", "coco_stuff_10k")


def coco_stuff_164k_label_map(raw, where="<array>"):
    """Contiguous label map (uint8, 0..170 / 255) of a stuffthingmaps PNG (uint8 array)."""
    out = P.apply_lut(raw, RAW_LUT, where)
    P.check_output_labels(out, NUM_CLASSES, where)
    return out


def coco_stuff_10k_label_map(s, where="<array>", release="v1.1"):
    """
    Contiguous label map (uint8, 0..170 / 255) of a COCO-Stuff-10k ``S`` array of the given
    release ("v1.1" or "v1.0", see the module docstring).
    """
    luts = {"v1.1": MAT_LUT, "v1.0": MAT_V10_LUT}
    if release not in luts:
        raise ValueError(f"release must be one of {sorted(luts)}, got {release!r}")
    out = P.apply_lut(np.asarray(s).astype(np.int64), luts[release], where)
    P.check_output_labels(out, NUM_CLASSES, where)
    return out


def read_coco_stuff_10k_mat(path):
    """
    ``(S, release)`` of a COCO-Stuff-10k annotation file: v1.0's MATLAB 7.3 (HDF5) files are
    read with h5py and transposed back to (height, width), v1.1's MATLAB 5 files with scipy.
    """
    import h5py

    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            if "S" not in f:
                raise P.InvalidLabelError(
                    f"{path}: no variable 'S' in this MATLAB 7.3 file (found {sorted(f)})"
                )
            # MATLAB stores arrays column-major: h5py sees the transpose.
            return np.asarray(f["S"]).T, "v1.0"
    from scipy.io import loadmat

    mat = loadmat(path)
    if "S" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise P.InvalidLabelError(f"{path}: no variable 'S' (found {found})")
    return mat["S"], "v1.1"


# --------------------------------------------------------------------------------------------
# COCO-Stuff-164k
# --------------------------------------------------------------------------------------------
def _dirs_164k(root, split):
    coco = os.path.join(root, "coco")
    return (
        os.path.join(coco, split),
        os.path.join(coco, "stuffthingmaps", split),
        os.path.join(coco, "stuffthingmaps_detectron2", split),
    )


def _convert_164k(task):
    dst, src = task
    P.write_png_atomic(dst, coco_stuff_164k_label_map(P.read_label_image(src), src))


def prepare_coco_stuff_164k(root, *, workers=None, progress=True):
    """
    Writes ``coco/stuffthingmaps_detectron2/{train2017,val2017}/*.png`` under ``root`` from the
    official stuffthingmaps (see the module docstring). Resumable and idempotent.

    Returns:
        list of :class:`~region_contrast.data.prepare.PrepareResult`, one per split.
    """
    required = [
        P.Required(f"coco/stuffthingmaps/{split}", "stuffthingmaps_trainval2017.zip", "*.png")
        for split in SPLITS_164K
    ]
    hints = []
    for split in SPLITS_164K:
        images = os.path.join(root, "coco", split)
        if glob.glob(os.path.join(images, "*.png")):
            hints.append(
                f"  {os.path.abspath(images)} holds PNG files: stuffthingmaps_trainval2017.zip "
                "was probably extracted into coco/ instead of coco/stuffthingmaps/ (unzip -d "
                "coco/stuffthingmaps); move the PNGs to coco/stuffthingmaps/" + split
            )
    P.check_layout("COCO-Stuff-164k", root, required, TREE_164K, PREPARE_164K, hints)
    results = []
    for split in SPLITS_164K:
        image_dir, raw_dir, out_dir = _dirs_164k(root, split)
        if not os.path.isdir(image_dir):
            print(
                f"warning: {os.path.abspath(image_dir)} is missing: training and evaluation need "
                f"the images ({split}.zip from https://cocodataset.org)."
            )
        tasks = P.png_tasks(raw_dir, out_dir)
        results.append(
            P.run_conversion(f"coco_stuff_164k {split}", tasks, _convert_164k, workers=workers,
                             progress=progress)
        )
    return results


# --------------------------------------------------------------------------------------------
# COCO-Stuff-10k
# --------------------------------------------------------------------------------------------
def _dirs_10k(root, split):
    base = os.path.join(root, DIR_10K)
    return (
        os.path.join(base, "images_detectron2", split),
        os.path.join(base, "annotations_detectron2", split),
    )


def _convert_10k(task):
    dst, src, image = task
    s, release = read_coco_stuff_10k_mat(src)
    from PIL import Image

    with Image.open(image) as img:
        width, height = img.size
    if s.shape != (height, width):
        raise P.InvalidLabelError(
            f"{src}: 'S' has shape {s.shape} but {image} is {height} x {width}"
        )
    P.write_png_atomic(dst, coco_stuff_10k_label_map(s, src, release))


def _link_image(task):
    dst, src = task
    with P.atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed: copy
            import shutil

            shutil.copyfile(src, tmp)


def _read_list(path):
    with open(path) as f:
        names = [line.strip() for line in f]
    return [os.path.splitext(n)[0] for n in names if n]


def prepare_coco_stuff_10k(root, *, workers=None, progress=True):
    """
    From the official COCO-Stuff-10k files (v1.1 or v1.0) in ``coco/coco_stuff_10k/`` under
    ``root``, writes
    ``annotations_detectron2/{train,test}/<name>.png`` and hard-links (or copies) each image to
    ``images_detectron2/{train,test}/<name>.jpg``, following ``imageLists/{train,test}.txt``.
    Resumable and idempotent; the official files are only read.

    Returns:
        list of :class:`~region_contrast.data.prepare.PrepareResult`.
    """
    src = "cocostuff-10k-v1.1.zip (or -v1.0.zip)"
    required = [
        P.Required(f"{DIR_10K}/images", src, "*.jpg"),
        P.Required(f"{DIR_10K}/annotations", src, "*.mat"),
        P.Required(f"{DIR_10K}/imageLists/train.txt", src, None),
        P.Required(f"{DIR_10K}/imageLists/test.txt", src, None),
    ]
    P.check_layout("COCO-Stuff-10k", root, required, TREE_10K, PREPARE_10K)
    base = os.path.join(root, DIR_10K)
    lists = {s: _read_list(os.path.join(base, "imageLists", f"{s}.txt")) for s in SPLITS_10K}
    missing = []
    for split, names in lists.items():
        for n in names:
            for path in (os.path.join(base, "images", n + ".jpg"),
                         os.path.join(base, "annotations", n + ".mat")):
                if not os.path.isfile(path):
                    missing.append((split, path))
    if missing:
        raise P.LayoutError(
            f"COCO-Stuff-10k: {len(missing)} files named in imageLists/ are missing, e.g. "
            f"{os.path.abspath(missing[0][1])} (listed in imageLists/{missing[0][0]}.txt). "
            f"Extract all of the downloaded zip. Expected tree under $DETECTRON2_DATASETS "
            f"({P.describe_root()}):\n{TREE_10K}"
        )
    results = []
    for split, names in lists.items():
        image_dir, ann_dir = _dirs_10k(root, split)
        link_tasks = [
            (os.path.join(image_dir, n + ".jpg"), os.path.join(base, "images", n + ".jpg"))
            for n in names
        ]
        label_tasks = [
            (os.path.join(ann_dir, n + ".png"), os.path.join(base, "annotations", n + ".mat"),
             os.path.join(base, "images", n + ".jpg"))
            for n in names
        ]
        results.append(
            P.run_conversion(f"coco_stuff_10k {split} labels", label_tasks, _convert_10k,
                             workers=workers, progress=progress)
        )
        results.append(
            P.run_conversion(f"coco_stuff_10k {split} images", link_tasks, _link_image,
                             workers=workers, progress=progress)
        )
    return results


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def _load(name, image_dir, gt_dir, prepare_command, downloads):
    from detectron2.data.datasets import load_sem_seg

    P.require_folder(name, image_dir, "*.jpg", "the image folder", prepare_command, downloads)
    P.require_folder(name, gt_dir, "*.png", "the label folder", prepare_command, downloads)
    return load_sem_seg(gt_dir, image_dir, gt_ext="png", image_ext="jpg")


# The classes of every COCO-Stuff split. The label maps hold contiguous ids; SemSegEvaluator
# writes the COCO ids into sem_seg_predictions.json, as Detectron2 and Mask2Former do.
CLASSES = dict(
    stuff_classes=list(COCO_STUFF_CLASSES),
    stuff_dataset_id_to_contiguous_id=dict(RAW_TO_CONTIGUOUS_COCO_ID),
    stuff_colors=[list(c) for c in COCO_STUFF_COLORS],
)


# The names other Detectron2 projects (MaskFormer, Mask2Former) give the same splits, on the
# same folders: their "test" is val2017.
ALIASES_164K = {"train2017": "train_stuff_sem_seg", "val2017": "test_stuff_sem_seg"}


def _load_164k(name, image_dir, gt_dir):
    return _load(name, image_dir, gt_dir, PREPARE_164K, DOWNLOADS_164K)


def _load_10k(name, image_dir, gt_dir):
    return _load(name, image_dir, gt_dir, PREPARE_10K, DOWNLOADS_10K)


def register_coco_stuff_164k(root, *, name_prefix="coco_2017"):
    """
    Registers ``<name_prefix>_{train,val}_stuff_164k_sem_seg`` for ``root``, and the same
    splits as ``<name_prefix>_{train,test}_stuff_sem_seg``; returns the four names in that order.
    """
    names = [f"{name_prefix}_{split[:-4]}_stuff_164k_sem_seg" for split in SPLITS_164K]
    names += [f"{name_prefix}_{ALIASES_164K[split]}" for split in SPLITS_164K]
    for name, split in zip(names, SPLITS_164K * 2):
        image_dir, _, gt_dir = _dirs_164k(root, split)
        P.register_sem_seg(name, _load_164k, image_dir, gt_dir, **CLASSES)
    return names


def register_coco_stuff_10k(root, *, name_prefix="coco_2017"):
    """Registers ``<name_prefix>_{train,test}_stuff_10k_sem_seg`` for ``root``; returns names."""
    return [
        P.register_sem_seg(f"{name_prefix}_{split}_stuff_10k_sem_seg", _load_10k,
                           *_dirs_10k(root, split), **CLASSES)
        for split in SPLITS_10K
    ]


register_coco_stuff_164k(P.datasets_root())
register_coco_stuff_10k(P.datasets_root())
