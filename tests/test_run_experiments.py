"""tools/run_experiments.py --quick on a tiny DigitScenes: runs, table, plot, resumption."""
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
    import run_experiments  # tools/ is on pytest's pythonpath

    return run_experiments


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    names = tiny_digit_scenes(str(tmp_path_factory.mktemp("d2_datasets")), "exp_digit_scenes",
                              num_val=3, size=128, seed=2)
    yield names
    unregister(names)


def argv(tmp_path, stage="screen", seeds=("0", "1"), settings=("baseline", "region"),
         extra_opts=()):
    return [
        "--quick", "--stage", stage, "--seeds", *seeds, "--settings", *settings,
        "--records", str(tmp_path / "records"), "--output-dir", str(tmp_path / "runs"),
        "--results", str(tmp_path / "study"), "--data-prefix", "exp_digit_scenes",
        "--opts", *extra_opts,
    ]


def test_quick_runs_write_records_tables_and_plot_and_resume(tmp_path, tiny_scenes):
    tool = load_tool()
    summary = tool.main(argv(tmp_path))["screen"]

    records = {}
    for setting in ("baseline", "region"):
        for seed in (0, 1):
            with open(tmp_path / "records" / "screen" / f"{setting}_seed{seed}.json") as f:
                records[setting, seed] = json.load(f)
    record = records["region", 0]
    assert record["evaluated_on"] == "exp_digit_scenes_val" and record["commit"]
    for key in ("foreground_as_other_foreground", "foreground_as_background", "ncm_accuracy",
                "scatter_ratio"):
        assert key in record["diagnostics"], key
    fractions = record["diagnostics"]
    assert 0 <= fractions["foreground_as_other_foreground"] + fractions[
        "foreground_as_background"] <= 1
    for setting in ("baseline", "region"):
        mious = [records[setting, s]["sem_seg"]["mIoU"] for s in (0, 1)]
        mean, std, n = summary[setting]["miou"]
        assert n == 2
        assert mean == pytest.approx(np.mean(mious)) and std == pytest.approx(np.std(mious))

    table = (tmp_path / "study.md").read_text()
    assert "## Screen (exp_digit_scenes_val)" in table
    for setting in ("baseline", "region"):
        mean, std, _ = summary[setting]["miou"]
        assert f"| {setting} | demo | {mean:.1f} +/- {std:.1f} |" in table
    for name in ds.DIGIT_SCENES_CLASSES:
        assert f"| {name} |" in table
    assert "Commits of the runs:" in table and "Machine" in table

    plot = np.asarray(Image.open(tmp_path / "study.png").convert("RGB"))
    assert plot.std() > 10 and len(np.unique(plot.reshape(-1, 3), axis=0)) > 10

    # A second call trains nothing: the finished runs are read back unchanged.
    done = tmp_path / "records" / "screen" / "baseline_seed0.json"
    stamp = os.stat(done).st_mtime_ns
    again = tool.main(argv(tmp_path))["screen"]
    assert os.stat(done).st_mtime_ns == stamp
    assert again["baseline"]["miou"] == summary["baseline"]["miou"]

    # Other arguments for the same run: it is trained again, not silently reused.
    tool.main(argv(tmp_path, seeds=("0",), settings=("baseline",),
                   extra_opts=("SOLVER.BASE_LR", "0.001")))
    with open(done) as f:
        assert "SOLVER.BASE_LR" in json.load(f)["argv"]


def test_confirmation_takes_the_largest_gains_over_the_regimes_baseline_on_val():
    tool = load_tool()

    def record(setting, miou):
        return {"setting": setting, "sem_seg": {"mIoU": miou}}

    # region_long has the highest mIoU but loses to its own baseline: a regime, not a method.
    screen = [record("baseline", 60.0), record("region", 61.0), record("weight_0.5", 62.5),
              record("temperature_0.2", 59.0), record("region_long", 65.0),
              record("baseline_long", 70.0), record("baseline_few", 50.0),
              record("region_few", 51.0)]
    assert tool.choose_for_confirmation(screen) == ["baseline", "weight_0.5", "region"]
    screen[-1] = record("region_few", 53.0)
    assert tool.choose_for_confirmation(screen) == [
        "baseline_few", "region_few", "baseline", "weight_0.5"]
    # None beats its baseline: the closest one is still confirmed, to measure the difference.
    losers = [record("baseline", 60.0), record("region", 58.0), record("no_projection", 59.5),
              record("baseline_long", 70.0), record("region_long", 65.0)]
    assert tool.choose_for_confirmation(losers) == ["baseline", "no_projection"]
    # Each model has its own pick: Semantic FPN's best setting beside DeepLabV3+'s, even when
    # its gain is smaller than theirs (or none beats its baseline).
    fpn = [record("baseline_fpn", 55.0), record("fpn_no_projection", 55.5),
           record("fpn_projection_64", 56.0)]
    assert tool.choose_for_confirmation(screen + fpn) == [
        "baseline_few", "region_few", "baseline", "weight_0.5", "baseline_fpn",
        "fpn_projection_64"]
    fpn[1:] = [record("fpn_no_projection", 54.0), record("fpn_projection_64", 53.0)]
    assert tool.choose_for_confirmation(losers + fpn) == [
        "baseline", "no_projection", "baseline_fpn", "fpn_no_projection"]


def test_confirmation_evaluates_the_screens_checkpoint_as_a_fresh_training_would(
        tmp_path, tiny_scenes):
    tool = load_tool()
    tool.main(argv(tmp_path, seeds=("0",), settings=("region",)))
    summary = tool.main(argv(tmp_path, stage="confirmation", seeds=("0", "1"),
                             settings=("region",)))["confirmation"]
    reused, trained = summary["region"]["runs"]
    assert reused["evaluated_on"] == "exp_digit_scenes_test"
    assert reused["trained_in"]["stage"] == "screen" and "--eval-only" in reused["argv"]
    assert "trained_in" not in trained and "--eval-only" not in trained["argv"]
    assert os.path.isfile(tmp_path / "runs" / "confirmation" / "region_seed1" /
                          "model_final.pth")
    assert not os.path.exists(tmp_path / "runs" / "confirmation" / "region_seed0" /
                              "model_final.pth")

    # On a clone without the checkpoints (they are not committed), the records still stand.
    record = tmp_path / "records" / "confirmation" / "region_seed0.json"
    stamp = os.stat(record).st_mtime_ns
    os.remove(tmp_path / "runs" / "screen" / "region_seed0" / "model_final.pth")
    tool.main(argv(tmp_path, stage="confirmation", seeds=("0", "1"), settings=("region",)))
    assert os.stat(record).st_mtime_ns == stamp

    # The same seed trained from scratch for the confirmation scores exactly the same on test:
    # training does not depend on the evaluated split.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    again = tool.main(argv(fresh, stage="confirmation", seeds=("0",),
                           settings=("region",)))["confirmation"]["region"]["runs"][0]
    assert "trained_in" not in again
    np.testing.assert_equal(again["sem_seg"], reused["sem_seg"])  # NaN: a class never seen
    np.testing.assert_equal(again["diagnostics"], reused["diagnostics"])


def test_few_scenes_regime_trains_on_a_prefix_of_the_training_set(tiny_scenes):
    from detectron2.data import DatasetCatalog

    tool = load_tool()
    name = tool.register_few_scenes("exp_digit_scenes_train")
    assert DatasetCatalog.get(name) == DatasetCatalog.get("exp_digit_scenes_train")[:250]
    argv_ = tool.run_argv("region_few", 0, "out", {"train": "exp_digit_scenes_train",
                                                   "eval": "exp_digit_scenes_val"}, [])
    assert argv_[argv_.index("DATASETS.TRAIN") + 1] == f"('{name}',)"


def test_verdicts_compare_seed_by_seed_and_apply_the_target():
    tool = load_tool()

    def runs(setting, mious):
        return [{"setting": setting, "seed": k, "sem_seg": {"mIoU": v, "IoU-a": v},
                 "diagnostics": {"ncm_accuracy": 0.5}} for k, v in enumerate(mious)]

    summary = tool.summarise(runs("baseline", [60.0, 61.0, 59.0]) +
                             runs("no_projection", [62.5, 61.5, 62.0]) +
                             runs("region", [61.0, 62.0, 61.0]) +
                             runs("region_few", [70.0, 70.0]))  # no baseline_few: no verdict
    lines = tool.verdicts(summary)
    assert len(lines) == 2
    # +2.0 on average, per seed +2.5 +0.5 +3.0, 61.5-62.5 above 59.0-61.0: met.
    assert lines[0].startswith("- no_projection against baseline: +2.0 mIoU on average; per "
                               "seed +2.5, +0.5, +3.0; ranges 61.5-62.5 and 59.0-61.0 apart.")
    assert lines[0].endswith("**met**.")
    # +1.3 on average but 61.0 is inside the baseline's range: not met.
    assert "+1.3 mIoU" in lines[1] and "overlap" in lines[1] and lines[1].endswith("**not met**.")
