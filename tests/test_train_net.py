"""train_net.py's own code path on a tiny DigitScenes: train, checkpoint, resume, evaluate."""
import glob
import os

import pytest
import torch

import region_contrast  # noqa: F401
from conftest import load_train_net, tiny_digit_scenes, unregister
from detectron2.engine import default_argument_parser
from region_contrast.engine import get_region_contrast_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
DIGIT_RECIPES = [c for c in CONFIGS if os.sep + "DigitScenes" + os.sep in c]


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("d2_datasets"))
    names = tiny_digit_scenes(root, "tiny_digit_scenes", num_train=16, num_val=4, size=128)
    yield names
    unregister(names)


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


def run(train_net, config, opts, *flags):
    args = default_argument_parser().parse_args(["--config-file", config, *flags, *opts])
    return train_net.main(args)


def test_every_recipe_loads():
    assert CONFIGS, "no recipes found"
    for path in CONFIGS:
        cfg = get_region_contrast_cfg()
        cfg.merge_from_file(path)
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES > 0, path


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
    train_net = load_train_net()
    opts = tiny_opts(tmp_path, max_iter=3)
    results = run(train_net, config, opts)
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
    run(train_net, config, opts, "--resume")
    resumed = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert resumed["iteration"] == 2

    evaluated = run(
        train_net, config, opts + ["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")],
        "--eval-only",
    )
    assert evaluated["sem_seg"]["mIoU"] >= 0
    assert os.path.exists(tmp_path / "inference" / "tiny_digit_scenes_val"
                          / "sem_seg_evaluation.pth")
