"""
Seeing what the model learns: demo/demo.py, tools/visualize_memory.py, the memory summary
functions and the TensorBoard summary hook, on a checkpoint trained for 3 iterations on a tiny
DigitScenes.
"""
import glob
import importlib.util
import os
import random
import types

import numpy as np
import pytest
import torch
from PIL import Image

import region_contrast  # noqa: F401
from conftest import build, make_cfg, single_thread
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.utils.events import EventStorage
from region_contrast.engine import main
from region_contrast.engine.hooks import MemorySummaryHook, build_memory_summary_hook
from region_contrast.memory_bank import RegionMemoryBank
from region_contrast.visualisation.memory_plots import FIGURE_PIXELS
from region_contrast.visualisation.memory_summary import (
    bank_from_state_dict,
    class_mean_cosine,
    class_means,
    project_2d,
    subsample_per_class,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(
    REPO, "configs", "DigitScenes",
    "deeplab_v3_plus_R_18_os32_region_contrast_digit_scenes_1500_bs8.yaml",
)
PREFIX = "tiny_digit_scenes"  # the session's tiny DigitScenes (conftest)
VAL = f"('{PREFIX}_val',)"
EVAL_PERIOD = 2
MAX_ITER = 3


def load_script(relative_path):
    path = os.path.join(REPO, relative_path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_picture(path, size=None):
    """The PNG exists, has ``size`` (width, height), and is not blank."""
    assert os.path.isfile(path), path
    image = Image.open(path)
    if size is not None:
        assert image.size == tuple(size), (path, image.size, size)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert pixels.std() > 10, f"{path} looks blank (pixel std {pixels.std():.1f})"
    assert len(np.unique(pixels, axis=0)) > 10, f"{path} has hardly any colours"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_scenes):
    """3 RegionContrast iterations (contrast on from the start), evaluated every 2."""
    out = tmp_path_factory.mktemp("vis_train")
    opts = [
        "DATASETS.TRAIN", f"('{PREFIX}_train',)",
        "DATASETS.TEST", VAL,
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(MAX_ITER),
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", str(EVAL_PERIOD),
        "MODEL.REGION_CONTRAST.WARMUP_ITERS", "0",
        "OUTPUT_DIR", str(out),
    ]
    args = default_argument_parser().parse_args(["--config-file", RECIPE, *opts])
    with single_thread():
        main(args)
    val_dir = os.path.dirname(DatasetCatalog.get(f"{PREFIX}_val")[0]["file_name"])
    return types.SimpleNamespace(
        out=out, checkpoint=str(out / "model_final.pth"), val_dir=val_dir,
        val_images=sorted(glob.glob(os.path.join(val_dir, "*.png"))),
    )


# ------------------------------------------------------------------------------------------
# demo/demo.py
# ------------------------------------------------------------------------------------------
def test_demo_writes_an_overlay_per_image(trained, tmp_path):
    demo = load_script("demo/demo.py")
    out = tmp_path / "overlays"
    first, *rest = trained.val_images
    inputs = [trained.val_dir, first, os.path.join(trained.val_dir, "val_0000[01].png")]
    with single_thread():
        written = demo.main([
            "--config-file", RECIPE, "--input", *inputs, "--output", str(out),
            "--opts", "MODEL.WEIGHTS", trained.checkpoint, "DATASETS.TEST", VAL,
        ])
    # The folder, the file and the pattern overlap: each image once, in the folder's order.
    names = [os.path.basename(p) for p in trained.val_images]
    assert [os.path.basename(p) for p in written] == names
    for image_path, overlay in zip(trained.val_images, written):
        # 128 px scenes are drawn 4x larger, so that the 10 px labels do not cover them.
        width, height = Image.open(image_path).size
        assert_picture(overlay, size=(4 * width, 4 * height))
    # --scale 1: the input's own size.
    written = demo.main([
        "--config-file", RECIPE, "--input", first, "--output", str(tmp_path / "same"),
        "--scale", "1", "--opts", "MODEL.WEIGHTS", trained.checkpoint, "DATASETS.TEST", VAL,
    ])
    assert_picture(written[0], size=Image.open(first).size)


def test_overlay_scale():
    demo = load_script("demo/demo.py")
    assert demo.overlay_scale(128, 128) == 4.0
    assert demo.overlay_scale(100, 300) == 6.0  # ceil(512 / 100)
    assert demo.overlay_scale(1024, 2048) == 1.0
    assert demo.overlay_scale(128, 128, 1.5) == 1.5


def test_demo_rejects_bad_input(trained, tmp_path):
    demo = load_script("demo/demo.py")
    common = ["--output", str(tmp_path / "o"), "--config-file", RECIPE]
    weights = ["--opts", "MODEL.WEIGHTS", trained.checkpoint, "DATASETS.TEST", VAL]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        demo.main([*common, "--input", str(tmp_path / "*.jpg"), *weights])
    with pytest.raises(FileNotFoundError, match="holds no image file"):
        demo.main([*common, "--input", str(tmp_path), *weights])
    with pytest.raises(ValueError, match="--scale"):
        demo.main([*common, "--input", trained.val_images[0], "--scale", "0", *weights])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        demo.main([*common, "--input", trained.val_images[0]])
    bad = tmp_path / "not_an_image.png"
    bad.write_text("plain text")
    with single_thread(), pytest.raises(ValueError, match="cannot read .*not_an_image.png"):
        demo.main([*common, "--input", str(bad), *weights])


# ------------------------------------------------------------------------------------------
# tools/visualize_memory.py
# ------------------------------------------------------------------------------------------
def test_visualize_memory_writes_both_figures(trained, tmp_path):
    tool = load_script("tools/visualize_memory.py")
    height, width = FIGURE_PIXELS
    written = tool.main([
        trained.checkpoint, "--config-file", RECIPE, "--output", str(tmp_path / "named"),
        "--opts", "DATASETS.TEST", VAL,
    ])
    assert sorted(os.path.basename(p) for p in written) == [
        "memory_projection.png", "memory_similarity.png"
    ]
    for path in written:
        assert_picture(path, size=(width, height))
    # Without a recipe the classes are numbered; t-SNE when scikit-learn is there.
    args = [trained.checkpoint, "--output", str(tmp_path / "numbered")]
    try:
        import sklearn  # noqa: F401

        args += ["--method", "tsne"]
    except ImportError:
        pass
    for path in tool.main(args):
        assert_picture(path, size=(width, height))


def test_visualize_memory_rejects_checkpoints_without_a_bank(tmp_path):
    tool = load_script("tools/visualize_memory.py")
    baseline = tmp_path / "baseline.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(1)}}, baseline)
    with pytest.raises(ValueError, match="ENABLED False"):
        tool.main([str(baseline), "--output", str(tmp_path / "a")])
    empty = tmp_path / "empty.pth"
    bank = RegionMemoryBank(3, 4, 2)
    torch.save({"model": {f"memory_bank.{k}": v for k, v in bank.state_dict().items()}}, empty)
    with pytest.raises(ValueError, match="is empty"):
        tool.main([str(empty), "--output", str(tmp_path / "b")])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tool.main([str(tmp_path / "missing.pth"), "--output", str(tmp_path / "c")])
    assert not os.path.exists(tmp_path / "a")


# ------------------------------------------------------------------------------------------
# TensorBoard summary during training
# ------------------------------------------------------------------------------------------
def test_training_writes_the_memory_summary_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained.out), size_guidance={"images": 0})
    events.Reload()
    height, width = FIGURE_PIXELS
    for tag in ("region_contrast/memory_similarity", "region_contrast/memory_projection"):
        assert tag in events.Tags()["images"], events.Tags()["images"]
        images = events.Images(tag)
        # After iteration 2 (the evaluation period) and after the last one (3); storage steps
        # count from 0.
        assert [e.step for e in images] == [EVAL_PERIOD - 1, MAX_ITER - 1]
        assert all((e.width, e.height) == (width, height) for e in images)


class _FakeTrainer:
    def __init__(self, max_iter, storage):
        self.iter, self.max_iter, self.storage = 0, max_iter, storage


def _filled_bank(num_classes=4, size=5, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = RegionMemoryBank(num_classes, size, dim)
    classes = torch.tensor([0, 0, 0, 1, 1, 2] * 2)  # class 3 stays empty
    bank.push(torch.randn(len(classes), dim, generator=g), classes)
    return bank


class _RecordingStorage(EventStorage):
    """Detectron2's EventStorage, also keeping what ``put_image`` received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images = []

    def put_image(self, img_name, img_tensor):
        self.images.append((img_name, img_tensor))
        super().put_image(img_name, img_tensor)


def test_summary_hook_schedule_images_and_no_side_effects():
    bank = _filled_bank()
    hook = MemorySummaryHook(3, bank, class_names=["bg", "a", "b", "c"])
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    with _RecordingStorage(0) as storage:
        hook.trainer = _FakeTrainer(max_iter=7, storage=storage)
        rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        due = []
        for it in range(7):
            hook.trainer.iter = it
            storage.iter = it
            count = len(storage.images)
            hook.after_step()
            if len(storage.images) > count:
                due.append(it)
        assert torch.equal(torch.get_rng_state(), rng[0])
        assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    assert due == [2, 5, 6]  # every 3rd iteration and the last
    names = [name for name, _ in storage.images]
    assert names == ["region_contrast/memory_projection", "region_contrast/memory_similarity"] * 3
    for _, image in storage.images:
        assert image.shape == (3, *FIGURE_PIXELS) and image.dtype == torch.float32
        assert 0 <= float(image.min()) and float(image.max()) <= 1 and float(image.std()) > 0.02
    for key, value in bank.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_summary_hook_only_with_a_bank_and_periodic_evaluation():
    cfg = make_cfg()
    cfg.TEST.EVAL_PERIOD = 5
    model = build(cfg)
    hook = build_memory_summary_hook(cfg, model)
    assert isinstance(hook, MemorySummaryHook) and hook.bank is model.memory_bank
    cfg.TEST.EVAL_PERIOD = 0
    assert build_memory_summary_hook(cfg, model) is None
    cfg = make_cfg(ENABLED=False)
    cfg.TEST.EVAL_PERIOD = 5
    assert build_memory_summary_hook(cfg, build(cfg)) is None


# ------------------------------------------------------------------------------------------
# region_contrast.visualisation.memory_summary
# ------------------------------------------------------------------------------------------
def test_bank_from_state_dict_matches_the_bank():
    bank = RegionMemoryBank(3, 4, 5, dtype=torch.float16)
    bank.push(torch.randn(9, 5), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 0]))  # class 0 wraps
    state = {f"module.memory_bank.{k}": v for k, v in bank.state_dict().items()}
    state["module.backbone.w"] = torch.zeros(2)
    rebuilt = bank_from_state_dict(state)
    assert rebuilt.dtype == torch.float16
    for a, b in zip(bank.snapshot(), rebuilt.snapshot()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ENABLED False"):
        bank_from_state_dict({"backbone.w": torch.zeros(2)})


def test_class_mean_cosine_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(20, 8, generator=g) * 3
    classes = torch.randint(0, 4, (20,), generator=g)
    classes[classes == 2] = 1  # class 2 gets no entry
    sim = class_mean_cosine(features, classes, num_classes=5)
    assert sim.dtype == torch.float64 and sim.shape == (5, 5)
    means = {}
    for c in range(5):
        rows = [features[i].double() / features[i].double().norm()
                for i in range(20) if int(classes[i]) == c]
        if rows:
            mean = sum(rows) / len(rows)
            means[c] = mean / mean.norm()
    for i in range(5):
        for j in range(5):
            if i in means and j in means:
                assert abs(float(sim[i, j]) - float(means[i] @ means[j])) < 1e-12
            else:  # a class without entries: NaN row and column
                assert torch.isnan(sim[i, j])
    assert torch.isnan(class_means(features, classes, 5)[2]).all()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_mean_cosine(features, classes, num_classes=3)


def test_subsample_per_class_is_even_and_bounded():
    classes = torch.tensor([2] * 10 + [0] * 3 + [1])
    keep = subsample_per_class(classes, 4)
    assert keep.tolist() == sorted(keep.tolist())
    assert torch.bincount(classes[keep]).tolist() == [3, 1, 4]
    assert keep[classes[keep] == 2].tolist() == [0, 3, 5, 8]  # every 2.5th of 10, from the first
    assert subsample_per_class(classes, 0).tolist() == list(range(14))


def test_pca_projection_matches_svd_and_draws_no_random_numbers():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(50, 6, generator=g) * torch.tensor([5.0, 3, 1, 1, 1, 1])
    state = torch.get_rng_state()
    projection = project_2d(features)
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.nn.functional.normalize(features.double(), dim=1).numpy()
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    reference = x @ vt[:2].T
    got = projection.coords.numpy()
    # Components are defined up to their sign.
    assert np.allclose(np.abs(got), np.abs(reference), atol=1e-9)
    assert np.allclose(projection.explained, (s[:2] ** 2) / (s ** 2).sum())
    assert torch.equal(project_2d(features).coords, projection.coords)  # deterministic
    assert project_2d(features[:0]).coords.shape == (0, 2)
    with pytest.raises(ValueError, match="'pca' or 'tsne'"):
        project_2d(features, method="umap")
