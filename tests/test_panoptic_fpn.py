"""
Panoptic FPN with region contrast on its semantic branch, end to end as a user runs it: a tiny
COCO panoptic in the official layout and formats under $DETECTRON2_DATASETS (images, panoptic
JSON and PNGs, instances JSON), this project's prepare script for the stuff-only maps, then
``train_net.py`` with the region-contrast recipe on Detectron2's builtin
``coco_2017_{train,val}_panoptic_separated``: a few iterations, then Detectron2's evaluators
(stuff mIoU, COCO box and mask AP, and PQ where panopticapi is installed). With 2 processes too
where this Detectron2's ``launch`` starts CPU processes.
"""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import fixtures_raw as fx
from conftest import REPO, SEVERAL_PROCESSES, unregister
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_panoptic_separated
from detectron2.modeling import PanopticFPN
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.structures import BitMasks
from region_contrast.data.mapper import ValidatingDatasetMapper
from region_contrast.engine import Trainer, load_config
from region_contrast.engine.trainer import check_evaluation, panoptic_quality_available

RECIPES = os.path.join(REPO, "configs", "COCO-Panoptic")
RECIPE = os.path.join(RECIPES, "panoptic_fpn_R_50_region_contrast_coco_panoptic_90k_bs16.yaml")
BASELINE = os.path.join(RECIPES, "panoptic_fpn_R_50_coco_panoptic_90k_bs16.yaml")
BANK = "sem_seg_head.region_contrast.memory_bank."
# Tiny images (40-56 px, shortest edge 64 in the model), no pretrained weights (offline: GroupNorm
# in the backbone instead of the frozen statistics of the pretrained one, which leave a random
# ResNet's activations unbounded and the RPN without a finite proposal), a bank
# of 8 slots per class, the contrast on from the first iteration; every detection kept, so that an
# untrained model still has instances for box/mask AP and the panoptic merge.
TINY = [
    "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "GN",
    "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.002",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.REGION_CONTRAST.WARMUP_ITERS", "0", "MODEL.REGION_CONTRAST.MEMORY_SIZE", "8",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH", "0.0",
]


@pytest.fixture(scope="module")
def coco_panoptic(tmp_path_factory):
    """$DETECTRON2_DATASETS with a tiny COCO panoptic (3 train, 2 val images), prepared by the
    project's script as a user runs it."""
    root = str(tmp_path_factory.mktemp("coco_panoptic"))
    _, sizes = fx.make_coco_images(root)
    # Where Detectron2's registration reads the panoptic PNGs (coco/panoptic_{train,val}2017).
    fx.make_coco_panoptic(root, sizes, png_dirs={"train2017": "panoptic_train2017",
                                                 "val2017": "panoptic_val2017"})
    fx.make_coco_instances(root)
    proc = subprocess.run(
        [sys.executable, "datasets/prepare_coco_panoptic_stuff_sem_seg.py", "--workers", "1",
         "--no-progress"],
        cwd=REPO, env={**os.environ, "DETECTRON2_DATASETS": root}, capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def train_net(root, *args):
    env = {**os.environ, "DETECTRON2_DATASETS": root, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train_net.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


# Where this Detectron2's launch() starts CPU processes (official main), the run uses 2 of them:
# the same mapper, model and evaluators as one process, plus gloo, DDP and evaluation across
# ranks. Detectron2 v0.6's launch() asserts CUDA, so there it is one process.
PROCESSES = 2 if SEVERAL_PROCESSES else 1


def test_panoptic_fpn_with_region_contrast_trains_and_evaluates(coco_panoptic, tmp_path):
    proc = train_net(coco_panoptic, "--config-file", RECIPE, "--num-gpus", str(PROCESSES),
                     *TINY, "OUTPUT_DIR", str(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "loss_contrast" in output and "loss_mask" in output and "loss_rpn_cls" in output
    # Detectron2's evaluators, as its tools/train_net.py builds them for this data set.
    for task in ("bbox", "segm", "sem_seg"):
        assert f"copypaste: Task: {task}" in output, task
    assert ("copypaste: Task: panoptic_seg" in output) == panoptic_quality_available()
    assert ("panopticapi is not installed" in output) != panoptic_quality_available()

    model = torch.load(tmp_path / "model_final.pth", map_location="cpu",
                       weights_only=False)["model"]
    count = model[BANK + "count"]
    # Class 0 (every "thing") never enters the bank; stuff regions do.
    assert int(count[0]) == 0 and int(count[1:].sum()) > 0
    assert not model[BANK + "features"][0].any()
    if PROCESSES > 1:
        assert f"memory bank is identical on all {PROCESSES} ranks" in output

    # The checkpoint loads into Detectron2's plain PanopticFPN (the baseline recipe): only the
    # contrast's own entries are left over.
    cfg = load_config(BASELINE, TINY)
    plain = Trainer.build_model(cfg)
    assert type(plain) is PanopticFPN
    incompatible = DetectionCheckpointer(plain).load(str(tmp_path / "model_final.pth"))
    assert incompatible is not None
    for name, value in plain.state_dict().items():
        assert torch.equal(value, model[name]), name
    assert {k for k in model if k not in plain.state_dict()} == {
        BANK + "features", BANK + "ptr", BANK + "count"}

    # The twin with the contrast disabled is that same Detectron2 model.
    disabled = Trainer.build_model(load_config(
        RECIPE, TINY + ["MODEL.REGION_CONTRAST.ENABLED", "False"]))
    assert type(disabled) is PanopticFPN and type(disabled.sem_seg_head) is SemSegFPNHead
    assert disabled.state_dict().keys() == plain.state_dict().keys()


def test_mapper_gives_instances_aligned_with_the_semantic_map(coco_panoptic):
    """Registered as Detectron2 registers COCO panoptic ("separated": instances + stuff map),
    mapped with and without a flip: the instances are the sample's non-crowd things, on the
    pixels the stuff map calls "thing" (0), and move with the map."""
    coco = os.path.join(coco_panoptic, "coco")
    builtin = MetadataCatalog.get("coco_2017_val_panoptic_separated")
    classes = {k: builtin.get(k) for k in (
        "thing_classes", "thing_colors", "stuff_classes", "stuff_colors",
        "thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id")}
    register_coco_panoptic_separated(
        "tiny_coco_panoptic", classes, os.path.join(coco, "val2017"),
        os.path.join(coco, "panoptic_val2017"),
        os.path.join(coco, "annotations", "panoptic_val2017.json"),
        os.path.join(coco, "panoptic_stuff_val2017"),
        os.path.join(coco, "annotations", "instances_val2017.json"),
    )
    name = "tiny_coco_panoptic_separated"
    try:
        records = DatasetCatalog.get(name)
    finally:
        unregister([name])
    with open(os.path.join(coco, "annotations", "panoptic_val2017.json")) as f:
        segments = {a["image_id"]: a for a in json.load(f)["annotations"]}
    cfg = load_config(RECIPE, TINY)
    plain = ValidatingDatasetMapper(cfg, is_train=True, augmentations=[])
    flipped = ValidatingDatasetMapper(cfg, is_train=True, augmentations=[T.RandomFlip(prob=1.0)])
    checked = 0
    for record in records:
        a, b = plain(record), flipped(record)
        assert torch.equal(b["sem_seg"], a["sem_seg"].flip(-1))
        assert torch.equal(b["instances"].gt_classes, a["instances"].gt_classes)
        h, w = a["sem_seg"].shape
        masks = torch.zeros(0, h, w, dtype=torch.bool)
        if len(a["instances"]):
            masks = BitMasks.from_polygon_masks(a["instances"].gt_masks, h, w).tensor
            flipped_masks = BitMasks.from_polygon_masks(b["instances"].gt_masks, h, w).tensor
            assert torch.equal(flipped_masks, masks.flip(-1))

        pan = segments[record["image_id"]]
        ids = torch.from_numpy(fx.read_panoptic_ids(
            os.path.join(coco, "panoptic_val2017", pan["file_name"])))
        things = [s for s in pan["segments_info"] if s["category_id"] in
                  classes["thing_dataset_id_to_contiguous_id"] and not s["iscrowd"]]
        expected = sorted(classes["thing_dataset_id_to_contiguous_id"][s["category_id"]]
                          for s in things)
        assert sorted(a["instances"].gt_classes.tolist()) == expected
        for s in things:
            pixels = ids == s["id"]
            assert (a["sem_seg"][pixels] == 0).all()  # "thing" in the stuff-only map
            assert masks.any(dim=0)[pixels].all()     # inside the instances' masks
            checked += 1
    assert checked > 0


def test_test_time_augmentation_on_panoptic_data_fails_before_training():
    cfg = load_config(RECIPE, TINY + ["TEST.AUG.ENABLED", "True"])
    with pytest.raises(ValueError, match="TEST.AUG.ENABLED is True, but DATASETS.TEST has "
                                         "'coco_2017_val_panoptic_separated'"):
        check_evaluation(cfg)


def test_missing_panoptic_ground_truth_is_named_before_training(caplog, monkeypatch):
    """Detectron2's registration of the val set points where this process's
    $DETECTRON2_DATASETS has no COCO: without panopticapi (no PQ) a warning, with it an error
    naming the folder PQ would read after training."""
    root = MetadataCatalog.get("coco_2017_val_panoptic_separated").panoptic_root
    assert not os.path.exists(root)
    cfg = load_config(RECIPE, TINY)
    if panoptic_quality_available():
        with pytest.raises(FileNotFoundError,
                           match=f"panoptic_root {os.path.abspath(root)} does not exist"):
            check_evaluation(cfg)
    else:
        # Detectron2's setup_logger (train_net's setup, run by other tests in this process)
        # stops the project's logger from propagating to the root, where caplog listens.
        monkeypatch.setattr(logging.getLogger("region_contrast"), "propagate", True)
        check_evaluation(cfg)
        assert "panopticapi is not installed" in caplog.text
