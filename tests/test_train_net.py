"""train_net.py's own code path on a tiny DigitScenes: train, checkpoint, resume, evaluate."""
import glob
import math
import os
import subprocess
import sys

import pytest
import torch

import region_contrast  # noqa: F401
from conftest import digit_scenes_root
from detectron2.engine import default_argument_parser
from detectron2.layers import ASPP
from region_contrast import RegionContrastSegmentor, find_region_contrast
from region_contrast.engine import Trainer, get_region_contrast_cfg, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
DIGIT_RECIPES = [c for c in CONFIGS if os.sep + "DigitScenes" + os.sep in c]


def tiny_opts(output_dir, max_iter):
    return [
        "DATASETS.TRAIN", "('tiny_digit_scenes_train',)",
        "DATASETS.TEST", "('tiny_digit_scenes_val',)",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(output_dir),
    ]


def run(config, opts, *flags):
    args = default_argument_parser().parse_args(["--config-file", config, *flags, *opts])
    return main(args)


# The recipes a user trains; Base-*.yaml files are parts of them (data, model or schedule).
RECIPES = [c for c in CONFIGS if not os.path.basename(c).startswith("Base-")]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_recipe_builds_and_evaluates_any_image_size(path):
    """Each recipe builds its model (on the meta device: no memory, no weights), with the
    contrast exactly when enabled, and evaluates images of any size."""
    cfg = get_region_contrast_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        model = Trainer.build_model(cfg)
    assert (find_region_contrast(model) is not None) == cfg.MODEL.REGION_CONTRAST.ENABLED
    # A head whose ASPP pools over a fixed window (the crop) evaluates only sizes that tile it;
    # the recipe must then evaluate other sizes in windows.
    fixed = [m for m in model.modules() if isinstance(m, ASPP) and m.pool_kernel_size is not None]
    if fixed:
        assert isinstance(model, RegionContrastSegmentor), path
        assert model.window_size is not None or model.tile_size == tuple(cfg.INPUT.CROP.SIZE)


def test_digit_scenes_recipes_come_in_twins():
    baselines = [c for c in DIGIT_RECIPES if "region_contrast" not in os.path.basename(c)]
    assert baselines
    for path in baselines:
        twins = [os.path.join(os.path.dirname(path), os.path.basename(path).replace(
            "_digit_scenes", f"_region_contrast{variant}_digit_scenes"))
            for variant in ("", "_noproj")]
        twins = [t for t in twins if os.path.exists(t)]
        assert twins, f"no RegionContrast twin for {path}"
        for twin in twins:
            cfg = get_region_contrast_cfg()
            cfg.merge_from_file(twin)
            assert cfg.MODEL.REGION_CONTRAST.ENABLED
            assert (cfg.MODEL.REGION_CONTRAST.PROJ_DIM == 0) == ("_noproj" in twin), twin


@pytest.mark.parametrize("config", DIGIT_RECIPES, ids=os.path.basename)
def test_train_checkpoint_resume_and_evaluate(tiny_scenes, tmp_path, config):
    opts = tiny_opts(tmp_path, max_iter=3)
    results = run(config, opts)
    assert set(results["sem_seg"]) >= {"mIoU", "fwIoU", "mACC", "pACC"}
    assert os.path.exists(tmp_path / "model_final.pth")
    assert os.path.exists(tmp_path / "model_0000001.pth")

    # --resume continues from the last checkpoint; with RegionContrast the bank comes back too.
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["iteration"] == 2
    if "region_contrast" in os.path.basename(config):
        assert int(state["model"]["sem_seg_head.region_contrast.memory_bank.count"].sum()) > 0
    # Resume from the mid-run checkpoint: the last iteration is trained again from there.
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    os.remove(tmp_path / "model_final.pth")
    resumed_results = run(config, opts, "--resume")
    resumed = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert resumed["iteration"] == 2

    evaluated = run(
        config, opts + ["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")],
        "--eval-only",
    )
    # The same weights on the same images: the resumed training's final evaluation exactly.
    expected = resumed_results["sem_seg"]
    assert evaluated["sem_seg"].keys() == expected.keys()
    for key, value in evaluated["sem_seg"].items():  # NaN: a class absent from the images
        assert value == expected[key] or (math.isnan(value) and math.isnan(expected[key])), key
    assert os.path.exists(tmp_path / "inference" / "tiny_digit_scenes_val"
                          / "sem_seg_evaluation.pth")


def test_train_net_py_runs_and_starts_quietly_as_a_user_types_it(tiny_scenes, tmp_path):
    """The script itself, in a new process: imports in its own order, data sets registered
    from $DETECTRON2_DATASETS, two iterations and the evaluation, no warning a user cannot act
    on."""
    root = digit_scenes_root(tiny_scenes)
    recipe = os.path.join(REPO, "configs", "DigitScenes",
                          "semantic_R_18_FPN_region_contrast_noproj_digit_scenes_1500_bs8.yaml")
    command = [sys.executable, "train_net.py", "--config-file", recipe,
               "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
               "MODEL.REGION_CONTRAST.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
               "OUTPUT_DIR", str(tmp_path)]
    env = {**os.environ, "DETECTRON2_DATASETS": root, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "copypaste: mIoU" in proc.stdout + proc.stderr
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert int(state["model"]["sem_seg_head.region_contrast.memory_bank.count"].sum()) > 0
    assert "Warning" not in proc.stderr, [line for line in proc.stderr.splitlines()
                                          if "Warning" in line]
