import json
import os

import numpy as np
import pytest
from PIL import Image

import region_contrast  # noqa: F401  (before Detectron2)
from region_contrast.data import digit_scenes as ds
from region_contrast.files import temp_path

from detectron2.data import DatasetCatalog, MetadataCatalog

ARGS = dict(num_train=12, num_val=6, num_test=5, size=64, seed=3, progress=False)


def _generate(root, **overrides):
    return ds.generate_digit_scenes(str(root), **{**ARGS, **overrides})


def _files(dataset_dir):
    """Relative path -> bytes of every file of a generated set."""
    out = {}
    for dirpath, _, names in os.walk(dataset_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, dataset_dir)] = f.read()
    return out


def _scene_paths(dataset_dir, split):
    image_dir = os.path.join(dataset_dir, "images", split)
    gt_dir = os.path.join(dataset_dir, "annotations", split)
    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".png"))
    return [(os.path.join(image_dir, n), os.path.join(gt_dir, n)) for n in names]


@pytest.fixture(scope="module")
def mnist():
    return ds.load_mnist_5k()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("scenes_a"))


def test_mnist_and_split(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    split = ds.split_digit_indices(labels)
    parts = [set(split[s].tolist()) for s in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(len(p) for p in parts) == 5000
    assert np.bincount(labels[split["train"]]).tolist() == [400] * 10
    assert np.bincount(labels[split["val"]]).tolist() == [50] * 10
    assert np.bincount(labels[split["test"]]).tolist() == [50] * 10
    again = ds.split_digit_indices(labels)
    assert all(np.array_equal(split[k], again[k]) for k in split)


def test_layout_and_labels(generated, mnist):
    _, labels = mnist
    assert os.path.isfile(os.path.join(generated, "manifest.json"))
    assert not os.path.exists(os.path.join(generated, "generation.json"))
    bg_fractions = []
    for split, n in (("train", 12), ("val", 6), ("test", 5)):
        pairs = _scene_paths(generated, split)
        assert len(pairs) == n
        rows = json.load(open(os.path.join(generated, f"digits_{split}.json")))
        assert len(rows) == n
        for (img_path, gt_path), scene_rows in zip(pairs, rows):
            img, gt = Image.open(img_path), Image.open(gt_path)
            assert img.mode == "RGB" and gt.mode == "L"
            assert img.size == gt.size == (64, 64)
            gt = np.asarray(gt)
            values = set(np.unique(gt).tolist())
            assert values <= set(range(11)) | {255}
            assert values & set(range(1, 11)), "scene without any digit pixels"
            # Foreground classes are among the digits drawn in this scene.
            assert values - {0, 255} <= {int(labels[r]) + 1 for r in scene_rows}
            assert 2 <= len(scene_rows) <= 6
            bg_fractions.append(np.mean(gt == 0))
    assert 0.6 < np.mean(bg_fractions) < 0.97
    assert min(bg_fractions) > 0.3


def test_train_val_test_digits_disjoint(generated, mnist):
    _, labels = mnist
    split = ds.split_digit_indices(labels)
    used = {}
    for s in ds.SPLITS:
        with open(os.path.join(generated, f"digits_{s}.json")) as f:
            used[s] = {r for scene in json.load(f) for r in scene}
    assert not (used["train"] & used["val"] or used["train"] & used["test"]
                or used["val"] & used["test"])
    for s in ds.SPLITS:
        assert used[s] <= set(split[s].tolist())


def test_deterministic(generated, tmp_path):
    assert _files(generated) == _files(_generate(tmp_path / "one"))
    # Rendering in worker processes gives the same bytes.
    assert _files(generated) == _files(_generate(tmp_path / "two", num_workers=2))


def test_scene_regenerates_alone(generated, mnist):
    images, labels = mnist
    pool = ds.split_digit_indices(labels)["val"]
    image, label, rows = ds.render_scene(ds.scene_rng(3, "val", 4), images, labels, pool, 64)
    _, gt_path = _scene_paths(generated, "val")[4]
    assert np.array_equal(np.asarray(Image.open(gt_path)), label)
    img_path = gt_path.replace("annotations", "images")
    assert np.array_equal(np.asarray(Image.open(img_path)), image)
    assert rows == json.load(open(os.path.join(generated, "digits_val.json")))[4]


def test_rerun_is_noop(tmp_path, capsys):
    out = _generate(tmp_path)
    mtimes = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in _files(out)}
    assert _generate(tmp_path) == out
    assert "nothing to do" in capsys.readouterr().out
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in _files(out)} == mtimes


def test_interrupted_run_is_completed(generated, tmp_path):
    out = _generate(tmp_path)
    # Simulate an interruption: no manifest yet, a few scenes missing, half-written leftovers.
    os.replace(os.path.join(out, "manifest.json"), os.path.join(out, "generation.json"))
    os.remove(os.path.join(out, "digits_val.json"))
    os.remove(os.path.join(out, "images", "train", "train_00003.png"))
    os.remove(os.path.join(out, "images", "val", "val_00005.png"))
    os.remove(os.path.join(out, "annotations", "val", "val_00005.png"))
    # What a writer killed mid-file leaves behind: its temporary file.
    stale = temp_path(os.path.join(out, "images", "train", "train_00007.png"))
    with open(stale, "wb") as f:
        f.write(b"partial")
    kept = os.path.join(out, "images", "train", "train_00001.png")
    kept_mtime = os.stat(kept).st_mtime_ns

    _generate(tmp_path)
    assert not os.path.exists(stale)
    assert os.stat(kept).st_mtime_ns == kept_mtime  # complete scenes are skipped
    assert _files(out) == _files(generated)


def test_mismatched_arguments_refused(tmp_path):
    out = _generate(tmp_path)
    with pytest.raises(ds.DigitScenesMismatchError, match="manifest.json") as err:
        _generate(tmp_path, seed=4)
    assert "delete" in str(err.value) and "DETECTRON2_DATASETS" in str(err.value)
    # A partial set with other arguments is refused as well.
    os.remove(os.path.join(out, "manifest.json"))
    with pytest.raises(ds.DigitScenesMismatchError, match="generation.json"):
        _generate(tmp_path, num_train=13)


def test_registration_loads(generated):
    root = os.path.dirname(generated)
    names = ds.register_digit_scenes(root, name_prefix="test_digit_scenes")
    try:
        assert names == ["test_digit_scenes_train", "test_digit_scenes_val",
                         "test_digit_scenes_test"]
        # Registering again (e.g. re-import) replaces instead of failing.
        ds.register_digit_scenes(root, name_prefix="test_digit_scenes")
        for name, n in zip(names, (12, 6, 5)):
            dicts = DatasetCatalog.get(name)
            assert len(dicts) == n
            for d in dicts:
                assert os.path.basename(d["file_name"]) == os.path.basename(d["sem_seg_file_name"])
                assert "/images/" in d["file_name"] and "/annotations/" in d["sem_seg_file_name"]
            meta = MetadataCatalog.get(name)
            assert len(meta.stuff_classes) == 11 and len(meta.stuff_colors) == 11
            assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_default_names_registered():
    assert {"digit_scenes_train", "digit_scenes_val", "digit_scenes_test"} <= set(
        DatasetCatalog.list())
    assert MetadataCatalog.get("digit_scenes_val").stuff_classes == ds.DIGIT_SCENES_CLASSES


def test_missing_data_error(tmp_path):
    names = ds.register_digit_scenes(str(tmp_path / "nowhere"), name_prefix="missing_scenes")
    try:
        with pytest.raises(FileNotFoundError) as err:
            DatasetCatalog.get("missing_scenes_train")
        msg = str(err.value)
        assert "missing_scenes_train" in msg and "nowhere" in msg
        assert "DETECTRON2_DATASETS" in msg and "python datasets/prepare_digit_scenes.py" in msg
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
