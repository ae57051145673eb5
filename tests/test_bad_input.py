"""
Bad input stops with a clear error: the file or key, the value found, what was expected, the fix.

Invalid ``MODEL.REGION_CONTRAST`` values are covered in tests/test_meta_arch.py
(``test_invalid_settings_are_rejected_naming_the_key``) and a missing DigitScenes root in
tests/test_digit_scenes.py (``test_missing_data_error``); not repeated here.
"""
import math
import os

import cv2
import numpy as np
import pytest
import torch

from conftest import make_cfg, single_thread, unregister  # imports region_contrast
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.evaluation import SemSegEvaluator
from region_contrast.data import digit_scenes as ds
from region_contrast.data.mapper import ValidatingDatasetMapper
from region_contrast.engine import Trainer
from region_contrast.evaluation import ValidatingSemSegEvaluator

K = 5  # classes of the fabricated data sets
SIZE = 64


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return str(path)


def sample(tmp_path, name="a", label=None, image_size=(SIZE, SIZE), seed=0):
    """Writes one RGB image and its label map; returns a Detectron2 dataset dict."""
    rng = np.random.default_rng(seed)
    if label is None:
        label = rng.integers(0, K, size=(SIZE, SIZE)).astype(np.uint8)
        label[:4] = 255
    image = rng.integers(0, 256, size=image_size + (3,)).astype(np.uint8)
    return {
        "file_name": write_png(tmp_path / "images" / f"{name}.png", image),
        "sem_seg_file_name": write_png(tmp_path / "labels" / f"{name}.png", label),
    }


def mapper(is_train=True):
    return ValidatingDatasetMapper(make_cfg(num_classes=K), is_train=is_train, augmentations=[])


def register(name, dicts):
    unregister([name])
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(
        stuff_classes=[str(i) for i in range(K)], ignore_label=255, evaluator_type="sem_seg"
    )


def assert_mentions(message, *parts):
    for part in parts:
        assert str(part) in message, f"{part!r} not in: {message}"


# --------------------------------------------------------------------------------------------
# Missing data
# --------------------------------------------------------------------------------------------
def test_missing_split_names_data_set_path_and_fix(tmp_path):
    # The root exists with its training split; the validation split was never generated.
    for folder in ("images", "annotations"):
        write_png(tmp_path / "digit_scenes" / folder / "train" / "train_00000.png",
                  np.zeros((8, 8), np.uint8))
    names = ds.register_digit_scenes(str(tmp_path), name_prefix="half_scenes")
    try:
        assert len(DatasetCatalog.get("half_scenes_train")) == 1
        with pytest.raises(FileNotFoundError) as err:
            DatasetCatalog.get("half_scenes_val")
        assert_mentions(
            str(err.value), "half_scenes_val", os.path.join(str(tmp_path), "digit_scenes"),
            os.path.join("annotations", "val"), "DETECTRON2_DATASETS",
            "python datasets/prepare_digit_scenes.py",
        )
    finally:
        unregister(names)


# --------------------------------------------------------------------------------------------
# Labels outside the classes
# --------------------------------------------------------------------------------------------
def test_mapper_rejects_labels_outside_the_classes(tmp_path):
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[10:20, 10:20] = 7
    label[30:32, 30:32] = 9
    label[40:, :] = 255  # ignore is fine
    d = sample(tmp_path, label=label)
    with pytest.raises(ValueError) as err:
        mapper()(d)
    assert_mentions(
        str(err.value), d["sem_seg_file_name"], "7 (100 px)", "9 (4 px)", f"[0, {K - 1}]",
        "NUM_CLASSES", "IGNORE_VALUE", "255", "Fix",
    )
    ok = sample(tmp_path, name="ok")
    out = mapper()(ok)  # valid classes and ignore pass, unchanged
    expected = cv2.imread(ok["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
    assert torch.equal(out["sem_seg"], torch.as_tensor(expected.astype(np.int64)))


def test_trainer_loader_validates_labels(tmp_path):
    dicts = [sample(tmp_path, name=f"s{i}", seed=i) for i in range(2)]
    bad = cv2.imread(dicts[1]["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
    bad[5, 5] = K  # one pixel is enough
    write_png(dicts[1]["sem_seg_file_name"], bad)
    register("bad_labels_train", dicts)
    try:
        cfg = make_cfg(num_classes=K)
        cfg.DATASETS.TRAIN = ("bad_labels_train",)
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.DATALOADER.NUM_WORKERS = 0
        with pytest.raises(ValueError) as err:
            next(iter(Trainer.build_train_loader(cfg)))
        assert_mentions(str(err.value), dicts[1]["sem_seg_file_name"], f"{K} (1 px)")
    finally:
        unregister(["bad_labels_train"])


def _outputs(pred):
    scores = torch.nn.functional.one_hot(torch.as_tensor(pred), K).permute(2, 0, 1).float()
    return [{"sem_seg": scores}]


def test_evaluator_rejects_labels_outside_the_classes(tmp_path):
    dicts = [sample(tmp_path, name=f"v{i}", seed=i) for i in range(3)]
    bad = cv2.imread(dicts[2]["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
    bad[0, :3] = [K, K + 1, 254]
    write_png(dicts[2]["sem_seg_file_name"], bad)
    register("bad_labels_val", dicts)
    try:
        evaluator = ValidatingSemSegEvaluator("bad_labels_val", distributed=False)
        evaluator.reset()
        pred = np.random.default_rng(0).integers(0, K, size=(SIZE, SIZE))
        for d in dicts[:2]:
            evaluator.process([{"file_name": d["file_name"]}], _outputs(pred))
        with pytest.raises(ValueError) as err:
            evaluator.process([{"file_name": dicts[2]["file_name"]}], _outputs(pred))
        assert_mentions(
            str(err.value), dicts[2]["sem_seg_file_name"], f"{K} (1 px)", f"{K + 1} (1 px)",
            "254 (1 px)", f"[0, {K - 1}]", "Fix",
        )
        # Predictions of another size than the ground truth: named, not a numpy broadcast error.
        with pytest.raises(ValueError, match="expected the same size") as err:
            evaluator.process([{"file_name": dicts[0]["file_name"]}], _outputs(pred[:, :40]))
        assert_mentions(str(err.value), dicts[0]["sem_seg_file_name"], "40x64", "64x64")
    finally:
        unregister(["bad_labels_val"])


def test_evaluator_matches_detectron2_on_valid_data(tmp_path):
    dicts = [sample(tmp_path, name=f"g{i}", seed=i) for i in range(3)]
    register("good_labels_val", dicts)
    try:
        evaluators = [
            cls("good_labels_val", distributed=False)
            for cls in (SemSegEvaluator, ValidatingSemSegEvaluator)
        ]
        rng = np.random.default_rng(1)
        for e in evaluators:
            e.reset()
        for d in dicts:
            pred = rng.integers(0, K, size=(SIZE, SIZE))
            for e in evaluators:
                e.process([{"file_name": d["file_name"]}], _outputs(pred))
        expected, got = (e.evaluate()["sem_seg"] for e in evaluators)
        # Key for key what the installed Detectron2 reports (boundary IoU too, on main), every
        # class present in these maps, so no metric may be NaN.
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert not math.isnan(got[key]), key
            assert got[key] == value, key
    finally:
        unregister(["good_labels_val"])


# --------------------------------------------------------------------------------------------
# Unreadable files and mismatched sizes
# --------------------------------------------------------------------------------------------
def test_image_and_label_of_different_sizes(tmp_path):
    d = sample(tmp_path, image_size=(SIZE, SIZE + 8))
    with pytest.raises(ValueError) as err:
        mapper()(d)
    assert_mentions(
        str(err.value), d["file_name"], d["sem_seg_file_name"], f"{SIZE + 8}x{SIZE}",
        f"{SIZE}x{SIZE}", "same size", "Fix",
    )


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "missing"])
@pytest.mark.parametrize("which", ["file_name", "sem_seg_file_name"])
def test_unreadable_files_are_named(tmp_path, damage, which):
    d = sample(tmp_path)
    path = d[which]
    if damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "not_an_image":
        open(path, "wb").write(b"this is not a PNG file\n" * 10)
    else:
        os.remove(path)
    expected = FileNotFoundError if damage == "missing" else OSError
    with pytest.raises(expected) as err:
        mapper()(d)
    assert_mentions(str(err.value), path, "Fix")


def test_colour_label_map_is_rejected(tmp_path):
    d = sample(tmp_path, label=np.zeros((SIZE, SIZE, 3), np.uint8))
    with pytest.raises(ValueError) as err:
        mapper()(d)
    assert_mentions(str(err.value), d["sem_seg_file_name"], "RGB", "single-channel", "prepare")


# --------------------------------------------------------------------------------------------
# A non-finite loss through the Trainer
# --------------------------------------------------------------------------------------------
class PoisonInputAt(HookBase):
    """From iteration ``j`` on, the input normalisation divides by zero: the loss is NaN."""

    def __init__(self, j):
        self.j = j
        self.bank_before = None

    def after_step(self):
        if self.trainer.iter == self.j - 1:
            bank = self.trainer.model.memory_bank
            self.bank_before = {k: v.clone() for k, v in bank.state_dict().items()}

    def before_step(self):
        if self.trainer.iter == self.j:
            self.trainer.model.pixel_std.zero_()


def test_non_finite_loss_stops_training_and_leaves_the_bank_clean(tmp_path):
    dicts = [sample(tmp_path, name=f"t{i}", seed=i) for i in range(4)]
    register("nan_train", dicts)
    try:
        cfg = make_cfg(num_classes=K)
        cfg.DATASETS.TRAIN = ("nan_train",)
        cfg.DATASETS.TEST = ()
        cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
        cfg.INPUT.MAX_SIZE_TRAIN = SIZE
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.SOLVER.MAX_ITER = 6
        cfg.SOLVER.WARMUP_ITERS = 1
        cfg.SOLVER.CHECKPOINT_PERIOD = 100
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.SEED = 0
        cfg.OUTPUT_DIR = str(tmp_path / "out")
        with single_thread():
            trainer = Trainer(cfg)
            poison = PoisonInputAt(j=3)
            trainer.register_hooks([poison])
            with pytest.raises(FloatingPointError, match="iteration=3"):
                trainer.train()
        bank = trainer.model.memory_bank
        assert int(bank.count.sum()) > 0 and poison.bank_before is not None
        assert torch.isfinite(bank.features).all()
        # Exactly the rows of iterations 0..j-1: the poisoned step pushed nothing.
        for key, value in bank.state_dict().items():
            assert torch.equal(value, poison.bank_before[key]), key
    finally:
        unregister(["nan_train"])
