"""The recipes the benchmark measures, synthetic batches shaped like their data, and part 4 (bank
bytes of every recipe in configs/)."""
import os

import torch

from .common import CONFIGS, PIXELS_PER_CLASS, REPO


def _merged_cfg(path):
    from region_contrast.engine import get_region_contrast_cfg

    cfg = get_region_contrast_cfg()
    cfg.merge_from_file(path)
    return cfg


def all_recipes():
    out = []
    for root, _dirs, files in os.walk(CONFIGS):
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                out.append(os.path.join(root, name))
    return sorted(out)


def find_recipe(folder, accept):
    """First recipe under configs/<folder> with 'region_contrast' in its name that ``accept``s."""
    base = os.path.join(CONFIGS, folder)
    if not os.path.isdir(base):
        return None, None
    for path in all_recipes():
        if not path.startswith(base + os.sep) or "region_contrast" not in os.path.basename(path):
            continue
        try:
            cfg = _merged_cfg(path)
        except Exception:
            continue
        if cfg.MODEL.REGION_CONTRAST.ENABLED and accept(cfg):
            return path, cfg
    return None, None


def _is_deeplab_v3_plus(cfg):
    return "V3Plus" in cfg.MODEL.SEM_SEG_HEAD.NAME


def digit_scenes_cfg():
    path, cfg = find_recipe("DigitScenes", _is_deeplab_v3_plus)
    if cfg is None:
        path = os.path.join(CONFIGS, "Base-DigitScenes.yaml")
        cfg = _merged_cfg(path)
        cfg.MODEL.REGION_CONTRAST.ENABLED = True
        source = "configs/Base-DigitScenes.yaml with MODEL.REGION_CONTRAST.ENABLED True"
    else:
        source = os.path.relpath(path, REPO)
    return cfg, source


def digit_scenes_fpn_cfg():
    """The DigitScenes Semantic FPN recipe with region contrast (RegionContrastHead)."""
    path, cfg = find_recipe("DigitScenes", lambda c: (
        c.MODEL.SEM_SEG_HEAD.NAME == "RegionContrastHead"
        and c.MODEL.REGION_CONTRAST.HEAD_NAME == "SemSegFPNHead"))
    if cfg is None:
        raise FileNotFoundError("configs/DigitScenes has no Semantic FPN region contrast recipe")
    return cfg, os.path.relpath(path, REPO)


def coco_panoptic_fpn_cfg():
    """
    The COCO panoptic Panoptic FPN region-contrast recipe, with GroupNorm in the backbone: no
    pretrained weights offline, and a random ResNet with the recipe's frozen statistics has
    unbounded activations (no finite proposal, so no representative R-CNN work).
    """
    path, cfg = find_recipe("COCO-Panoptic", lambda c: (
        c.MODEL.META_ARCHITECTURE == "PanopticFPN" and c.SOLVER.MAX_ITER == 90000))
    if cfg is None:
        raise FileNotFoundError("configs/COCO-Panoptic has no 1x Panoptic FPN region contrast "
                                "recipe")
    # The recipe's lr 0.02 on random weights and synthetic data diverges within the timed steps
    # (non-finite boxes leave the R-CNN heads without work); the step's cost does not depend on
    # the learning rate.
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "GN", "SOLVER.BASE_LR", "0.0002"])
    return cfg, (os.path.relpath(path, REPO)
                 + " with MODEL.RESNETS.NORM GN and SOLVER.BASE_LR 0.0002 (random weights)")


def _is_cityscapes_r101_v3plus(cfg):
    return (
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19
        and cfg.MODEL.RESNETS.DEPTH == 101
        and "V3Plus" in cfg.MODEL.SEM_SEG_HEAD.NAME
    )


def cityscapes_cfg():
    """The Cityscapes DeepLabV3+ R101 RC recipe if configs/Cityscapes has one, else overrides."""
    path, cfg = find_recipe("Cityscapes", _is_cityscapes_r101_v3plus)
    if cfg is not None:
        return cfg, os.path.relpath(path, REPO)
    from region_contrast.engine import get_region_contrast_cfg

    cfg = get_region_contrast_cfg()
    m = cfg.MODEL
    m.META_ARCHITECTURE = "RegionContrastSegmentor"
    m.WEIGHTS = ""
    m.PIXEL_MEAN = [123.675, 116.28, 103.53]
    m.PIXEL_STD = [58.395, 57.12, 57.375]
    m.BACKBONE.NAME = "build_resnet_deeplab_backbone"
    m.BACKBONE.FREEZE_AT = 0
    m.RESNETS.DEPTH = 101
    m.RESNETS.STEM_TYPE = "deeplab"
    m.RESNETS.STEM_OUT_CHANNELS = 128
    m.RESNETS.STRIDE_IN_1X1 = False
    m.RESNETS.RES4_DILATION = 1
    m.RESNETS.RES5_DILATION = 2
    m.RESNETS.RES5_MULTI_GRID = [1, 2, 4]
    m.RESNETS.OUT_FEATURES = ["res2", "res5"]
    m.RESNETS.NORM = "BN"
    m.SEM_SEG_HEAD.NAME = "RegionContrastDeepLabV3PlusHead"
    m.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res5"]
    m.SEM_SEG_HEAD.PROJECT_FEATURES = ["res2"]
    m.SEM_SEG_HEAD.PROJECT_CHANNELS = [48]
    m.SEM_SEG_HEAD.ASPP_CHANNELS = 256
    m.SEM_SEG_HEAD.ASPP_DILATIONS = [6, 12, 18]
    m.SEM_SEG_HEAD.ASPP_DROPOUT = 0.1
    m.SEM_SEG_HEAD.CONVS_DIM = 256
    m.SEM_SEG_HEAD.COMMON_STRIDE = 4
    m.SEM_SEG_HEAD.NUM_CLASSES = 19
    m.SEM_SEG_HEAD.NORM = "BN"
    m.SEM_SEG_HEAD.LOSS_TYPE = "hard_pixel_mining"
    m.SEM_SEG_HEAD.IGNORE_VALUE = 255
    m.REGION_CONTRAST.ENABLED = True
    # One slot per Cityscapes training image and class.
    m.REGION_CONTRAST.MEMORY_SIZE = 2975
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (512, 1024)
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.IMS_PER_BATCH = 16
    return cfg, ("overrides (no Cityscapes RC recipe in configs/): DeepLabV3+ R101, deeplab stem, "
                 "RES5_DILATION 2 (os16), res2/res5, ASPP 256, 19 classes, MEMORY_SIZE 2975, SGD")


def class_count_cfg(cityscapes, folder, num_classes):
    """An ADE20K / COCO-Stuff RC recipe in configs/<folder>, else Cityscapes' with C classes."""
    path, cfg = find_recipe(folder, lambda c: c.MODEL.SEM_SEG_HEAD.NUM_CLASSES == num_classes
                            and "V3Plus" in c.MODEL.SEM_SEG_HEAD.NAME)
    if cfg is not None:
        return cfg, os.path.relpath(path, REPO)
    cfg = cityscapes.clone()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.INPUT.CROP.SIZE = (512, 512)
    return cfg, f"Cityscapes recipe with NUM_CLASSES {num_classes}, crop 512x512"


def prepare_cfg(cfg, device, crop=None, enabled=True, opts=()):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = device.type
    cfg.MODEL.WEIGHTS = ""  # never download anything
    if crop is not None:
        cfg.INPUT.CROP.ENABLED = True
        cfg.INPUT.CROP.TYPE = "absolute"
        cfg.INPUT.CROP.SIZE = tuple(crop)
    # SyncBN needs a process group; one process on one device is plain BN.
    for node in (cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD):
        if node.NORM in ("SyncBN", "nnSyncBN", "naiveSyncBN"):
            node.NORM = "BN"
    cfg.MODEL.REGION_CONTRAST.ENABLED = enabled
    cfg.freeze()
    return cfg


def _blob(h, w, cy, cx, ry, rx):
    y = torch.arange(h, dtype=torch.float32).unsqueeze(1)
    x = torch.arange(w, dtype=torch.float32).unsqueeze(0)
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2


def digit_scenes_batch(n, crop, num_classes, g):
    """Shaped like DigitScenes: mostly background (0), 2-6 digit-class strokes, 255 rims."""
    h, w = crop
    batch = []
    for _ in range(n):
        label = torch.zeros(h, w, dtype=torch.long)
        image = torch.rand(3, h, w, generator=g) * 80 + 40
        for _ in range(int(torch.randint(2, 7, (1,), generator=g))):
            cls = int(torch.randint(1, num_classes, (1,), generator=g))
            r = float(torch.empty(1).uniform_(min(h, w) * 0.06, min(h, w) * 0.16, generator=g))
            cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
            d = _blob(h, w, cy, cx, r * 1.3, r)
            stroke = (d >= 0.45) & (d <= 1.0)
            rim = (d > 1.0) & (d <= 1.35) & (label == 0)
            label[stroke] = cls
            label[rim] = 255
            image[:, stroke] = 230.0
        batch.append({"image": image, "sem_seg": label, "height": h, "width": w})
    return batch


def street_batch(n, crop, num_classes, g):
    """Cityscapes-like: sky / building / road bands and 8-16 other regions per image, 3% ignore."""
    h, w = crop
    batch = []
    cell = 16
    gh, gw = max(1, h // cell), max(1, w // cell)
    for _ in range(n):
        coarse = torch.empty(gh, gw, dtype=torch.long)
        coarse[: gh // 4] = 10 % num_classes  # sky
        coarse[gh // 4: gh // 2] = 2 % num_classes  # building
        coarse[gh // 2:] = 0  # road
        others = torch.randperm(num_classes, generator=g)[: min(num_classes, 16)]
        for k in range(int(torch.randint(8, 17, (1,), generator=g))):
            cls = int(others[k % others.numel()])
            y0 = int(torch.randint(0, gh, (1,), generator=g))
            x0 = int(torch.randint(0, gw, (1,), generator=g))
            coarse[y0: y0 + 1 + gh // 6, x0: x0 + 1 + gw // 8] = cls
        label = coarse.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        label = torch.nn.functional.pad(label, (0, w - label.shape[1], 0, h - label.shape[0]),
                                        value=255)[:h, :w].clone()
        label[torch.rand(h, w, generator=g) < 0.03] = 255
        image = torch.rand(3, h, w, generator=g) * 255
        batch.append({"image": image, "sem_seg": label, "height": h, "width": w})
    return batch


def panoptic_batch(n, crop, num_classes, g):
    """
    COCO-panoptic-like for Panoptic FPN: stuff bands and blocks (classes 1..num_classes-1), 2-6
    "thing" rectangles (80 thing classes) that are class 0 in the semantic map and instances with
    boxes and masks; 3% ignore.
    """
    from detectron2.structures import BitMasks, Boxes, Instances

    h, w = crop
    batch = []
    for _ in range(n):
        label = torch.empty(h, w, dtype=torch.long)
        stuff = torch.randint(1, num_classes, (4,), generator=g)
        for k in range(4):  # horizontal bands of stuff
            label[k * h // 4: (k + 1) * h // 4] = stuff[k]
        boxes, classes, masks = [], [], []
        for _ in range(int(torch.randint(2, 7, (1,), generator=g))):
            bh = int(torch.randint(h // 8, h // 2, (1,), generator=g))
            bw = int(torch.randint(w // 8, w // 2, (1,), generator=g))
            y0 = int(torch.randint(0, h - bh, (1,), generator=g))
            x0 = int(torch.randint(0, w - bw, (1,), generator=g))
            mask = torch.zeros(h, w, dtype=torch.bool)
            mask[y0: y0 + bh, x0: x0 + bw] = True
            label[mask] = 0
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            classes.append(int(torch.randint(0, 80, (1,), generator=g)))
            masks.append(mask)
        label[torch.rand(h, w, generator=g) < 0.03] = 255
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.gt_classes = torch.tensor(classes)
        instances.gt_masks = BitMasks(torch.stack(masks))
        image = torch.rand(3, h, w, generator=g) * 255
        batch.append({"image": image, "sem_seg": label, "instances": instances,
                      "height": h, "width": w})
    return batch


def prefill_bank(bank, seed):
    """Fills every slot with random unit rows through ``push`` (a steady-state bank)."""
    g = torch.Generator().manual_seed(seed)
    step = max(1, 2**22 // (bank.size * bank.dim))  # classes per push: bounded temporaries
    for first in range(0, bank.num_classes, step):
        classes = torch.arange(first, min(first + step, bank.num_classes))
        rows = torch.randn(classes.numel() * bank.size, bank.dim, generator=g)
        rows = torch.nn.functional.normalize(rows, dim=1)
        device = bank.features.device
        bank.push(rows.to(device), classes.repeat_interleave(bank.size).to(device))


def _bank_row(name, num_classes, size, dim, dtype, enabled):
    fp32 = num_classes * size * dim * 4
    return {
        "recipe": name,
        "region_contrast_enabled": bool(enabled),
        "num_classes": num_classes,
        "memory_size": size,
        "dim": dim,
        "configured_dtype": dtype,
        "bank_bytes_fp32": fp32,
        "bank_bytes_fp16": fp32 // 2,
        "bank_bytes_bf16": fp32 // 2,
        "bank_bytes_configured": fp32 // (1 if dtype == "float32" else 2),
        "pixel_memory_bytes_fp32": num_classes * PIXELS_PER_CLASS * dim * 4,
        "pixel_memory_bytes_fp16": num_classes * PIXELS_PER_CLASS * dim * 2,
    }


def _embedding_dim(cfg):
    rc = cfg.MODEL.REGION_CONTRAST
    if rc.PROJ_DIM:
        return rc.PROJ_DIM
    head = cfg.MODEL.SEM_SEG_HEAD
    name = rc.HEAD_NAME if head.NAME == "RegionContrastHead" else head.NAME
    # DeepLabV3's classifier reads the ASPP output; DeepLabV3+'s and Semantic FPN's CONVS_DIM.
    return head.ASPP_CHANNELS if name.endswith("DeepLabV3Head") else head.CONVS_DIM


def memory_table(extra):
    rows = []
    for path in all_recipes():
        rel = os.path.relpath(path, REPO)
        try:
            cfg = _merged_cfg(path)
        except Exception as e:
            rows.append({"recipe": rel, "error": repr(e)})
            continue
        rc = cfg.MODEL.REGION_CONTRAST
        row = _bank_row(rel, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, rc.MEMORY_SIZE,
                        _embedding_dim(cfg), rc.MEMORY_DTYPE, rc.ENABLED)
        row["base_file"] = os.path.basename(path).startswith("Base-")
        rows.append(row)
    for name, cfg in extra:
        rc = cfg.MODEL.REGION_CONTRAST
        row = _bank_row(name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, rc.MEMORY_SIZE,
                        _embedding_dim(cfg), rc.MEMORY_DTYPE, True)
        row["base_file"] = False
        rows.append(row)
    return rows
