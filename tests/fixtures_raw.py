"""
Tiny stand-ins for the official raw downloads, each in its official layout and format, and the
independent reference mappings the tests check the prepare scripts against.

Every builder writes under a data set root (what DETECTRON2_DATASETS points at) and returns a
description of what it wrote: the source files (which must never change) and, per output the
prepare script must write, the expected label map computed here by slow, obvious code from the
official definitions (not from the package).
"""
import json
import os

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Official definitions, written out independently of the package
# ----------------------------------------------------------------------------------------------
# Cityscapes: the 19 evaluated classes in trainId order (cityscapesScripts' labels.py).
CITYSCAPES_TRAIN_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]
# Labels that exist but are not evaluated (trainId 255), and the one that is never drawn.
CITYSCAPES_IGNORED = ["unlabeled", "ego vehicle", "rectification border", "out of roi", "static",
                      "dynamic", "ground", "parking", "rail track", "guard rail", "bridge",
                      "tunnel", "polegroup", "caravan", "trailer"]
CITYSCAPES_NOT_DRAWN = ["license plate"]

# COCO-Stuff: COCO ids 1..182, thing ids that were never used; stuffthingmaps hold id - 1.
COCO_UNUSED_IDS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]


def cityscapes_train_id(label):
    """trainId of a polygon label as cityscapesScripts draws it (None: not drawn)."""
    known = CITYSCAPES_TRAIN_CLASSES + CITYSCAPES_IGNORED + CITYSCAPES_NOT_DRAWN
    if label not in known and label.endswith("group"):
        label = label[: -len("group")]
    if label in CITYSCAPES_NOT_DRAWN:
        return None
    if label in CITYSCAPES_TRAIN_CLASSES:
        return CITYSCAPES_TRAIN_CLASSES.index(label)
    assert label in CITYSCAPES_IGNORED, label
    return 255


def ade20k_reference(raw):
    out = np.empty(raw.shape, dtype=np.uint8)
    for (y, x), v in np.ndenumerate(raw):
        out[y, x] = 255 if v == 0 else v - 1
    return out


def coco_stuff_raw_reference_table():
    """stuffthingmaps value (COCO id - 1) -> contiguous class, built from the unused-id list."""
    used_raw = [coco_id - 1 for coco_id in range(1, 183) if coco_id not in COCO_UNUSED_IDS]
    assert len(used_raw) == 171
    table = {v: 255 for v in range(256)}
    for k, raw in enumerate(used_raw):
        table[raw] = k
    return table


def coco_stuff_164k_reference(raw):
    table = coco_stuff_raw_reference_table()
    out = np.empty(raw.shape, dtype=np.uint8)
    for (y, x), v in np.ndenumerate(raw):
        out[y, x] = table[int(v)]
    return out


def coco_stuff_10k_reference(s, release="v1.1"):
    table = coco_stuff_raw_reference_table()
    out = np.empty(s.shape, dtype=np.uint8)
    for (y, x), v in np.ndenumerate(s):
        if release == "v1.0":  # 0, 1 unlabeled; 2..172 the contiguous classes + 2
            out[y, x] = 255 if v <= 1 else int(v) - 2
        else:
            out[y, x] = 255 if v == 0 else table[int(v) - 1]
    return out


def write_matlab_v73(path, arrays):
    """A MATLAB 7.3 file as MATLAB writes it: HDF5 after a 512-byte text header, arrays in
    column-major order (h5py sees each one transposed)."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=np.asarray(value).T)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: fixture HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(512, b" "))


def panoptic_stuffonly_reference(rgb, segments_info, categories):
    stuff_ids = sorted(c["id"] for c in categories if not c["isthing"])
    isthing = {c["id"]: bool(c["isthing"]) for c in categories}
    by_id = {s["id"]: s["category_id"] for s in segments_info}
    out = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    for y in range(rgb.shape[0]):
        for x in range(rgb.shape[1]):
            r, g, b = (int(c) for c in rgb[y, x])
            seg = r + 256 * g + 256 * 256 * b
            if seg in by_id:
                cat = by_id[seg]
                out[y, x] = 0 if isthing[cat] else 1 + stuff_ids.index(cat)
    return out


def panoptic_semseg_reference(rgb, segments_info, categories):
    """The 133-class map: categories numbered in id order, void 255."""
    ids = sorted(c["id"] for c in categories)
    by_id = {s["id"]: s["category_id"] for s in segments_info}
    out = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    for y in range(rgb.shape[0]):
        for x in range(rgb.shape[1]):
            r, g, b = (int(c) for c in rgb[y, x])
            seg = r + 256 * g + 256 * 256 * b
            if seg in by_id:
                out[y, x] = ids.index(by_id[seg])
    return out


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
def _rng(*key):
    return np.random.default_rng([20240601, *key])


def _write_jpg(path, h, w, rng):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, quality=90)


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_cityscapes(root, counts=(("train", "aachen", 2), ("val", "frankfurt", 2)), h=64, w=96):
    """leftImg8bit/<split>/<city>/*.png and gtFine/<split>/<city>/*_gtFine_{polygons.json,
    labelIds.png,instanceIds.png}, as in the official zips (the PNGs made with cityscapesscripts,
    as the originals were). Returns {"sources": [...], "expected": {output path: array}}."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    base = os.path.join(root, "cityscapes")
    labels = (CITYSCAPES_TRAIN_CLASSES + ["ego vehicle", "rectification border", "polegroup",
                                          "caravan", "license plate", "cargroup", "persongroup"])
    sources, expected = [], {}
    for split, city, n in counts:
        for i in range(n):
            rng = _rng(0, len(split), i)
            stem = f"{city}_000000_{i:06d}"
            image = os.path.join(base, "leftImg8bit", split, city, stem + "_leftImg8bit.png")
            os.makedirs(os.path.dirname(image), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(image)
            objects, ref = [], np.full((h, w), 255, dtype=np.uint8)
            # A background road, then rectangles of every kind, some deleted.
            rects = [("road", 0, h // 2, w - 1, h - 1, 0)]
            for k, label in enumerate(labels):
                x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
                x1 = x0 + int(rng.integers(3, min(30, w - x0)))
                y1 = y0 + int(rng.integers(3, min(20, h - y0)))
                rects.append((label, x0, y0, x1, y1, int(k % 9 == 4)))
            for label, x0, y0, x1, y1, deleted in rects:
                objects.append({
                    "label": label,
                    "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
                    "deleted": deleted,
                })
                tid = cityscapes_train_id(label)
                if not deleted and tid is not None:
                    ref[y0 : y1 + 1, x0 : x1 + 1] = tid
            gt_dir = os.path.join(base, "gtFine", split, city)
            os.makedirs(gt_dir, exist_ok=True)
            polygons = os.path.join(gt_dir, stem + "_gtFine_polygons.json")
            with open(polygons, "w") as f:
                json.dump({"imgHeight": h, "imgWidth": w, "objects": objects}, f)
            label_ids = os.path.join(gt_dir, stem + "_gtFine_labelIds.png")
            instance_ids = os.path.join(gt_dir, stem + "_gtFine_instanceIds.png")
            json2labelImg(polygons, label_ids, "ids")
            # The official instanceIds are 16-bit PNGs; json2instanceImg's int32 image cannot be
            # saved as PNG by recent Pillow, so store its values as uint16 as the zip does.
            annotation = Annotation()
            annotation.fromJsonFile(polygons)
            instances = np.array(createInstanceImage(annotation, "ids"), dtype=np.int64)
            Image.fromarray(instances.astype(np.uint16)).save(instance_ids)
            sources += [image, polygons, label_ids, instance_ids]
            expected[os.path.join(gt_dir, stem + "_gtFine_labelTrainIds.png")] = ref
    return {"sources": sources, "expected": expected}


def make_ade20k(root, counts=(("training", 3), ("validation", 2))):
    base = os.path.join(root, "ADEChallengeData2016")
    sources, expected = [], {}
    for folder, n in counts:
        for i in range(n):
            rng = _rng(1, len(folder), i)
            h, w = 48 + 8 * i, 64
            name = f"ADE_{'train' if folder == 'training' else 'val'}_{i + 1:08d}"
            image = os.path.join(base, "images", folder, name + ".jpg")
            _write_jpg(image, h, w, rng)
            raw = rng.integers(0, 151, size=(h, w)).astype(np.uint8)
            raw[0, :3] = [0, 1, 150]  # both ends of the range and "other"
            raw[h // 2 :, : w // 2] = rng.integers(0, 151)  # a large region to train on
            ann = os.path.join(base, "annotations", folder, name + ".png")
            _write_png(ann, raw)
            sources += [image, ann]
            expected[os.path.join(base, "annotations_detectron2", folder, name + ".png")] = (
                ade20k_reference(raw)
            )
    # Files that come with the zip and must be left alone.
    for extra in ("objectInfo150.txt", "sceneCategories.txt"):
        path = os.path.join(base, extra)
        with open(path, "w") as f:
            f.write("fixture\n")
        sources.append(path)
    return {"sources": sources, "expected": expected}


COCO_IMAGES = {"train2017": [9, 25, 30], "val2017": [139, 285]}


def make_coco_images(root):
    sources, sizes = [], {}
    for split, ids in COCO_IMAGES.items():
        for k, image_id in enumerate(ids):
            h, w = 40 + 8 * k, 56
            path = os.path.join(root, "coco", split, f"{image_id:012d}.jpg")
            _write_jpg(path, h, w, _rng(2, image_id))
            sources.append(path)
            sizes[(split, image_id)] = (h, w)
    return sources, sizes


def make_coco_stuff_164k(root, sizes):
    """coco/stuffthingmaps/{train2017,val2017}/<id>.png: COCO id - 1, 255 unlabeled."""
    unused_raw = [i - 1 for i in COCO_UNUSED_IDS]
    sources, expected = [], {}
    for (split, image_id), (h, w) in sorted(sizes.items()):
        rng = _rng(3, image_id)
        choices = np.array(list(range(182)) + [255], dtype=np.uint8)
        raw = rng.choice(choices, size=(h, w)).astype(np.uint8)
        raw[0, : len(unused_raw)] = unused_raw  # unused ids must become 255
        raw[1, :4] = [0, 181, 255, 91]
        raw[h // 2 :, : w // 2] = 123
        path = os.path.join(root, "coco", "stuffthingmaps", split, f"{image_id:012d}.png")
        _write_png(path, raw)
        sources.append(path)
        expected[os.path.join(root, "coco", "stuffthingmaps_detectron2", split,
                              f"{image_id:012d}.png")] = coco_stuff_164k_reference(raw)
    return {"sources": sources, "expected": expected}


def make_coco_stuff_10k(root, counts=(("train", 3), ("test", 2)), release="v1.1"):
    """
    coco/coco_stuff_10k/{images/*.jpg, annotations/*.mat (S), imageLists/{train,test}.txt}, as
    the v1.1 release (MATLAB 5 files) or the v1.0 release (MATLAB 7.3 files, other values).
    """
    from scipy.io import savemat

    base = os.path.join(root, "coco", "coco_stuff_10k")
    sources, expected, images = [], {}, {}
    os.makedirs(os.path.join(base, "imageLists"), exist_ok=True)
    for split, n in counts:
        names = []
        for i in range(n):
            name = f"COCO_train2014_{1000 * (len(split)) + i:012d}"
            names.append(name)
            rng = _rng(4, len(split), i)
            h, w = 40 + 4 * i, 60
            image = os.path.join(base, "images", name + ".jpg")
            _write_jpg(image, h, w, rng)
            mat = os.path.join(base, "annotations", name + ".mat")
            os.makedirs(os.path.dirname(mat), exist_ok=True)
            if release == "v1.0":
                s = rng.integers(0, 173, size=(h, w)).astype(np.uint16)
                s[0, :4] = [0, 1, 2, 172]  # unlabeled twice, first and last class
                s[h // 2 :, w // 2 :] = 150
                write_matlab_v73(mat, {"S": s})
            else:
                s = rng.integers(0, 183, size=(h, w)).astype(np.uint16)
                s[0, :4] = [0, 1, 182, 12]  # unlabeled, first and last id, an unused id
                s[h // 2 :, w // 2 :] = 150
                savemat(mat, {"S": s, "names": np.array(["unlabeled", "person"], dtype=object),
                              "captions": np.array(["a fixture"], dtype=object)})
            sources += [image, mat]
            images[os.path.join(base, "images_detectron2", split, name + ".jpg")] = image
            expected[os.path.join(base, "annotations_detectron2", split, name + ".png")] = (
                coco_stuff_10k_reference(s, release)
            )
        lst = os.path.join(base, "imageLists", f"{split}.txt")
        with open(lst, "w") as f:
            f.write("\n".join(names) + "\n")
        sources.append(lst)
    return {"sources": sources, "expected": expected, "images": images}


def panoptic_categories():
    """The COCO panoptic 2017 categories as its JSON lists them (ids, names, isthing)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [
        {"id": c["id"], "name": c["name"], "isthing": c["isthing"], "supercategory": "fixture"}
        for c in COCO_CATEGORIES
    ]


def make_coco_panoptic(root, sizes, png_dirs=None):
    """coco/annotations/panoptic_{split}.json and the panoptic PNGs (id = R + 256 G + 256^2 B);
    the expected outputs are both the 54-class panoptic_stuff_* and 133-class panoptic_semseg_*.
    ``png_dirs`` maps split -> folder relative to coco/ (default: Detectron2's place for train,
    annotations/panoptic_val2017, where unzipping the inner zip in place puts it, for val)."""
    png_dirs = png_dirs or {"train2017": "panoptic_train2017",
                            "val2017": "annotations/panoptic_val2017"}
    categories = panoptic_categories()
    thing_ids = [c["id"] for c in categories if c["isthing"]]
    stuff_ids = [c["id"] for c in categories if not c["isthing"]]
    sources, expected = [], {}
    for split in ("train2017", "val2017"):
        images, annotations = [], []
        for (s, image_id), (h, w) in sorted(sizes.items()):
            if s != split:
                continue
            rng = _rng(5, image_id)
            ids = np.zeros((h, w), dtype=np.int64)  # 0 = void
            segments = []
            cats = [int(rng.choice(thing_ids)), int(rng.choice(thing_ids)),
                    int(rng.choice(stuff_ids)), int(rng.choice(stuff_ids)), stuff_ids[0],
                    stuff_ids[-1]]
            for k, cat in enumerate(cats):
                seg_id = int(rng.integers(1, 256**3))
                y0, x0 = int(rng.integers(0, h - 10)), int(rng.integers(0, w - 10))
                y1, x1 = y0 + int(rng.integers(5, 20)), x0 + int(rng.integers(5, 30))
                ids[y0:y1, x0:x1] = seg_id
                segments.append({"id": seg_id, "category_id": cat, "iscrowd": int(k == 1),
                                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": 0})
            ids[h // 2 :, : w // 2] = segments[2]["id"]
            ids[-2:, -2:] = 777  # a segment id with no segments_info: unlabeled
            for seg in segments:
                seg["area"] = int((ids == seg["id"]).sum())
            segments = [seg for seg in segments if seg["area"] > 0]
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
            file_name = f"{image_id:012d}.png"
            png = os.path.join(root, "coco", png_dirs[split], file_name)
            _write_png(png, rgb)
            sources.append(png)
            images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h,
                           "width": w})
            annotations.append({"image_id": image_id, "file_name": file_name,
                                "segments_info": segments})
            expected[os.path.join(root, "coco", f"panoptic_stuff_{split}", file_name)] = (
                panoptic_stuffonly_reference(rgb, segments, categories)
            )
            expected[os.path.join(root, "coco", f"panoptic_semseg_{split}", file_name)] = (
                panoptic_semseg_reference(rgb, segments, categories)
            )
        path = os.path.join(root, "coco", "annotations", f"panoptic_{split}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                       "categories": categories}, f)
        sources.append(path)
    return {"sources": sources, "expected": expected}


def read_panoptic_ids(path):
    """The segment id of every pixel of a panoptic PNG (R + 256 G + 256^2 B), int64."""
    rgb = np.asarray(Image.open(path), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def make_coco_instances(root):
    """coco/annotations/instances_{split}.json (COCO's detection format, the file Detectron2's
    COCO panoptic "separated" registration reads) from the panoptic JSON and PNGs written by
    :func:`make_coco_panoptic`: one object per "thing" segment, its mask as polygons (the
    bounding rectangle of each connected part: the segments there are unions of rectangles,
    partly covered by later ones, so the polygons may hold a few pixels more)."""
    import cv2

    categories = panoptic_categories()
    things = {c["id"]: c for c in categories if c["isthing"]}
    for split in ("train2017", "val2017"):
        with open(os.path.join(root, "coco", "annotations", f"panoptic_{split}.json")) as f:
            panoptic = json.load(f)
        objects = []
        for ann in panoptic["annotations"]:
            png = [os.path.join(root, "coco", d, ann["file_name"])
                   for d in (f"panoptic_{split}", f"annotations/panoptic_{split}")]
            ids = read_panoptic_ids(next(p for p in png if os.path.exists(p)))
            for seg in ann["segments_info"]:
                if seg["category_id"] not in things:
                    continue
                mask = (ids == seg["id"]).astype(np.uint8)
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                # Pixel corners, not centres: a polygon around the pixels it covers.
                polygons = []
                for c in contours:
                    x, y, w, h = cv2.boundingRect(c)
                    polygons.append([float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)])
                ys, xs = np.nonzero(mask)
                objects.append({
                    "id": len(objects) + 1, "image_id": ann["image_id"],
                    "category_id": seg["category_id"], "iscrowd": seg["iscrowd"],
                    "area": int(mask.sum()), "segmentation": polygons,
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                             int(ys.max() - ys.min() + 1)],
                })
        path = os.path.join(root, "coco", "annotations", f"instances_{split}.json")
        with open(path, "w") as f:
            json.dump({"info": {}, "licenses": [], "images": panoptic["images"],
                       "annotations": objects,
                       "categories": [{"id": c["id"], "name": c["name"],
                                       "supercategory": c["supercategory"]}
                                      for c in things.values()]}, f)


def make_all(root):
    """Every data set in one root, as a user would have them. Returns {dataset: description}."""
    image_sources, sizes = make_coco_images(root)
    out = {
        "cityscapes": make_cityscapes(root),
        "ade20k": make_ade20k(root),
        "coco_stuff_164k": make_coco_stuff_164k(root, sizes),
        "coco_stuff_10k": make_coco_stuff_10k(root),
        "coco_panoptic": make_coco_panoptic(root, sizes),
    }
    out["coco_stuff_164k"]["sources"] += image_sources
    out["coco_panoptic"]["sources"] += image_sources
    return out
