"""
Panoptic FPN with region contrast on its semantic branch, end to end as a user runs it: a tiny
COCO panoptic in the official layout and formats under $DETECTRON2_DATASETS (images, panoptic
JSON and PNGs, instances JSON), this project's prepare script for the stuff-only maps, then
``train_net.py`` with the region-contrast recipe on Detectron2's builtin
``coco_2017_{train,val}_panoptic_separated``: a few iterations, then Detectron2's evaluators
(stuff mIoU, COCO box and mask AP, and PQ where panopticapi is installed). With 2 processes too
where this Detectron2's ``launch`` starts CPU processes.
"""
import os
import subprocess
import sys

import pytest
import torch

import fixtures_raw as fx
from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import PanopticFPN
from region_contrast.compat import launch_runs_on_cpu
from region_contrast.engine import Trainer, load_config
from region_contrast.engine.trainer import panoptic_quality_available

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


@pytest.mark.parametrize("processes", [
    1,
    pytest.param(2, marks=pytest.mark.skipif(
        not (launch_runs_on_cpu() or torch.cuda.is_available()),
        reason="this Detectron2's launch() starts GPU processes only (v0.6 asserts CUDA)")),
])
def test_panoptic_fpn_with_region_contrast_trains_and_evaluates(coco_panoptic, tmp_path,
                                                                processes):
    proc = train_net(coco_panoptic, "--config-file", RECIPE, "--num-gpus", str(processes),
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
