"""tools/run_experiments.py --quick on a tiny DigitScenes: runs, table, plot, resumption."""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

import region_contrast  # noqa: F401
from region_contrast.data import digit_scenes as ds
from conftest import tiny_digit_scenes, unregister

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool():
    path = os.path.join(REPO, "tools", "run_experiments.py")
    spec = importlib.util.spec_from_file_location("run_experiments", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    names = tiny_digit_scenes(str(tmp_path_factory.mktemp("d2_datasets")), "exp_digit_scenes",
                              num_val=3, size=128, seed=2)
    yield names
    unregister(names)


def argv(tmp_path, seeds=("0", "1"), variants=("baseline", "region"), extra_opts=()):
    return [
        "--quick", "--seeds", *seeds, "--variants", *variants,
        "--output-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "digit_scenes"),
        "--opts", "DATASETS.TRAIN", "('exp_digit_scenes_train',)",
        "DATASETS.TEST", "('exp_digit_scenes_val',)", *extra_opts,
    ]


def test_quick_runs_write_table_and_plot_and_resume(tmp_path, tiny_scenes):
    tool = load_tool()
    summary = tool.main(argv(tmp_path))

    records = {}
    for variant in ("baseline", "region"):
        for seed in (0, 1):
            with open(tmp_path / "runs" / f"{variant}_seed{seed}" / "run.json") as f:
                records[variant, seed] = json.load(f)
    # The region-contrast runs really trained with the bank; the baseline without one.
    assert "MODEL.REGION_CONTRAST.ENABLED" not in " ".join(records["region", 0]["argv"])
    for variant in ("baseline", "region"):
        mious = [records[variant, s]["sem_seg"]["mIoU"] for s in (0, 1)]
        mean, std, n = summary[variant]["miou"]
        assert n == 2
        assert mean == pytest.approx(np.mean(mious)) and std == pytest.approx(np.std(mious))

    table = (tmp_path / "digit_scenes.md").read_text()
    for variant in ("baseline", "region"):
        mean, std, _ = summary[variant]["miou"]
        assert f"| {variant} | {mean:.1f} +/- {std:.1f} | 2 |" in table
    for name in ds.DIGIT_SCENES_CLASSES:
        assert f"| {name} |" in table
    assert "Commit of the runs:" in table and "Machine:" in table

    plot = np.asarray(Image.open(tmp_path / "digit_scenes.png").convert("RGB"))
    assert plot.shape == (400, 600, 3)
    assert plot.std() > 10 and len(np.unique(plot.reshape(-1, 3), axis=0)) > 10

    # A second call trains nothing: the finished runs are read back unchanged.
    done = tmp_path / "runs" / "baseline_seed0" / "run.json"
    stamp = os.stat(done).st_mtime_ns
    again = tool.main(argv(tmp_path))
    assert os.stat(done).st_mtime_ns == stamp
    assert again["baseline"]["miou"] == summary["baseline"]["miou"]

    # Other arguments for the same folder: that run is trained again, not silently reused.
    tool.main(argv(tmp_path, ("0",), ("baseline",), ("SOLVER.BASE_LR", "0.001")))
    with open(done) as f:
        assert "SOLVER.BASE_LR" in json.load(f)["argv"]
